#!/usr/bin/env python
"""Masked-LM pretraining of MosaicBERT with the Hugging Face Trainer.

    python train/pretrain.py --config train/configs/mosaic-bert-mini.json \
        --train_files .data/corpus --valid_files .data/corpus/valid.txt.xz --output_dir runs/mini --max_steps 1000

Data: plain text (`--train_files` folders/globs/files of .txt/.txt.xz/.txt.gz; documents separated by blank lines,
or one per line) or a `datasets` dataset (`--dataset NAME_OR_PATH --text_column text`). Text is tokenized once
with the package tokenizer and cached (see train/mlm_data.py). Sequences of `--max_seq_len` tokens are fed as
unpadded, flattened batches (input_ids (1, t) + cu_seqlens/max_seqlen/position_ids), never padded.

Recipe defaults follow MosaicBERT: 30% masking, AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 1e-5
(decoupled, see `--weight_decay`), 6% linear warmup then linear decay to 0.

Distributed: run the same command under `torchrun --nproc_per_node N` (DDP) or
`accelerate launch --config_file train/accelerate_fsdp.yaml` (FSDP); the Trainer does the rest.

Stopping: `--max_steps`, `--num_train_epochs`, `--max_train_tokens` (converted to steps), and/or `--max_minutes`
(a wall-clock budget for the training loop: the total step count is re-estimated from the measured throughput so
the learning rate reaches 0 when time runs out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from mlm_data import (
    FixedMaskDataset,
    FlatMLMCollator,
    TokenSequences,
    resolve_text_files,
    tokenize_dataset_to_cache,
    tokenize_files_to_cache,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--train_files", nargs="+", help="Folders, globs or files of .txt/.txt.xz/.txt.gz text.")
    data.add_argument("--valid_files", nargs="+", help="Validation text (same formats); enables evaluation.")
    data.add_argument("--dataset", help="A `datasets` hub name or local path (load_dataset / save_to_disk folder).")
    data.add_argument("--dataset_config", default=None, help="Dataset configuration name.")
    data.add_argument("--dataset_split", default="train", help="Split used for training (default: train).")
    data.add_argument("--valid_split", default=None, help="Dataset split used for validation, e.g. validation.")
    data.add_argument("--text_column", default="text", help="Column holding the text (one document per row).")
    data.add_argument("--document_format", default="auto", choices=["auto", "blank_line", "line"],
                      help="Text files: documents separated by blank lines, or one per line (auto: detect).")
    data.add_argument("--packing", default="concat", choices=["concat", "document"],
                      help="concat: join documents and cut every max_seq_len (recipe); document: cut each document.")
    data.add_argument("--max_seq_len", type=int, default=128, help="Tokens per sequence incl. [CLS]/[SEP].")
    data.add_argument("--cache_dir", default=str(REPO_ROOT / ".cache" / "tokens"), help="Token cache folder.")
    data.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1),
                      help="Processes for tokenization.")
    data.add_argument("--max_valid_sequences", type=int, default=None,
                      help="Evaluate on the first N validation sequences only.")

    model = p.add_argument_group("model")
    model.add_argument("--model_dir", default=str(REPO_ROOT),
                       help="Package folder giving the base config, model code and tokenizer (default: repo root).")
    model.add_argument("--config", help="JSON of config overrides applied to the base config (model size).")
    model.add_argument("--init_checkpoint", help="Start from the weights of this checkpoint instead of random init.")
    model.add_argument("--attention_backend", choices=["auto", "torch", "triton"], default=None,
                       help="Override the config's attention backend.")
    model.add_argument("--gradient_checkpointing", action="store_true")
    model.add_argument("--fp32_layernorm", action="store_true",
                       help="Keep autocast's fp32 LayerNorm. By default pretraining runs LayerNorm in the autocast "
                            "dtype (config.low_precision_layernorm; same loss curve, ~8%% faster, see BENCHMARKS.md).")

    mlm = p.add_argument_group("masking")
    mlm.add_argument("--mlm_probability", type=float, default=0.3, help="Training masking rate (recipe: 0.3).")
    mlm.add_argument("--eval_mlm_probability", type=float, default=0.15,
                     help="Validation masking rate; the masks are fixed by --seed so numbers compare across runs.")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--learning_rate", type=float, default=5e-4)
    opt.add_argument("--adam_beta1", type=float, default=0.9)
    opt.add_argument("--adam_beta2", type=float, default=0.98)
    opt.add_argument("--adam_epsilon", type=float, default=1e-6)
    opt.add_argument("--weight_decay", type=float, default=1e-5,
                     help="Decoupled weight decay as in the recipe (per-step shrink = weight_decay × lr/peak_lr); "
                          "passed to torch AdamW as weight_decay / learning_rate.")
    opt.add_argument("--warmup_ratio", type=float, default=0.06)
    opt.add_argument("--max_grad_norm", type=float, default=1.0)
    opt.add_argument("--per_device_train_batch_size", type=int, default=64, help="Sequences per device per step.")
    opt.add_argument("--per_device_eval_batch_size", type=int, default=128)
    opt.add_argument("--gradient_accumulation_steps", type=int, default=1)

    stop = p.add_argument_group("duration")
    stop.add_argument("--max_steps", type=int, default=-1)
    stop.add_argument("--num_train_epochs", type=float, default=1.0, help="Used when no other limit is given.")
    stop.add_argument("--max_train_tokens", type=float, default=None, help="Stop after this many tokens (all ranks).")
    stop.add_argument("--max_minutes", type=float, default=None, help="Wall-clock budget of the training loop.")

    run = p.add_argument_group("run")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--resume", nargs="?", const=True, default=None,
                     help="Resume from the last checkpoint in output_dir, or from the given checkpoint folder.")
    run.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU).")
    run.add_argument("--torch_compile", action="store_true")
    run.add_argument("--dataloader_num_workers", type=int, default=2)
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--logging_steps", type=int, default=50)
    run.add_argument("--eval_steps", type=int, default=0, help="Evaluate every N steps (0: only at the end).")
    run.add_argument("--save_steps", type=int, default=1000)
    run.add_argument("--save_total_limit", type=int, default=2)
    run.add_argument("--report_to", default="none", help="Trainer integrations (tensorboard, wandb, ...).")
    run.add_argument("--disable_tqdm", action="store_true")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if bool(args.train_files) == bool(args.dataset):
        raise ValueError("Give exactly one training source: --train_files or --dataset.")
    if args.valid_split and not args.dataset:
        raise ValueError("--valid_split needs --dataset.")
    if args.max_seq_len < 8:
        raise ValueError(f"--max_seq_len ({args.max_seq_len}) is too small.")
    for name in ("mlm_probability", "eval_mlm_probability"):
        if not 0.0 < getattr(args, name) < 1.0:
            raise ValueError(f"--{name} must be in (0, 1), got {getattr(args, name)}.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}.")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ValueError(f"--max_minutes must be positive, got {args.max_minutes}.")
    if args.max_train_tokens is not None and args.max_train_tokens <= 0:
        raise ValueError(f"--max_train_tokens must be positive, got {args.max_train_tokens}.")
    if args.config and not Path(args.config).is_file():
        raise FileNotFoundError(f"Config overrides file not found: {args.config!r}.")
    if not Path(args.model_dir, "config.json").is_file():
        raise FileNotFoundError(f"No config.json in --model_dir {args.model_dir!r}.")
    if args.init_checkpoint and not Path(args.init_checkpoint).exists():
        raise FileNotFoundError(f"--init_checkpoint not found: {args.init_checkpoint!r}.")
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
    """(1, t, V) logits → (1, t, 2): [argmax id, token NLL] at masked positions, 0 elsewhere.

    Only the masked rows are read (the sparse head leaves zeros elsewhere), and only two numbers per token are
    kept for the metrics instead of V logits.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    scored = labels != -100
    out = torch.zeros(*labels.shape, 2, dtype=torch.float32, device=logits.device)
    rows = logits[scored].float()  # (m, V)
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
            return tokenize_files_to_cache(paths, tokenizer, args.cache_dir, args.document_format, args.num_proc, log)
        return tokenize_dataset_to_cache(
            _load_hf_dataset(args, split), args.text_column, tokenizer, args.cache_dir, args.num_proc, log
        )

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
# Main
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


def main(argv=None, callbacks=()) -> dict:
    args = parse_args(argv)
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(args.output_dir)
    resume = args.resume
    if resume is True:
        resume = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if resume is None:
            raise FileNotFoundError(f"--resume: no checkpoint-* folder in {str(output_dir)!r}.")
    elif resume is None and output_dir.is_dir() and get_last_checkpoint(str(output_dir)):
        raise ValueError(
            f"{str(output_dir)!r} already holds checkpoints; pass --resume to continue or pick another --output_dir."
        )

    # Model and tokenizer, through the public Auto API only.
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    overrides = load_config_overrides(args.config)
    overrides.setdefault("alibi_starting_size", args.max_seq_len)
    overrides.setdefault("low_precision_layernorm", not args.fp32_layernorm)
    if args.attention_backend:
        overrides["attention_backend"] = args.attention_backend
    if args.init_checkpoint:
        config = AutoConfig.from_pretrained(args.init_checkpoint, trust_remote_code=True, **overrides)
    else:
        config = AutoConfig.from_pretrained(args.model_dir, trust_remote_code=True, **overrides)
    if config.model_type != "mosaic_bert":
        raise ValueError(
            f"Config model_type is {config.model_type!r}, expected 'mosaic_bert' (convert other checkpoints with "
            "convert/convert_checkpoint.py)."
        )
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the config's vocab_size is "
                         f"{config.vocab_size}.")

    use_cuda = torch.cuda.is_available()
    has_valid = args.valid_paths is not None or bool(args.valid_split)
    eval_steps = args.eval_steps if args.eval_steps > 0 and has_valid else None

    training_args = TrainingArguments(
        output_dir=str(output_dir),
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
        max_steps=args.max_steps,  # revised below once the data size is known
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
    log = print if training_args.process_index == 0 else (lambda *a, **k: None)
    global_batch = args.per_device_train_batch_size * training_args.world_size * args.gradient_accumulation_steps

    train_ds, valid_ds, collator = build_datasets(args, tokenizer, training_args, log)
    tokens_per_sequence = train_ds.num_tokens / len(train_ds)
    log(f"Training data: {len(train_ds):,} sequences, {train_ds.num_tokens:,} tokens "
        f"({tokens_per_sequence:.1f} per sequence); validation: "
        f"{len(valid_ds) if valid_ds is not None else 0:,} sequences")

    # Steps: an explicit --max_steps, else --max_train_tokens converted, else epochs; a time budget revises it.
    step_cap = args.max_steps if args.max_steps > 0 else None
    if args.max_train_tokens:
        token_steps = math.ceil(args.max_train_tokens / (tokens_per_sequence * global_batch))
        step_cap = min(step_cap, token_steps) if step_cap else token_steps
    if step_cap:
        training_args.max_steps = step_cap
    elif args.max_minutes:
        training_args.max_steps = 10**9  # the budget callback brings it down once throughput is measured
    schedule = LinearSchedule(args.warmup_ratio, total_steps=step_cap)

    if args.init_checkpoint:
        model = AutoModelForMaskedLM.from_pretrained(args.init_checkpoint, config=config, trust_remote_code=True)
    else:
        model = AutoModelForMaskedLM.from_config(config, trust_remote_code=True)
    n_params = _count_parameters(model)
    log(f"Model: {n_params / 1e6:.2f}M parameters, {config.num_hidden_layers} layers × {config.hidden_size} hidden, "
        f"global batch {global_batch} sequences")

    budget = TrainingBudget(schedule, args.max_minutes, step_cap)
    trainer = PretrainTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=valid_ds,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics if valid_ds is not None else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if valid_ds is not None else None,
        callbacks=[budget, *callbacks],
        schedule=schedule,
    )

    train_result = trainer.train(resume_from_checkpoint=resume)
    # Exact token count: sum of every rank's own count.
    local = torch.tensor([trainer.local_tokens], dtype=torch.int64, device=training_args.device)
    session_tokens = int(trainer.accelerator.reduce(local, reduction="sum").item())
    runtime = train_result.metrics.get("train_runtime", float("nan"))

    final_eval = {}
    if valid_ds is not None:
        final_eval = trainer.evaluate()
    trainer.save_model(str(output_dir))

    summary = {
        "steps": trainer.state.global_step,
        "tokens_seen_this_run": session_tokens,
        "tokens_per_second": session_tokens / runtime if runtime and runtime > 0 else None,
        "train_runtime_s": runtime,
        "train_loss": train_result.metrics.get("train_loss"),
        "final_valid_mlm_loss": final_eval.get("eval_mlm_loss"),
        "final_valid_mlm_accuracy": final_eval.get("eval_mlm_accuracy"),
        "valid_mlm_probability": args.eval_mlm_probability if valid_ds is not None else None,
        "valid_masked_tokens": final_eval.get("eval_masked_tokens"),
        "train_mlm_probability": args.mlm_probability,
        "max_seq_len": args.max_seq_len,
        "global_batch_sequences": global_batch,
        "world_size": training_args.world_size,
        "parameters": n_params,
        "config_overrides": overrides,
        "resumed_from": str(resume) if resume else None,
    }
    if trainer.is_world_process_zero():
        (output_dir / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log("\n".join([
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


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
