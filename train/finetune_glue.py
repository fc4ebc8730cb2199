#!/usr/bin/env python
"""Fine-tune a MosaicBERT checkpoint on GLUE tasks with the Hugging Face Trainer and report dev-set metrics.

    python train/finetune_glue.py --model runs/mini --tasks sst2,mrpc,stsb --data_dir .data/glue \
        --output_dir runs/mini-glue --bf16

Data: local TSVs laid out as `<data_dir>/<task>/{train,validation}.tsv` (MNLI: `validation_matched.tsv` and
`validation_mismatched.tsv`), tab-separated with a header, no quoting, columns as the Hugging Face `glue` dataset
(e.g. `sentence,label`; `sentence1,sentence2,label`); without `--data_dir` the `nyu-mll/glue` dataset is loaded
through `datasets` (needs network or a filled datasets cache).

Per-task defaults (learning rate, epochs, batch size) are the MosaicBERT GLUE settings; max length 256 with dynamic
padding (the model removes padding itself), 6% linear warmup then linear decay, weight decay = lr/10 in the
decoupled convention (RTE: 1e-5), i.e. torch AdamW weight_decay = 0.1 (RTE: 1e-5 / lr). Metrics: accuracy;
accuracy and F1 for MRPC and QQP; Matthews correlation for CoLA; Pearson and Spearman for STS-B (regression with
one output). Writes `<output_dir>/glue_results.json` and `<output_dir>/glue_results.md`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class GlueTask:
    name: str
    display: str
    text_columns: tuple[str, ...]
    num_labels: int  # 1 = regression
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...]
    learning_rate: float
    epochs: int
    batch_size: int
    decoupled_weight_decay: float | None = None  # None: learning_rate / 10

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def weight_decay(self, learning_rate: float) -> float:
        return learning_rate / 10 if self.decoupled_weight_decay is None else self.decoupled_weight_decay


TASKS = {
    t.name: t
    for t in [
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), 3, ("accuracy",),
                 ("validation_matched", "validation_mismatched"), 5e-5, 3, 48),
        GlueTask("qqp", "QQP", ("question1", "question2"), 2, ("accuracy", "f1"), ("validation",), 3e-5, 5, 16),
        GlueTask("qnli", "QNLI", ("question", "sentence"), 2, ("accuracy",), ("validation",), 1e-5, 10, 16),
        GlueTask("sst2", "SST-2", ("sentence",), 2, ("accuracy",), ("validation",), 3e-5, 3, 16),
        GlueTask("cola", "CoLA", ("sentence",), 2, ("matthews_correlation",), ("validation",), 5e-5, 10, 32),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), 1, ("pearson", "spearman"), ("validation",),
                 3e-5, 10, 32),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), 2, ("accuracy", "f1"), ("validation",), 8e-5, 10, 32),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), 2, ("accuracy",), ("validation",), 1e-5, 3, 16,
                 decoupled_weight_decay=1e-5),
    ]
}
# The original recipe starts these from the MNLI-finetuned checkpoint (`--from_mnli`).
FROM_MNLI_TASKS = ("rte", "mrpc", "stsb")


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def parse_tasks(spec: str) -> list[GlueTask]:
    names = [t.strip().lower().replace("-", "") for t in spec.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks is empty.")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"Unknown GLUE task(s) {unknown}; known tasks: {', '.join(TASKS)}.")
    return [TASKS[n] for n in dict.fromkeys(names)]


def read_tsv(path: Path, task: GlueTask) -> dict[str, list]:
    """Read one split: {column: values} for the text columns and `label`. Errors name the file and the problem."""
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"GLUE file not found: {str(path)!r} (expected <data_dir>/{task.name}/<split>.tsv).")
    frame = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, na_filter=False, dtype=str,
                        encoding="utf-8")
    needed = [*task.text_columns, "label"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{str(path)!r} lacks column(s) {missing} for {task.name}; it has {list(frame.columns)}.")
    if len(frame) == 0:
        raise ValueError(f"{str(path)!r} has no data rows.")
    return {c: frame[c].tolist() for c in needed}


def load_hub_split(task: GlueTask, split: str) -> dict[str, list]:
    import datasets

    try:
        ds = datasets.load_dataset("nyu-mll/glue", task.name, split=split)
    except Exception as err:  # offline, or no cached copy: say what to do instead
        raise FileNotFoundError(
            f"Could not load GLUE {task.name}/{split} from the datasets hub ({type(err).__name__}: {err}). "
            "Pass --data_dir with local TSVs."
        ) from err
    return {c: list(ds[c]) for c in [*task.text_columns, "label"]}


def convert_labels(values: list, task: GlueTask, where: str) -> np.ndarray:
    try:
        labels = np.array([float(v) for v in values], dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{where}: non-numeric label ({err}).") from None
    if task.is_regression:
        return labels.astype(np.float32)
    if not np.all(labels == np.round(labels)) or labels.min() < 0 or labels.max() >= task.num_labels:
        bad = next(v for v in labels if v != round(v) or not 0 <= v < task.num_labels)
        raise ValueError(f"{where}: label {bad} is not a class id in [0, {task.num_labels}).")
    return labels.astype(np.int64)


def load_task_data(task: GlueTask, data_dir: str | None, max_train: int | None, max_eval: int | None,
                   seed: int) -> dict[str, dict]:
    """{split: {"texts": tuple of lists, "labels": array}} for train and every eval split of the task."""
    out = {}
    for split in ("train", *task.eval_splits):
        if data_dir:
            path = Path(data_dir) / task.name / f"{split}.tsv"
            columns, where = read_tsv(path, task), str(path)
        else:
            columns, where = load_hub_split(task, split), f"nyu-mll/glue {task.name}/{split}"
        labels = convert_labels(columns["label"], task, where)
        texts = tuple(list(columns[c]) for c in task.text_columns)
        limit = max_train if split == "train" else max_eval
        if limit is not None and limit < len(labels):
            # A random subset, so a quick run still sees every class.
            keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:limit])
            labels = labels[keep]
            texts = tuple([col[i] for i in keep] for col in texts)
        out[split] = {"texts": texts, "labels": labels}
    return out


class EncodedSplit(torch.utils.data.Dataset):
    """Tokenized examples (unpadded); DataCollatorWithPadding pads each batch to its longest example."""

    def __init__(self, tokenizer, texts: tuple[list, ...], labels: np.ndarray, max_length: int):
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        self.features = [
            {key: enc[key][i] for key in ("input_ids", "token_type_ids", "attention_mask") if key in enc}
            for i in range(len(labels))
        ]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**self.features[i], "labels": self.labels[i].item()}


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
def glue_metrics(task: GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics as GLUE defines them. A correlation is undefined for constant predictions; it counts as 0 then
    (the convention scikit-learn's Matthews correlation already follows)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    if task.is_regression:
        scores = predictions.reshape(-1).astype(np.float64)
        labels = labels.astype(np.float64)
        constant = np.ptp(scores) == 0 or np.ptp(labels) == 0
        return {
            "pearson": 0.0 if constant else float(pearsonr(scores, labels)[0]),
            "spearman": 0.0 if constant else float(spearmanr(scores, labels)[0]),
        }
    predicted = predictions.argmax(-1)
    values = {}
    for name in task.metrics:
        if name == "accuracy":
            values[name] = float((predicted == labels).mean())
        elif name == "f1":
            values[name] = float(f1_score(labels, predicted, zero_division=0.0))
        elif name == "matthews_correlation":
            values[name] = float(matthews_corrcoef(labels, predicted))
    return values


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint checks
# ----------------------------------------------------------------------------------------------------------------
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_checkpoint(path: str) -> None:
    """Fail early, naming the problem, for a checkpoint this script cannot fine-tune."""
    from transformers import AutoConfig

    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"--model must be a checkpoint folder, got the file {path!r}.")
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"No config.json in checkpoint folder {path!r}.")
        if not any((local / f).is_file() for f in WEIGHT_FILES):
            raise FileNotFoundError(
                f"No model weights ({', '.join(WEIGHT_FILES)}) in {path!r}; fine-tuning needs a trained checkpoint."
            )
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    if config.model_type != "mosaic_bert":
        raise ValueError(
            f"{path!r} is a {config.model_type!r} checkpoint, not MosaicBERT ('mosaic_bert'); convert it first with "
            "convert/convert_checkpoint.py."
        )


def load_classifier(path: str, task: GlueTask, attention_backend: str | None, replace_head: bool):
    from transformers import AutoModelForSequenceClassification

    labels = {i: f"LABEL_{i}" for i in range(task.num_labels)}  # fresh, also over an MNLI model's three labels
    kwargs = {"id2label": labels, "label2id": {v: k for k, v in labels.items()},
              "problem_type": "regression" if task.is_regression else "single_label_classification"}
    if attention_backend:
        kwargs["attention_backend"] = attention_backend
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, trust_remote_code=True, output_loading_info=True, ignore_mismatched_sizes=replace_head, **kwargs
    )
    missing_encoder = [k for k in info["missing_keys"] if k.startswith(("bert.embeddings.", "bert.encoder."))]
    if missing_encoder:
        raise ValueError(
            f"{path!r} does not hold MosaicBERT encoder weights (missing e.g. {missing_encoder[:3]}); it is a "
            "checkpoint of another architecture."
        )
    return model


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="MosaicBERT checkpoint folder (or Hub id) to fine-tune.")
    p.add_argument("--tasks", default="sst2,cola,mrpc,rte,stsb",
                   help=f"Comma-separated tasks among {', '.join(TASKS)}.")
    p.add_argument("--data_dir", help="Folder of <task>/<split>.tsv files; without it the datasets hub is used.")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_seq_length", type=int, default=256)
    p.add_argument("--max_train_samples", type=int, default=None, help="Random subset of the training data.")
    p.add_argument("--max_eval_samples", type=int, default=None, help="Random subset of each validation split.")
    p.add_argument("--learning_rate", type=float, default=None, help="Override every task's learning rate.")
    p.add_argument("--num_train_epochs", type=float, default=None, help="Override every task's epochs.")
    p.add_argument("--per_device_train_batch_size", type=int, default=None, help="Override every task's batch.")
    p.add_argument("--per_device_eval_batch_size", type=int, default=128)
    p.add_argument("--warmup_ratio", type=float, default=0.06)
    p.add_argument("--from_mnli", nargs="?", const=True, default=None,
                   help="Start RTE, MRPC and STS-B from an MNLI-finetuned checkpoint, as the original recipe: the "
                        "MNLI model of this run (mnli in --tasks) or the given folder.")
    p.add_argument("--attention_backend", choices=["auto", "torch", "triton"], default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--logging_steps", type=int, default=100)
    p.add_argument("--save_models", action="store_true", help="Keep each fine-tuned model in <output_dir>/<task>.")
    p.add_argument("--disable_tqdm", action="store_true")
    return p


def _warmup_kwargs(ratio: float) -> dict:
    """Warmup as a fraction of the steps: `warmup_steps` takes a float below 1 from transformers 5 on (where
    `warmup_ratio` is deprecated); 4.x only has `warmup_ratio` for it."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return {"warmup_ratio": ratio}
    return {"warmup_steps": ratio}


def _format_results_table(results: dict) -> str:
    lines = ["| Task | Metric | Score | Train examples | Epochs | LR | Batch |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results["tasks"].values():
        metrics = ", ".join(f"{k} {100 * v:.2f}" for k, v in r["metrics"].items())
        lines.append(f"| {r['display']} | {metrics} | {100 * r['score']:.2f} | {r['train_examples']:,} | "
                     f"{r['epochs']:g} | {r['learning_rate']:g} | {r['batch_size']} |")
    lines.append(f"| **Average** | | **{100 * results['average_score']:.2f}** | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    tasks = parse_tasks(args.tasks)
    if args.from_mnli is True and "mnli" not in [t.name for t in tasks]:
        raise ValueError("--from_mnli without a folder needs mnli in --tasks.")
    if isinstance(args.from_mnli, str):
        check_checkpoint(args.from_mnli)
    if args.max_seq_length < 8:
        raise ValueError(f"--max_seq_length ({args.max_seq_length}) is too small.")
    if args.from_mnli:  # MNLI first so the others can start from it
        tasks.sort(key=lambda t: t.name != "mnli")

    # Every check before any training: the checkpoint, then all data of all tasks.
    check_checkpoint(args.model)
    data = {t.name: load_task_data(t, args.data_dir, args.max_train_samples, args.max_eval_samples, args.seed)
            for t in tasks}

    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    collator = DataCollatorWithPadding(tokenizer)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    mnli_model = args.from_mnli if isinstance(args.from_mnli, str) else None
    results = {"model": args.model, "seed": args.seed, "max_seq_length": args.max_seq_length, "tasks": {}}

    for task in tasks:
        lr = args.learning_rate or task.learning_rate
        epochs = args.num_train_epochs or task.epochs
        batch = args.per_device_train_batch_size or task.batch_size
        source = mnli_model if (args.from_mnli and task.name in FROM_MNLI_TASKS and mnli_model) else args.model
        model = load_classifier(source, task, args.attention_backend, replace_head=source != args.model)
        splits = data[task.name]
        train_ds = EncodedSplit(tokenizer, splits["train"]["texts"], splits["train"]["labels"], args.max_seq_length)
        task_dir = output_dir / task.name
        training_args = TrainingArguments(
            output_dir=str(task_dir),
            learning_rate=lr,
            num_train_epochs=epochs,
            per_device_train_batch_size=batch,
            per_device_eval_batch_size=args.per_device_eval_batch_size,
            **_warmup_kwargs(args.warmup_ratio),
            lr_scheduler_type="linear",
            weight_decay=task.weight_decay(lr) / lr,
            adam_beta1=0.9,
            adam_beta2=0.98,
            adam_epsilon=1e-6,
            bf16=args.bf16,
            eval_strategy="no",
            save_strategy="no",
            logging_steps=args.logging_steps,
            seed=args.seed,
            report_to="none",
            remove_unused_columns=False,
            dataloader_num_workers=args.dataloader_num_workers,
            disable_tqdm=args.disable_tqdm or None,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, data_collator=collator,
                          processing_class=tokenizer)
        start = time.time()
        train_out = trainer.train()
        split_metrics = {}
        for split in task.eval_splits:
            eval_ds = EncodedSplit(tokenizer, splits[split]["texts"], splits[split]["labels"], args.max_seq_length)
            pred = trainer.predict(eval_ds)
            split_metrics[split] = glue_metrics(task, pred.predictions, pred.label_ids)
        primary = split_metrics[task.eval_splits[0]]
        record = {
            "display": task.display,
            "metrics": primary,
            "score": float(np.mean(list(primary.values()))),
            "splits": split_metrics,
            "train_examples": len(train_ds),
            "eval_examples": {s: int(len(splits[s]["labels"])) for s in task.eval_splits},
            "learning_rate": lr,
            "epochs": epochs,
            "batch_size": batch,
            "torch_weight_decay": training_args.weight_decay,
            "steps": trainer.state.max_steps,
            "warmup_steps": training_args.get_warmup_steps(trainer.state.max_steps),
            "train_loss": train_out.metrics.get("train_loss"),
            "seconds": round(time.time() - start, 1),
            "initialized_from": source,
        }
        results["tasks"][task.name] = record
        if training_args.process_index == 0:
            print(f"{task.display}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in primary.items()), flush=True)
        if args.save_models or (args.from_mnli is True and task.name == "mnli"):
            trainer.save_model(str(task_dir / "model"))
            if task.name == "mnli":
                mnli_model = str(task_dir / "model")
        del trainer, model

    scores = [r["score"] for r in results["tasks"].values()]
    results["average_score"] = float(np.mean(scores)) if scores else math.nan
    table = _format_results_table(results)
    if training_args.process_index == 0:
        (output_dir / "glue_results.json").write_text(json.dumps(results, indent=2) + "\n")
        (output_dir / "glue_results.md").write_text(table)
        print(table)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
