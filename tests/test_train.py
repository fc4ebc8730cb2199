"""Pretraining data pipeline, pretrain.py (single process, resume, DDP over gloo) and finetune_glue.py, on CPU.

Everything runs on text and TSVs written here, with tiny models (2 layers × 64 hidden) and the package tokenizer.
"""

import json
import lzma
import math
import os
import random
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))

import finetune_glue  # noqa: E402
import mlm_data  # noqa: E402
import pretrain  # noqa: E402

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
        "hidden_dropout_prob": 0.0}


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: text, tokenizer, a tiny config file
# ----------------------------------------------------------------------------------------------------------------
ADJ = "red green small large old new happy quiet bright dark".split()
NOUN = "cat dog house tree river car bird city book garden".split()
VERB = "sees likes finds follows visits watches helps builds".split()


def _documents(n_docs, seed):
    rng = random.Random(seed)

    def sentence():
        return (f"The {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} the {rng.choice(ADJ)} "
                f"{rng.choice(NOUN)}.")

    return [[" ".join(sentence() for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(2, 5))]
            for _ in range(n_docs)]


def _write_corpus(path: Path, docs):
    text = "\n\n".join("\n".join(paragraphs) for paragraphs in docs) + "\n"
    if path.name.endswith(".xz"):
        with lzma.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "train").mkdir()
    _write_corpus(root / "train" / "part-0.txt", _documents(150, 0))
    _write_corpus(root / "train" / "part-1.txt.xz", _documents(150, 1))
    _write_corpus(root / "valid.txt.xz", _documents(20, 2))
    return root


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(REPO), trust_remote_code=True)


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def _pretrain_argv(corpus, config, out, cache, *extra):
    return ["--config", str(config), "--train_files", str(corpus / "train"), "--output_dir", str(out),
            "--cache_dir", str(cache), "--num_proc", "1", "--dataloader_num_workers", "0", "--max_seq_len", "32",
            "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--logging_steps", "10",
            "--disable_tqdm", *extra]


# ----------------------------------------------------------------------------------------------------------------
# Reading and tokenizing text
# ----------------------------------------------------------------------------------------------------------------
def test_resolve_text_files_folder_glob_and_errors(corpus, tmp_path):
    files = mlm_data.resolve_text_files([str(corpus / "train")])
    assert [f.name for f in files] == ["part-0.txt", "part-1.txt.xz"]
    assert mlm_data.resolve_text_files(str(corpus / "train" / "*.xz"))[0].name == "part-1.txt.xz"
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        mlm_data.resolve_text_files([str(tmp_path / "nowhere.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No .* files in folder"):
        mlm_data.resolve_text_files([str(tmp_path / "empty")])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="not a text file"):
        mlm_data.resolve_text_files([str(tmp_path / "data.csv")])


def test_split_documents_formats():
    text = "p1 a\np1 b\n\np2 a\n\n\np3\n"
    assert mlm_data.split_documents(text, "auto") == [["p1 a", "p1 b"], ["p2 a"], ["p3"]]
    assert mlm_data.split_documents("one\ntwo\nthree\n", "auto") == [["one"], ["two"], ["three"]]
    assert mlm_data.split_documents(text, "line") == [["p1 a"], ["p1 b"], ["p2 a"], ["p3"]]
    with pytest.raises(ValueError, match="Unknown document format"):
        mlm_data.split_documents(text, "paragraphs")


def test_tokenize_cache_matches_tokenizer_and_is_reused(corpus, tokenizer, tmp_path, monkeypatch):
    files = mlm_data.resolve_text_files([str(corpus / "train")])
    first = mlm_data.tokenize_to_cache(mlm_data.TextFiles(files), tokenizer, tmp_path, num_proc=1, log=lambda *a: None)
    docs = _documents(150, 0)
    assert first.num_documents == 300
    for i in (0, 7, 149):
        expected = tokenizer("\n".join(docs[i]), add_special_tokens=False)["input_ids"]
        assert first.tokens[first.doc_offsets[i]:first.doc_offsets[i + 1]].tolist() == expected
    assert first.tokens.dtype == np.uint16
    messages = []
    again = mlm_data.tokenize_to_cache(mlm_data.TextFiles(files), tokenizer, tmp_path, num_proc=1, log=messages.append)
    assert again.path == first.path and messages and "cached" in messages[0]
    # A process pool gives the same tokens (it is only a speed-up); these files are small enough to skip it.
    monkeypatch.setattr(mlm_data, "SMALL_INPUT_BYTES", 0)
    pooled = mlm_data.tokenize_to_cache(mlm_data.TextFiles(files), tokenizer, tmp_path / "pool", num_proc=2,
                                        log=lambda *a: None)
    assert np.array_equal(np.asarray(pooled.tokens), np.asarray(first.tokens))
    assert np.array_equal(pooled.doc_offsets, first.doc_offsets)


def test_empty_text_file_is_an_error(tokenizer, tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="blank.txt.*empty"):
        mlm_data.tokenize_to_cache(mlm_data.TextFiles([tmp_path / "blank.txt"]), tokenizer, tmp_path / "c",
                                   log=lambda *a: None)


@pytest.mark.parametrize("packing", ["concat", "document"])
def test_sequences_are_cls_body_sep_and_cover_the_text(corpus, tokenizer, tmp_path, packing):
    files = mlm_data.resolve_text_files([str(corpus / "valid.txt.xz")])
    c = mlm_data.tokenize_to_cache(mlm_data.TextFiles(files), tokenizer, tmp_path, log=lambda *a: None)
    seqs = mlm_data.TokenSequences(c, 17, tokenizer.cls_token_id, tokenizer.sep_token_id, packing)
    items = [seqs[i]["input_ids"] for i in range(len(seqs))]
    assert all(len(x) <= 17 and x[0] == tokenizer.cls_token_id and x[-1] == tokenizer.sep_token_id for x in items)
    bodies = np.concatenate([x[1:-1] for x in items])
    if packing == "concat":
        # every sequence but the last is full; the stream is the documents, each followed by [SEP]
        assert all(len(x) == 17 for x in items[:-1])
        assert len(bodies) == c.num_tokens + c.num_documents
        assert (bodies == tokenizer.sep_token_id).sum() == c.num_documents
    else:
        assert np.array_equal(bodies, np.asarray(c.tokens).astype(np.int64))
    assert seqs.num_tokens == sum(len(x) for x in items)


# ----------------------------------------------------------------------------------------------------------------
# Collator and masking
# ----------------------------------------------------------------------------------------------------------------
def test_collator_never_pads(tokenizer):
    collator = mlm_data.FlatMLMCollator.from_tokenizer(tokenizer, 0.3)
    lengths = [1 + 2, 17, 5, 128, 64]
    examples = [{"input_ids": np.concatenate([[101], np.random.randint(1000, 2000, n - 2), [102]])}
                for n in lengths]
    batch = collator(examples)
    total = sum(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert batch["max_seqlen"] == max(lengths) and isinstance(batch["max_seqlen"], int)
    expected_positions = np.concatenate([np.arange(n) for n in lengths])
    assert batch["position_ids"][0].tolist() == expected_positions.tolist()
    assert not (batch["input_ids"] == tokenizer.pad_token_id).any()
    original = torch.cat([torch.as_tensor(e["input_ids"]) for e in examples])
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert (batch["labels"][0][special] == -100).all(), "special tokens are never masked"
    scored = batch["labels"][0] != -100
    assert torch.equal(batch["labels"][0][scored], original[scored])


def test_masking_rates(tokenizer):
    collator = mlm_data.FlatMLMCollator.from_tokenizer(tokenizer, 0.3)
    torch.manual_seed(0)
    ids = torch.randint(1000, 30000, (200_000,))
    masked, labels = collator.mask(ids)
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.3) < 0.01
    to_mask = (masked == tokenizer.mask_token_id) & chosen
    unchanged = (masked == ids) & chosen
    assert abs(to_mask.sum().item() / chosen.sum().item() - 0.8) < 0.01
    assert abs(unchanged.sum().item() / chosen.sum().item() - 0.1) < 0.01  # (+ the rare random == original)
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_a_batch_always_predicts_something(tokenizer):
    collator = mlm_data.FlatMLMCollator.from_tokenizer(tokenizer, 0.01)
    for seed in range(20):
        torch.manual_seed(seed)
        batch = collator([{"input_ids": np.array([101, 2000, 2001, 102])}])
        assert (batch["labels"] != -100).sum() >= 1


def test_validation_masking_is_fixed(corpus, tokenizer, tmp_path):
    files = mlm_data.resolve_text_files([str(corpus / "valid.txt.xz")])
    c = mlm_data.tokenize_to_cache(mlm_data.TextFiles(files), tokenizer, tmp_path, log=lambda *a: None)
    seqs = mlm_data.TokenSequences(c, 32, tokenizer.cls_token_id, tokenizer.sep_token_id)
    collator = mlm_data.FlatMLMCollator.from_tokenizer(tokenizer, 0.3)
    a = mlm_data.FixedMaskDataset(seqs, collator, 0.15, seed=1)
    b = mlm_data.FixedMaskDataset(seqs, collator, 0.15, seed=1)
    for i in (0, 5):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(a[i]["labels"], b[i]["labels"])
    rate = np.mean([(a[i]["labels"] != -100).float().mean().item() for i in range(len(a))])
    assert 0.08 < rate < 0.2
    batch = collator([a[0], a[1]])
    assert torch.equal(batch["labels"][0], torch.cat([a[0]["labels"], a[1]["labels"]])), "eval labels kept"


# ----------------------------------------------------------------------------------------------------------------
# Schedule and budget
# ----------------------------------------------------------------------------------------------------------------
def test_linear_schedule_warmup_then_decay():
    s = pretrain.LinearSchedule(0.06, total_steps=100)
    assert s(0) == 0.0 and s(3) == pytest.approx(0.5) and s(6) == pytest.approx(1.0)
    assert s(53) == pytest.approx(0.5) and s(100) == 0.0 and s(150) == 0.0


def test_time_budget_sets_total_steps_from_throughput(monkeypatch):
    from transformers import TrainerControl, TrainerState

    clock = [1000.0]
    monkeypatch.setattr(pretrain.time, "time", lambda: clock[0])
    schedule = pretrain.LinearSchedule(0.06, total_steps=None)
    budget = pretrain.TrainingBudget(schedule, max_minutes=1.0, step_cap=None)
    state, control = TrainerState(), TrainerControl()
    state.max_steps = 10**9
    args = types.SimpleNamespace(device=torch.device("cpu"))
    budget.on_train_begin(args, state, control)
    for step in range(1, 51):  # 0.5 s per step (0.25 s for the first ten) → 110 steps fit in the minute
        clock[0] += 0.25 if step <= 10 else 0.5
        state.global_step = step
        budget.on_step_end(args, state, control)
        if step < 50:
            assert schedule.total_steps is None and state.max_steps == 10**9
    assert schedule.total_steps == state.max_steps == 50 + 2 * (60 - 22.5)
    assert not control.should_training_stop and not control.should_save
    state.global_step = 51  # not a revision step; the Trainer's own flow stops at max_steps
    control.should_training_stop = True
    budget.on_step_end(args, state, control)
    assert control.should_save, "a budget run always leaves a checkpoint to resume from"
    control.should_training_stop = control.should_save = False
    clock[0] += 60.0  # out of time
    state.global_step = 100
    budget.on_step_end(args, state, control)
    assert control.should_training_stop and control.should_save


# ----------------------------------------------------------------------------------------------------------------
# pretrain.py end to end
# ----------------------------------------------------------------------------------------------------------------
def test_pretrain_lowers_loss_and_saves_a_loadable_checkpoint(corpus, tiny_config_file, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out = tmp_path / "run"
    summary = pretrain.main(_pretrain_argv(
        corpus, tiny_config_file, out, tmp_path / "cache", "--valid_files", str(corpus / "valid.txt.xz"),
        "--max_steps", "30", "--max_valid_sequences", "32", "--save_steps", "1000",
    ))
    assert summary["steps"] == 30
    assert summary["tokens_seen_this_run"] == 30 * 8 * 32  # concat packing: every sequence is full
    # Uniform guessing over the vocabulary scores ln(30528) ≈ 10.3; 30 steps on this tiny language do far better.
    assert summary["final_valid_mlm_loss"] < math.log(30528) - 3
    assert summary["final_valid_mlm_accuracy"] > 0.1
    assert summary["valid_mlm_probability"] == 0.15
    on_disk = json.loads((out / "pretrain_summary.json").read_text())
    assert on_disk["steps"] == 30 and on_disk["final_valid_mlm_loss"] == summary["final_valid_mlm_loss"]

    model, info = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == 2 and model.config.alibi_starting_size == 32
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    enc = tok(["the red cat sees the green [MASK]."], return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], model.config.vocab_size)


def test_pretrain_resume_continues_from_checkpoint(corpus, tiny_config_file, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    pretrain.main(_pretrain_argv(corpus, tiny_config_file, out, cache, "--max_steps", "4", "--save_steps", "2"))
    assert (out / "checkpoint-4").is_dir()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        pretrain.main(_pretrain_argv(corpus, tiny_config_file, out, cache, "--max_steps", "6"))
    summary = pretrain.main(_pretrain_argv(corpus, tiny_config_file, out, cache, "--max_steps", "6",
                                           "--save_steps", "2", "--resume"))
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("checkpoint-4")
    assert summary["tokens_seen_this_run"] == 2 * 8 * 32


def test_pretrain_from_a_datasets_folder(tiny_config_file, tmp_path):
    import datasets

    docs = ["\n".join(d) for d in _documents(60, 3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": docs}),
                          "validation": datasets.Dataset.from_dict({"content": docs[:8]})}
                         ).save_to_disk(str(tmp_path / "ds"))
    base = ["--config", str(tiny_config_file), "--dataset", str(tmp_path / "ds"), "--output_dir",
            str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--num_proc", "1",
            "--dataloader_num_workers", "0", "--max_seq_len", "32", "--per_device_train_batch_size", "4",
            "--max_steps", "2", "--disable_tqdm"]
    with pytest.raises(ValueError, match="Column 'text' is not in the dataset.*content"):
        pretrain.main(base)
    summary = pretrain.main(base + ["--text_column", "content", "--valid_split", "validation"])
    assert summary["steps"] == 2 and summary["final_valid_mlm_loss"] is not None


def test_pretrain_bad_inputs_fail_before_training(corpus, tiny_config_file, tmp_path):
    run = lambda *extra: pretrain.main(  # noqa: E731
        ["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "c"), "--num_proc", "1", *extra])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        run("--train_files", str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="exactly one training source"):
        run("--train_files", str(corpus / "train"), "--dataset", "x")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        run("--train_files", str(corpus / "train"), "--config", str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="--mlm-probability"):
        run("--train_files", str(corpus / "train"), "--mlm_probability", "1.5")
    (tmp_path / "blank.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        run("--train_files", str(tmp_path / "blank.txt"), "--config", str(tiny_config_file))
    # A stock BERT checkpoint is another architecture.
    import transformers

    stock = tmp_path / "stock"
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )).save_pretrained(stock)
    with pytest.raises(ValueError, match="model_type is 'bert'"):
        run("--train_files", str(corpus / "train"), "--init_checkpoint", str(stock))
    assert not (tmp_path / "out").exists()


DDP_LAUNCHER = """
import hashlib, json, os, sys
from pathlib import Path
sys.path.insert(0, {train_dir!r})
import pretrain
from transformers import TrainerCallback

def digest(model):
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()

class WeightDigest(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = digest(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = int(os.environ["RANK"])
        record = {{"rank": rank, "world": int(os.environ["WORLD_SIZE"]), "start": self.start,
                   "end": digest(model), "steps": state.global_step}}
        Path({out!r}, f"digest-{{rank}}.json").write_text(json.dumps(record))

pretrain.main(sys.argv[1:], callbacks=[WeightDigest()])
"""


def test_ddp_two_processes_over_gloo_end_with_identical_weights(corpus, tiny_config_file, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    launcher = tmp_path / "launch.py"
    launcher.write_text(DDP_LAUNCHER.format(train_dir=str(REPO / "train"), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(launcher), *_pretrain_argv(corpus, tiny_config_file, out, tmp_path / "cache", "--max_steps", "4",
                                          "--per_device_train_batch_size", "4")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [json.loads((out / f"digest-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in records] == [2, 2] and [r["steps"] for r in records] == [4, 4]
    assert records[0]["start"] == records[1]["start"], "both ranks start from the same weights"
    assert records[0]["end"] != records[0]["start"], "training changed the weights"
    assert records[0]["end"] == records[1]["end"], "DDP keeps the ranks' weights identical"
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_sequences"] == 8
    assert summary["tokens_seen_this_run"] == 4 * 8 * 32


# ----------------------------------------------------------------------------------------------------------------
# finetune_glue.py
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(str(REPO), trust_remote_code=True, **TINY)
    AutoModelForMaskedLM.from_config(config, trust_remote_code=True).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(REPO), trust_remote_code=True).save_pretrained(path)
    return path


def _write_tsv(path: Path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows),
                    encoding="utf-8")


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    good, bad = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", '"null']
    for split, n in (("train", 48), ("validation", 16)):
        rows = []
        for _ in range(n):
            label = rng.randint(0, 1)
            rows.append((f"a {rng.choice(good if label else bad)} film NA", label))
        _write_tsv(root / "sst2" / f"{split}.tsv", ("sentence", "label"), rows)
        pairs = []
        for _ in range(n):
            a, b = rng.choice(NOUN), rng.choice(NOUN)
            pairs.append((f"the {a} sleeps", f"the {b} sleeps", 5.0 if a == b else round(rng.uniform(0, 2), 1)))
        _write_tsv(root / "stsb" / f"{split}.tsv", ("sentence1", "sentence2", "label"), pairs)
        _write_tsv(root / "rte" / f"{split}.tsv", ("sentence1", "sentence2", "label"),
                   [(f"the {a} sleeps", f"a {a} is awake", rng.randint(0, 1)) for a in NOUN[: n // 4]])
    for split in ("train", "validation_matched", "validation_mismatched"):
        _write_tsv(root / "mnli" / f"{split}.tsv", ("premise", "hypothesis", "label"),
                   [(f"the {a} sleeps", f"the {b} sleeps", rng.randint(0, 2)) for a in NOUN[:4] for b in NOUN[:3]])
    return root


def test_finetune_glue_runs_and_writes_metrics(tiny_checkpoint, glue_dir, tmp_path):
    out = tmp_path / "glue"
    results = finetune_glue.main(["--model", str(tiny_checkpoint), "--tasks", "sst2,stsb", "--data_dir",
                                  str(glue_dir), "--output_dir", str(out), "--num_train_epochs", "1",
                                  "--disable_tqdm"])
    assert set(results["tasks"]) == {"sst2", "stsb"}
    sst2, stsb = results["tasks"]["sst2"], results["tasks"]["stsb"]
    assert set(sst2["metrics"]) == {"accuracy"} and 0.0 <= sst2["metrics"]["accuracy"] <= 1.0
    assert set(stsb["metrics"]) == {"pearson", "spearman"}
    assert sst2["train_examples"] == 48 and sst2["eval_examples"] == {"validation": 16}
    assert sst2["learning_rate"] == 3e-5 and sst2["batch_size"] == 16  # the recipe's SST-2 settings
    assert sst2["torch_weight_decay"] == pytest.approx(0.1)  # decoupled lr/10
    assert sst2["steps"] == 3 and sst2["warmup_steps"] == 1  # ceil(6% of 3)
    assert results["tasks"]["stsb"]["steps"] == 2
    on_disk = json.loads((out / "glue_results.json").read_text())
    assert on_disk["tasks"]["sst2"]["metrics"] == sst2["metrics"]
    table = (out / "glue_results.md").read_text()
    assert "| SST-2 |" in table and "| STS-B |" in table and "Average" in table


def test_finetune_glue_from_mnli(tiny_checkpoint, glue_dir, tmp_path):
    results = finetune_glue.main(["--model", str(tiny_checkpoint), "--tasks", "rte,mnli", "--from_mnli",
                                  "--data_dir", str(glue_dir), "--output_dir", str(tmp_path), "--num_train_epochs",
                                  "1", "--disable_tqdm"])
    assert list(results["tasks"]) == ["mnli", "rte"], "MNLI runs first"
    mnli, rte = results["tasks"]["mnli"], results["tasks"]["rte"]
    assert set(mnli["splits"]) == {"validation_matched", "validation_mismatched"}
    assert mnli["initialized_from"] == str(tiny_checkpoint)
    assert rte["initialized_from"] == str(tmp_path / "mnli" / "model")
    assert rte["torch_weight_decay"] == pytest.approx(1.0)  # RTE: decoupled 1e-5 at lr 1e-5


def test_finetune_glue_max_train_samples(tiny_checkpoint, glue_dir, tmp_path):
    results = finetune_glue.main(["--model", str(tiny_checkpoint), "--tasks", "sst2", "--data_dir", str(glue_dir),
                                  "--output_dir", str(tmp_path), "--max_train_samples", "10",
                                  "--max_eval_samples", "5", "--num_train_epochs", "1", "--disable_tqdm"])
    assert results["tasks"]["sst2"]["train_examples"] == 10
    assert results["tasks"]["sst2"]["eval_examples"] == {"validation": 5}


def test_glue_tsv_reading_keeps_quotes_and_na_strings(glue_dir):
    data = finetune_glue.load_task_data(finetune_glue.TASKS["sst2"], str(glue_dir), None, None, 0)
    texts = data["train"]["texts"][0]
    assert all(t.endswith(" film NA") for t in texts)
    assert any('"null' in t for t in data["train"]["texts"][0] + data["validation"]["texts"][0])
    assert data["train"]["labels"].dtype == np.int64
    stsb = finetune_glue.load_task_data(finetune_glue.TASKS["stsb"], str(glue_dir), None, None, 0)
    assert stsb["train"]["labels"].dtype == np.float32


def test_glue_metrics_as_defined():
    t = finetune_glue.TASKS
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([1, 0, 0, 0])
    assert finetune_glue.glue_metrics(t["sst2"], logits, labels) == {"accuracy": 0.75}
    mrpc = finetune_glue.glue_metrics(t["mrpc"], logits, labels)
    assert mrpc["accuracy"] == 0.75 and mrpc["f1"] == pytest.approx(2 / 3)
    cola = finetune_glue.glue_metrics(t["cola"], logits, labels)
    assert cola["matthews_correlation"] == pytest.approx(1 / math.sqrt(3))
    stsb = finetune_glue.glue_metrics(t["stsb"], np.array([[1.0], [2.0], [3.0], [5.0]]), np.array([1, 2, 3, 4.0]))
    assert stsb["spearman"] == pytest.approx(1.0) and 0.9 < stsb["pearson"] < 1.0
    assert finetune_glue.glue_metrics(t["stsb"], np.ones((4, 1)), np.array([1, 2, 3, 4.0]))["pearson"] == 0.0


def test_finetune_glue_bad_inputs(tiny_checkpoint, glue_dir, tmp_path):
    import transformers

    run = lambda *a: finetune_glue.main(["--output_dir", str(tmp_path / "out"), *a])  # noqa: E731
    with pytest.raises(ValueError, match="Unknown GLUE task.*'sst3'"):
        run("--model", str(tiny_checkpoint), "--tasks", "sst2,sst3", "--data_dir", str(glue_dir))
    with pytest.raises(FileNotFoundError, match="cola/train.tsv"):
        run("--model", str(tiny_checkpoint), "--tasks", "cola", "--data_dir", str(glue_dir))
    _write_tsv(tmp_path / "bad" / "mrpc" / "train.tsv", ("text_a", "text_b", "label"), [("a", "b", 1)])
    with pytest.raises(ValueError, match=r"train.tsv:1: the header lacks column\(s\) \[.sentence1., .sentence2.\]"):
        run("--model", str(tiny_checkpoint), "--tasks", "mrpc", "--data_dir", str(tmp_path / "bad"))
    _write_tsv(tmp_path / "bad2" / "sst2" / "train.tsv", ("sentence", "label"), [("fine", 1), ("odd", 2)])
    with pytest.raises(ValueError, match=r"bad2/sst2/train.tsv:3: label '2' is not a class id"):
        run("--model", str(tiny_checkpoint), "--tasks", "sst2", "--data_dir", str(tmp_path / "bad2"))
    no_weights = tmp_path / "no_weights"  # the folder's config and code without weights (this folder ships some)
    no_weights.mkdir()
    shutil.copy(REPO / "config.json", no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match="No model weights"):
        run("--model", str(no_weights), "--tasks", "sst2", "--data_dir", str(glue_dir))
    stock = tmp_path / "stock"
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )).save_pretrained(stock)
    with pytest.raises(ValueError, match="'bert' checkpoint, not MosaicBERT"):
        run("--model", str(stock), "--tasks", "sst2", "--data_dir", str(glue_dir))
    assert not (tmp_path / "out").exists(), "nothing is written before the inputs are checked"


def test_scripts_run_as_commands():
    for script in ("train/pretrain.py", "train/finetune_glue.py"):
        proc = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# Resume picks the newest complete checkpoint
# ----------------------------------------------------------------------------------------------------------------
def _truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def two_checkpoints(corpus, tiny_config_file, tmp_path_factory):
    """A finished 4-step run with checkpoint-2 and checkpoint-4 (copied per test: the tests damage them)."""
    root = tmp_path_factory.mktemp("ckpts")
    pretrain.main(_pretrain_argv(corpus, tiny_config_file, root / "run", root / "cache", "--max_steps", "4",
                                 "--save_steps", "2"))
    return root / "run"


@pytest.mark.parametrize("damage, reason", [
    (lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json"),
    (lambda c: (c / "trainer_state.json").write_text('{"global_step": 4, "log_hi'), "trainer_state.json is not"),
    (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is truncated"),
    (lambda c: _truncate(c / "model.safetensors", 0.0001), "model.safetensors is truncated"),
    (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
    (lambda c: (c / "optimizer.pt").unlink(), "no optimizer state"),
    (lambda c: _truncate(c / "rng_state.pth", 0.9), "rng_state.pth is truncated"),
])
def test_checkpoint_problem_names_what_is_incomplete(two_checkpoints, tmp_path, damage, reason):
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(two_checkpoints / "checkpoint-4", checkpoint)
    assert pretrain.checkpoint_problem(checkpoint) is None
    damage(checkpoint)
    assert reason in pretrain.checkpoint_problem(checkpoint)


def test_resume_falls_back_to_the_newest_complete_checkpoint(corpus, tiny_config_file, two_checkpoints, tmp_path,
                                                              capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    # A save killed midway: checkpoint-6 has weights but no trainer state; checkpoint-4's optimizer is cut short.
    (out / "checkpoint-6").mkdir()
    shutil.copy(out / "checkpoint-4" / "model.safetensors", out / "checkpoint-6" / "model.safetensors")
    _truncate(out / "checkpoint-4" / "optimizer.pt")
    summary = pretrain.main(_pretrain_argv(corpus, tiny_config_file, out, tmp_path / "cache", "--max_steps", "6",
                                           "--save_steps", "100", "--resume"))
    log = capsys.readouterr().out
    assert "skipping checkpoint-6: no trainer_state.json" in log
    assert "skipping checkpoint-4: optimizer.pt is truncated" in log
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 6
    assert summary["tokens_seen_this_run"] == 4 * 8 * 32


def test_resume_without_a_complete_checkpoint_is_an_error(corpus, tiny_config_file, two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    for step in (2, 4):
        (out / f"checkpoint-{step}" / "trainer_state.json").unlink()
    argv = _pretrain_argv(corpus, tiny_config_file, out, tmp_path / "cache", "--max_steps", "6", "--resume")
    message = "no complete checkpoint.*checkpoint-4: no trainer_state.json.*; checkpoint-2: no"
    with pytest.raises(ValueError, match=message):
        pretrain.main(argv)
    with pytest.raises(ValueError, match="checkpoint-4'? is not a complete checkpoint: no trainer_state.json"):
        pretrain.main(argv[:-1] + ["--resume", str(out / "checkpoint-4")])


# ----------------------------------------------------------------------------------------------------------------
# Sparse MLM logits
# ----------------------------------------------------------------------------------------------------------------
def test_metrics_accept_sparse_logits_in_row_major_order():
    torch.manual_seed(0)
    labels = torch.full((2, 5), -100)
    labels[0, 3], labels[1, 0], labels[1, 4], labels[0, 1] = 7, 2, 9, 4
    dense = torch.randn(2, 5, 12)
    sparse = dense[labels != -100]  # (m, V): the labelled positions, row-major
    assert sparse.shape == (4, 12)
    expected = pretrain.preprocess_logits_for_metrics(dense, labels)
    assert torch.equal(pretrain.preprocess_logits_for_metrics(sparse, labels), expected)
    assert torch.equal(pretrain.preprocess_logits_for_metrics((sparse,), labels), expected)
    assert expected[0, 1, 0] == dense[0, 1].argmax() and expected[0, 0].abs().sum() == 0
    with pytest.raises(ValueError, match="3 rows of logits for 4 labelled tokens"):
        pretrain.preprocess_logits_for_metrics(sparse[:3], labels)


class _ConfigSpy(pretrain.TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.sparse_prediction = getattr(model.config, "sparse_prediction", None)


def test_pretraining_asks_for_sparse_logits_and_saves_a_dense_config(corpus, tiny_config_file, tmp_path):
    spy = _ConfigSpy()
    summary = pretrain.main(_pretrain_argv(corpus, tiny_config_file, tmp_path / "run", tmp_path / "cache",
                                           "--valid_files", str(corpus / "valid.txt.xz"), "--max_steps", "2",
                                           "--max_valid_sequences", "16"), callbacks=[spy])
    assert spy.sparse_prediction is True
    assert summary["final_valid_mlm_accuracy"] is not None
    assert json.loads((tmp_path / "run" / "config.json").read_text()).get("sparse_prediction") is False


# ----------------------------------------------------------------------------------------------------------------
# Bad text and GLUE files name the file and line
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["latin1.txt", "latin1.txt.xz", "latin1.txt.gz"])
def test_non_utf8_text_names_file_offset_and_line(tokenizer, tmp_path, name):
    import gzip

    raw = "first line\nsecond line\n".encode() + "caf\xe9 au lait\n".encode("latin-1")
    path = tmp_path / name
    opener = lzma.open if name.endswith(".xz") else gzip.open if name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(raw)
    with pytest.raises(ValueError, match=rf"{name}' is not UTF-8 text: byte 0xe9 at .*offset 26 \(line 3\)"):
        mlm_data.tokenize_to_cache(mlm_data.TextFiles([path]), tokenizer, tmp_path / "cache", log=lambda *a: None)


def test_damaged_archive_names_the_file(tokenizer, tmp_path):
    (tmp_path / "cut.txt.xz").write_bytes(lzma.compress(b"some text\n" * 100)[:40])
    with pytest.raises(ValueError, match="cut.txt.xz' is not a readable .xz archive"):
        mlm_data.read_text(tmp_path / "cut.txt.xz")


GLUE_BAD_FILES = [
    ("stsb", ("sentence1", "sentence2", "label"), [("a", "b", "1.5"), ("c", "d", "nan")],
     r"stsb/train.tsv:3: label 'nan' is not a finite number"),
    ("stsb", ("sentence1", "sentence2", "label"), [("a", "b", "-inf")],
     r"stsb/train.tsv:2: label '-inf' is not a finite number"),
    ("sst2", ("sentence", "label"), [("fine", "1"), ("odd", "inf")], r"sst2/train.tsv:3: label 'inf' is not a finite"),
    ("sst2", ("sentence", "label"), [("fine", "1"), ("odd", "NaN")], r"sst2/train.tsv:3: label 'NaN' is not a finite"),
    ("sst2", ("sentence", "label"), [("fine", "positive")], r"sst2/train.tsv:2: label 'positive' is not a number"),
    ("sst2", ("sentence", "label"), [("fine", "1"), ("ok", "0.5")], r"sst2/train.tsv:3: label '0.5' is not a class"),
    ("sst2", ("sentence", "label"), [("fine", "1"), ("a\ttab", "0")], r"sst2/train.tsv:3: 3 field\(s\), but the"),
    ("sst2", ("sentence", "label"), [("fine",), ("ok", "0")], r"sst2/train.tsv:2: 1 field\(s\), but the header has 2"),
    ("mrpc", ("sentence1", "label"), [("a", "1")], r"mrpc/train.tsv:1: the header lacks column\(s\) \['sentence2'\]"),
]


@pytest.mark.parametrize("task, header, rows, message", GLUE_BAD_FILES)
def test_bad_glue_rows_name_file_and_line(tmp_path, task, header, rows, message):
    _write_tsv(tmp_path / task / "train.tsv", header, rows)
    with pytest.raises(ValueError, match=message):
        finetune_glue.load_task_data(finetune_glue.TASKS[task], str(tmp_path), None, None, 0)


def test_glue_nan_label_fails_before_training(tiny_checkpoint, glue_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(glue_dir / "stsb", data / "stsb")
    lines = (data / "stsb" / "validation.tsv").read_text().splitlines()
    lines[5] = lines[5].rsplit("\t", 1)[0] + "\tnan"
    (data / "stsb" / "validation.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"stsb/validation.tsv:6: label 'nan' is not a finite number"):
        finetune_glue.main(["--model", str(tiny_checkpoint), "--tasks", "stsb", "--data-dir", str(data),
                            "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# Command lines: dashed names, underscore aliases, exit status
# ----------------------------------------------------------------------------------------------------------------
def test_dashed_options_and_hidden_underscore_aliases(corpus):
    dashed = pretrain.parse_args(["--train-files", str(corpus / "train"), "--output-dir", "x", "--max-seq-len", "64",
                                  "--init-checkpoint", str(REPO)])
    old = pretrain.parse_args(["--train_files", str(corpus / "train"), "--output_dir", "x", "--max_seq_len", "64",
                               "--init_checkpoint", str(REPO)])
    assert vars(dashed) == vars(old)
    for parser in (pretrain.build_parser(), finetune_glue.build_parser()):
        text = parser.format_help()
        assert "--output-dir" in text and "--output_dir" not in text
        assert not [s for a in parser._actions for s in a.option_strings if "_" in s and s.replace("_", "-") not in
                    a.option_strings], "every underscore spelling is an alias of a dashed one"
    glue = finetune_glue.build_parser().parse_args(["--model", "m", "--output_dir", "o", "--data_dir", "d"])
    assert (glue.output_dir, glue.data_dir) == ("o", "d")


@pytest.mark.parametrize("script, argv, message", [
    ("train/pretrain.py", ["--train-files", "missing.txt", "--output-dir", "out"],
     "pretrain.py: error: Text file or folder not found: 'missing.txt'"),
    ("train/finetune_glue.py", ["--model", str(REPO), "--tasks", "sst3", "--output-dir", "out"],
     "finetune_glue.py: error: Unknown GLUE task(s) ['sst3']"),
])
def test_bad_input_exits_2_with_a_one_line_error(tmp_path, script, argv, message):
    proc = subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# The documented sample run works as written
# ----------------------------------------------------------------------------------------------------------------
def _documented_sample_commands() -> list[list[str]]:
    """`python train/pretrain.py ... train/sample_text.txt ...` commands in the bash blocks of docs/training.md and
    README.md, as argument lists."""
    import re
    import shlex

    commands = []
    for doc in ("docs/training.md", "README.md"):
        for block in re.findall(r"```bash\n(.*?)```", (REPO / doc).read_text(), flags=re.S):
            for command in block.replace("\\\n", " ").splitlines():
                if "train/pretrain.py" in command and "train/sample_text.txt" in command:
                    words = shlex.split(command, comments=True)
                    assert words[:2] == ["python", "train/pretrain.py"], command
                    commands.append(words[2:])
    return commands


def test_documented_sample_pretraining_commands_run(tmp_path, monkeypatch):
    commands = _documented_sample_commands()
    assert len(commands) >= 2 and any("--init-checkpoint" in c for c in commands)
    monkeypatch.chdir(REPO)  # the commands are written for the repository root (`--init-checkpoint .`)
    for i, argv in enumerate(commands):
        out = tmp_path / f"run-{i}"
        summary = pretrain.main([*argv, "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
                                 "--disable-tqdm"])
        assert summary["steps"] == 20 and math.isfinite(summary["train_loss"])
        assert (out / "model.safetensors").is_file()
