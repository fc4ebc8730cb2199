"""Where the GPU waits for the host: idle gaps between kernels in back-to-back eager calls, and what the host did.

    python bench/idle_gaps.py infer fixed          # MosaicBERT-base forwards (bench/infer.py's model, bf16)
    python bench/idle_gaps.py train ragged         # MLM training steps (bench/train_step.py's "mosaic triton+sparse")
    python bench/idle_gaps.py infer fixed --bert   # transformers' BertModel-base, the same way

Profiles 4 forwards (or 2 training steps) after 5 warm-up calls with torch.profiler (CPU + CUDA, Python stacks),
then prints the GPU's busy and idle time per call; the gaps up to `--min-gap` µs (too short for the host to be the
cause) summed by the kernels on either side; and for the largest idle gaps the host calls that began inside each
gap (offset from the gap's start and duration, µs).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(mode, kind, bert=False):
    if mode == "infer":
        import infer

        model = (infer.hf_bert() if bert else infer.ours()).to("cuda", torch.bfloat16).eval()
        row = {"fixed": "fixed 128 x 256", "ragged": "ragged 32-512 x 128"}.get(kind, kind)
        batch, _ = infer.make_batch(row)

        def call():
            with torch.inference_mode():
                model(**batch)

        return call, 4
    import train_step

    model = train_step.VARIANTS["mosaic triton+sparse"]().to("cuda").train()
    batch, _ = train_step.make_batch(kind)
    opt = train_step.optimizer(model)
    return lambda: train_step.mlm_step(model, batch, opt), 2


def _short(name):
    return name.split("(")[0].split("<")[0][:48]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["infer", "train"])
    parser.add_argument("kind", nargs="?", default="fixed")
    parser.add_argument("--gaps", type=int, default=8, help="how many of the largest gaps to detail")
    parser.add_argument("--min-gap", type=float, default=20.0, help="µs between kernels that count as idle")
    parser.add_argument("--bert", action="store_true", help="infer: transformers' BERT (bench/infer.py's) instead")
    parser.add_argument("--no-stack", action="store_true",
                        help="no Python stacks (a lighter profiler: host time closer to an unprofiled run)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.manual_seed(0)
    call, n = build(args.mode, args.kind, args.bert)
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=not args.no_stack) as prof:
        for _ in range(n):
            call()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    device = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                    key=lambda e: e["ts"])
    host = sorted((e for e in events if e.get("cat") in ("python_function", "cpu_op", "cuda_runtime") and "dur" in e),
                  key=lambda e: e["ts"])
    gaps, small, end, last = [], [], device[0]["ts"] + device[0]["dur"], device[0]["name"]
    for e in device[1:]:
        gap = e["ts"] - end
        if gap > args.min_gap:
            gaps.append((gap, end, e["ts"], e["name"]))
        elif gap > 0:
            small.append((gap, last, e["name"]))
        if e["ts"] + e["dur"] > end:
            end, last = e["ts"] + e["dur"], e["name"]
    span = end - device[0]["ts"]
    busy = sum(e["dur"] for e in device)
    idle = sum(g[0] for g in gaps)
    print(f"{args.mode} {args.kind} ({torch.cuda.get_device_name()}): per call GPU span {span / n / 1e3:.2f} ms, "
          f"kernels {busy / n / 1e3:.2f} ms, idle gaps over {args.min_gap:.0f} µs {idle / n / 1e3:.2f} ms "
          f"({len(gaps) / n:.0f} gaps)")
    counts = {}
    for e in device:
        counts[_short(e["name"])] = counts.get(_short(e["name"]), 0) + 1
    print("kernels per call: " + ", ".join(f"{c / n:g} {k}" for k, c in sorted(counts.items(), key=lambda i: -i[1])))
    # gaps too short for the host to be the cause: the GPU between dependent kernels (launch latency, tails)
    print(f"gaps up to {args.min_gap:.0f} µs: {len(small) / n:.0f} per call, {sum(g[0] for g in small) / n:.0f} µs "
          "per call; by the kernels on either side (µs per call, count per call):")
    pairs = {}
    for gap, before, after in small:
        key = f"{_short(before)} -> {_short(after)}"
        total, count = pairs.get(key, (0.0, 0))
        pairs[key] = (total + gap, count + 1)
    for key, (total, count) in sorted(pairs.items(), key=lambda item: -item[1][0])[:12]:
        print(f"  {total / n:7.1f} {count / n:5.1f}  {key}")
    for length, start, stop, next_kernel in sorted(gaps, reverse=True)[: args.gaps]:
        print(f"\ngap of {length:.0f} µs, then {next_kernel[:70]}")
        began = [h for h in host if start <= h["ts"] < stop and h["dur"] >= 10]
        for h in began[:20]:
            print(f"  +{h['ts'] - start:6.0f} {h['dur']:7.0f}  {h['name'][:100]}")


if __name__ == "__main__":
    main()
