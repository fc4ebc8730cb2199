"""Loading the package the ways users do: Auto classes, save/load, the Hub's remote-code path, pipelines, Trainer."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from conftest import CODE_FILES, REPO, TOKENIZER_FILES, tiny_config, tiny_model
from reference import reference_encoder, reference_mlm_logits

AUTO_CLASSES = [
    "AutoModel",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMultipleChoice",
]


def hub_folder(tmp_path, name="hub"):
    """A folder laid out like the Hub repo: code, config and tokenizer files, no weights yet."""
    folder = tmp_path / name
    folder.mkdir()
    for f in CODE_FILES + TOKENIZER_FILES + ["config.json"]:
        shutil.copy(REPO / f, folder / f)
    return folder


def test_root_config_has_every_auto_class():
    config = json.loads((REPO / "config.json").read_text())
    assert config["model_type"] == "mosaic_bert"
    assert set(config["auto_map"]) == {"AutoConfig", *AUTO_CLASSES}


@pytest.mark.parametrize("auto_class", AUTO_CLASSES)
def test_save_and_load_round_trip_every_head(tmp_path, auto_class):
    model = tiny_model(auto_class, vocab_size=30528, num_labels=3)
    ids = torch.randint(1, 30000, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    if auto_class == "AutoModelForMultipleChoice":
        ids, mask = ids[None], mask[None]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved["auto_map"]) == {"AutoConfig", *AUTO_CLASSES}
    assert all((tmp_path / f).exists() for f in CODE_FILES)
    assert not list(tmp_path.glob("*.bin")), "weights are saved as safetensors only"
    loaded, info = getattr(transformers, auto_class).from_pretrained(
        tmp_path, trust_remote_code=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded.eval()
    with torch.no_grad():
        a, b = model(input_ids=ids, attention_mask=mask), loaded(input_ids=ids, attention_mask=mask)
    for key in a.keys():
        torch.testing.assert_close(a[key], b[key])


def test_upstream_checkpoint_loads_without_missing_keys_and_matches(tmp_path):
    """A pytorch_model.bin with the upstream key names and no tied decoder weight, as the Hub's."""
    folder = hub_folder(tmp_path)
    config = tiny_config(vocab_size=30528)
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    template = tiny_model(vocab_size=30528).state_dict()
    upstream = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in template.items()}
    del upstream["cls.predictions.decoder.weight"]
    torch.save(upstream, folder / "pytorch_model.bin")
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    ids = torch.randint(1, 30000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    ref = reference_mlm_logits(upstream, config, reference_encoder(upstream, config, ids, mask))
    valid = mask.bool()
    torch.testing.assert_close(logits[valid].double(), ref[valid], rtol=1e-5, atol=1e-5)


def test_loading_without_trust_remote_code_fails_loudly(tmp_path):
    folder = hub_folder(tmp_path)
    tiny_model(vocab_size=30528).save_pretrained(folder)
    with pytest.raises(ValueError):
        transformers.AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=False)


# As if triton were not installed: `import triton` raises ImportError and importlib.util.find_spec("triton") is None
# (transformers 4.x probes packages with find_spec when it is imported).
HIDE_TRITON = """
import sys
sys.modules["triton"] = None
"""


def test_hub_loading_path_without_triton(tmp_path):
    """transformers checks every relatively imported file's imports; triton must not be required."""
    folder = hub_folder(tmp_path)
    tiny_model(vocab_size=30528).save_pretrained(folder)
    script = HIDE_TRITON + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer
        from transformers.dynamic_module_utils import check_imports
        for f in {CODE_FILES!r}:
            check_imports({str(folder)!r} + "/" + f)
        model = AutoModelForMaskedLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        mod = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".flash_attn_triton"]
        assert mod.HAS_TRITON is False
        tok = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        batch = tok(["hello world", "a longer sentence here"], padding=True, return_tensors="pt")
        out = model(**batch)
        assert torch.isfinite(out.logits).all()
        print("ok")
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.fixture(scope="module")
def fill_mask(tmp_path_factory):
    folder = hub_folder(tmp_path_factory.mktemp("fm"))
    tiny_model(vocab_size=30528).save_pretrained(folder)
    return transformers.pipeline("fill-mask", model=str(folder), trust_remote_code=True)


def test_fill_mask_pipeline_single_and_several_masks(fill_mask):
    top = fill_mask("the cat sat on the [MASK].", top_k=3)
    assert len(top) == 3 and all(set(r) >= {"score", "token", "token_str", "sequence"} for r in top)
    scores = [r["score"] for r in top]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1
    # The pipeline's scores are the model's softmax at the mask.
    tok, model = fill_mask.tokenizer, fill_mask.model
    enc = tok("the cat sat on the [MASK].", return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits[0, enc["input_ids"][0].tolist().index(tok.mask_token_id)].softmax(-1)
    assert top[0]["token"] == int(probs.argmax())
    assert top[0]["score"] == pytest.approx(float(probs.max()), rel=1e-4)

    several = fill_mask("[MASK] cat sat on the [MASK].", top_k=2)
    assert len(several) == 2 and all(len(r) == 2 for r in several)
    batched = fill_mask(["a [MASK] day.", "the [MASK] is blue and [MASK]."], top_k=1)
    assert len(batched) == 2
    targeted = fill_mask("the cat sat on the [MASK].", targets=["mat", "dog"])
    assert {r["token_str"] for r in targeted} == {"mat", "dog"}


def test_fill_mask_pipeline_without_mask_raises(fill_mask):
    with pytest.raises(Exception, match="(?i)mask"):
        fill_mask("there is no mask token here.")


def test_fill_mask_pipeline_batched_equals_one_by_one(fill_mask):
    """Batches pad the shorter inputs; results must not depend on the batch (the model unpads)."""
    texts = ["a [MASK] day.", "the sky over the old harbour is [MASK] and grey today.", "[MASK]!"]
    single = [fill_mask(t, top_k=3) for t in texts]
    for batch_size in (2, 3):
        batched = fill_mask(texts, top_k=3, batch_size=batch_size)
        assert len(batched) == len(texts)
        for ours, theirs in zip(batched, single):
            assert [r["token"] for r in ours] == [r["token"] for r in theirs]
            assert [r["score"] for r in ours] == pytest.approx([r["score"] for r in theirs], rel=1e-4, abs=1e-7)


def test_fill_mask_pipeline_targets_with_top_k_and_duplicates(fill_mask):
    text = "the cat sat on the [MASK]."
    every = {r["token_str"]: r["score"] for r in fill_mask(text, targets=["mat", "dog", "house"])}
    assert set(every) == {"mat", "dog", "house"}
    best = fill_mask(text, targets=["mat", "dog", "house"], top_k=1)
    assert len(best) == 1 and best[0]["token_str"] == max(every, key=every.get)
    assert best[0]["score"] == pytest.approx(every[best[0]["token_str"]], rel=1e-5)
    assert {r["token_str"] for r in fill_mask(text, targets=["mat", "mat", "dog"], top_k=10)} == {"mat", "dog"}
    with pytest.raises(ValueError):
        fill_mask(text, targets=[])


def test_fill_mask_pipeline_several_masks_each_ranked(fill_mask):
    """One ranked list per mask, each from the model's softmax at that mask; the other mask stays in `sequence`."""
    text = "[MASK] cat sat on the [MASK]."
    results = fill_mask(text, top_k=3)
    tok, model = fill_mask.tokenizer, fill_mask.model
    enc = tok(text, return_tensors="pt")
    positions = (enc["input_ids"][0] == tok.mask_token_id).nonzero().flatten().tolist()
    with torch.no_grad():
        probs = model(**enc).logits[0].softmax(-1)
    assert len(results) == len(positions) == 2
    for per_mask, position in zip(results, positions):
        assert [r["token"] for r in per_mask] == probs[position].topk(3).indices.tolist()
        assert [r["score"] for r in per_mask] == pytest.approx(probs[position].topk(3).values.tolist(), rel=1e-4)
        assert all(r["sequence"].count("[MASK]") == 1 and r["token_str"] in r["sequence"] for r in per_mask)


def _trainer_loss_falls(auto_class, labels_fn, **config):
    from torch.utils.data import Dataset

    class Toy(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.rows = []
            for i in range(32):
                n = 3 + i % 6
                ids = torch.randint(1, 99, (n,), generator=g).tolist()
                self.rows.append({"input_ids": ids, "labels": labels_fn(i, ids)})

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    def collate(rows):
        s = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [0] * (s - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}

    model = tiny_model(auto_class, **config)
    data = Toy()
    batch = collate(data.rows)
    with torch.no_grad():
        before = model(**batch).loss.item()
    args = transformers.TrainingArguments(
        output_dir="unused", use_cpu=True, max_steps=40, per_device_train_batch_size=8, learning_rate=3e-3,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )
    transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate).train()
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < 0.7 * before, (before, after)


def test_trainer_classification(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _trainer_loss_falls("AutoModelForSequenceClassification", lambda i, ids: ids[0] % 2, num_labels=2)


def test_trainer_regression(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _trainer_loss_falls("AutoModelForSequenceClassification", lambda i, ids: ids[0] / 50.0 - 1.0, num_labels=1)


def test_trainer_multi_label(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _trainer_loss_falls(
        "AutoModelForSequenceClassification",
        lambda i, ids: [float(ids[0] % 2), float(ids[0] % 3 == 0), 1.0],
        num_labels=3,
        problem_type="multi_label_classification",
    )


def test_trainer_gradient_accumulation_2x4_equals_1x8(tmp_path, monkeypatch):
    """Through Trainer: the MLM loss honours num_items_in_batch, so accumulation is not inflated."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        ids = torch.randint(1, 99, (12,), generator=g)
        labels = torch.where(torch.rand(12, generator=g) < 0.15 + 0.05 * i, ids, -100)
        rows.append({"input_ids": ids, "labels": labels})

    def collate(batch):
        return {k: torch.stack([r[k] for r in batch]) for k in batch[0]}

    def run(per_device, accumulation):
        model = tiny_model(seed=1)
        args = transformers.TrainingArguments(
            output_dir="unused", use_cpu=True, max_steps=1, per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation, learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant",
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, weight_decay=0.0,
            max_grad_norm=0.0,
        )
        transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
        return model.state_dict()

    a, b = run(8, 1), run(4, 2)
    initial = tiny_model(seed=1).state_dict()
    assert any(not torch.equal(a[k], initial[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)
