"""Where an MLM training step spends its GPU time: one `bench/train_step.py` variant on one of its batches.

    python bench/profile_train.py                                   # "mosaic triton+sparse", fixed 256 x 128
    python bench/profile_train.py "HF BERT sdpa compile" ragged     # any variant of bench/train_step.py

Times 10 steps (after 5 warm-up steps) for the step time and real tokens/s, then runs torch.profiler over 3 steps
and prints the GPU kernels by their time per step, with how many launches a step makes.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402  (variants and batches shared with the training benchmark)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", nargs="?", default="mosaic triton+sparse", choices=list(train_step.VARIANTS))
    parser.add_argument("kind", nargs="?", default="fixed", help="fixed, ragged or long:<length>:<batch size>")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.manual_seed(0)
    model = train_step.VARIANTS[args.variant]().to("cuda").train()
    batch, lengths = train_step.make_batch(args.kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
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


if __name__ == "__main__":
    main()
