import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton reads this when it is first imported (transformers imports it): without a GPU the kernel tests run in
    # Triton's interpreter, in this process rather than in a subprocess of their own.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# The package's code: the remote-code modules a model folder needs next to config.json.
CODE_FILES = [
    "configuration_bert.py", "modeling_bert.py", "bert_padding.py", "flash_attn_triton.py", "fused_ops.py",
    "triton_launch.py",
]
TOKENIZER_FILES = ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def tiny_config(**overrides):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(REPO), trust_remote_code=True, **{**TINY, **overrides})


def tiny_model(auto_class="AutoModelForMaskedLM", seed=0, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, auto_class)
    return cls.from_config(tiny_config(**overrides), trust_remote_code=True).eval()


def _load_script(relative_path, name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_export_onnx = None


def ragged_batch(lengths, vocab=99, seed=0, seqlen=None, device="cpu"):
    """Random ids with right padding: (len(lengths), seqlen) ids (0 at padding) and the 0/1 mask. The one
    builder, shared with scripts/export_onnx.py (which also makes token types and left padding)."""
    global _export_onnx
    if _export_onnx is None:
        _export_onnx = _load_script("scripts/export_onnx.py", "export_onnx_for_tests")
    batch = _export_onnx.ragged_batch(lengths, vocab, seqlen=seqlen, seed=seed)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def package_module(model, name="modeling_bert"):
    """The loaded remote-code module `name` that `model` came from."""
    package = type(model).__module__.rsplit(".", 1)[0]
    return sys.modules[f"{package}.{name}"]


@pytest.fixture
def repo():
    return REPO
