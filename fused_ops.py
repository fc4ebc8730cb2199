# Copyright 2026 The MosaicBERT package authors. Apache-2.0.
"""Fused element-wise kernels for the encoder: the gated GELU of the GLU MLP, and residual add + dropout +
LayerNorm; and the MLM loss's cross-entropy. Each replaces several memory-bound passes (split, GELU, multiply;
dropout, add, LayerNorm; cast, log-softmax, gather) with one Triton kernel forward and one backward.

Axis legend: `t` rows (total tokens of a packed batch, or any flattened leading dims), `n` hidden size,
`i` intermediate size of the GLU (its Linear produces `2 * i` columns: gate first, then value).

Layers, top to bottom: Triton kernels -> launchers (validate, allocate, launch) -> `torch.library` custom ops
(`mosaic_bert::gated_gelu_fwd/_bwd`, `mosaic_bert::add_dropout_layer_norm_fwd/_bwd`,
`mosaic_bert::cross_entropy_fwd/_bwd`) with fake implementations and autograd, so `torch.compile(fullgraph=True)`
traces through them -> the public functions `gated_gelu`, `add_dropout_layer_norm` and `cross_entropy`, which take
the kernels on CUDA and otherwise compute the same thing
with plain PyTorch ops (which inductor fuses on its own). In eager mode the public functions skip the dispatcher
(`triton_launch.route`): the launcher directly when nothing records a graph, and when autograd records one, a
`torch.autograd.Function` over the op's own implementation and formula (the host cost of a small batch's step).

The file imports without Triton. Under Triton's interpreter (`TRITON_INTERPRET=1` set before triton is first
imported) the kernels also run on CPU tensors, slowly; that path is never chosen automatically, only with
`use_triton=True` (or `DEFAULT_USE_TRITON = True`), for tests.
"""

import contextlib
import inspect
import os
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the public functions fall back to PyTorch ops
    triton = None
    tl = None
    HAS_TRITON = False

try:  # the package's modules import each other relatively; tests and scripts import this file on its own
    from .triton_launch import (
        autograd_function,
        backward_direct,
        cdiv,
        device_context,
        launch,
        next_power_of_2,
        route,
        tracing,
    )
except ImportError:
    from triton_launch import (
        autograd_function,
        backward_direct,
        cdiv,
        device_context,
        launch,
        next_power_of_2,
        route,
        tracing,
    )

try:  # host-side TMA descriptors (triton >= 3.4): the gated GEMM below needs them
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None
# ...and pipelines its tile and k loops as one, with `tl.range(flatten=True)`, which not every triton release has:
# without either, the gated GEMM runs as the pointer-load kernel at every size
if TensorDescriptor is not None and "flatten" not in inspect.signature(tl.range).parameters:
    TensorDescriptor = None

__all__ = [
    "HAS_TRITON",
    "DEFAULT_USE_TRITON",
    "add_dropout_layer_norm",
    "cross_entropy",
    "fused_kernels_available",
    "gated_gelu",
    "gated_linear_gelu",
    "reuse_cpu_gemm_output",
]

# Same switch Triton reads when `@triton.jit` runs: with it, the kernels accept CPU tensors.
_INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")

# What `use_triton=None` means: None picks the kernels for CUDA tensors when triton is installed; True forces
# them (CPU tensors then need the interpreter); False always takes the PyTorch path. A module-level default so
# a test can force the kernels through a whole model without threading a flag through every layer.
DEFAULT_USE_TRITON = None

# torch.library.custom_op arrived in torch 2.4; on older torch the public functions take the PyTorch path.
_HAS_CUSTOM_OP = hasattr(torch.library, "custom_op")

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A LayerNorm row lives in registers as fp32: rows past 64 KiB (16384 columns) take the PyTorch path.
_MAX_ROW_BYTES = 65536


def fused_kernels_available(tensor):
    """True when the Triton kernels can run on `tensor`: triton is installed and the tensor is on CUDA, or it is
    on CPU and Triton's interpreter is on (`TRITON_INTERPRET=1` before triton was imported; for tests)."""
    if not (HAS_TRITON and _HAS_CUSTOM_OP):
        return False
    return tensor.device.type == "cuda" or (_INTERPRET and tensor.device.type == "cpu")


def _take_triton(use_triton, tensor, supported=True):
    """The one place that picks kernels or PyTorch ops. `supported`: the arguments are within what the kernels
    handle (dtypes, row size); an automatic choice quietly falls back when not, a forced one raises."""
    if use_triton is None:
        use_triton = DEFAULT_USE_TRITON
    if use_triton is None:
        # Never the interpreter automatically: it is orders of magnitude slower than the PyTorch path.
        return HAS_TRITON and _HAS_CUSTOM_OP and tensor.device.type == "cuda" and supported
    if not use_triton:
        return False
    if not fused_kernels_available(tensor):
        raise RuntimeError(
            f"use_triton=True needs triton installed and a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1); "
            f"got triton installed={HAS_TRITON}, device={tensor.device}, interpreter={_INTERPRET}"
        )
    if not supported:
        raise ValueError(f"the fused kernels take fp16/bf16/fp32 inputs with rows of at most {_MAX_ROW_BYTES} bytes")
    return True


if HAS_TRITON:

    @triton.jit
    def _normal_cdf(g):
        # Phi(g), the standard normal CDF of the exact GELU, as 1 / (1 + 2^-q(g)) with q an odd polynomial of
        # degree 13 fitted (weighted minimax, float64) to log2(Phi / (1 - Phi)) on [-6, 6]: 20 SASS instructions an
        # element beyond gate * value against (1 + erf(g / sqrt(2))) / 2's 34 (`bench/epilogue_sass.py`). q rises
        # monotonically past the fit; the argument is clamped to [-10, 10], where 2^-q over- and underflows, so Phi
        # is exactly 0 or 1 beyond. g * Phi(g) against float64: |error| <= 5.9e-7 (torch's fp32 erf GELU: 1.1e-6),
        # relative error <= 6.4e-5 where |GELU| > 1e-3 (torch: 9.3e-4). NaN stays NaN in g * Phi(g).
        c = tl.minimum(tl.maximum(g, -10.0), 10.0)
        c2 = c * c
        q = 5.220765597613308e-09 * c2 - 3.856254124912084e-07
        q = q * c2 + 1.1464014278317336e-05
        q = q * c2 - 0.00015949865337461233
        q = q * c2 - 9.508665243629366e-05
        q = q * c2 + 0.10483750700950623
        q = q * c2 + 2.3022079467773438
        return 1.0 / (1.0 + tl.exp2(-(q * c)))

    @triton.jit
    def _gelu_times(gate, value):
        return gate * _normal_cdf(gate) * value  # exact GELU(gate) * value

    @triton.jit
    def _dropout_keep(seed, row_offset, col0, dropout_p, BLOCK_N: tl.constexpr):
        # The keep mask of columns col0 ... col0 + BLOCK_N - 1 (col0 a multiple of 4) of the row whose Philox
        # counters start at row_offset (row * n): one Philox call gives the four uniforms of columns 4q ... 4q + 3,
        # counter row_offset + q. The forward and the backward call this with the same arguments for the same mask.
        quads = col0 // 4 + tl.arange(0, BLOCK_N // 4)
        u0, u1, u2, u3 = tl.rand4x(seed, row_offset + quads)
        # (BLOCK_N / 4, 2, 2) with [q, a, b] = u_(2a + b), read in row-major order: column 4q + k gets u_k
        return tl.join(tl.join(u0, u2), tl.join(u1, u3)).reshape(BLOCK_N) >= dropout_p

    @triton.jit
    def _gated_gelu_fwd_kernel(
        X,  # (t, 2 * i); row stride stride_xt, columns contiguous
        Out,  # (t, i) contiguous
        Seed,  # (1,) int64 Philox seed (read only with HAS_DROPOUT)
        stride_xt, stride_ot,
        inter,  # i
        dropout_p, scale,  # drop probability of the output and 1 / (1 - p)
        BLOCK_N: tl.constexpr,
        HAS_DROPOUT: tl.constexpr,
    ):
        # Grid: (t, column blocks of i). One program: BLOCK_N gate columns and the BLOCK_N value columns i apart.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < inter
        x_row = X + row * stride_xt
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        value = tl.load(x_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
        out = _gelu_times(gate, value)
        if HAS_DROPOUT:  # the backward regenerates the same mask (_dropout_keep), nothing is stored
            keep = _dropout_keep(tl.load(Seed), row * inter, tl.program_id(1) * BLOCK_N, dropout_p, BLOCK_N)
            out = tl.where(keep, out * scale, 0.0)
        tl.store(Out + row * stride_ot + cols, out.to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_gelu_bwd_kernel(
        DOut,  # (t, i); row stride stride_gt (may be 0 for a broadcast gradient), columns contiguous
        X,  # (t, 2 * i); row stride stride_xt, columns contiguous
        DX,  # (t, 2 * i) contiguous: d_gate in the first i columns, d_value in the last i
        Seed,  # (1,) int64, the forward's seed (read only with HAS_DROPOUT)
        stride_gt, stride_xt, stride_dxt,
        inter,
        dropout_p, scale,
        BLOCK_N: tl.constexpr,
        HAS_DROPOUT: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < inter
        x_row = X + row * stride_xt
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        value = tl.load(x_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(DOut + row * stride_gt + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:  # the forward's mask, regenerated from the seed, never stored
            keep = _dropout_keep(tl.load(Seed), row * inter, tl.program_id(1) * BLOCK_N, dropout_p, BLOCK_N)
            grad = tl.where(keep, grad * scale, 0.0)
        # GELU is recomputed, not stored: d/dg [g * Phi(g)] = Phi(g) + g * phi(g).
        cdf = _normal_cdf(gate)  # the forward's Phi(g)
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327  # 1 / sqrt(2 pi)
        d_gate = grad * value * (cdf + gate * pdf)
        d_value = grad * gate * cdf
        dx_row = DX + row * stride_dxt
        tl.store(dx_row + cols, d_gate.to(DX.dtype.element_ty), mask=mask)
        tl.store(dx_row + inter + cols, d_value.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_dropout_layer_norm_fwd_kernel(
        X,  # (t, n); row stride stride_xt, columns contiguous
        XBias,  # (n,) contiguous, added to X before dropout; unused without HAS_XBIAS
        Residual,  # (t, n) like X; unused without HAS_RESIDUAL
        W, B,  # (n,) contiguous
        Out,  # (t, n) contiguous, out dtype
        Copy,  # (t, n) contiguous like Out, the copy's dtype (a GEMM's input); unused without HAS_COPY
        Mean, Rstd,  # (t,) fp32, for the backward; unused without STORE_STATS
        Seed,  # (1,) int64 Philox seed; unused without HAS_DROPOUT
        stride_xt, stride_rt, stride_ot,
        n_cols, eps, dropout_p, dropout_scale,
        HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_STATS: tl.constexpr, HAS_COPY: tl.constexpr,
        HAS_XBIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Grid: (t,). One row per program, whole row in registers (BLOCK_N >= n).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        z = tl.load(X + row * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_XBIAS:
            z += tl.load(XBias + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            # The backward regenerates this mask from the seed and the row; nothing is stored.
            keep = _dropout_keep(tl.load(Seed), row * n_cols, 0, dropout_p, BLOCK_N)
            z = tl.where(keep, z * dropout_scale, 0.0)
        if HAS_RESIDUAL:
            z += tl.load(Residual + row * stride_rt + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(z, axis=0) / n_cols
        zc = tl.where(mask, z - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=0) / n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        y = zc * rstd * w + b
        tl.store(Out + row * stride_ot + cols, y.to(Out.dtype.element_ty), mask=mask)
        if HAS_COPY:  # the same values rounded once more, as a cast of Out would
            tl.store(Copy + row * stride_ot + cols, y.to(Out.dtype.element_ty).to(Copy.dtype.element_ty), mask=mask)
        if STORE_STATS:
            tl.store(Mean + row, mean)
            tl.store(Rstd + row, rstd)

    @triton.jit
    def _add_dropout_layer_norm_bwd_kernel(
        DOut,  # (t, n); row stride stride_gt, columns contiguous
        DCopy,  # (t, n); row stride stride_ct, the copy's gradient, added to DOut's; unused without HAS_DCOPY
        X, XBias, Residual,  # as in the forward
        W,  # (n,)
        Mean, Rstd,  # (t,) fp32 from the forward
        Seed,  # (1,) int64, the forward's seed
        DX, DResidual,  # (t, n) contiguous, in x's / residual's dtype
        DWPartial, DBPartial,  # (programs, n) fp32: one row of partial sums per program
        DXBPartial,  # (programs, n) fp32, partial sums of d_x for XBias's gradient; unused without HAS_XBIAS
        stride_gt, stride_ct, stride_xt, stride_rt, stride_dxt, stride_drt,
        n_rows, n_cols, rows_per_program, dropout_p, dropout_scale,
        HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_DCOPY: tl.constexpr, HAS_XBIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # Grid: (programs,). Each program walks a contiguous run of rows and keeps its share of d_weight, d_bias
        # (and d_xbias) in fp32 registers; the host sums the (programs, n) partials (deterministic, no atomics).
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dxb = tl.zeros((BLOCK_N,), dtype=tl.float32)
        xbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_XBIAS:
            xbias = tl.load(XBias + cols, mask=mask, other=0.0).to(tl.float32)
        seed = 0
        if HAS_DROPOUT:
            seed = tl.load(Seed)
        # Row indices fit int32 (t < 2**31); the loop counts in int32 and widens each row before any offset.
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        for r in range(row_start, row_end):
            # int64 as in the forward, so the Philox offsets below are bit-identical to the forward's
            row = tl.cast(r, tl.int64)
            z = tl.load(X + row * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_XBIAS:
                z += xbias
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, row * n_cols, 0, dropout_p, BLOCK_N)
                z = tl.where(keep, z * dropout_scale, 0.0)
            if HAS_RESIDUAL:
                z += tl.load(Residual + row * stride_rt + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            xhat = tl.where(mask, (z - mean) * rstd, 0.0)
            dy = tl.load(DOut + row * stride_gt + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_DCOPY:
                dy += tl.load(DCopy + row * stride_ct + cols, mask=mask, other=0.0).to(tl.float32)
            dw += dy * xhat
            db += dy
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / n_cols
            c2 = tl.sum(wdy, axis=0) / n_cols
            dz = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_RESIDUAL:
                tl.store(DResidual + row * stride_drt + cols, dz.to(DResidual.dtype.element_ty), mask=mask)
            if HAS_DROPOUT:
                dz = tl.where(keep, dz * dropout_scale, 0.0)
            if HAS_XBIAS:
                dxb += dz
            tl.store(DX + row * stride_dxt + cols, dz.to(DX.dtype.element_ty), mask=mask)
        tl.store(DWPartial + pid * n_cols + cols, dw, mask=mask)
        tl.store(DBPartial + pid * n_cols + cols, db, mask=mask)
        if HAS_XBIAS:
            tl.store(DXBPartial + pid * n_cols + cols, dxb, mask=mask)

    @triton.jit
    def _grouped_tile(tile, rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # (first row, first column) of output tile number `tile` of a (rows, cols) output in (BLOCK_M, BLOCK_N)
        # tiles, numbered GROUP_M row blocks at a time, column by column inside a group: consecutive tiles share
        # their weight columns while they are in L2
        num_m = tl.cdiv(rows, BLOCK_M)
        tiles_per_group = GROUP_M * tl.cdiv(cols, BLOCK_N)
        first_m = (tile // tiles_per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        return ((first_m + (tile % tiles_per_group) % group_rows) * BLOCK_M,
                ((tile % tiles_per_group) // group_rows) * BLOCK_N)

    @triton.jit
    def _gated_linear_gelu_kernel(
        x_desc,  # (t, n) TMA descriptor, blocks (BLOCK_M, BLOCK_K)
        w_desc,  # the (2, i, n) view of the (2 * i, n) weight (gate rows, value rows), blocks (2, BLOCK_N, BLOCK_K)
        out_desc,  # (t, i), blocks (BLOCK_M, BLOCK_N)
        t, inter, hidden,
        num_programs,  # the grid's size
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # Persistent grid: num_programs programs walk the (BLOCK_M, BLOCK_N) output tiles, GROUP_M row blocks at a
        # time so the weight tiles they share stay in L2. One load brings a tile's BLOCK_N gate rows and the matching
        # value rows, and one dot of width 2 * BLOCK_N computes [x W_gate^T | x W_value^T] from the same x block;
        # the epilogue writes GELU(gate) * value, so the (t, 2 * i) GEMM output never reaches memory. The tile and
        # k loops are pipelined as one (flatten), so the next tile's loads overlap this tile's epilogue.
        # TMA zero-fills loads past the edges and clips the store, so t, i and n need no multiple of a block.
        num_tiles = tl.cdiv(t, BLOCK_M) * tl.cdiv(inter, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
            row0, col0 = _grouped_tile(tile, t, inter, BLOCK_M, BLOCK_N, GROUP_M)
            acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
            for k in range(0, hidden, BLOCK_K):
                w = w_desc.load([0, col0, k]).reshape(2 * BLOCK_N, BLOCK_K)
                acc = tl.dot(x_desc.load([row0, k]), w.T, acc, input_precision=DOT_PRECISION)
            gate, value = acc.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()
            out_desc.store([row0, col0], _gelu_times(gate, value).to(out_desc.dtype))

    @triton.jit
    def _gated_linear_gelu_small_kernel(
        X,  # (t, n); row stride stride_xt, columns contiguous
        W,  # (2 * i, n); row stride stride_wt, columns contiguous: the gate's i rows, then the value's
        Out,  # (t, i); row stride stride_ot, columns contiguous
        t, inter, hidden,
        stride_xt, stride_wt, stride_ot,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # The gated GEMM for a few rows: plain pointer loads (no TMA descriptors to build on the host), one output
        # tile per program, grid (column blocks of i, row blocks of t). Any alignment and strides; masked edges.
        col0 = tl.program_id(0) * BLOCK_N
        row0 = tl.program_id(1) * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = col0 + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok = rows < t
        col_ok = cols < inter
        x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xt + ks[None, :]
        # (BLOCK_K, BLOCK_N) tiles of W_gate^T and W_value^T
        gate_ptrs = W + cols.to(tl.int64)[None, :] * stride_wt + ks[:, None]
        value_ptrs = W + (cols + inter).to(tl.int64)[None, :] * stride_wt + ks[:, None]
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, hidden, BLOCK_K):
            k_ok = ks < hidden - k
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            gate = tl.dot(a, tl.load(gate_ptrs, mask=w_mask, other=0.0), gate, input_precision=DOT_PRECISION)
            value = tl.dot(a, tl.load(value_ptrs, mask=w_mask, other=0.0), value, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            value_ptrs += BLOCK_K
        out = _gelu_times(gate, value)
        out_ptrs = Out + rows.to(tl.int64)[:, None] * stride_ot + cols[None, :]
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _cross_entropy_fwd_kernel(
        Logits,  # (m, v); row stride stride_lt, columns contiguous
        Target,  # (m,) int64 class ids
        Loss, Lse,  # (m,) fp32: the row's loss, and its log-sum-exp for the backward
        stride_lt, n_cols,
        BLOCK_N: tl.constexpr,
    ):
        # Grid: (m,). One row per program, read once: each lane keeps a running max and its sum of exponentials
        # (online softmax), combined across lanes at the end; statistics in fp32 whatever the logits' dtype.
        row = tl.program_id(0).to(tl.int64)
        row_ptr = Logits + row * stride_lt
        lane_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        lane_sum = tl.zeros((BLOCK_N,), tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(lane_max, x)
            # a lane that has seen only -inf keeps max -inf and sum 0 (exp(-inf - -inf) would be NaN)
            finite = new_max > float("-inf")
            shift = tl.where(finite, new_max, 0.0)
            lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(x - shift)
            lane_max = new_max
        row_max = tl.max(lane_max, axis=0)
        shift = tl.where(row_max > float("-inf"), row_max, 0.0)
        total = tl.sum(lane_sum * tl.exp(lane_max - shift), axis=0)
        lse = shift + tl.log(total)
        target = tl.load(Target + row)
        valid = (target >= 0) & (target < n_cols)
        picked = tl.load(row_ptr + tl.where(valid, target, 0)).to(tl.float32)
        # An id outside [0, v) gives NaN (the caller checks ids; never a read out of bounds)
        tl.store(Loss + row, tl.where(valid, lse - picked, float("nan")))
        tl.store(Lse + row, lse)

    @triton.jit
    def _cross_entropy_bwd_kernel(
        DLoss,  # (m,) fp32, row stride stride_g (0 for a broadcast gradient)
        Logits,  # (m, v) as in the forward
        Target, Lse,  # (m,) from the forward
        DLogits,  # (m, v) contiguous, the logits' dtype
        stride_g, stride_lt, n_cols,
        BLOCK_N: tl.constexpr,
    ):
        # Grid: (m, column blocks). d_logits = (softmax(logits) - onehot(target)) * d_loss, softmax from the stored
        # log-sum-exp: one read of the logits, one write of their gradient.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        x = tl.load(Logits + row * stride_lt + cols, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(Lse + row)
        grad = tl.load(DLoss + row * stride_g)
        target = tl.load(Target + row)
        valid = (target >= 0) & (target < n_cols)
        d = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * grad
        d = tl.where(valid, d, float("nan"))
        tl.store(DLogits + row * n_cols + cols, d.to(DLogits.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------
def _require_triton():
    if not HAS_TRITON:
        raise ImportError("the fused kernels need triton (pip install triton); the public functions fall back")


def _rows(tensor):
    """`tensor` (..., c) as a (rows, c) view (a copy only if no view exists), columns contiguous."""
    if tensor.dim() == 2 and tensor.stride(1) == 1:  # the model's (tokens, hidden) activations: as they are
        return tensor
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def _gelu_launch_config(inter):
    """(BLOCK_N, num_warps) for the gated GELU: 1024 columns per program, 8 per thread on 4 warps (16-byte
    vector loads in 16-bit dtypes); smaller for small i. Under the interpreter, 16 columns, so test sizes cross
    several blocks and a ragged tail."""
    if _INTERPRET:
        return 16, 1
    block = min(1024, max(32, next_power_of_2(inter)))
    return block, max(1, min(4, block // 256))


def _layer_norm_launch_config(n_cols):
    """(BLOCK_N, num_warps) for the LayerNorm kernels: the whole row, 256 columns per warp up to 8 warps
    (n = 768 or 1024: 4 warps, 8 fp32 values per thread); at least 4 columns, one Philox call's worth for the
    dropout mask (`_dropout_keep`)."""
    block = max(next_power_of_2(n_cols), 4)
    return block, 1 if _INTERPRET else min(max(block // 256, 1), 8)


def _gated_gelu_forward(x, seed=None, dropout_p=0.0):
    """x: (..., 2 * i) fp16/bf16/fp32, columns contiguous (rows may be strided); seed: (1,) int64 on x's device,
    or None when dropout_p == 0. Returns dropout(GELU(gate) * value): (..., i) in x's dtype."""
    _require_triton()
    inter = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2, out2 = _rows(x), _rows(out)
    block, num_warps = _gelu_launch_config(inter)
    with device_context(x):
        launch(
            _gated_gelu_fwd_kernel, (x2.shape[0], cdiv(inter, block), 1),
            (x2, out2, x2 if seed is None else seed, x2.stride(0), out2.stride(0), inter, dropout_p,
             _dropout_scale(dropout_p)),
            x.device.index, BLOCK_N=block, HAS_DROPOUT=seed is not None, num_warps=num_warps,
        )
    return out


def _gated_gelu_backward(grad_out, x, seed=None, dropout_p=0.0):
    """grad_out: (..., i), x: (..., 2 * i), the forward's seed. Returns d_x: (..., 2 * i) in x's dtype, written in
    one pass."""
    _require_triton()
    inter = x.shape[-1] // 2
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if grad_out.numel() == 0:
        return dx.zero_()
    x2, g2, dx2 = _rows(x), _rows(grad_out), dx.view(-1, 2 * inter)
    block, num_warps = _gelu_launch_config(inter)
    with device_context(x):
        launch(
            _gated_gelu_bwd_kernel, (x2.shape[0], cdiv(inter, block), 1),
            (g2, x2, dx2, x2 if seed is None else seed, g2.stride(0), x2.stride(0), dx2.stride(0), inter, dropout_p,
             _dropout_scale(dropout_p)),
            x.device.index, BLOCK_N=block, HAS_DROPOUT=seed is not None, num_warps=num_warps,
        )
    return dx


def _gated_linear_config(rows, dtype=torch.bfloat16):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps) of the persistent TMA gated GEMM, which runs
    from `GATED_GEMM_TMA_ROWS` rows. Measured on an H100 (bf16, n = 768, i = 3072; BENCHMARKS.md): 128 x 128 output
    tiles, each one 128 x 256 accumulator (gate and value side by side). Under the interpreter, 16-wide tiles so
    test sizes cross several tiles, a ragged edge and the persistent loop."""
    if _INTERPRET:
        return 16, 16, 16, 2, 1, 1
    if dtype == torch.float32:  # forced fp32 (use_triton=True): tiles whose pipeline fits the shared memory
        return 64, 64, 32, 8, 3, 4
    return 128, 128, 64, 16, 4, 8


_SM_COUNTS = {}
_GATED_GEMM_CAPABLE = {}
# Rows from which the gated GEMM runs as the persistent TMA kernel. Below, the pointer-load kernel: a TMA launch
# builds four descriptors on the host and takes Triton's full launch path (descriptors are not kept), which costs a
# small batch more host time than its faster loads save on the GPU (BENCHMARKS.md, 2026-12-06).
GATED_GEMM_TMA_ROWS = 8192


def _gated_linear_small_config(rows):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) of the pointer-load gated GEMM (H100, bf16, n = 768,
    i = 3072; BENCHMARKS.md). Under the interpreter, 16-wide tiles so test sizes cross several tiles and ragged
    edges."""
    if _INTERPRET:
        return 16, 16, 16, 1, 1
    if rows <= 256:
        return 64, 64, 64, 3, 4
    return 128, 64, 64, 3, 4


def _sm_count(device):
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so the persistent loop runs more than once
    count = _SM_COUNTS.get(device.index)
    if count is None:
        count = _SM_COUNTS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


def _gated_gemm_capable(device):
    """The gated GEMM kernels run on NVIDIA compute capability 9.0 (Hopper) or newer, where they were measured (the
    large-batch one loads through TMA), or under the interpreter."""
    if device.type != "cuda":
        return _INTERPRET
    capable = _GATED_GEMM_CAPABLE.get(device.index)
    if capable is None:
        capable = _GATED_GEMM_CAPABLE[device.index] = (
            torch.version.hip is None and torch.cuda.get_device_capability(device) >= (9, 0)
        )
    return capable


def _tma_compatible(*tensors):
    """TMA reads 2-D tensors whose base address and row stride are multiples of 16 bytes, columns contiguous."""
    return all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors
    )


def _gated_linear_gelu_forward(x, weight):
    """x: (..., n), weight: (2 * i, n), same dtype (fp16/bf16; fp32 computes with exact fp32 products). Returns
    GELU(x W_gate^T) * (x W_value^T): (..., i) in x's dtype, the gate in the weight's first i rows. From
    `GATED_GEMM_TMA_ROWS` rows, where TMA can read and write every operand (16-byte addresses and row strides), the
    persistent TMA kernel; otherwise the pointer-load kernel, which takes any alignment."""
    _require_triton()
    inter, hidden = weight.shape[0] // 2, weight.shape[1]
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2, out2 = _rows(x), _rows(out)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    rows = x2.shape[0]
    dot_precision = "ieee" if x.dtype == torch.float32 else None
    with device_context(x):
        if rows >= GATED_GEMM_TMA_ROWS and TensorDescriptor is not None and _tma_compatible(x2, weight, out2):
            block_m, block_n, block_k, group_m, num_stages, num_warps = _gated_linear_config(rows, x.dtype)
            programs = min(cdiv(rows, block_m) * cdiv(inter, block_n), _sm_count(x.device))
            _gated_linear_gelu_kernel[(programs,)](
                TensorDescriptor.from_tensor(x2, [block_m, block_k]),
                TensorDescriptor.from_tensor(weight.unflatten(0, (2, inter)), [2, block_n, block_k]),
                TensorDescriptor.from_tensor(out2, [block_m, block_n]),
                rows, inter, hidden, programs,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, DOT_PRECISION=dot_precision,
                num_stages=num_stages, num_warps=num_warps,
            )
        else:
            block_m, block_n, block_k, num_stages, num_warps = _gated_linear_small_config(rows)
            launch(
                _gated_linear_gelu_small_kernel, (cdiv(inter, block_n), cdiv(rows, block_m), 1),
                (x2, weight, out2, rows, inter, hidden, x2.stride(0), weight.stride(0), out2.stride(0)),
                x.device.index, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=dot_precision,
                num_stages=num_stages, num_warps=num_warps,
            )
    return out


def _dropout_scale(dropout_p):
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def _add_dropout_layer_norm_forward(x, residual, weight, bias, seed, eps, dropout_p, out_dtype, store_stats=True,
                                    copy=None, x_bias=None):
    """x, residual: (..., n); weight, bias, x_bias: (n,); seed: (1,) int64 on x's device, or None when
    dropout_p == 0. Returns out (..., n) in out_dtype, and mean, rstd (...,) fp32 of dropout(x + x_bias) +
    residual, or None, None with store_stats=False (a forward no backward will follow: two allocations and stores
    fewer). `copy`, a contiguous tensor of x's shape, also receives out cast to its dtype (written in the same
    pass)."""
    _require_triton()
    n_cols = x.shape[-1]
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = rstd = None
    if store_stats:
        mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
        rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out, mean, rstd
    x2, out2 = _rows(x), _rows(out)
    r2 = _rows(residual) if residual is not None else x2
    has_dropout = seed is not None and dropout_p > 0.0
    block, num_warps = _layer_norm_launch_config(n_cols)
    with device_context(x):
        launch(
            _add_dropout_layer_norm_fwd_kernel, (x2.shape[0], 1, 1),
            (x2, x2 if x_bias is None else x_bias.contiguous(), r2, weight.contiguous(), bias.contiguous(), out2,
             out2 if copy is None else copy.view(-1, n_cols),
             x2 if mean is None else mean, x2 if rstd is None else rstd, seed if has_dropout else x2,
             x2.stride(0), r2.stride(0), out2.stride(0),
             n_cols, float(eps), float(dropout_p), _dropout_scale(dropout_p)),
            x.device.index, HAS_RESIDUAL=residual is not None, HAS_DROPOUT=has_dropout, STORE_STATS=store_stats,
            HAS_COPY=copy is not None, HAS_XBIAS=x_bias is not None, BLOCK_N=block, num_warps=num_warps,
        )
    return out, mean, rstd


# Programs per SM of the LayerNorm backward. Each walks a contiguous run of rows and keeps one (n,) set of
# d_weight / d_bias partials, so the (programs, n) fp32 partial buffer stays small (6 MB at 132 SMs, n = 768).
# More programs keep more warps resident to hide the loads' latency: at 32768 x 768, 2 a SM took 211 / 271 µs
# (without / with dropout), 4: 172 / 199, 8: 184 / 204, 16: 171 / 185 (H100, `python bench/elementwise.py
# --bwd-programs 2 4 16`, BENCHMARKS.md 2026-12-06).
LAYER_NORM_BWD_PROGRAMS_PER_SM = 16
# Software-pipelining depth of the LayerNorm backward's row loop (the launch's num_stages; None: Triton's default),
# swept by `python bench/elementwise.py --bwd-stages 1 2 3 4`.
LAYER_NORM_BWD_NUM_STAGES = None


def _layer_norm_bwd_programs(device):
    """Programs of the LayerNorm backward: LAYER_NORM_BWD_PROGRAMS_PER_SM per SM on a GPU, 4 under the
    interpreter (to test the row loop). Not bounded by the rows (a program without rows writes zero partial sums):
    the partial sums' shape must not depend on the row count, which a compiled graph may only know at run time."""
    return LAYER_NORM_BWD_PROGRAMS_PER_SM * _sm_count(device) if device.type == "cuda" else 4


def _add_dropout_layer_norm_backward(grad_out, x, residual, weight, bias, mean, rstd, seed, dropout_p, grad_copy=None,
                                     x_bias=None):
    """Shapes as in the forward; grad_out: (..., n); grad_copy: the gradient of the forward's copy, or None. Returns
    d_x (x's dtype), d_residual (residual's dtype; an empty tensor when residual is None) and the fp32 partial sums
    of d_weight, d_bias and d_x_bias (the last only with x_bias), one row of each per program: (2 or 3, programs,
    n), for the sum of the two output gradients. `_layer_norm_param_grads` reduces them, all in one reduction."""
    _require_triton()
    n_cols = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        dres = torch.empty(residual.shape, dtype=residual.dtype, device=x.device)
    else:
        dres = torch.empty((0,), dtype=x.dtype, device=x.device)
    n_rows = x.numel() // n_cols if n_cols else 0
    programs = _layer_norm_bwd_programs(x.device)
    partials = torch.empty((2 if x_bias is None else 3, programs, n_cols), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return dx, dres, partials.zero_()
    x2, g2, dx2 = _rows(x), _rows(grad_out), dx.view(-1, n_cols)
    c2 = _rows(grad_copy) if grad_copy is not None else g2
    r2 = _rows(residual) if residual is not None else x2
    dr2 = dres.view(-1, n_cols) if residual is not None else dx2
    has_dropout = seed is not None and dropout_p > 0.0
    block, num_warps = _layer_norm_launch_config(n_cols)
    with device_context(x):
        launch(
            _add_dropout_layer_norm_bwd_kernel, (programs, 1, 1),
            (g2, c2, x2, x2 if x_bias is None else x_bias.contiguous(), r2, weight.contiguous(), mean.reshape(-1),
             rstd.reshape(-1), seed if has_dropout else x2, dx2, dr2, partials[0], partials[1], partials[-1],
             g2.stride(0), c2.stride(0), x2.stride(0), r2.stride(0), dx2.stride(0), dr2.stride(0),
             n_rows, n_cols, cdiv(n_rows, programs), float(dropout_p), _dropout_scale(dropout_p)),
            x.device.index, HAS_RESIDUAL=residual is not None, HAS_DROPOUT=has_dropout,
            HAS_DCOPY=grad_copy is not None, HAS_XBIAS=x_bias is not None, BLOCK_N=block, num_warps=num_warps,
            **({} if LAYER_NORM_BWD_NUM_STAGES is None else {"num_stages": LAYER_NORM_BWD_NUM_STAGES}),
        )
    return dx, dres, partials


def _layer_norm_param_grads(partials, weight, bias, x_bias):
    """d_weight, d_bias, d_x_bias (None without x_bias) in their parameters' dtypes from the backward's partial
    sums: one reduction over the programs for all of them."""
    sums = partials.sum(1)
    return sums[0].to(weight.dtype), sums[1].to(bias.dtype), None if x_bias is None else sums[2].to(x_bias.dtype)


def _cross_entropy_block(n_cols):
    """Columns per program of the cross-entropy kernels: 16 under the interpreter (test sizes cross several blocks
    and a ragged tail), else up to 4096 (a 30k vocabulary row in 8 steps)."""
    return 16 if _INTERPRET else min(4096, max(16, next_power_of_2(n_cols)))


def _cross_entropy_forward(logits, target):
    """logits: (m, v) with contiguous columns; target: (m,) int64. Returns loss, lse: (m,) fp32."""
    _require_triton()
    m, n_cols = logits.shape
    loss = torch.empty((m,), dtype=torch.float32, device=logits.device)
    lse = torch.empty((m,), dtype=torch.float32, device=logits.device)
    if m == 0:
        return loss, lse
    block = _cross_entropy_block(n_cols)
    with device_context(logits):
        launch(
            _cross_entropy_fwd_kernel, (m, 1, 1), (logits, target, loss, lse, logits.stride(0), n_cols),
            logits.device.index, BLOCK_N=block, num_warps=8 if block >= 2048 else 4,
        )
    return loss, lse


def _cross_entropy_backward(grad_loss, logits, target, lse):
    """grad_loss: (m,) (any stride, e.g. an expanded scalar); the rest as in the forward. Returns d_logits (m, v) in
    the logits' dtype."""
    _require_triton()
    m, n_cols = logits.shape
    dlogits = torch.empty((m, n_cols), dtype=logits.dtype, device=logits.device)
    if m == 0:
        return dlogits
    grad_loss = grad_loss.float()
    block = min(_cross_entropy_block(n_cols), 1024)
    with device_context(logits):
        launch(
            _cross_entropy_bwd_kernel, (m, cdiv(n_cols, block), 1),
            (grad_loss, logits, target, lse, dlogits, grad_loss.stride(0), logits.stride(0), n_cols),
            logits.device.index, BLOCK_N=block, num_warps=4,
        )
    return dlogits


# --------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (no graph break), with fake implementations for tracing
# --------------------------------------------------------------------------------------------------------
def _op_defined(name):
    # The package can be imported more than once per process (from the repo root in tests, and again by
    # transformers as remote code); the dispatcher holds one op per name, so later copies reuse the first.
    return hasattr(torch.ops.mosaic_bert, name)


# The autograd formulas, one per custom op with a backward: registered with the op (torch.compile) and made the
# `torch.autograd.Function` that eager autograd calls (`route`).
def _gated_gelu_setup_context(ctx, inputs, output):
    x, seed, dropout_p = inputs
    ctx.save_for_backward(x, seed)
    ctx.dropout_p = dropout_p


def _gated_gelu_autograd_backward(ctx, grad_out):
    x, seed = ctx.saved_tensors
    bwd = _gated_gelu_backward if backward_direct(grad_out, x) else torch.ops.mosaic_bert.gated_gelu_bwd
    return bwd(grad_out, x, seed, ctx.dropout_p), None, None


def _add_dropout_layer_norm_fwd_impl(x, x_bias, residual, weight, bias, seed, eps, dropout_p, out_dtype, copy_dtype):
    # (out, copy, mean, rstd); copy is out in copy_dtype, or an empty tensor when copy_dtype is None
    copy = x.new_empty(x.shape if copy_dtype is not None else (0,), dtype=copy_dtype or out_dtype)
    out, mean, rstd = _add_dropout_layer_norm_forward(
        x, residual, weight, bias, seed, eps, dropout_p, out_dtype, copy=copy if copy_dtype is not None else None,
        x_bias=x_bias,
    )
    return out, copy, mean, rstd


def _add_dropout_layer_norm_bwd_impl(grad_out, grad_copy, x, x_bias, residual, weight, bias, mean, rstd, seed,
                                     dropout_p):
    # (d_x, d_residual, the parameters' partial sums); the autograd formula reduces the partial sums
    return _add_dropout_layer_norm_backward(
        grad_out, x, residual, weight, bias, mean, rstd, seed, dropout_p, grad_copy=grad_copy, x_bias=x_bias
    )


def _add_dropout_layer_norm_setup_context(ctx, inputs, output):
    x, x_bias, residual, weight, bias, seed, eps, dropout_p, out_dtype, copy_dtype = inputs
    _, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero tensors for mean, rstd, the empty copy or an unused output
    ctx.save_for_backward(x, x_bias, residual, weight, bias, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.has_residual = residual is not None
    ctx.has_copy = copy_dtype is not None


def _add_dropout_layer_norm_autograd_backward(ctx, grad_out, grad_copy, grad_mean, grad_rstd):
    x, x_bias, residual, weight, bias, mean, rstd, seed = ctx.saved_tensors
    grad_copy = grad_copy if ctx.has_copy else None
    if grad_out is None:  # only the copy was used (None: neither was)
        if grad_copy is None:
            return (None,) * 10
        grad_out, grad_copy = grad_copy, None
    bwd = (_add_dropout_layer_norm_bwd_impl if backward_direct(grad_out, grad_copy, x, x_bias, residual, weight)
           else torch.ops.mosaic_bert.add_dropout_layer_norm_bwd)
    dx, dres, partials = bwd(grad_out, grad_copy, x, x_bias, residual, weight, bias, mean, rstd, seed, ctx.dropout_p)
    dw, db, dxb = _layer_norm_param_grads(partials, weight, bias, x_bias)
    return dx, dxb, dres if ctx.has_residual else None, dw, db, None, None, None, None, None


def _cross_entropy_setup_context(ctx, inputs, output):
    logits, target = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero tensor for lse
    ctx.save_for_backward(logits, target, lse)


def _cross_entropy_autograd_backward(ctx, grad_loss, grad_lse):
    if grad_loss is None:
        return None, None
    logits, target, lse = ctx.saved_tensors
    bwd = _cross_entropy_backward if backward_direct(grad_loss, logits) else torch.ops.mosaic_bert.cross_entropy_bwd
    return bwd(grad_loss, logits, target, lse), None


_GatedGelu = autograd_function("GatedGelu", _gated_gelu_forward, _gated_gelu_setup_context,
                               _gated_gelu_autograd_backward)
_AddDropoutLayerNorm = autograd_function("AddDropoutLayerNorm", _add_dropout_layer_norm_fwd_impl,
                                         _add_dropout_layer_norm_setup_context,
                                         _add_dropout_layer_norm_autograd_backward)
_CrossEntropy = autograd_function("CrossEntropy", _cross_entropy_forward, _cross_entropy_setup_context,
                                  _cross_entropy_autograd_backward)


if _HAS_CUSTOM_OP and not _op_defined("gated_gelu_fwd"):

    @torch.library.custom_op("mosaic_bert::gated_gelu_fwd", mutates_args=())
    def _gated_gelu_fwd_op(x: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
        return _gated_gelu_forward(x, seed, dropout_p)

    @_gated_gelu_fwd_op.register_fake
    def _(x, seed, dropout_p):
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    @torch.library.custom_op("mosaic_bert::gated_gelu_bwd", mutates_args=())
    def _gated_gelu_bwd_op(
        grad_out: torch.Tensor, x: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float
    ) -> torch.Tensor:
        return _gated_gelu_backward(grad_out, x, seed, dropout_p)

    @_gated_gelu_bwd_op.register_fake
    def _(grad_out, x, seed, dropout_p):
        return torch.empty_like(x)

    _gated_gelu_fwd_op.register_autograd(_gated_gelu_autograd_backward, setup_context=_gated_gelu_setup_context)


if _HAS_CUSTOM_OP and not _op_defined("add_dropout_layer_norm_fwd"):

    @torch.library.custom_op("mosaic_bert::add_dropout_layer_norm_fwd", mutates_args=())
    def _add_dropout_layer_norm_fwd_op(
        x: torch.Tensor,
        x_bias: Optional[torch.Tensor],
        residual: Optional[torch.Tensor],
        weight: torch.Tensor,
        bias: torch.Tensor,
        seed: Optional[torch.Tensor],
        eps: float,
        dropout_p: float,
        out_dtype: torch.dtype,
        copy_dtype: Optional[torch.dtype],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _add_dropout_layer_norm_fwd_impl(x, x_bias, residual, weight, bias, seed, eps, dropout_p, out_dtype,
                                                copy_dtype)

    @_add_dropout_layer_norm_fwd_op.register_fake
    def _(x, x_bias, residual, weight, bias, seed, eps, dropout_p, out_dtype, copy_dtype):
        stats_shape = x.shape[:-1]
        return (
            x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty(x.shape if copy_dtype is not None else (0,), dtype=copy_dtype or out_dtype),
            x.new_empty(stats_shape, dtype=torch.float32),
            x.new_empty(stats_shape, dtype=torch.float32),
        )

    @torch.library.custom_op("mosaic_bert::add_dropout_layer_norm_bwd", mutates_args=())
    def _add_dropout_layer_norm_bwd_op(
        grad_out: torch.Tensor,
        grad_copy: Optional[torch.Tensor],
        x: torch.Tensor,
        x_bias: Optional[torch.Tensor],
        residual: Optional[torch.Tensor],
        weight: torch.Tensor,
        bias: torch.Tensor,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        seed: Optional[torch.Tensor],
        dropout_p: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _add_dropout_layer_norm_bwd_impl(grad_out, grad_copy, x, x_bias, residual, weight, bias, mean, rstd,
                                                seed, dropout_p)

    @_add_dropout_layer_norm_bwd_op.register_fake
    def _(grad_out, grad_copy, x, x_bias, residual, weight, bias, mean, rstd, seed, dropout_p):
        dres = torch.empty_like(residual) if residual is not None else x.new_empty((0,))
        programs = _layer_norm_bwd_programs(x.device)
        partials = x.new_empty((2 if x_bias is None else 3, programs, x.shape[-1]), dtype=torch.float32)
        return torch.empty_like(x), dres, partials

    _add_dropout_layer_norm_fwd_op.register_autograd(
        _add_dropout_layer_norm_autograd_backward, setup_context=_add_dropout_layer_norm_setup_context
    )


if _HAS_CUSTOM_OP and not _op_defined("cross_entropy_fwd"):

    @torch.library.custom_op("mosaic_bert::cross_entropy_fwd", mutates_args=())
    def _cross_entropy_fwd_op(logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return _cross_entropy_forward(logits, target)

    @_cross_entropy_fwd_op.register_fake
    def _(logits, target):
        rows = logits.shape[:1]
        return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)

    @torch.library.custom_op("mosaic_bert::cross_entropy_bwd", mutates_args=())
    def _cross_entropy_bwd_op(
        grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor
    ) -> torch.Tensor:
        return _cross_entropy_backward(grad_loss, logits, target, lse)

    @_cross_entropy_bwd_op.register_fake
    def _(grad_loss, logits, target, lse):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    _cross_entropy_fwd_op.register_autograd(
        _cross_entropy_autograd_backward, setup_context=_cross_entropy_setup_context
    )


if _HAS_CUSTOM_OP and not _op_defined("gated_linear_gelu"):
    # Inference only (no autograd formula): `gated_linear_gelu` takes it only when nothing records a graph.

    @torch.library.custom_op("mosaic_bert::gated_linear_gelu", mutates_args=())
    def _gated_linear_gelu_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _gated_linear_gelu_forward(x, weight)

    @_gated_linear_gelu_op.register_fake
    def _(x, weight):
        return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
def _dropout_seed(dropout_p, x):
    # Drawn on the device by torch's generator: follows torch.manual_seed and the RNG state that activation
    # checkpointing restores, without a device-to-host copy.
    return torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64) if dropout_p > 0.0 else None


def gated_gelu(x, dropout_p=0.0, training=False, use_triton=None):
    """dropout(GELU(gate) * value) for the gated-linear-unit MLP, with the exact GELU: gate * Phi(gate), Phi the
    standard normal CDF (the kernels evaluate it to fp32 accuracy, more closely than torch's fp32 erf GELU).

    Args:
        x (`torch.Tensor` of shape `(..., 2 * intermediate_size)`): a Linear output, the gate in the first half of
            the last dimension and the value in the second; fp16/bf16/fp32. Read in place (no split copies); the
            last dimension must be contiguous for the kernel (rows may be strided), else it is copied.
        dropout_p (`float`): drop probability of the output, applied only when `training`; kept elements are
            scaled by 1 / (1 - dropout_p). The kernel regenerates the mask from a Philox seed in the backward.
        training (`bool`): dropout on or off.
        use_triton (`bool`, *optional*): None takes the Triton kernel for CUDA tensors when triton is installed
            (see `DEFAULT_USE_TRITON`), True forces it (CPU needs `TRITON_INTERPRET=1`), False uses PyTorch ops.

    Returns:
        `torch.Tensor` of shape `(..., intermediate_size)` in x's dtype. The kernel computes in fp32 and rounds
        once; its backward writes d_x (gate and value halves) in one pass, recomputing GELU from x.
    """
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"gated_gelu needs an even last dimension (gate and value halves), got {x.shape[-1]}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    dropout_p = float(dropout_p) if training else 0.0
    if _take_triton(use_triton, x, x.dtype in _SUPPORTED_DTYPES):
        seed = _dropout_seed(dropout_p, x)
        how = route(x)
        if how == "op":
            return torch.ops.mosaic_bert.gated_gelu_fwd(x, seed, dropout_p)
        if how == "function":
            return _GatedGelu.apply(x, seed, dropout_p)
        return _gated_gelu_forward(x, seed, dropout_p)
    # reference path: what the kernel computes, in PyTorch ops
    gate, value = x.split(x.shape[-1] // 2, dim=-1)
    out = F.gelu(gate, approximate="none")
    # in place when no graph is recorded: one fewer (t, intermediate) buffer to allocate and fault in
    out = out * value if torch.is_grad_enabled() and x.requires_grad else out.mul_(value)
    return F.dropout(out, dropout_p, training=True) if dropout_p > 0.0 else out


_CPU_SCRATCH = threading.local()  # .buffers: {dtype: flat tensor} while `reuse_cpu_gemm_output` is active


@contextlib.contextmanager
def reuse_cpu_gemm_output():
    """Within this block, in this thread, `gated_linear_gelu` on CPU writes its (t, 2 * i) GEMM output into one
    buffer reused from call to call instead of a fresh allocation each time (the encoder wraps its layer loop in
    it). At base width a fresh output is 6144 floats a token: past the allocator's mmap threshold, so every call
    would map new pages and fault them in; reusing the buffer made a CPU forward 4-15% faster. Only when nothing
    records a graph (a saved activation must not be overwritten by the next layer) and autocast is off; the
    buffer is dropped when the block ends, so nothing is held between forwards."""
    previous = getattr(_CPU_SCRATCH, "buffers", None)
    _CPU_SCRATCH.buffers = {}
    try:
        yield
    finally:
        _CPU_SCRATCH.buffers = previous


def _cpu_gemm_into_scratch(x, weight):
    """x @ weight^T written into this thread's reusable buffer: (..., 2 * i), valid until the next call."""
    buffers = _CPU_SCRATCH.buffers
    x2 = x.reshape(-1, x.shape[-1])
    size = x2.shape[0] * weight.shape[0]
    buffer = buffers.get(x.dtype)
    if buffer is None or buffer.numel() < size:
        buffer = buffers[x.dtype] = torch.empty(size, dtype=x.dtype)
    out = buffer[:size].view(x2.shape[0], weight.shape[0])
    torch.mm(x2, weight.t(), out=out)
    return out.view(*x.shape[:-1], weight.shape[0])


def _autocast_on(x):
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 took no device type
        return torch.is_autocast_enabled() if x.device.type == "cuda" else torch.is_autocast_cpu_enabled()


def gated_linear_gelu(x, weight, dropout_p=0.0, training=False, use_triton=None):
    """dropout(GELU(x W_gate^T) * (x W_value^T)): the gated-linear-unit MLP's bias-free Linear and its gated GELU.

    Args:
        x (`torch.Tensor` of shape `(..., n)`): the MLP's input.
        weight (`torch.Tensor` of shape `(2 * intermediate_size, n)`): the Linear's weight, gate rows first.
        dropout_p, training, use_triton: as in `gated_gelu`.

    Returns:
        `torch.Tensor` of shape `(..., intermediate_size)`: what `gated_gelu(F.linear(x, weight), ...)` returns.
        When nothing records a graph, dropout is off, autocast is off, x and weight share a 16-bit dtype (or
        use_triton=True forces the kernels, fp32 included) and the GPU is a Hopper or newer (compute capability
        9.0+), one Triton GEMM applies the GELU and the product in its epilogue, so the (t, 2 * i) activations are
        never written and read back, and a small batch makes one launch instead of two; it has no backward.
        Everything else takes the Linear and the `gated_gelu` kernel.
    """
    if weight.dim() != 2 or weight.shape[0] % 2 != 0 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"gated_linear_gelu needs a (2 * intermediate_size, {x.shape[-1]}) weight for an input of last "
            f"dimension {x.shape[-1]}, got {tuple(weight.shape)}"
        )
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    traced = tracing(x, weight)  # torch.compile, fake tensors, dispatch modes: the op
    # What both special paths need: nothing records a graph (neither has a backward, and a saved GEMM output must
    # not be overwritten), and F.linear would compute in x's dtype on x's device (else it casts, or raises).
    plain_inference = (
        not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and x.dtype == weight.dtype
        and x.device == weight.device
        and not _autocast_on(x)
    )
    forced = (use_triton if use_triton is not None else DEFAULT_USE_TRITON) is True
    if (
        plain_inference
        and not (training and dropout_p > 0.0)
        and (x.dtype in (torch.float16, torch.bfloat16) or (forced and x.dtype == torch.float32))
        and _take_triton(use_triton, x)
        and _gated_gemm_capable(x.device)
    ):
        if traced:
            return torch.ops.mosaic_bert.gated_linear_gelu(x, weight)
        return _gated_linear_gelu_forward(x, weight)
    reuse_buffer = getattr(_CPU_SCRATCH, "buffers", None) is not None  # inside `reuse_cpu_gemm_output`
    if plain_inference and reuse_buffer and x.device.type == "cpu" and not traced:
        # gated_gelu returns a new tensor: nothing handed back aliases the reused buffer
        gated = _cpu_gemm_into_scratch(x, weight)
    else:
        gated = F.linear(x, weight)
    return gated_gelu(gated, dropout_p=dropout_p, training=training, use_triton=use_triton)


def cross_entropy(logits, target, use_triton=None):
    """Per-row cross-entropy of `logits` (m, v) against class ids `target` (m,), as
    `F.cross_entropy(logits.float(), target, reduction="none")`, returned in fp32.

    With the kernels, the logits (any supported dtype, e.g. the MLM head's bf16 output under autocast) are read
    once forward and once backward, and their gradient written once in their dtype: no fp32 copy of the logits, no
    stored log-probabilities. Ids must lie in [0, v) (the caller checks them: the model range-checks its labels);
    the kernel gives NaN for an id outside, never a read out of bounds.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy takes logits (m, v) and target (m,), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"cross_entropy's target is on {target.device}, its logits on {logits.device}")
    supported = logits.dtype in _SUPPORTED_DTYPES and logits.shape[1] > 0 and not torch.is_floating_point(target)
    if _take_triton(use_triton, logits, supported):
        logits2 = logits if logits.stride(1) == 1 else logits.contiguous()
        target = target.long().contiguous()
        how = route(logits2)
        if how == "op":
            loss, _ = torch.ops.mosaic_bert.cross_entropy_fwd(logits2, target)
        elif how == "function":
            loss, _ = _CrossEntropy.apply(logits2, target)
        else:
            loss, _ = _cross_entropy_forward(logits2, target)
        return loss
    return F.cross_entropy(logits.float(), target, reduction="none")


def add_dropout_layer_norm(x, residual, weight, bias, eps, dropout_p=0.0, training=False, out_dtype=None,
                           use_triton=None, copy_dtype=None, x_bias=None):
    """LayerNorm(dropout(x + x_bias) + residual) over the last dimension, in one pass forward and one backward.

    Args:
        x (`torch.Tensor` of shape `(..., hidden)`): e.g. a sublayer's output; fp16/bf16/fp32.
        residual (`torch.Tensor` of x's shape, *optional*): added after dropout, any supported dtype. None gives
            LayerNorm(dropout(x)) (the embeddings, whose caller passes word + token-type as x and residual).
        weight, bias (`torch.Tensor` of shape `(hidden,)`): the LayerNorm affine parameters.
        eps (`float`): added to the variance.
        dropout_p (`float`): drop probability for x (not the residual), applied only when `training`; kept
            elements are scaled by 1 / (1 - dropout_p).
        training (`bool`): dropout on or off.
        out_dtype (`torch.dtype`, *optional*): defaults to the promotion of x's and residual's dtypes (what
            `torch.result_type(x, residual)` gives for same-shaped tensors, i.e. the unfused `x + residual`), x's
            dtype without a residual. Under autocast a bf16 Linear output plus an fp32 residual stream thus gives
            fp32; pass the autocast dtype to normalize in low precision (`low_precision_layernorm`).
        use_triton (`bool`, *optional*): as in `gated_gelu`.
        copy_dtype (`torch.dtype`, *optional*): also return the output cast to this dtype, written by the same pass
            (e.g. the autocast dtype for the next GEMM's input, where the output itself stays fp32); in the
            backward the two outputs' gradients are summed inside the kernel.
        x_bias (`torch.Tensor` of shape `(hidden,)`, *optional*): added to x before dropout: the bias of the Linear
            that produced x, which then runs without it, so that the backward reduces the bias gradient in the
            kernel's pass instead of a separate one. It does not take part in the default out_dtype, as the Linear's
            output keeps its dtype when the Linear adds its bias (under autocast, an fp32 bias onto a bf16 output);
            the sum is formed in fp32 and its gradient comes back in x_bias's dtype.

    Returns:
        `torch.Tensor` of x's shape in out_dtype, or the pair (output, copy) with copy_dtype. Sum and statistics
        are computed in fp32. Gradients come back in
        the dtypes of x, residual, weight and bias. With the kernel, the dropout mask comes from a Philox seed
        drawn with torch's generator on x's device (reproducible under `torch.manual_seed`, no host sync) and is
        regenerated in the backward, never stored; the PyTorch path draws its mask with `F.dropout` instead.
    """
    hidden = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
    if weight.shape != (hidden,) or bias.shape != (hidden,):
        raise ValueError(
            f"weight and bias must have shape ({hidden},), got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if x_bias is not None and x_bias.shape != (hidden,):
        raise ValueError(f"x_bias must have shape ({hidden},), got {tuple(x_bias.shape)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if out_dtype is None:
        # promote_types, not result_type: dynamo traces the former as a constant, the latter is a graph break
        out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if copy_dtype is not None and copy_dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"copy_dtype must be one of {_SUPPORTED_DTYPES}, got {copy_dtype}")
    dropout_p = float(dropout_p) if training else 0.0
    supported = (
        x.dtype in _SUPPORTED_DTYPES and weight.dtype in _SUPPORTED_DTYPES and bias.dtype in _SUPPORTED_DTYPES
        and out_dtype in _SUPPORTED_DTYPES and (residual is None or residual.dtype in _SUPPORTED_DTYPES)
        and (x_bias is None or x_bias.dtype in _SUPPORTED_DTYPES) and 0 < hidden * 4 <= _MAX_ROW_BYTES
    )
    if _take_triton(use_triton, x, supported):
        seed = _dropout_seed(dropout_p, x)
        how = route(x, x_bias, residual, weight, bias)
        if how is not None:
            args = (x, x_bias, residual, weight, bias, seed, float(eps), dropout_p, out_dtype, copy_dtype)
            op = torch.ops.mosaic_bert.add_dropout_layer_norm_fwd if how == "op" else _AddDropoutLayerNorm.apply
            out, copy, _, _ = op(*args)
        else:
            copy = None if copy_dtype is None else torch.empty(x.shape, dtype=copy_dtype, device=x.device)
            out, _, _ = _add_dropout_layer_norm_forward(
                x, residual, weight, bias, seed, float(eps), dropout_p, out_dtype, store_stats=False, copy=copy,
                x_bias=x_bias,
            )
        return out if copy_dtype is None else (out, copy)
    # reference path: the same computation in fp32 PyTorch ops, which inductor fuses on its own
    z = x.float()
    if x_bias is not None:
        z = z + x_bias.float()
    if dropout_p > 0.0:
        z = F.dropout(z, dropout_p, training=True)
    if residual is not None:
        z = z + residual.float()
    out = F.layer_norm(z, (hidden,), weight.float(), bias.float(), eps).to(out_dtype)
    return out if copy_dtype is None else (out, out.to(copy_dtype))
