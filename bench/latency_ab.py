"""Eager inference latency of MosaicBERT-base against transformers' BERT-base (sdpa), and optionally against another
checkout of MosaicBERT, timed in alternation in one process.

    python bench/latency_ab.py                                 # batch 1 x 128 and batch 8 x 16-256
    python bench/latency_ab.py --repo ../old-checkout [../another] --rows latency fixed
    python bench/latency_ab.py --static --rows fixed latency   # + this checkout with static_shapes=True
    python bench/latency_ab.py --rows fixed --variants "mosaic compile reduce-overhead" "BERT sdpa compile"
    python bench/latency_ab.py --smoke                         # CPU dry run (tests/test_bench_smoke.py)

A forward of a small batch waits on the host (Python, kernel launches), and on a shared machine host speed drifts
by tens of percent between processes and within one, so latencies measured in separate runs do not compare. Here
all models are built once (bf16, `inference_mode`, the batches of `bench/infer.py`) and each round times
`--forwards` forwards of every model on every row with CUDA events, rotating the order; the table gives the minimum
(least disturbed) and the median over rounds, in ms per forward, and each model's minimum over BERT's.
`--variants` adds models of `bench/infer.py` by name (compiled ones too: each compiles in the warm-up, every
row first, so the timed rounds replay what was compiled; a reduce-overhead model marks each call a new CUDA-graph
step).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import infer  # noqa: E402  (rows, batches and model builders shared with the inference benchmark)


def build_models(other_repos, static=False, variants=()):
    models = {}
    for name, repo in (("mosaic", REPO), *((f"mosaic {r}", r) for r in other_repos)):
        infer.MODEL_REPO = Path(repo).resolve()
        torch.manual_seed(0)
        models[name] = infer.ours().to(infer.DEVICE, infer.DTYPE).eval()
    infer.MODEL_REPO = REPO
    if static:
        torch.manual_seed(0)
        models["mosaic static"] = infer.ours_static().to(infer.DEVICE, infer.DTYPE).eval()
    torch.manual_seed(0)
    models["BERT sdpa"] = infer.hf_bert().to(infer.DEVICE, infer.DTYPE).eval()
    for name in variants:
        torch.manual_seed(0)
        module, forward = infer.VARIANTS[name][0]()
        module.to(infer.DEVICE, infer.DTYPE).eval()
        models[name] = forward
    return models


class Timer:
    """Milliseconds between start() and stop(): CUDA events on the GPU (stop waits for them), the wall clock on CPU."""

    def __init__(self):
        self.cuda = infer.DEVICE == "cuda"
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self):
        if self.cuda:
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self):
        if not self.cuda:
            return (time.perf_counter() - self.t0) * 1e3
        self.end.record()
        self.end.synchronize()
        return self.begin.elapsed_time(self.end)


def _mode(name):
    return "reduce-overhead" if name.endswith("reduce-overhead") else None


def time_rounds(models, rows, rounds, forwards, warmup=5):
    """{(row, model): [ms per forward of each round]}."""
    batches = {row: infer.make_batch(row)[0] for row in rows}
    names = list(models)
    times = {(row, name): [] for row in rows for name in names}
    timer = Timer()
    with torch.inference_mode():
        for row in rows:
            for name in names:
                for _ in range(warmup):
                    infer.mark_step(_mode(name))
                    models[name](**batches[row])
        if timer.cuda:
            torch.cuda.synchronize()
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for row in rows:
                for name in order:
                    model, batch, mode = models[name], batches[row], _mode(name)
                    timer.start()
                    for _ in range(forwards):
                        infer.mark_step(mode)
                        model(**batch)
                    times[(row, name)].append(timer.stop() / forwards)
    return times


def table(times, rows, names):
    lines = ["| batch | model | min ms | median ms | min ÷ BERT's min |", "|---|---|---:|---:|---:|"]
    for row in rows:
        base = min(times[(row, "BERT sdpa")])
        for name in names:
            t = times[(row, name)]
            lines.append(f"| {row} | {name} | {min(t):.2f} | {statistics.median(t):.2f} | {min(t) / base:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", nargs="*", default=[], help="other MosaicBERT checkouts to time beside this one")
    parser.add_argument("--rows", nargs="*", default=["latency"], help="bench/infer.py rows containing one of these")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--forwards", type=int, default=20, help="forwards per model, row and round")
    parser.add_argument("--static", action="store_true", help="also this checkout with static_shapes=True")
    parser.add_argument("--variants", nargs="*", default=[], choices=list(infer.VARIANTS), metavar="NAME",
                        help="models of bench/infer.py to time beside them, compiled ones included")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run: fp32, tiny models and batches, 2 rounds")
    args = parser.parse_args()
    if args.smoke:  # as bench/infer.py --smoke
        infer.DEVICE, infer.DTYPE, infer.SMOKE = "cpu", torch.float32, True
        args.rounds, args.forwards = 2, 1
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    if args.variants:  # MosaicBERT unpads: nonzero's data-dependent size is captured in the graph, as in infer.py
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        torch._dynamo.config.capture_scalar_outputs = True
    rows = [r for r in infer.ROWS if any(s in r for s in args.rows)]
    models = build_models(args.repo, args.static, args.variants)
    times = time_rounds(models, rows, args.rounds, args.forwards, warmup=1 if args.smoke else 5)
    device = torch.cuda.get_device_name() if infer.DEVICE == "cuda" else "cpu"
    print(f"{device}, torch {torch.__version__}; {args.rounds} rounds of {args.forwards} forwards; "
          f"other checkouts: {args.repo}")
    print(table(times, rows, list(models)))


if __name__ == "__main__":
    main()
