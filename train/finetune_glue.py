#!/usr/bin/env python
"""Fine-tune a MosaicBERT checkpoint on GLUE tasks with the Hugging Face Trainer and report dev-set metrics.

    python train/finetune_glue.py --model runs/mini --tasks sst2,mrpc,stsb --data-dir "$DATA/glue" \
        --output-dir runs/mini-glue --bf16

Data: local TSVs laid out as `<data-dir>/<task>/{train,validation}.tsv` (MNLI: `validation_matched.tsv` and
`validation_mismatched.tsv`), tab-separated with a header, no quoting, columns as the Hugging Face `glue` dataset
(e.g. `sentence,label`; `sentence1,sentence2,label`); without `--data-dir` the `nyu-mll/glue` dataset is loaded
through `datasets` (needs network or a filled datasets cache). Every file of every task is read and checked
before any training: a missing column, a row with the wrong number of fields, a label that is not a number, not
finite (`nan`, `inf`) or not a class id fails, naming the file and line.

Per-task defaults (learning rate, epochs, batch size) are the MosaicBERT GLUE settings; max length 256 with dynamic
padding (the model removes padding itself), 6% linear warmup then linear decay, weight decay = lr/10 in the
decoupled convention (RTE: 1e-5), i.e. torch AdamW weight_decay = 0.1 (RTE: 1e-5 / lr). Metrics: accuracy;
accuracy and F1 for MRPC and QQP; Matthews correlation for CoLA; Pearson and Spearman for STS-B (regression with
one output). Writes `<output-dir>/glue_results.json` and `<output-dir>/glue_results.md`.
Option names are dashed; the older underscore spellings (`--data_dir`) still work.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from script_cli import HelpFormatter, exit_on_input_error, flag

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
# The original recipe starts these from the MNLI-finetuned checkpoint (`--from-mnli`).
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


@dataclass
class SplitColumns:
    """One split as read: {column: values} for the text columns and `label`, and where each row came from."""

    columns: dict[str, list]
    rows: list[str]  # per row, e.g. "data/sst2/train.tsv:17" (file and line) or "nyu-mll/glue sst2/train row 3"


def read_tsv(path: Path, task: GlueTask) -> SplitColumns:
    """Read one split (tab-separated, a header row, no quoting). Errors name the file and line: a missing column,
    a row with the wrong number of fields, a file that is not UTF-8."""
    if not path.is_file():
        raise FileNotFoundError(f"GLUE file not found: {str(path)!r} (expected <data-dir>/{task.name}/<split>.tsv).")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        bad = f"byte 0x{data[err.start]:02x} at offset {err.start}"
        raise ValueError(f"{path}:{line}: not UTF-8 text ({bad}).") from None
    needed = [*task.text_columns, "label"]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: the file is empty (no header row).")
    missing = [c for c in needed if c not in header]
    if missing:
        raise ValueError(f"{path}:1: the header lacks column(s) {missing} for {task.name}; it has {header}.")
    index = [header.index(c) for c in needed]
    columns, rows = {c: [] for c in needed}, []
    for fields in reader:
        if len(fields) != len(header):
            raise ValueError(f"{path}:{reader.line_num}: {len(fields)} field(s), but the header has {len(header)} "
                             f"({', '.join(header)}).")
        for c, i in zip(needed, index):
            columns[c].append(fields[i])
        rows.append(f"{path}:{reader.line_num}")
    if not rows:
        raise ValueError(f"{path}: no data rows.")
    return SplitColumns(columns, rows)


def load_hub_split(task: GlueTask, split: str) -> SplitColumns:
    import datasets

    try:
        ds = datasets.load_dataset("nyu-mll/glue", task.name, split=split)
    except Exception as err:  # offline, or no cached copy: say what to do instead
        raise FileNotFoundError(
            f"Could not load GLUE {task.name}/{split} from the datasets hub ({type(err).__name__}: {err}). "
            "Pass --data-dir with local TSVs."
        ) from err
    columns = {c: list(ds[c]) for c in [*task.text_columns, "label"]}
    return SplitColumns(columns, [f"nyu-mll/glue {task.name}/{split} row {i}" for i in range(len(ds))])


def convert_labels(values: list, task: GlueTask, rows: list[str]) -> np.ndarray:
    """Labels as float32 scores (regression) or int64 class ids. A label that is not a number, not finite
    (`nan`, `inf`: a regression would train to NaN) or not a class id raises ValueError naming its row."""
    labels = np.empty(len(values), dtype=np.float64)
    for i, (value, row) in enumerate(zip(values, rows)):
        try:
            labels[i] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{row}: label {value!r} is not a number.") from None
        if not math.isfinite(labels[i]):
            raise ValueError(f"{row}: label {value!r} is not a finite number.")
        if not task.is_regression and not (labels[i] == int(labels[i]) and 0 <= labels[i] < task.num_labels):
            raise ValueError(f"{row}: label {value!r} is not a class id in [0, {task.num_labels}) for {task.name}.")
    return labels.astype(np.float32 if task.is_regression else np.int64)


def load_task_data(task: GlueTask, data_dir: str | None, max_train: int | None, max_eval: int | None,
                   seed: int) -> dict[str, dict]:
    """{split: {"texts": tuple of lists, "labels": array}} for train and every eval split of the task."""
    out = {}
    for split in ("train", *task.eval_splits):
        if data_dir:
            read = read_tsv(Path(data_dir) / task.name / f"{split}.tsv", task)
        else:
            read = load_hub_split(task, split)
        labels = convert_labels(read.columns["label"], task, read.rows)
        texts = tuple(list(read.columns[c]) for c in task.text_columns)
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="MosaicBERT checkpoint folder (or Hub id) to fine-tune.")
    p.add_argument("--tasks", default="sst2,cola,mrpc,rte,stsb",
                   help=f"Comma-separated tasks among {', '.join(TASKS)}.")
    p.add_argument(*flag("--data-dir"),
                   help="Folder of <task>/<split>.tsv files; without it the datasets hub is used.")
    p.add_argument(*flag("--output-dir"), required=True)
    p.add_argument(*flag("--max-seq-length"), type=int, default=256)
    p.add_argument(*flag("--max-train-samples"), type=int, default=None, help="Random subset of the training data.")
    p.add_argument(*flag("--max-eval-samples"), type=int, default=None, help="Random subset of each validation split.")
    p.add_argument(*flag("--learning-rate"), type=float, default=None, help="Override every task's learning rate.")
    p.add_argument(*flag("--num-train-epochs"), type=float, default=None, help="Override every task's epochs.")
    p.add_argument(*flag("--per-device-train-batch-size"), type=int, default=None, help="Override every task's batch.")
    p.add_argument(*flag("--per-device-eval-batch-size"), type=int, default=128)
    p.add_argument(*flag("--warmup-ratio"), type=float, default=0.06)
    p.add_argument(*flag("--from-mnli"), nargs="?", const=True, default=None,
                   help="Start RTE, MRPC and STS-B from an MNLI-finetuned checkpoint, as the original recipe: the "
                        "MNLI model of this run (mnli in --tasks) or the given folder.")
    p.add_argument(*flag("--attention-backend"), choices=["auto", "torch", "triton"], default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(*flag("--dataloader-num-workers"), type=int, default=0)
    p.add_argument(*flag("--logging-steps"), type=int, default=100)
    p.add_argument(*flag("--save-models"), action="store_true",
                   help="Keep each fine-tuned model in <output-dir>/<task>/model.")
    p.add_argument(*flag("--disable-tqdm"), action="store_true")
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


@dataclass
class GlueRun:
    """Everything checked and loaded before the first task trains."""

    args: argparse.Namespace
    tasks: list[GlueTask]
    data: dict[str, dict]
    tokenizer: object
    output_dir: Path


def prepare(argv=None) -> GlueRun:
    """Parse and check the arguments, the checkpoint(s) and all data of all tasks. Bad input raises here
    (ValueError / FileNotFoundError naming the file and line), before any training."""
    from transformers import AutoTokenizer

    args = build_parser().parse_args(argv)
    tasks = parse_tasks(args.tasks)
    if args.from_mnli is True and "mnli" not in [t.name for t in tasks]:
        raise ValueError("--from-mnli without a folder needs mnli in --tasks.")
    if isinstance(args.from_mnli, str):
        check_checkpoint(args.from_mnli)
    if args.max_seq_length < 8:
        raise ValueError(f"--max-seq-length ({args.max_seq_length}) is too small.")
    if args.from_mnli:  # MNLI first so the others can start from it
        tasks.sort(key=lambda t: t.name != "mnli")
    check_checkpoint(args.model)
    data = {t.name: load_task_data(t, args.data_dir, args.max_train_samples, args.max_eval_samples, args.seed)
            for t in tasks}
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    return GlueRun(args, tasks, data, tokenizer, Path(args.output_dir))


def finetune_task(run: GlueRun, task: GlueTask, source: str) -> tuple[dict, object]:
    """Fine-tune `source` on one task and score its dev split(s); returns (result record, trainer)."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    args, splits, tokenizer = run.args, run.data[task.name], run.tokenizer
    lr = args.learning_rate or task.learning_rate
    epochs = args.num_train_epochs or task.epochs
    batch = args.per_device_train_batch_size or task.batch_size
    model = load_classifier(source, task, args.attention_backend, replace_head=source != args.model)
    train_ds = EncodedSplit(tokenizer, splits["train"]["texts"], splits["train"]["labels"], args.max_seq_length)
    training_args = TrainingArguments(
        output_dir=str(run.output_dir / task.name),
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
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds,
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
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
    return record, trainer


def run_tasks(run: GlueRun) -> dict:
    """Fine-tune every task in order (RTE, MRPC and STS-B from the MNLI model with --from-mnli) and write
    glue_results.json / glue_results.md; returns the results."""
    args = run.args
    run.output_dir.mkdir(parents=True, exist_ok=True)
    mnli_model = args.from_mnli if isinstance(args.from_mnli, str) else None
    results = {"model": args.model, "seed": args.seed, "max_seq_length": args.max_seq_length, "tasks": {}}
    is_main = True
    for task in run.tasks:
        source = mnli_model if (args.from_mnli and task.name in FROM_MNLI_TASKS and mnli_model) else args.model
        record, trainer = finetune_task(run, task, source)
        results["tasks"][task.name] = record
        is_main = trainer.args.process_index == 0
        if is_main:
            print(f"{task.display}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in record["metrics"].items()),
                  flush=True)
        if args.save_models or (args.from_mnli is True and task.name == "mnli"):
            trainer.save_model(str(run.output_dir / task.name / "model"))
            if task.name == "mnli":
                mnli_model = str(run.output_dir / task.name / "model")
        del trainer

    scores = [r["score"] for r in results["tasks"].values()]
    results["average_score"] = float(np.mean(scores)) if scores else math.nan
    table = _format_results_table(results)
    if is_main:
        (run.output_dir / "glue_results.json").write_text(json.dumps(results, indent=2) + "\n")
        (run.output_dir / "glue_results.md").write_text(table)
        print(table)
    return results


def main(argv=None) -> dict:
    """Fine-tune as the command line says; returns the results. Bad input raises before any training."""
    return run_tasks(prepare(argv))


if __name__ == "__main__":
    # Bad input: a one-line error and status 2; a failure during training: its traceback and status 1.
    run_tasks(exit_on_input_error(prepare))
