"""Where an MLM training step spends its time: one `bench/train_step.py` variant on one of its batches.

    python bench/profile_train.py                                   # "mosaic triton+sparse", fixed 256 x 128
    python bench/profile_train.py "HF BERT sdpa compile" ragged     # any variant of bench/train_step.py
    python bench/profile_train.py --phases                          # host against GPU per phase, and the syncs

Times 10 steps (after 5 warm-up steps) for the step time and real tokens/s, then runs torch.profiler over 3 steps
and prints the GPU kernels by their time per step, with how many launches a step makes.

`--phases` instead runs one step under torch's CUDA sync debug mode (each synchronizing call is listed with the
code that made it), then 10 steps back to back with host clocks and CUDA events at the forward / backward /
optimizer boundaries. A phase's host time includes any wait at a sync in it; its GPU time (event to event)
includes the GPU's idle time, so the three GPU times add up to a step's wall time, and a phase where the GPU
waits for the host shows as GPU time above the phase's kernel time.
"""

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402  (variants, batches and the step shared with the training benchmark)


def kernel_table(step, lengths, args):
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / 10
    print(f"{args.variant}, {args.kind}: {seconds * 1e3:.2f} ms a step, {int(lengths.sum()) / seconds / 1e3:.0f}k "
          f"real tokens/s ({torch.cuda.get_device_name()}, torch {torch.__version__})")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in kernels)
    print(f"GPU kernel time a step: {total / 3 / 1e3:.2f} ms\n")
    print("| ms a step | launches a step | kernel |\n|---:|---:|---|")
    for e in kernels[: args.top]:
        print(f"| {e.self_device_time_total / 3 / 1e3:.3f} | {e.count // 3} | `{e.key[:100]}` |")


def phases(step, lengths, args, steps=10):
    syncs = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
            syncs.append(" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[:-5:-1]))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    print(f"{args.variant}, {args.kind} ({torch.cuda.get_device_name()}, torch {torch.__version__})")
    print(f"host-device syncs in one step: {len(syncs)}" + "".join(f"\n    {s}" for s in syncs))

    runs = []
    start = time.perf_counter()
    for _ in range(steps):
        clocks, events = [], [torch.cuda.Event(enable_timing=True) for _ in range(4)]

        def mark(i):  # a host clock and a CUDA event at each phase boundary
            clocks.append(time.perf_counter())
            events[i].record()

        step(mark)
        runs.append((clocks, events))
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    print(f"\nwall {wall * 1e3:.2f} ms a step, {int(lengths.sum()) / wall / 1e3:.0f}k real tokens/s")
    print("| phase | host ms | GPU ms (event to event) |\n|---|---:|---:|")
    for i, name in enumerate(("forward", "backward", "optimizer")):
        host = sum(c[i + 1] - c[i] for c, _ in runs) / steps * 1e3
        gpu = sum(e[i].elapsed_time(e[i + 1]) for _, e in runs) / steps
        print(f"| {name} | {host:.2f} | {gpu:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", nargs="?", default="mosaic triton+sparse", choices=list(train_step.VARIANTS))
    parser.add_argument("kind", nargs="?", default="fixed", help="fixed, ragged or long:<length>:<batch size>")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--phases", action="store_true", help="host against GPU time per phase, and the syncs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.manual_seed(0)
    model = train_step.VARIANTS[args.variant]().to("cuda").train()
    batch, lengths = train_step.make_batch(args.kind)
    opt = train_step.optimizer(model)

    def step(mark=None):
        train_step.mlm_step(model, batch, opt, mark)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    (phases if args.phases else kernel_table)(step, lengths, args)


if __name__ == "__main__":
    main()
