"""The GLU MLP's backward through W_o and the gated GELU as one persistent TMA GEMM, against what a training step
runs today: cuBLAS d_glu = g W_o, then the gated GELU backward kernel over the (t, 2 * i) pre-activations.

    python bench/gated_bwd_gemm.py [--rows 8192 32768] [--configs 128,128,64,8,4,8 ...] [--dropout 0.1]
    TRITON_INTERPRET=1 python bench/gated_bwd_gemm.py --smoke    # CPU: the kernel against float64

The fused kernel computes a (BLOCK_M, BLOCK_N) tile of d_glu = g W_o in registers and, in its epilogue, reads the
matching gate and value tiles of the forward's pre-activations, applies the dropout mask (regenerated from the
forward's seed, as `fused_ops._gated_gelu_bwd_kernel` does) and writes d_gate and d_value: d_glu never reaches
memory. "early" issues the gate / value loads before the tile's k loop instead of after it. GPU µs per call from a
CUDA graph of 20 calls (best of 5 replays, `gated_gemm.gpu_us`); each variant is checked against the unfused pair
first.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_ops  # noqa: E402

if not fused_ops.HAS_TRITON or fused_ops.TensorDescriptor is None:
    sys.exit("needs triton with host TMA descriptors and tl.range(flatten=...)")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

TensorDescriptor = fused_ops.TensorDescriptor
HIDDEN, INTER = 768, 3072


@triton.jit
def _keep_tile(seed, row0, col0, inter, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # fused_ops._dropout_keep for BLOCK_M rows at once: row r's Philox counters start at r * inter, one call a
    # four-column quad, column 4q + k gets the call's k-th uniform
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    quads = col0 // 4 + tl.arange(0, BLOCK_N // 4)
    u0, u1, u2, u3 = tl.rand4x(seed, rows[:, None] * inter + quads[None, :])
    return tl.join(tl.join(u0, u2), tl.join(u1, u3)).reshape(BLOCK_M, BLOCK_N) >= dropout_p


@triton.jit
def _gated_bwd_gemm_kernel(
    g_desc,  # (t, n) gradient of the MLP's W_o output, blocks (BLOCK_M, BLOCK_K)
    w_desc,  # W_o: (n, i), blocks (BLOCK_K, BLOCK_N)
    gate_desc, value_desc,  # the (t, i) halves of the (t, 2 * i) pre-activations, blocks (BLOCK_M, BLOCK_N)
    dgate_desc, dvalue_desc,  # the (t, i) halves of d_pre, blocks (BLOCK_M, BLOCK_N)
    seed_ptr, t, inter, hidden, num_programs, dropout_p, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EARLY: tl.constexpr,
):
    num_tiles = tl.cdiv(t, BLOCK_M) * tl.cdiv(inter, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
        row0, col0 = fused_ops._grouped_tile(tile, t, inter, BLOCK_M, BLOCK_N, GROUP_M)
        if EARLY:
            gate = gate_desc.load([row0, col0])
            value = value_desc.load([row0, col0])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, hidden, BLOCK_K):
            acc = tl.dot(g_desc.load([row0, k]), w_desc.load([k, col0]), acc)
        if not EARLY:
            gate = gate_desc.load([row0, col0])
            value = value_desc.load([row0, col0])
        gate = gate.to(tl.float32)
        value = value.to(tl.float32)
        if HAS_DROPOUT:
            keep = _keep_tile(tl.load(seed_ptr), row0, col0, inter, dropout_p, BLOCK_M, BLOCK_N)
            acc = tl.where(keep, acc * scale, 0.0)
        cdf = fused_ops._normal_cdf(gate)
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327
        dgate_desc.store([row0, col0], (acc * value * (cdf + gate * pdf)).to(dgate_desc.dtype))
        dvalue_desc.store([row0, col0], (acc * gate * cdf).to(dvalue_desc.dtype))


def fused(g, wo, pre, seed, dropout_p, config, early=False):
    block_m, block_n, block_k, group_m, stages, warps, *per_sm = config
    t, inter = pre.shape[0], pre.shape[1] // 2
    dpre = torch.empty_like(pre)
    programs = min(triton.cdiv(t, block_m) * triton.cdiv(inter, block_n),
                   (per_sm[0] if per_sm else 1) * fused_ops._sm_count(g.device))
    half = [block_m, block_n]
    _gated_bwd_gemm_kernel[(programs,)](
        TensorDescriptor.from_tensor(g, [block_m, block_k]), TensorDescriptor.from_tensor(wo, [block_k, block_n]),
        TensorDescriptor.from_tensor(pre[:, :inter], half), TensorDescriptor.from_tensor(pre[:, inter:], half),
        TensorDescriptor.from_tensor(dpre[:, :inter], half), TensorDescriptor.from_tensor(dpre[:, inter:], half),
        seed if seed is not None else g, t, inter, g.shape[1], programs, dropout_p,
        fused_ops._dropout_scale(dropout_p), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        HAS_DROPOUT=seed is not None, EARLY=early, num_stages=stages, num_warps=warps,
    )
    return dpre


def unfused(g, wo, pre, seed, dropout_p):
    return fused_ops._gated_gelu_backward(g @ wo, pre, seed, dropout_p)


def reference(g, wo, pre, keep, dropout_p):
    """float64: d_pre of dropout(GELU(gate) * value) under the keep mask, given d_glu = g W_o."""
    pre64 = pre.double().requires_grad_(True)
    inter = pre.shape[1] // 2
    out = torch.nn.functional.gelu(pre64[:, :inter]) * pre64[:, inter:]
    if keep is not None:
        out = torch.where(keep, out / (1 - dropout_p), 0.0)
    out.backward(g.double() @ wo.double())
    return pre64.grad


def keep_mask(t, inter, seed, dropout_p, device):
    """The forward kernel's keep mask, read back from its output on all-ones gates and values."""
    ones = torch.full((t, 2 * inter), 4.0, device=device)
    return fused_ops._gated_gelu_forward(ones, seed, dropout_p) != 0


def smoke():
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.float16, 3e-2)):
        gen = torch.Generator().manual_seed(0)
        t, n, inter = 70, 32, 48
        g = torch.randn(t, n, generator=gen).to(dtype)
        wo = (torch.randn(n, inter, generator=gen) / 4).to(dtype)
        pre = torch.randn(t, 2 * inter, generator=gen).to(dtype)
        for p in (0.0, 0.3):
            seed = torch.tensor([1234], dtype=torch.int64) if p else None
            keep = keep_mask(t, inter, seed, p, "cpu") if p else None
            ref = reference(g, wo, pre, keep, p)
            for early in (False, True):
                got = fused(g, wo, pre, seed, p, (16, 16, 16, 2, 1, 1), early=early)
                err = (got.double() - ref).abs().max().item() / ref.abs().max().item()
                print(f"{dtype} p={p} early={early}: relative max error {err:.3g}", "ok" if err < tolerance else
                      "WRONG", flush=True)
                if err >= tolerance:
                    sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--configs", nargs="*", default=["128,128,64,8,4,8", "128,128,64,8,3,8", "128,64,64,8,4,4",
                                                         "128,256,64,8,3,8", "128,128,64,8,3,4,2"],
                        help="BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,stages,warps[,programs per SM]")
    args = parser.parse_args()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke runs under TRITON_INTERPRET=1")
        return smoke()
    from gated_gemm import gpu_us

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    wo = torch.randn(HIDDEN, INTER, device=dev, dtype=dt) * INTER ** -0.5
    seed = torch.tensor([77], dtype=torch.int64, device=dev) if args.dropout else None
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; bf16, n = "
          f"{HIDDEN}, i = {INTER}, dropout {args.dropout}; GPU µs per call")
    print("| variant | " + " | ".join(f"{r} rows" for r in args.rows) + " |\n|---|" + "---:|" * len(args.rows))
    data = {r: (torch.randn(r, HIDDEN, device=dev, dtype=dt), torch.randn(r, 2 * INTER, device=dev, dtype=dt))
            for r in args.rows}
    print("| cuBLAS g W_o alone | " + " | ".join(f"{gpu_us(lambda g=g: g @ wo):.1f}" for g, _ in data.values())
          + " |", flush=True)
    print("| cuBLAS g W_o + gated GELU backward kernel (today) | " + " | ".join(
        f"{gpu_us(lambda g=g, pre=pre: unfused(g, wo, pre, seed, args.dropout)):.1f}" for g, pre in data.values())
        + " |", flush=True)
    g, pre = data[min(args.rows)]
    expected = unfused(g, wo, pre, seed, args.dropout).float()
    scale = expected.abs().max().item()
    for config in [tuple(int(v) for v in c.split(",")) for c in args.configs]:
        for early in (False, True):
            name = f"fused {config}{' early' if early else ''}"
            try:
                err = (fused(g, wo, pre, seed, args.dropout, config, early).float() - expected).abs().max().item()
                if err > 2e-2 * scale:
                    print(f"| {name} | wrong (max error {err:.3g} of {scale:.3g}) |", flush=True)
                    continue
                cells = [f"{gpu_us(lambda g=g, pre=pre: fused(g, wo, pre, seed, args.dropout, config, early)):.1f}"
                         for g, pre in data.values()]
            except Exception as e:  # a config that does not compile or fit: reported, the rest still run
                cells = [f"failed: {type(e).__name__}: {str(e)[:80]}"]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
