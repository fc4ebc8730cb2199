"""convert/convert_checkpoint.py: each upstream layout converts into a folder that loads through the Auto API.

Hub and Composer layouts are written here from a tiny model of this package, so a conversion must give back
identical outputs. A stock transformers BERT maps only in part: the mapped tensors must be equal, the rest fresh.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "convert"))

import convert_checkpoint as cc  # noqa: E402

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
        "hidden_dropout_prob": 0.0}
IDS = torch.tensor([[101, 1996, 4937, 2003, 103, 1012, 102, 0], [101, 2307, 3899, 102, 0, 0, 0, 0]])
MASK = (IDS != 0).long()


def ours(auto_class="AutoModelForMaskedLM", seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.AutoConfig.from_pretrained(str(REPO), trust_remote_code=True, **{**TINY, **overrides})
    return getattr(transformers, auto_class).from_config(config, trust_remote_code=True).eval()


def outputs(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def upstream_config(**extra):
    """What the Hub repo's config.json looks like: the stock model_type and the sizes."""
    return {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 30528, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
            "attention_probs_dropout_prob": 0.1, "alibi_starting_size": 512, **extra}


def load(path, auto_class="AutoModelForMaskedLM"):
    model, info = getattr(transformers, auto_class).from_pretrained(
        str(path), trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------------------
def test_hub_pytorch_model_bin_round_trip(tmp_path):
    model = ours()
    src = tmp_path / "hub"
    src.mkdir()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps(upstream_config()))
    report = cc.main(["--input", str(src), "--output", str(tmp_path / "out")])
    assert report["format"] == "hub" and report["auto_class"] == "AutoModelForMaskedLM"
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "modeling_bert.py").is_file()
    assert (out / "tokenizer.json").is_file()
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "mosaic_bert" and "AutoModelForMaskedLM" in saved["auto_map"]
    assert saved["attention_probs_dropout_prob"] == 0.0
    assert torch.equal(outputs(load(out)), outputs(model))


def test_hub_sequence_classification_round_trip(tmp_path):
    model = ours("AutoModelForSequenceClassification", num_labels=3)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    report = cc.main(["--input", str(tmp_path / "pytorch_model.bin"), "--output", str(tmp_path / "out"),
                      "--num_attention_heads", "2"])
    assert report["auto_class"] == "AutoModelForSequenceClassification"
    converted = load(tmp_path / "out", "AutoModelForSequenceClassification")
    assert converted.config.num_labels == 3
    assert torch.equal(outputs(converted), outputs(model))


def test_composer_checkpoint_round_trip(tmp_path):
    model = ours(seed=1)
    state = {
        "state": {
            "model": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizers": {"DecoupledAdamW": {"state": {}, "param_groups": []}},
            "timestamp": {"epoch": 1, "batch": 100},
        },
        "rng": [{"torch": torch.get_rng_state()}],
    }
    torch.save(state, tmp_path / "ep1-ba100-rank0.pt")
    report = cc.main(["--input", str(tmp_path / "ep1-ba100-rank0.pt"), "--output", str(tmp_path / "out"),
                      "--num_attention_heads", "2"])
    assert report["format"] == "composer"
    assert torch.equal(outputs(load(tmp_path / "out")), outputs(model))


def test_composer_checkpoint_with_pickled_objects_needs_unsafe_pickle(tmp_path):
    model = ours(seed=2)
    state = {"state": {"model": {f"model.{k}": v for k, v in model.state_dict().items()}},
             "config": argparse.Namespace(run_name="x")}  # an arbitrary object: refused by weights_only
    torch.save(state, tmp_path / "latest.pt")
    with pytest.raises(ValueError, match="--unsafe-pickle"):
        cc.main(["--input", str(tmp_path / "latest.pt"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    cc.main(["--input", str(tmp_path / "latest.pt"), "--output", str(tmp_path / "out"), "--unsafe_pickle",
             "--num_attention_heads", "2"])
    assert torch.equal(outputs(load(tmp_path / "out")), outputs(model))


def test_stock_bert_maps_what_it_can(tmp_path):
    torch.manual_seed(3)
    stock = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128))
    stock.save_pretrained(tmp_path / "stock")
    report = cc.main(["--input", str(tmp_path / "stock"), "--output", str(tmp_path / "out")])
    assert report["format"] == "hf_bert" and report["vocab_resized"] == [30522, 30528]
    assert any("position_embeddings" in line for line in report["dropped"])
    assert any("mlp.gated_layers" in line for line in report["fresh"])
    converted = load(tmp_path / "out")
    got, src = converted.state_dict(), stock.state_dict()

    words = got["bert.embeddings.word_embeddings.weight"]
    assert words.shape == (30528, 64)
    assert torch.equal(words[:30522], src["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(words[30522:], torch.zeros(6, 64)), "added vocabulary rows are zero"
    assert torch.equal(got["cls.predictions.decoder.weight"], words), "decoder stays tied"
    bias = got["cls.predictions.decoder.bias"]
    assert torch.equal(bias[:30522], src["cls.predictions.bias"])
    assert (bias[30522:] == src["cls.predictions.bias"].min()).all()
    for name in ("token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"):
        assert torch.equal(got[f"bert.embeddings.{name}"], src[f"bert.embeddings.{name}"])
    for i in range(2):
        p = f"bert.encoder.layer.{i}."
        for part in ("weight", "bias"):
            qkv = torch.cat([src[f"{p}attention.self.{n}.{part}"] for n in ("query", "key", "value")])
            assert torch.equal(got[f"{p}attention.self.Wqkv.{part}"], qkv)
            assert torch.equal(got[f"{p}attention.output.dense.{part}"], src[f"{p}attention.output.dense.{part}"])
            assert torch.equal(got[f"{p}attention.output.LayerNorm.{part}"],
                               src[f"{p}attention.output.LayerNorm.{part}"])
            assert torch.equal(got[f"{p}mlp.layernorm.{part}"], src[f"{p}output.LayerNorm.{part}"])
        # The MLP has no counterpart: freshly initialised, not a reshaped copy of the stock MLP.
        assert got[f"{p}mlp.gated_layers.weight"].shape == (256, 64)
        assert not torch.equal(got[f"{p}mlp.wo.weight"], src[f"{p}output.dense.weight"])
    for name in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
        assert torch.equal(got[f"cls.predictions.transform.{name}"], src[f"cls.predictions.transform.{name}"])


def test_vocab_can_shrink(tmp_path):
    model = ours(seed=4)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(upstream_config()))
    cc.main(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--vocab-size", "30522"])
    converted = load(tmp_path / "out")
    assert converted.config.vocab_size == 30522
    assert torch.equal(converted.bert.embeddings.word_embeddings.weight,
                       model.bert.embeddings.word_embeddings.weight[:30522])
    # A narrower decoder matmul may block the sums differently: equal up to float rounding.
    torch.testing.assert_close(outputs(converted), outputs(model)[..., :30522], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        cc.main(["--input", str(tmp_path), "--output", str(tmp_path / "out2"), "--vocab_size", "30000"])


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written
# ----------------------------------------------------------------------------------------------------------------
def test_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        cc.main(["--input", str(tmp_path / "nothing.bin"), "--output", str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No checkpoint in folder"):
        cc.main(["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_another_architecture_is_refused(tmp_path):
    gpt2_like = {"transformer.h.0.attn.c_attn.weight": torch.zeros(64, 192), "transformer.wte.weight": torch.zeros(
        10, 64)}
    torch.save(gpt2_like, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="No recognisable BERT keys.*transformer.h.0.attn.c_attn.weight"):
        cc.main(["--input", str(tmp_path / "pytorch_model.bin"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_key(tmp_path):
    sd = ours(seed=5).state_dict()
    sd["bert.encoder.layer.1.attention.output.dense.weight"] = torch.zeros(64, 32)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"layer\.1\.attention\.output\.dense\.weight.*\(64, 32\).*\(64, 64\)"):
        cc.main(["--input", str(tmp_path / "pytorch_model.bin"), "--output", str(tmp_path / "out"),
                 "--num_attention_heads", "2"])
    assert not (tmp_path / "out").exists()


def test_missing_key_and_config_disagreement_are_named(tmp_path):
    sd = ours(seed=6).state_dict()
    del sd["bert.encoder.layer.0.mlp.wo.bias"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="lacks.*layer.0.mlp.wo.bias"):
        cc.main(["--input", str(tmp_path / "pytorch_model.bin"), "--output", str(tmp_path / "out"),
                 "--num_attention_heads", "2"])
    torch.save(ours(seed=6).state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(upstream_config(num_hidden_layers=12)))
    with pytest.raises(ValueError, match="num_hidden_layers=12 but the weights have 2"):
        cc.main(["--input", str(tmp_path), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_output_folder_is_not_clobbered(tmp_path):
    torch.save(ours(seed=7).state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        cc.main(["--input", str(tmp_path / "pytorch_model.bin"), "--output", str(tmp_path / "out")])
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_runs_as_a_command(tmp_path):
    model = ours(seed=8)
    src = tmp_path / "hub"
    src.mkdir()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps(upstream_config()))
    proc = subprocess.run([sys.executable, str(REPO / "convert" / "convert_checkpoint.py"), "--input", str(src),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Converted" in proc.stdout
    assert torch.equal(outputs(load(tmp_path / "out")), outputs(model))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, value):
    sd = ours(seed=9).state_dict()
    sd["bert.encoder.layer.1.mlp.wo.weight"][3, 5] = value
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"tensor 'bert.encoder.layer.1.mlp.wo.weight' holds 1 non-finite value"):
        cc.main(["--input", str(tmp_path / "pytorch_model.bin"), "--output", str(tmp_path / "out"),
                 "--num-attention-heads", "2"])
    assert not (tmp_path / "out").exists()


def _sharded_checkpoint(folder: Path, seed: int) -> tuple[torch.nn.Module, dict]:
    """A two-shard safetensors checkpoint with its index, as save_pretrained writes one."""
    from safetensors.torch import save_file

    model = ours(seed=seed)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "cls.predictions.decoder.weight"}
    keys = sorted(sd)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "config.json").write_text(json.dumps(upstream_config()))
    return model, weight_map


def _write_index(folder: Path, weight_map: dict):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_safetensors_round_trip(tmp_path):
    model, weight_map = _sharded_checkpoint(tmp_path / "src", seed=10)
    _write_index(tmp_path / "src", weight_map)
    cc.main(["--input", str(tmp_path / "src"), "--output", str(tmp_path / "out")])
    assert torch.equal(outputs(load(tmp_path / "out")), outputs(model))


@pytest.mark.parametrize("escape", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE",
                                    "..\\outside.safetensors"])
def test_shard_paths_outside_the_input_folder_are_refused(tmp_path, escape):
    src = tmp_path / "ckpt" / "src"
    _, weight_map = _sharded_checkpoint(src, seed=11)
    # A real file outside the folder, so only the path check can stop it being read.
    shutil.copy(src / "model-00002-of-00002.safetensors", tmp_path / "ckpt" / "outside.safetensors")
    shard = str(tmp_path / "ckpt" / "outside.safetensors") if escape == "ABSOLUTE" else escape
    _write_index(src, {k: (shard if v.startswith("model-00002") else v) for k, v in weight_map.items()})
    with pytest.raises(ValueError, match=r"names the shard .*outside.safetensors.*, which is outside the checkpoint"):
        cc.main(["--input", str(src), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_bad_input_on_the_command_line_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "convert" / "convert_checkpoint.py"), "--input",
                           str(tmp_path / "nothing.bin"), "--output", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "convert_checkpoint.py: error: Input checkpoint not found" in proc.stderr
    assert "Traceback" not in proc.stderr
