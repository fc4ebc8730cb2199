"""The GLU's Linear + gated GELU at base size on one GPU, three ways: the pointer-load gated GEMM, the persistent TMA
gated GEMM, and `F.linear` followed by the gated GELU kernel.

    python bench/gated_gemm.py [--rows 1 128 512 ...] [--dtype bf16]

GPU µs per call from a CUDA graph of 20 calls (best of 5 replays), so launch cost is left out; host µs per call
issuing 300 calls without waiting (the model's automatic choice, `fused_ops._gated_linear_gelu_forward`, and the
unfused pair). Pointer-kernel tile configs (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) are timed side by side; each
result is checked against the unfused pair (relative error) before it is timed. The pick is
`fused_ops._gated_linear_small_config` and `fused_ops.GATED_GEMM_TMA_ROWS`.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fused_ops  # noqa: E402

HIDDEN, INTER = 768, 3072
CONFIGS = [(64, 32, 64, 4, 4), (64, 64, 64, 3, 4), (128, 64, 64, 3, 4), (128, 128, 64, 3, 8), (128, 64, 64, 4, 8)]


def pointer_kernel(x, w, config):
    block_m, block_n, block_k, stages, warps = config
    out = torch.empty(x.shape[0], INTER, device=x.device, dtype=x.dtype)
    grid = (fused_ops.cdiv(INTER, block_n), fused_ops.cdiv(x.shape[0], block_m), 1)
    fused_ops.launch(
        fused_ops._gated_linear_gelu_small_kernel, grid,
        (x, w, out, x.shape[0], INTER, HIDDEN, x.stride(0), w.stride(0), out.stride(0)), x.device.index,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=None, num_stages=stages, num_warps=warps,
    )
    return out


# TMA kernel configs (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, stages, warps) for --tma-sweep; each tile is one
# (BLOCK_M, 2 * BLOCK_N) accumulator. Tried and dropped (BENCHMARKS.md, 2026-12-06): two (BLOCK_M, BLOCK_N) dots a
# k-step instead of one, unflattened loops, storing the tile in two halves, warp specialization; 64- and 256-row
# tiles, BLOCK_K 32 and 128.
TMA_CONFIGS = [(128, 128, 64, 16, 4, 8), (128, 128, 64, 8, 4, 8), (128, 128, 64, 8, 3, 8), (128, 128, 64, 4, 4, 8),
               (128, 64, 64, 8, 4, 8)]


def tma_kernel(x, w, config=None):
    saved = fused_ops.GATED_GEMM_TMA_ROWS, fused_ops._gated_linear_config
    fused_ops.GATED_GEMM_TMA_ROWS = 0
    if config is not None:
        fused_ops._gated_linear_config = lambda rows, dtype=None: config
    try:
        return fused_ops._gated_linear_gelu_forward(x, w)
    finally:
        fused_ops.GATED_GEMM_TMA_ROWS, fused_ops._gated_linear_config = saved


def unfused(x, w):
    return fused_ops._gated_gelu_forward(F.linear(x, w))


def gpu_us(fn, calls=20):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    return best


def host_us(fn, calls=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 128, 512, 1024, 2048, 4096, 8192, 32768])
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--tma-sweep", action="store_true",
                        help="time the TMA kernel's tile configs instead (and the Linear alone, its GEMM's ceiling)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    torch.manual_seed(0)
    w = (torch.randn(2 * INTER, HIDDEN, device="cuda") * HIDDEN**-0.5).to(dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, n = {HIDDEN}, i = {INTER}")
    if args.tma_sweep:
        return tma_sweep(args.rows, w, dtype)
    head = ["rows", "unfused GPU", "TMA GPU", *(f"pointer {c}" for c in CONFIGS), "host: unfused", "host: auto"]
    print("| " + " | ".join(head) + " |\n|" + "---:|" * len(head))
    with torch.inference_mode():
        for rows in args.rows:
            x = torch.randn(rows, HIDDEN, device="cuda").to(dtype)
            ref = unfused(x, w).float()
            cells = []
            for fn in [lambda: unfused(x, w), lambda: tma_kernel(x, w),
                       *(lambda c=c: pointer_kernel(x, w, c) for c in CONFIGS)]:
                err = (fn().float() - ref).abs().max().item() / ref.abs().max().item()
                cells.append(f"{gpu_us(fn):.1f}" if err < 2e-2 else f"wrong ({err:.2g})")
            cells += [f"{host_us(lambda: unfused(x, w)):.1f}",
                      f"{host_us(lambda: fused_ops._gated_linear_gelu_forward(x, w)):.1f}"]
            print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)


def chunked(x, w, chunk, scratch):
    """F.linear a chunk of rows at a time into one reused (chunk, 2 * i) buffer, each chunk's gated GELU right
    after its GEMM: the GEMM output is read back from L2 rather than memory."""
    out = torch.empty(x.shape[0], INTER, device=x.device, dtype=x.dtype)
    block, warps = fused_ops._gelu_launch_config(INTER)
    for r0 in range(0, x.shape[0], chunk):
        part = x[r0:r0 + chunk]
        buf = scratch[: part.shape[0]]
        torch.matmul(part, w.T, out=buf)
        dst = out[r0:r0 + chunk]
        fused_ops.launch(
            fused_ops._gated_gelu_fwd_kernel, (part.shape[0], fused_ops.cdiv(INTER, block), 1),
            (buf, dst, buf, buf.stride(0), dst.stride(0), INTER, 0.0, 1.0), x.device.index,
            BLOCK_N=block, HAS_DROPOUT=False, num_warps=warps,
        )
    return out


def tma_sweep(rows_list, w, dtype):
    """One line a variant, one column a row count: GPU µs per call."""
    xs = {rows: torch.randn(rows, HIDDEN, device="cuda").to(dtype) for rows in rows_list}
    variants = [("Linear alone", lambda x: F.linear(x, w)), ("Linear + gated GELU", lambda x: unfused(x, w))]
    for chunk in (1024, 2048, 4096):
        scratch = torch.empty(chunk, 2 * INTER, device="cuda", dtype=dtype)
        variants.append((f"chunked {chunk}", lambda x, c=chunk, b=scratch: chunked(x, w, c, b)))
    variants += [(f"TMA {c}", lambda x, c=c: tma_kernel(x, w, c)) for c in TMA_CONFIGS]
    print("| variant | " + " | ".join(f"{r} rows" for r in rows_list) + " |\n|---|" + "---:|" * len(rows_list))
    with torch.inference_mode():
        refs = {rows: unfused(x, w).float() for rows, x in xs.items()}
        for name, fn in variants:
            cells = []
            for rows, x in xs.items():
                try:
                    err = 0.0 if name == "Linear alone" else (
                        (fn(x).float() - refs[rows]).abs().max().item() / refs[rows].abs().max().item())
                    cells.append(f"{gpu_us(lambda: fn(x)):.1f}" if err < 2e-2 else f"wrong ({err:.2g})")
                except Exception as e:  # e.g. out of shared memory: reported, the rest still run
                    cells.append(f"failed: {type(e).__name__}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
