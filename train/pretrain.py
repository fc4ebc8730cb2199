#!/usr/bin/env python
"""Masked-LM pretraining of MosaicBERT with the Hugging Face Trainer.

    # the shipped sample text, the shipped config, 20 steps on CPU (well under a minute)
    python train/pretrain.py --train-files train/sample_text.txt --max-steps 20 --max-seq-len 32 \
        --per-device-train-batch-size 4 --dataloader-num-workers 0 --output-dir runs/sample
    # the same, continuing from the shipped weights instead of a random init
    python train/pretrain.py --train-files train/sample_text.txt --max-steps 20 --max-seq-len 32 \
        --per-device-train-batch-size 4 --dataloader-num-workers 0 --output-dir runs/sample-cont --init-checkpoint .
    # a real run (GPU)
    python train/pretrain.py --config train/configs/mosaic-bert-mini.json --train-files "$DATA/corpus/train-*.txt.xz" \
        --valid-files "$DATA/corpus/valid.txt.xz" --output-dir runs/mini --max-steps 10000 --bf16

Data: plain text (`--train-files` folders/globs/files of .txt/.txt.xz/.txt.gz, UTF-8; documents separated by blank
lines, or one per line) or a `datasets` dataset (`--dataset NAME_OR_PATH --text-column text`). Text is tokenized
once with the package tokenizer and cached (see train/mlm_data.py). Sequences of `--max-seq-len` tokens are fed as
unpadded, flattened batches (input_ids (1, t) + cu_seqlens/max_seqlen/position_ids), never padded. `$DATA` is a
folder holding `corpus/` (see docs/training.md).

Recipe defaults follow MosaicBERT: 30% masking, AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 1e-5
(decoupled, see `--weight-decay`), 6% linear warmup then linear decay to 0.

Distributed: run the same command under `torchrun --nproc_per_node N` (DDP) or
`accelerate launch --config_file train/accelerate_fsdp.yaml` (FSDP); the Trainer does the rest.

Stopping: `--max-steps`, `--num-train-epochs`, `--max-train-tokens` (converted to steps), and/or `--max-minutes`
(a wall-clock budget for the training loop: the total step count is re-estimated from the measured throughput so
the learning rate reaches 0 when time runs out).

Resume: `--resume` continues from the newest *complete* `checkpoint-N` in `--output-dir` (a save killed midway
leaves an incomplete one, which is skipped with the reason logged), `--resume PATH` from that checkpoint.
Option names are dashed; the older underscore spellings (`--train_files`) still work."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mlm_data import (
    DatasetColumn,
    FixedMaskDataset,
    FlatMLMCollator,
    TextFiles,
    TokenSequences,
    resolve_text_files,
    tokenize_to_cache,
)
from script_cli import HelpFormatter, exit_on_input_error, flag
from transformers import Trainer, TrainerCallback

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument(*flag("--train-files"), nargs="+", help="Folders, globs or files of .txt/.txt.xz/.txt.gz text.")
    data.add_argument(*flag("--valid-files"), nargs="+", help="Validation text (same formats); enables evaluation.")
    data.add_argument("--dataset", help="A `datasets` hub name or local path (load_dataset / save_to_disk folder).")
    data.add_argument(*flag("--dataset-config"), default=None, help="Dataset configuration name.")
    data.add_argument(*flag("--dataset-split"), default="train", help="Split used for training (default: train).")
    data.add_argument(*flag("--valid-split"), default=None, help="Dataset split used for validation, e.g. validation.")
    data.add_argument(*flag("--text-column"), default="text", help="Column holding the text (one document per row).")
    data.add_argument(*flag("--document-format"), default="auto", choices=["auto", "blank_line", "line"],
                      help="Text files: documents separated by blank lines, or one per line (auto: detect).")
    data.add_argument("--packing", default="concat", choices=["concat", "document"],
                      help="concat: join documents and cut every max_seq_len (recipe); document: cut each document.")
    data.add_argument(*flag("--max-seq-len"), type=int, default=128, help="Tokens per sequence incl. [CLS]/[SEP].")
    data.add_argument(*flag("--cache-dir"), default=str(REPO_ROOT / ".cache" / "tokens"), help="Token cache folder.")
    data.add_argument(*flag("--num-proc"), type=int, default=min(8, os.cpu_count() or 1),
                      help="Processes for tokenization.")
    data.add_argument(*flag("--max-valid-sequences"), type=int, default=None,
                      help="Evaluate on the first N validation sequences only.")

    model = p.add_argument_group("model")
    model.add_argument(*flag("--model-dir"), default=str(REPO_ROOT),
                       help="Package folder giving the base config, model code and tokenizer (default: repo root).")
    model.add_argument("--config", help="JSON of config overrides applied to the base config (model size).")
    model.add_argument(*flag("--init-checkpoint"),
                       help="Start from the weights of this checkpoint (e.g. `.`, the shipped weights) instead of "
                            "a random init.")
    model.add_argument(*flag("--attention-backend"), choices=["auto", "torch", "triton"], default=None,
                       help="Override the config's attention backend.")
    model.add_argument(*flag("--gradient-checkpointing"), action="store_true")
    model.add_argument(*flag("--fp32-layernorm"), action="store_true",
                       help="Keep autocast's fp32 LayerNorm. By default pretraining runs LayerNorm in the autocast "
                            "dtype (config.low_precision_layernorm; same loss curve, ~8%% faster, see BENCHMARKS.md).")

    mlm = p.add_argument_group("masking")
    mlm.add_argument(*flag("--mlm-probability"), type=float, default=0.3, help="Training masking rate (recipe: 0.3).")
    mlm.add_argument(*flag("--eval-mlm-probability"), type=float, default=0.15,
                     help="Validation masking rate; the masks are fixed by --seed so numbers compare across runs.")

    opt = p.add_argument_group("optimization")
    opt.add_argument(*flag("--learning-rate"), type=float, default=5e-4)
    opt.add_argument(*flag("--adam-beta1"), type=float, default=0.9)
    opt.add_argument(*flag("--adam-beta2"), type=float, default=0.98)
    opt.add_argument(*flag("--adam-epsilon"), type=float, default=1e-6)
    opt.add_argument(*flag("--weight-decay"), type=float, default=1e-5,
                     help="Decoupled weight decay as in the recipe (per-step shrink = weight_decay × lr/peak_lr); "
                          "passed to torch AdamW as weight_decay / learning_rate.")
    opt.add_argument(*flag("--warmup-ratio"), type=float, default=0.06)
    opt.add_argument(*flag("--max-grad-norm"), type=float, default=1.0)
    opt.add_argument(*flag("--per-device-train-batch-size"), type=int, default=64,
                     help="Sequences per device per step.")
    opt.add_argument(*flag("--per-device-eval-batch-size"), type=int, default=128)
    opt.add_argument(*flag("--gradient-accumulation-steps"), type=int, default=1)

    stop = p.add_argument_group("duration")
    stop.add_argument(*flag("--max-steps"), type=int, default=-1)
    stop.add_argument(*flag("--num-train-epochs"), type=float, default=1.0, help="Used when no other limit is given.")
    stop.add_argument(*flag("--max-train-tokens"), type=float, default=None,
                      help="Stop after this many tokens (all ranks).")
    stop.add_argument(*flag("--max-minutes"), type=float, default=None, help="Wall-clock budget of the training loop.")

    run = p.add_argument_group("run")
    run.add_argument(*flag("--output-dir"), required=True)
    run.add_argument("--resume", nargs="?", const=True, default=None,
                     help="Resume from the newest complete checkpoint in --output-dir (incomplete ones, left by a "
                          "killed save, are skipped), or from the given checkpoint folder.")
    run.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU).")
    run.add_argument(*flag("--torch-compile"), action="store_true")
    run.add_argument(*flag("--dataloader-num-workers"), type=int, default=2)
    run.add_argument("--seed", type=int, default=42)
    run.add_argument(*flag("--logging-steps"), type=int, default=50)
    run.add_argument(*flag("--eval-steps"), type=int, default=0, help="Evaluate every N steps (0: only at the end).")
    run.add_argument(*flag("--save-steps"), type=int, default=1000)
    run.add_argument(*flag("--save-total-limit"), type=int, default=2)
    run.add_argument(*flag("--report-to"), default="none", help="Trainer integrations (tensorboard, wandb, ...).")
    run.add_argument(*flag("--disable-tqdm"), action="store_true")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if bool(args.train_files) == bool(args.dataset):
        raise ValueError("Give exactly one training source: --train-files or --dataset.")
    if args.valid_split and not args.dataset:
        raise ValueError("--valid-split needs --dataset.")
    if args.max_seq_len < 8:
        raise ValueError(f"--max-seq-len ({args.max_seq_len}) is too small.")
    for name in ("mlm_probability", "eval_mlm_probability"):
        if not 0.0 < getattr(args, name) < 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(args, name)}.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning-rate must be positive, got {args.learning_rate}.")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be positive, got {args.max_minutes}.")
    if args.max_train_tokens is not None and args.max_train_tokens <= 0:
        raise ValueError(f"--max-train-tokens must be positive, got {args.max_train_tokens}.")
    if args.config and not Path(args.config).is_file():
        raise FileNotFoundError(f"Config overrides file not found: {args.config!r}.")
    if not Path(args.model_dir, "config.json").is_file():
        raise FileNotFoundError(f"No config.json in --model-dir {args.model_dir!r}.")
    if args.init_checkpoint and not Path(args.init_checkpoint).exists():
        raise FileNotFoundError(f"--init-checkpoint not found: {args.init_checkpoint!r}.")
    # Resolve the text files now so that a bad path fails before anything is built.
    args.train_paths = resolve_text_files(args.train_files) if args.train_files else None
    args.valid_paths = resolve_text_files(args.valid_files) if args.valid_files else None
    if isinstance(args.resume, str) and not Path(args.resume).is_dir():
        raise FileNotFoundError(f"--resume checkpoint folder not found: {args.resume!r}.")
    return args


def load_config_overrides(path: str | None) -> dict:
    if not path:
        return {}
    with open(path) as f:
        overrides = json.load(f)
    if not isinstance(overrides, dict):
        raise ValueError(f"{path!r} must hold a JSON object of config fields.")
    return overrides


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule and training budget
# ----------------------------------------------------------------------------------------------------------------
class LinearSchedule:
    """LR multiplier for LambdaLR: linear warmup over `warmup_ratio` of the steps, then linear decay to 0 at
    `total_steps`. `total_steps` may be revised during training (time budget); every rank gets the same value."""

    def __init__(self, warmup_ratio: float, total_steps: int | None = None):
        self.warmup_ratio = warmup_ratio
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        total = max(1, int(self.total_steps))
        warmup = max(1, math.ceil(self.warmup_ratio * total)) if self.warmup_ratio > 0 else 0
        if step < warmup:
            return step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))


class TrainingBudget(TrainerCallback):
    """Trainer callback for `--max_minutes` (`--max_train_tokens` is turned into a step count up front, which keeps
    every rank stopping at the same step).

    Under a time budget the total step count is not known up front. It is estimated as
    `step + throughput × remaining time` at step 50 after the start (throughput measured from step 10 on; until
    then the LR stays near 0, the warmup not having started) and revised every 100 steps, more often near the end,
    with the throughput of the last interval. The estimate becomes both the schedule's total (the LR reaches 0
    when time runs out) and the Trainer's max_steps (which stops the loop). Rank 0 decides and broadcasts, so all
    ranks change the LR at the same step.
    """

    def __init__(self, schedule: LinearSchedule, max_minutes: float | None, step_cap: int | None):
        self.schedule = schedule
        self.budget_s = None if max_minutes is None else 60.0 * max_minutes
        self.step_cap = step_cap
        self.start = self.anchor_time = None
        self.begin_step = self.anchor_step = self.next_revision = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()
        self.begin_step = state.global_step
        self.next_revision = state.global_step + 50
        return control

    def _broadcast(self, values: list[float], args) -> list[float]:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return values
        device = args.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.broadcast(t, src=0)
        return t.tolist()

    def on_step_end(self, args, state, control, **kwargs):
        if self.budget_s is None:
            return control
        self._revise(args, state, control)
        if control.should_training_stop:
            control.should_save = True  # a checkpoint to resume from, whatever step the budget ended on
        return control

    def _revise(self, args, state, control):
        since = state.global_step - self.begin_step
        if since == 10:  # throughput is measured from here: the first steps pay for warm-up and autotuning
            self.anchor_time, self.anchor_step = time.time(), state.global_step
        if since < 50 or state.global_step < self.next_revision:
            return
        now = time.time()
        # Throughput over the last interval, so a change of speed (evaluation, a busy machine) shows up quickly.
        rate = (state.global_step - self.anchor_step) / max(1e-6, now - self.anchor_time)
        remaining = self.budget_s - (now - self.start)
        total = state.global_step + max(0, int(rate * remaining))
        if self.step_cap:
            total = min(total, self.step_cap)
        total, out_of_time = self._broadcast([float(total), float(remaining <= 0)], args)
        total = max(int(total), state.global_step)
        self.schedule.total_steps = total
        state.max_steps = total
        self.anchor_time, self.anchor_step = now, state.global_step
        # Every 100 steps, more often near the end (same on every rank: it depends on synced values only).
        self.next_revision = state.global_step + max(10, min(100, (total - state.global_step) // 4))
        if out_of_time or total <= state.global_step:
            control.should_training_stop = True


# ----------------------------------------------------------------------------------------------------------------
# Metrics: the model scores only masked positions, so everything is restricted to labels != -100.
# ----------------------------------------------------------------------------------------------------------------
def preprocess_logits_for_metrics(logits, labels):
    """Logits → (1, t, 2): [argmax id, token NLL] at labelled positions, 0 elsewhere; two numbers per token are
    kept for the metrics instead of V logits.

    Two logits layouts: dense (1, t, V), of which only the labelled rows are read, or sparse (m, V) with one row
    per labelled token in row-major order of the positions (config.sparse_prediction), the order of
    `labels[labels != -100]`.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    scored = labels != -100
    rows = (logits if logits.dim() == 2 else logits[scored]).float()  # (m, V)
    if rows.shape[0] != int(scored.sum()):
        raise ValueError(f"{rows.shape[0]} rows of logits for {int(scored.sum())} labelled tokens.")
    out = torch.zeros(*labels.shape, 2, dtype=torch.float32, device=logits.device)
    nll = torch.nn.functional.cross_entropy(rows, labels[scored], reduction="none")
    out[scored] = torch.stack([rows.argmax(-1).float(), nll], dim=-1)
    return out


def compute_metrics(eval_pred) -> dict:
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    scored = labels != -100
    count = int(scored.sum())
    if count == 0:
        return {"mlm_accuracy": float("nan"), "mlm_loss": float("nan"), "masked_tokens": 0}
    pred_ids = predictions[..., 0][scored].astype(np.int64)
    nll = predictions[..., 1][scored].astype(np.float64)
    return {
        "mlm_accuracy": float((pred_ids == labels[scored]).mean()),
        "mlm_loss": float(nll.mean()),
        "masked_tokens": count,
    }


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def _load_hf_dataset(args, split: str):
    import datasets

    path = Path(args.dataset)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"Split {split!r} not in {args.dataset!r}; its splits are {list(ds)}.")
            ds = ds[split]
        return ds
    return datasets.load_dataset(args.dataset, args.dataset_config, split=split)


def build_datasets(args, tokenizer, training_args, log=print):
    def corpus_of(paths=None, split=None):
        if paths is not None:
            source = TextFiles(paths, args.document_format)
        else:
            source = DatasetColumn(_load_hf_dataset(args, split), args.text_column)
        return tokenize_to_cache(source, tokenizer, args.cache_dir, args.num_proc, log)

    # Rank 0 of each node tokenizes; the others wait and then read its cache.
    with training_args.main_process_first(local=True, desc="tokenization"):
        train_corpus = corpus_of(args.train_paths, args.dataset_split)
        valid_corpus = None
        if args.valid_paths is not None:
            valid_corpus = corpus_of(args.valid_paths)
        elif args.valid_split:
            valid_corpus = corpus_of(split=args.valid_split)

    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    train = TokenSequences(train_corpus, args.max_seq_len, cls_id, sep_id, args.packing)
    collator = FlatMLMCollator.from_tokenizer(tokenizer, args.mlm_probability)
    valid = None
    if valid_corpus is not None:
        sequences = TokenSequences(valid_corpus, args.max_seq_len, cls_id, sep_id, args.packing)
        valid = FixedMaskDataset(sequences, collator, args.eval_mlm_probability, seed=args.seed)
        if args.max_valid_sequences:
            valid = torch.utils.data.Subset(valid, range(min(len(valid), args.max_valid_sequences)))
    return train, valid, collator


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------
class PretrainTrainer(Trainer):
    """Trainer whose LR schedule is a LinearSchedule (revisable under a time budget) and which counts tokens
    without a host sync per step (batches have no padding, so input_ids.numel() is the token count)."""

    def __init__(self, *args, schedule: LinearSchedule, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = schedule
        self.local_tokens = 0

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            if self.schedule.total_steps is None:
                self.schedule.total_steps = num_training_steps
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.schedule)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        tokens = inputs["input_ids"].numel()
        self.local_tokens += tokens
        # Exact for one process; with several ranks an estimate until the exact sum at the end of training.
        self.state.num_input_tokens_seen += tokens * self.args.world_size
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs, start_time=None):
        if "loss" in logs:
            logs["tokens_seen"] = self.state.num_input_tokens_seen
        super().log(logs, start_time)


def _checkpointing_kwargs(enabled: bool) -> dict:
    """Activation checkpointing under the TrainingArguments name this transformers version uses."""
    if not enabled:
        return {}
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": True}


def _count_parameters(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: resume only from a complete one
# ----------------------------------------------------------------------------------------------------------------
def _safetensors_problem(path: Path) -> str | None:
    """The header (8-byte length, then JSON) must parse, and the last tensor must end exactly at the end of the
    file: a file cut short by a killed save fails this without reading a tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            return f"{path.name} is truncated (header of {header_len} bytes in a {size}-byte file)"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return f"{path.name} has an unreadable header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        return f"{path.name} is truncated ({size} bytes, its header describes {expected})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip whose central directory comes last: a file cut short has none."""
    try:
        with zipfile.ZipFile(path) as z:
            if not z.namelist():
                return f"{path.name} is empty"
    except (zipfile.BadZipFile, OSError) as err:
        return f"{path.name} is truncated or damaged ({err})"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer `checkpoint-N` folder cannot be resumed from (None: it is complete).

    A save killed midway leaves files missing or cut short; the Trainer writes the weights, then the optimizer,
    scheduler and RNG states, then trainer_state.json last. The checks are cheap (no tensor is read): every JSON
    file parses and trainer_state.json is at step N; the weights and an optimizer state are there; every
    safetensors file ends where its header says; every torch.save file (.pt, .pth, .bin) is a complete zip.
    """
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return "no trainer_state.json (the save did not finish)"
    for path in sorted(folder.glob("*.json")):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return f"{path.name} is not valid JSON"
        if path == state_file:
            step = content.get("global_step") if isinstance(content, dict) else None
            folder_step = folder.name.rsplit("-", 1)[-1]
            if str(step) != folder_step:
                return f"trainer_state.json says global_step {step}, the folder name says {folder_step}"
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json",
                                                      "pytorch_model.bin")):
        return "no model weights"
    if not any(folder.glob("optimizer*")):
        return "no optimizer state"
    for path in sorted(folder.glob("*.safetensors")):
        if problem := _safetensors_problem(path):
            return problem
    for pattern in ("*.pt", "*.pth", "*.bin"):
        for path in sorted(folder.glob(pattern)):
            if problem := _torch_file_problem(path):
                return problem
    return None


def _checkpoint_step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[-1])


def find_resume_checkpoint(output_dir: Path, log=print) -> Path:
    """The newest complete checkpoint-N in output_dir; newer incomplete ones are skipped, saying why."""
    folders = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    if not folders:
        raise FileNotFoundError(f"--resume: no checkpoint-* folder in {str(output_dir)!r}.")
    skipped = []
    for folder in sorted(folders, key=_checkpoint_step, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            for name, why in skipped:
                log(f"--resume: skipping {name}: {why}")
            log(f"--resume: continuing from {folder}")
            return folder
        skipped.append((folder.name, problem))
    details = "; ".join(f"{name}: {why}" for name, why in skipped)
    raise ValueError(f"--resume: no complete checkpoint in {str(output_dir)!r} ({details}).")


def resolve_resume(args, log=print) -> Path | None:
    """The checkpoint to resume from (None: a fresh run). A fresh run into a folder holding checkpoints is refused."""
    output_dir = Path(args.output_dir)
    if args.resume is True:
        if not output_dir.is_dir():
            raise FileNotFoundError(f"--resume: the output folder {str(output_dir)!r} does not exist.")
        return find_resume_checkpoint(output_dir, log)
    if isinstance(args.resume, str):
        folder = Path(args.resume)
        if problem := checkpoint_problem(folder):
            raise ValueError(f"--resume {args.resume!r} is not a complete checkpoint: {problem}.")
        return folder
    if output_dir.is_dir() and any(p.is_dir() for p in output_dir.glob("checkpoint-*")):
        raise ValueError(
            f"{str(output_dir)!r} already holds checkpoints; pass --resume to continue or pick another --output-dir."
        )
    return None


# ----------------------------------------------------------------------------------------------------------------
# Building the run
# ----------------------------------------------------------------------------------------------------------------
def build_config(args, tokenizer):
    """The model config: the base (--model-dir, or --init-checkpoint's) with the overrides; returns (config,
    overrides)."""
    from transformers import AutoConfig

    overrides = load_config_overrides(args.config)
    overrides.setdefault("alibi_starting_size", args.max_seq_len)
    overrides.setdefault("low_precision_layernorm", not args.fp32_layernorm)
    if args.attention_backend:
        overrides["attention_backend"] = args.attention_backend
    config = AutoConfig.from_pretrained(args.init_checkpoint or args.model_dir, trust_remote_code=True, **overrides)
    if config.model_type != "mosaic_bert":
        raise ValueError(
            f"Config model_type is {config.model_type!r}, expected 'mosaic_bert' (convert other checkpoints with "
            "convert/convert_checkpoint.py)."
        )
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the config's vocab_size is "
                         f"{config.vocab_size}.")
    # Logits for the labelled (masked) tokens only, (m, vocab), instead of a dense (batch, seq, vocab) tensor that
    # is zero elsewhere. A model version without the option ignores it; the metrics below handle both layouts.
    config.sparse_prediction = True
    return config, overrides


def build_training_args(args):
    from transformers import TrainingArguments

    use_cuda = torch.cuda.is_available()
    has_valid = args.valid_paths is not None or bool(args.valid_split)
    eval_steps = args.eval_steps if args.eval_steps > 0 and has_valid else None
    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_epsilon=args.adam_epsilon,
        weight_decay=args.weight_decay / args.learning_rate,
        max_grad_norm=args.max_grad_norm,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,  # revised by plan_steps once the data size is known
        logging_steps=args.logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        bf16=args.bf16,
        torch_compile=args.torch_compile,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_pin_memory=use_cuda,
        dataloader_persistent_workers=args.dataloader_num_workers > 0,
        seed=args.seed,
        report_to=args.report_to,
        disable_tqdm=args.disable_tqdm or None,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        eval_accumulation_steps=16,
        logging_nan_inf_filter=False,  # the filter reads the loss on the host every step (a GPU sync)
        use_cpu=not use_cuda,
        **_checkpointing_kwargs(args.gradient_checkpointing),
    )


def plan_steps(args, training_args, train_ds, global_batch: int) -> tuple[LinearSchedule, int | None]:
    """An explicit --max-steps, else --max-train-tokens converted to steps, else epochs; a time budget revises the
    total as it goes. Sets training_args.max_steps; returns (schedule, step cap or None)."""
    step_cap = args.max_steps if args.max_steps > 0 else None
    if args.max_train_tokens:
        tokens_per_sequence = train_ds.num_tokens / len(train_ds)
        token_steps = math.ceil(args.max_train_tokens / (tokens_per_sequence * global_batch))
        step_cap = min(step_cap, token_steps) if step_cap else token_steps
    if step_cap:
        training_args.max_steps = step_cap
    elif args.max_minutes:
        training_args.max_steps = 10**9  # the budget callback brings it down once throughput is measured
    return LinearSchedule(args.warmup_ratio, total_steps=step_cap), step_cap


def build_model(args, config):
    from transformers import AutoModelForMaskedLM

    if args.init_checkpoint:
        return AutoModelForMaskedLM.from_pretrained(args.init_checkpoint, config=config, trust_remote_code=True)
    return AutoModelForMaskedLM.from_config(config, trust_remote_code=True)


@dataclass
class PretrainRun:
    """Everything built and checked before the first step."""

    args: argparse.Namespace
    trainer: PretrainTrainer
    resume: Path | None
    overrides: dict
    global_batch: int
    parameters: int
    log: object
    has_valid: bool


def prepare(argv=None, callbacks=()) -> PretrainRun:
    """Parse and check the arguments, resolve the checkpoint to resume from, build tokenizer, config, data, model
    and Trainer. Bad input raises here (ValueError / FileNotFoundError), before any training."""
    from transformers import AutoTokenizer

    args = parse_args(argv)
    training_args = build_training_args(args)
    log = print if training_args.process_index == 0 else (lambda *a, **k: None)
    resume = resolve_resume(args, log)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    config, overrides = build_config(args, tokenizer)
    global_batch = args.per_device_train_batch_size * training_args.world_size * args.gradient_accumulation_steps

    train_ds, valid_ds, collator = build_datasets(args, tokenizer, training_args, log)
    log(f"Training data: {len(train_ds):,} sequences, {train_ds.num_tokens:,} tokens "
        f"({train_ds.num_tokens / len(train_ds):.1f} per sequence); validation: "
        f"{len(valid_ds) if valid_ds is not None else 0:,} sequences")
    schedule, step_cap = plan_steps(args, training_args, train_ds, global_batch)

    model = build_model(args, config)
    parameters = _count_parameters(model)
    log(f"Model: {parameters / 1e6:.2f}M parameters, {config.num_hidden_layers} layers × {config.hidden_size} "
        f"hidden, global batch {global_batch} sequences")
    trainer = PretrainTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=valid_ds,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics if valid_ds is not None else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if valid_ds is not None else None,
        callbacks=[TrainingBudget(schedule, args.max_minutes, step_cap), *callbacks],
        schedule=schedule,
    )
    return PretrainRun(args, trainer, resume, overrides, global_batch, parameters, log, valid_ds is not None)


def train(run: PretrainRun) -> dict:
    """Train, evaluate, save the final model and write pretrain_summary.json; returns the summary."""
    args, trainer = run.args, run.trainer
    output_dir = Path(args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=str(run.resume) if run.resume else None)
    # Exact token count: sum of every rank's own count.
    local = torch.tensor([trainer.local_tokens], dtype=torch.int64, device=trainer.args.device)
    session_tokens = int(trainer.accelerator.reduce(local, reduction="sum").item())
    runtime = train_result.metrics.get("train_runtime", float("nan"))
    final_eval = trainer.evaluate() if run.has_valid else {}
    # The sparse logits are a training-time choice: the saved model gives dense logits as usual.
    trainer.model.config.sparse_prediction = False
    trainer.save_model(str(output_dir))

    summary = {
        "steps": trainer.state.global_step,
        "tokens_seen_this_run": session_tokens,
        "tokens_per_second": session_tokens / runtime if runtime and runtime > 0 else None,
        "train_runtime_s": runtime,
        "train_loss": train_result.metrics.get("train_loss"),
        "final_valid_mlm_loss": final_eval.get("eval_mlm_loss"),
        "final_valid_mlm_accuracy": final_eval.get("eval_mlm_accuracy"),
        "valid_mlm_probability": args.eval_mlm_probability if run.has_valid else None,
        "valid_masked_tokens": final_eval.get("eval_masked_tokens"),
        "train_mlm_probability": args.mlm_probability,
        "max_seq_len": args.max_seq_len,
        "global_batch_sequences": run.global_batch,
        "world_size": trainer.args.world_size,
        "parameters": run.parameters,
        "config_overrides": run.overrides,
        "resumed_from": str(run.resume) if run.resume else None,
    }
    if trainer.is_world_process_zero():
        (output_dir / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        run.log("\n".join([
            "Pretraining done:",
            f"  steps                 {summary['steps']}",
            f"  tokens seen (run)     {summary['tokens_seen_this_run']:,}",
            f"  tokens/s              {summary['tokens_per_second'] or float('nan'):,.0f}",
            f"  valid MLM loss        {summary['final_valid_mlm_loss']}",
            f"  valid MLM accuracy    {summary['final_valid_mlm_accuracy']}"
            f" (masking {args.eval_mlm_probability:.0%})",
            f"  saved to              {output_dir}",
        ]))
    return summary


def main(argv=None, callbacks=()) -> dict:
    """Pretrain as the command line says; returns the summary. Bad input raises before training starts."""
    return train(prepare(argv, callbacks))


if __name__ == "__main__":
    # Bad input: a one-line error and status 2; a failure during training: its traceback and status 1.
    train(exit_on_input_error(prepare))
