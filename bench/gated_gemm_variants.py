"""Designs of the persistent TMA gated GEMM (GLU Linear + GELU(gate) * value in the epilogue), timed side by side:
how the gate and value rows reach the tile, whether the tile and k loops are flattened, how the tile is stored.

    python bench/gated_gemm_variants.py [--rows 8192 32768]
    TRITON_INTERPRET=1 python bench/gated_gemm_variants.py --smoke    # CPU: every variant against a float64 reference
    python bench/gated_gemm_variants.py --resources --configs ...     # no GPU: registers, spills, shared memory

Variants (each a `tl.range` persistent loop over (BLOCK_M, BLOCK_N) output tiles, GROUP_M row blocks at a time):
- "two dots": two (BLOCK_M, BLOCK_N) accumulators a tile, x against the gate half and the value half of the weight
  through two descriptors (the design shipped before 2026-12-06's ninth session);
- "one dot, view": one (BLOCK_M, 2 * BLOCK_N) accumulator, the tile's gate and value rows loaded together through a
  (2, i, n) view of the weight with (2, BLOCK_N, BLOCK_K) blocks (what `fused_ops._gated_linear_gelu_kernel` runs);
- "one dot, copy": the same from a copy of the weight whose rows are interleaved block by block (gate block j, then
  value block j), read with 2-D (2 * BLOCK_N, BLOCK_K) blocks;
- "+ flat": the tile and k loops pipelined as one (`tl.range(flatten=True)`); "+ split": the tile stored in two
  halves; "+ save": the (t, 2 * i) pre-activations stored as well (what a training forward would keep); "+ dropout":
  the output's dropout mask (p = DROPOUT_P) from Philox in the epilogue, as the gated GELU kernel draws it; "+ ws":
  the tile loop warp-specialized (`tl.range(warp_specialize=True)`: loads, dots and epilogue in separate warps,
  where the Triton build supports it on the GPU); "no GELU": gate * value, to time the GELU's share of the epilogue;
  "rational erfc": GELU from a branch-free rational-exponential erfc instead of the shipped `fused_ops._gelu_times`
  (Phi as the sigmoid of a fitted odd polynomial: 20 SASS instructions an element beyond gate * value); "erf": Phi
  from libdevice's `tl.erf` (34 instructions; the kernels' form before 2026-12-07).
GPU µs per call from a CUDA graph of 20 calls (best of 5 replays, `gated_gemm.gpu_us`); every variant is checked
against F.linear + the gated GELU first and reported as wrong if it differs.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_ops  # noqa: E402

if not fused_ops.HAS_TRITON or fused_ops.TensorDescriptor is None:
    sys.exit("needs triton with host TMA descriptors and tl.range(flatten=...)")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from gated_bwd_gemm import HIDDEN, INTER, TensorDescriptor, _keep_tile, keep_mask  # noqa: E402

DROPOUT_P = 0.1  # the "+ dropout" design's drop probability (MosaicBERT-base's hidden_dropout_prob)
SEED = None  # its Philox seed: a (1,) int64 tensor on the device, set by main() / smoke()


@triton.jit
def _gelu_times_rational(gate, value):
    # GELU(gate) * value with Phi(g) = erfc(-g / sqrt(2)) / 2 from a branch-free Chebyshev fit of erfc (Numerical
    # Recipes' erfcc, fractional error < 1.2e-7): one reciprocal, one exp, nine FMAs; no branch for the two
    # halves of erf's range to diverge on. Against float64, |error| <= 6.1e-7 over [-12, 12] in fp32 (torch's fp32
    # erf GELU: 1.2e-6).
    z = tl.abs(gate) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.5 * z)
    p = 0.17087277 * t - 0.82215223
    p = p * t + 1.48851587
    p = p * t - 1.13520398
    p = p * t + 0.27886807
    p = p * t - 0.18628806
    p = p * t + 0.09678418
    p = p * t + 0.37409196
    p = p * t + 1.00002368
    p = p * t - 1.26551223
    half_erfc = 0.5 * t * tl.exp(p - z * z)
    return gate * tl.where(gate >= 0, 1.0 - half_erfc, half_erfc) * value


@triton.jit
def _gelu_times_erf(gate, value):
    # GELU(gate) * value with Phi from libdevice's erf: (1 + erf(g / sqrt(2))) / 2, 34 SASS instructions an element
    # beyond gate * value (the kernels' form before 2026-12-07).
    return 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * value


@triton.jit
def _variant_kernel(
    x_desc, w_desc, value_desc, out_desc, pre_desc, t, inter, hidden, num_programs, seed_ptr, dropout_p, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    MODE: tl.constexpr,  # 0: two dots; 1: one dot, (2, i, n) view; 2: one dot, interleaved copy
    FLAT: tl.constexpr, SPLIT: tl.constexpr, SAVE: tl.constexpr, WS: tl.constexpr,
    GELU: tl.constexpr,  # 0: gate * value; 1: the shipped GELU(gate) * value; 2: rational erfc; 3: erf
    DROPOUT: tl.constexpr = False,  # the output's dropout mask from Philox, as `fused_ops._gated_gelu_fwd_kernel`
):
    num_tiles = tl.cdiv(t, BLOCK_M) * tl.cdiv(inter, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=FLAT, warp_specialize=WS):
        row0, col0 = fused_ops._grouped_tile(tile, t, inter, BLOCK_M, BLOCK_N, GROUP_M)
        if MODE == 0:
            gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, hidden, BLOCK_K):
                a = x_desc.load([row0, k])
                gate = tl.dot(a, w_desc.load([col0, k]).T, gate)
                value = tl.dot(a, value_desc.load([col0, k]).T, value)
        else:
            acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
            for k in range(0, hidden, BLOCK_K):
                if MODE == 1:
                    w = w_desc.load([0, col0, k]).reshape(2 * BLOCK_N, BLOCK_K)
                else:
                    w = w_desc.load([2 * col0, k])
                acc = tl.dot(x_desc.load([row0, k]), w.T, acc)
            gate, value = acc.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()
        if SAVE:
            pre_desc.store([row0, col0], gate.to(pre_desc.dtype))
            pre_desc.store([row0, inter + col0], value.to(pre_desc.dtype))
        if GELU == 1:
            out = fused_ops._gelu_times(gate, value)
        elif GELU == 2:
            out = _gelu_times_rational(gate, value)
        elif GELU == 3:
            out = _gelu_times_erf(gate, value)
        else:
            out = gate * value
        if DROPOUT:
            keep = _keep_tile(tl.load(seed_ptr), row0, col0, inter, dropout_p, BLOCK_M, BLOCK_N)
            out = tl.where(keep, out * scale, 0.0)
        out = out.to(out_desc.dtype)
        if SPLIT:
            left, right = out.reshape(BLOCK_M, 2, BLOCK_N // 2).permute(0, 2, 1).split()
            out_desc.store([row0, col0], left)
            out_desc.store([row0, col0 + BLOCK_N // 2], right)
        else:
            out_desc.store([row0, col0], out)


def interleave_blocks(weight, block_n):
    """The (2 * i, n) weight with its rows reordered: gate block j then value block j, for j = 0, 1, ..."""
    inter, hidden = weight.shape[0] // 2, weight.shape[1]
    return weight.view(2, inter // block_n, block_n, hidden).transpose(0, 1).reshape(2 * inter, hidden).contiguous()


def variant(x, weight, config, mode, flat=False, split=False, save=False, ws=False, gelu=1, copy=None, dropout=False):
    """Run one design; returns the (t, i) output, and the (t, 2 * i) pre-activations with save."""
    block_m, block_n, block_k, group_m, stages, warps, *per_sm = config
    t, hidden = x.shape
    inter = weight.shape[0] // 2
    out = torch.empty(t, inter, dtype=x.dtype, device=x.device)
    pre = torch.empty(t, 2 * inter, dtype=x.dtype, device=x.device) if save else None
    out_desc = TensorDescriptor.from_tensor(out, [block_m, block_n // 2 if split else block_n])
    if mode == 0:
        w_desc = TensorDescriptor.from_tensor(weight[:inter], [block_n, block_k])
        value_desc = TensorDescriptor.from_tensor(weight[inter:], [block_n, block_k])
    elif mode == 1:
        w_desc = value_desc = TensorDescriptor.from_tensor(weight.unflatten(0, (2, inter)), [2, block_n, block_k])
    else:
        w_desc = value_desc = TensorDescriptor.from_tensor(copy, [2 * block_n, block_k])
    per_sm = per_sm[0] if per_sm else 1  # programs a SM: 2 lets one program's epilogue overlap another's dots
    programs = min(triton.cdiv(t, block_m) * triton.cdiv(inter, block_n), per_sm * fused_ops._sm_count(x.device))
    _variant_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [block_m, block_k]), w_desc, value_desc, out_desc,
        TensorDescriptor.from_tensor(pre, [block_m, block_n]) if save else out_desc,
        t, inter, hidden, programs, SEED if dropout else x, DROPOUT_P, fused_ops._dropout_scale(DROPOUT_P),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, MODE=mode,
        FLAT=flat, SPLIT=split, SAVE=save, WS=ws, GELU=gelu, DROPOUT=dropout, num_stages=stages, num_warps=warps,
    )
    return (out, pre) if save else out


DESIGNS = {
    "two dots": dict(mode=0),
    "two dots + flat": dict(mode=0, flat=True),
    "one dot, view": dict(mode=1),
    "one dot, view + flat": dict(mode=1, flat=True),
    "one dot, copy": dict(mode=2),
    "one dot, copy + flat": dict(mode=2, flat=True),
    "one dot, copy + flat + split": dict(mode=2, flat=True, split=True),
    "one dot, copy + save": dict(mode=2, save=True),
    "one dot, view + flat + save": dict(mode=1, flat=True, save=True),
    "one dot, view + flat + save + dropout": dict(mode=1, flat=True, save=True, dropout=True),
    "one dot, view + ws": dict(mode=1, ws=True),
    "one dot, view + flat + ws": dict(mode=1, flat=True, ws=True),
    "one dot, view + flat, no GELU": dict(mode=1, flat=True, gelu=0),
    "one dot, view + flat, rational erfc": dict(mode=1, flat=True, gelu=2),
    "one dot, view + flat, erf": dict(mode=1, flat=True, gelu=3),
}
CONFIGS = [(128, 128, 64, 8, 3, 8), (128, 128, 64, 16, 4, 8)]


def reference(x, weight, gelu=1, dropout=False):
    pre = x.double() @ weight.double().T
    inter = weight.shape[0] // 2
    gate = F.gelu(pre[:, :inter]) if gelu else pre[:, :inter]
    out = gate * pre[:, inter:]
    if dropout:  # the gated GELU kernel's mask for this seed
        keep = keep_mask(pre.shape[0], inter, SEED, DROPOUT_P, x.device)
        out = torch.where(keep, out / (1 - DROPOUT_P), 0.0)
    return out, pre


def check(x, weight, config, design, tolerance):
    """Max abs error of the output (and of the saved pre-activations) against float64."""
    copy = interleave_blocks(weight, config[1]) if design.get("mode") == 2 else None
    result = variant(x, weight, config, copy=copy, **design)
    out, pre = result if design.get("save") else (result, None)
    ref_out, ref_pre = reference(x, weight, design.get("gelu", 1), design.get("dropout", False))
    err = (out.double() - ref_out).abs().max().item()
    if pre is not None:
        err = max(err, (pre.double() - ref_pre).abs().max().item())
    return err, err <= tolerance


def smoke():
    """CPU, interpreter: every design on sizes with ragged edges in every direction, fp32 and fp16."""
    global SEED
    SEED = torch.tensor([1234], dtype=torch.int64)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(70, 64, generator=g).to(dtype)
        weight = (torch.randn(2 * 48, 64, generator=g) / 8).to(dtype)
        for name, design in DESIGNS.items():
            err, ok = check(x, weight, (32, 16, 16, 2, 1, 1), design, tolerance)
            print(f"{name} {dtype}: max error {err:.3g}", "ok" if ok else "WRONG", flush=True)
            if not ok:
                sys.exit(1)


def print_resources(designs, configs):
    # What fits before timing: a config that spills, or whose programs a SM (7th field) exceed what its registers
    # and shared memory allow, wastes a device call. Hopper: 64K registers, 228 KB shared memory a SM (227 KB a
    # program), 1 KB of it reserved a program.
    from offline_compile import compile_for, resources

    configs = [tuple(int(v) for v in c.split(",")) for c in configs] if configs else CONFIGS
    print(f"triton {triton.__version__}, sm_90, bf16, compiled offline")
    print("| variant (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, stages, warps[, programs a SM]) | registers a thread | "
          "spilled bytes | shared KiB | programs a SM that fit |\n|---|---:|---:|---:|---:|")
    for name, design in DESIGNS.items():
        if designs and name not in designs:
            continue
        for config in configs:
            block_m, block_n, block_k, group_m, stages, warps, *_ = config
            mode = design.get("mode", 0)
            rows = 2 * block_n if mode == 2 else block_n
            w_block = f"[2,{block_n},{block_k}]" if mode == 1 else f"[{rows},{block_k}]"
            signature = {"x_desc": f"tensordesc<bf16[{block_m},{block_k}]>", "w_desc": f"tensordesc<bf16{w_block}>",
                         "value_desc": f"tensordesc<bf16{w_block}>",
                         "out_desc": f"tensordesc<bf16[{block_m},{block_n // 2 if design.get('split') else block_n}]>",
                         "pre_desc": f"tensordesc<bf16[{block_m},{block_n}]>", "t": "i32", "inter": "i32",
                         "hidden": "i32", "num_programs": "i32", "seed_ptr": "*i64", "dropout_p": "fp32",
                         "scale": "fp32"}
            constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, MODE=mode,
                              FLAT=design.get("flat", False), SPLIT=design.get("split", False),
                              SAVE=design.get("save", False), WS=design.get("ws", False), GELU=design.get("gelu", 1),
                              DROPOUT=design.get("dropout", False))
            signature.update(dict.fromkeys(constexprs, "constexpr"))
            try:
                kernel = compile_for(_variant_kernel, signature, constexprs, 90, num_warps=warps, num_stages=stages)
                registers, spilled, shared = resources(kernel)
            except Exception as e:  # e.g. a pass failing on one config: reported, the rest still compile
                print(f"| {name} {config} | failed: {type(e).__name__} |")
                continue
            fit = min(65536 // (registers * warps * 32), 233472 // (shared + 1024))
            print(f"| {name} {config} | {registers} | {spilled} | {shared / 1024:.0f} | {fit} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter check of every design, no timing")
    parser.add_argument("--designs", nargs="*", help="only these designs (names as in the table)")
    parser.add_argument("--configs", nargs="*",
                        help="launch configs as BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,stages,warps[,programs per SM]")
    parser.add_argument("--resources", action="store_true",
                        help="no GPU: compile each design and config for sm_90 offline and print its registers, "
                             "spills, shared memory and how many programs fit a SM")
    args = parser.parse_args()
    if args.resources:
        return print_resources(args.designs, args.configs)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke runs under TRITON_INTERPRET=1")
        return smoke()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
    from gated_gemm import gpu_us

    global SEED
    SEED = torch.tensor([77], dtype=torch.int64, device="cuda")
    torch.manual_seed(0)
    weight = torch.randn(2 * INTER, HIDDEN, device="cuda", dtype=torch.bfloat16) * HIDDEN ** -0.5
    xs = {rows: torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16) for rows in args.rows}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; bf16, "
          f"n = {HIDDEN}, i = {INTER}; GPU µs per call")
    print("| variant (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, stages, warps[, programs a SM]) | "
          + " | ".join(f"{r} rows" for r in args.rows) + " |\n|---|" + "---:|" * len(args.rows))
    baselines = [("cuBLAS Linear alone", lambda x: F.linear(x, weight)),
                 ("cuBLAS Linear + gated GELU kernel", lambda x: fused_ops._gated_gelu_forward(F.linear(x, weight))),
                 (f"cuBLAS Linear + gated GELU kernel with dropout {DROPOUT_P} (a training forward)",
                  lambda x: fused_ops._gated_gelu_forward(F.linear(x, weight), SEED, DROPOUT_P))]
    for name, fn in baselines:
        print(f"| {name} | " + " | ".join(f"{gpu_us(lambda x=x: fn(x)):.1f}" for x in xs.values()) + " |", flush=True)
    small = torch.randn(300, HIDDEN, device="cuda", dtype=torch.bfloat16)
    tolerance = 2 * (fused_ops._gated_gelu_forward(F.linear(small, weight)).double()
                     - reference(small, weight)[0]).abs().max().item() + 1e-2
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs] if args.configs else CONFIGS
    for name, design in DESIGNS.items():
        if args.designs and name not in args.designs:
            continue
        for config in configs:
            try:
                err, ok = check(small, weight, config, design, tolerance)
                if not ok:
                    print(f"| {name} {config} | wrong (max error {err:.3g}) |", flush=True)
                    continue
                copy = interleave_blocks(weight, config[1]) if design.get("mode") == 2 else None
                cells = [f"{gpu_us(lambda x=x: variant(x, weight, config, copy=copy, **design)):.1f}"
                         for x in xs.values()]
            except Exception as e:  # e.g. a compiler pass failing on one config: reported, the rest still run
                cells = [f"failed: {type(e).__name__}"]
            print(f"| {name} {config} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
