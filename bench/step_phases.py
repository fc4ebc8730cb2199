"""Host and GPU time per phase of an eager MLM training step, and the step's host-device syncs.

    python bench/step_phases.py                                  # "mosaic triton+sparse", fixed 256 x 128
    python bench/step_phases.py "HF BERT sdpa" ragged            # any variant and batch of bench/train_step.py

Runs 5 warm-up steps, then one step under torch's CUDA sync debug mode (each synchronizing call is listed with
the code that made it), then 10 steps back to back with CUDA events and host clocks at the forward / backward /
optimizer boundaries. Host time of a phase includes any wait at a sync in it; GPU time between two events
includes the GPU's idle time in between, so GPU forward + backward + optimizer = the wall time of a step, and
where the host is slower than the GPU it shows.
"""

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402  (variants and batches shared with the training benchmark)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", nargs="?", default="mosaic triton+sparse", choices=list(train_step.VARIANTS))
    parser.add_argument("kind", nargs="?", default="fixed", help="fixed, ragged or long:<length>:<batch size>")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.manual_seed(0)
    model = train_step.VARIANTS[args.variant]().to("cuda").train()
    batch, lengths = train_step.make_batch(args.kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        clocks = [time.perf_counter()]
        events[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        clocks.append(time.perf_counter())
        events[1].record()
        loss.backward()
        clocks.append(time.perf_counter())
        events[2].record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clocks.append(time.perf_counter())
        events[3].record()
        return clocks, events

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    syncs = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
            syncs.append([f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-4:]])

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
    print(f"host-device syncs in one step: {len(syncs)}")
    for frames in syncs:
        print("   " + " <- ".join(reversed(frames)))

    runs = []
    start = time.perf_counter()
    for _ in range(args.steps):
        runs.append(step())
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps
    names = ("forward", "backward", "optimizer")
    print(f"\nwall {wall * 1e3:.2f} ms a step, {int(lengths.sum()) / wall / 1e3:.0f}k real tokens/s")
    print("| phase | host ms | GPU ms (event to event) |\n|---|---:|---:|")
    for i, name in enumerate(names):
        host = sum(c[i + 1] - c[i] for c, _ in runs) / args.steps * 1e3
        gpu = sum(e[i].elapsed_time(e[i + 1]) for _, e in runs) / args.steps
        print(f"| {name} | {host:.2f} | {gpu:.2f} |")


if __name__ == "__main__":
    main()
