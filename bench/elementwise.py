"""The training step's element-wise kernels at base size on one GPU: the gated GELU and add + dropout + LayerNorm,
forward and backward, with and without dropout, as an MLM training step at 256 x 128 tokens calls them (bf16
autocast: the GEMM outputs bf16, the LayerNorm's residual and output fp32).

    python bench/elementwise.py [--rows 32768] [--repo PATH ...] [--bwd-programs 2 4 8 16] [--bwd-stages 1 2 3]
                                [--gelu-configs 1024x4 2048x8 ...] [--loss]

GPU µs per call from a CUDA graph of 20 calls (best of 5 replays) and the bytes each call must move over that
time (GB/s). `--repo` times the kernels of other checkouts in the same process, side by side; `--bwd-programs`
also times the LayerNorm backward with that many programs per SM (`fused_ops.LAYER_NORM_BWD_PROGRAMS_PER_SM`),
`--bwd-stages` with that software-pipelining depth of its row loop (`fused_ops.LAYER_NORM_BWD_NUM_STAGES`).
`--gelu-configs` also times the gated GELU, forward and backward, with other (BLOCK_N, num_warps) launch configs
than `fused_ops._gelu_launch_config`'s, written BLOCK_NxWARPS. `--loss` also times the MLM loss, forward +
backward, on the bf16 logits of 30% of the rows against a 30528-word vocabulary: `fused_ops.cross_entropy(...).sum()`
against `F.cross_entropy(logits.float(), ..., reduction="sum")` (what the model computed before the kernel), by
CUDA events (best of 5 runs of 10).
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gated_gemm import gpu_us  # noqa: E402  (CUDA-graph timing shared with the gated GEMM benchmark)

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTER = 768, 3072


def load_fused_ops(repo, index):
    """The fused_ops module of checkout `repo`, imported under its own name (with its triton_launch)."""
    repo = Path(repo).resolve()
    saved = sys.modules.get("triton_launch")
    sys.path.insert(0, str(repo))
    try:
        sys.modules.pop("triton_launch", None)
        spec = importlib.util.spec_from_file_location(f"fused_ops_{index}", repo / "fused_ops.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(repo))
        if saved is not None:
            sys.modules["triton_launch"] = saved
    return module


def cases(ops, rows, p):
    """(name, fn, bytes moved) for one fused_ops module."""
    bf16, fp32 = torch.bfloat16, torch.float32
    seed = torch.randint(0, 2**62, (1,), device="cuda") if p > 0 else None
    glu_in = torch.randn(rows, 2 * INTER, device="cuda", dtype=bf16)
    glu_grad = torch.randn(rows, INTER, device="cuda", dtype=bf16)
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=bf16)  # a Linear's output
    residual = torch.randn(rows, HIDDEN, device="cuda", dtype=fp32)  # the fp32 residual stream
    weight = torch.ones(HIDDEN, device="cuda")
    bias = torch.zeros(HIDDEN, device="cuda")
    ln_grad = torch.randn(rows, HIDDEN, device="cuda", dtype=fp32)
    _, mean, rstd = ops._add_dropout_layer_norm_forward(x, residual, weight, bias, seed, 1e-12, p, fp32)
    glu_bytes = rows * INTER * 2
    ln_bytes = rows * HIDDEN
    return [
        ("gated GELU fwd", lambda: ops._gated_gelu_forward(glu_in, seed, p), 3 * glu_bytes),
        ("gated GELU bwd", lambda: ops._gated_gelu_backward(glu_grad, glu_in, seed, p), 5 * glu_bytes),
        ("add+LN fwd", lambda: ops._add_dropout_layer_norm_forward(x, residual, weight, bias, seed, 1e-12, p, fp32),
         ln_bytes * (2 + 4 + 4)),
        ("add+LN bwd", lambda: ops._layer_norm_param_grads(
            ops._add_dropout_layer_norm_backward(ln_grad, x, residual, weight, bias, mean, rstd, seed, p)[2],
            weight, bias, None), ln_bytes * (4 + 2 + 4 + 2 + 4)),
    ]


def sweep(ops, attribute, settings, rows, kernels):
    """Time the `cases` at indices `kernels` with `ops.<attribute>` set to each (value, label) of `settings` in
    turn, with and without dropout; the attribute is restored after."""
    saved = getattr(ops, attribute)
    try:
        for value, label in settings:
            setattr(ops, attribute, value)
            for p in (0.0, 0.1):
                chosen = cases(ops, rows, p)
                for name, fn, nbytes in (chosen[k] for k in kernels):
                    us = gpu_us(fn)
                    print(f"| {name}, {label} | {p} | {us:.1f} ({nbytes / us / 1e3:.0f}) |", flush=True)
    finally:
        setattr(ops, attribute, saved)


def time_loss(fn, logits, target, repeats=5, calls=10):
    """ms per forward + backward of fn(logits, target) -> scalar loss."""
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn(logits, target).backward()
            logits.grad = None
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / calls)
    return best


def loss_table(ops, rows, vocab=30528):
    import torch.nn.functional as F

    m = int(0.3 * rows)
    logits = torch.randn(m, vocab, device="cuda", dtype=torch.bfloat16).requires_grad_()
    target = torch.randint(0, vocab, (m,), device="cuda")
    variants = [
        ("F.cross_entropy(logits.float())", lambda x, t: F.cross_entropy(x.float(), t, reduction="sum")),
        ("fused_ops.cross_entropy", lambda x, t: ops.cross_entropy(x, t).sum()),
    ]
    print(f"\n| MLM loss fwd + bwd, {m} x {vocab} bf16 logits | ms |")
    print("|---|---:|")
    for name, fn in variants:
        time_loss(fn, logits, target, repeats=1, calls=2)  # compile the kernels
        print(f"| {name} | {time_loss(fn, logits, target):.3f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--repo", nargs="*", default=[], help="other checkouts to time side by side")
    parser.add_argument("--bwd-programs", type=int, nargs="*", default=[])
    parser.add_argument("--bwd-stages", type=int, nargs="*", default=[])
    parser.add_argument("--gelu-configs", nargs="*", default=[], help="gated GELU launch configs, e.g. 2048x8")
    parser.add_argument("--loss", action="store_true", help="also time the MLM loss (cross-entropy)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.manual_seed(0)
    repos = [REPO, *args.repo]
    modules = [load_fused_ops(r, i) for i, r in enumerate(repos)]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, rows = {args.rows}, n = {HIDDEN}, i = {INTER}")
    names = ["this checkout", *args.repo]
    print("| kernel | dropout | " + " | ".join(f"{n}: µs (GB/s)" for n in names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    with torch.no_grad():
        for p in (0.0, 0.1):
            per_module = [cases(ops, args.rows, p) for ops in modules]
            for k, (name, _, nbytes) in enumerate(per_module[0]):
                cells = []
                for module_cases in per_module:
                    us = gpu_us(module_cases[k][1])
                    cells.append(f"{us:.1f} ({nbytes / us / 1e3:.0f})")
                print(f"| {name} | {p} | " + " | ".join(cells) + " |", flush=True)
        ops = modules[0]
        sweep(ops, "LAYER_NORM_BWD_PROGRAMS_PER_SM", [(n, f"{n} programs / SM") for n in args.bwd_programs],
              args.rows, [3])
        sweep(ops, "LAYER_NORM_BWD_NUM_STAGES", [(n, f"{n} stages") for n in args.bwd_stages], args.rows, [3])
        configs = [tuple(int(v) for v in c.split("x")) for c in args.gelu_configs]
        sweep(ops, "_gelu_launch_config", [(lambda inter, c=c: c, f"{c[0]} columns, {c[1]} warps") for c in configs],
              args.rows, [0, 1])
    if args.loss:
        loss_table(modules[0], args.rows)


if __name__ == "__main__":
    main()
