# Copyright 2026 The MosaicBERT package authors. Apache-2.0.
"""Varlen FlashAttention with in-kernel ALiBi, forward and backward, for Triton 3.x.

Axis legend: `t` total tokens of a packed (unpadded) batch, `b` sequences, `h` heads, `d` head dim.

Sequences are packed back to back along the token axis and delimited by `cu_seqlens` (int32, (b + 1,),
cumulative lengths starting at 0), the flash-attn 2 "varlen" convention. Attention never crosses a sequence
boundary. The ALiBi bias `-slope[h] * |i - j|` (positions restart at 0 in every sequence) is computed inside
the kernels from two aranges, so no (L, L) tensor exists anywhere and memory stays O(total_tokens).

Layers, top to bottom: Triton kernels -> launchers (validate, allocate, launch) -> `torch.library` custom ops
(`mosaic_bert::flash_attn_varlen_fwd/bwd` and `mosaic_bert::flash_attn_varlen_qkvpacked_fwd/bwd`, with fake
implementations and autograd, so `torch.compile` traces through them without a graph break) -> the public
functions `flash_attn_varlen_func` and `flash_attn_varlen_qkvpacked_func`, and `check_max_seqlen`. In eager mode
the public functions skip the dispatcher (`triton_launch.route`): the launcher directly when nothing records a
graph, and when autograd records one, a `torch.autograd.Function` over the ops' own implementation and formula.

The file imports without Triton (Triton is optional for the model); the public attention functions then raise
an ImportError. On a machine without a GPU the kernels run under Triton's interpreter when `TRITON_INTERPRET=1`
is set before Triton is first imported (slow; meant for tests).
"""

import math
import operator
import os

import torch

try:
    import triton
    import triton.language as tl

    # The kernels reach autograd and torch.compile as torch.library custom ops (torch >= 2.4, the package's
    # floor); on older torch the model takes its PyTorch attention path, as without Triton.
    HAS_TRITON = hasattr(torch.library, "custom_op")
except ImportError:  # the model falls back to its PyTorch attention path
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
        relaunch,
        route,
    )
except ImportError:
    from triton_launch import (
        autograd_function,
        backward_direct,
        cdiv,
        device_context,
        launch,
        next_power_of_2,
        relaunch,
        route,
    )

__all__ = [
    "HAS_TRITON",
    "PackedSelfAttention",
    "check_max_seqlen",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
]

# Triton decides at decoration time whether `@triton.jit` builds an interpreted function, so we read the same
# switch once, here, to pick a tiny autotune list for the (very slow) interpreter.
_INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")

# The kernels work in base 2 (exp2/log2). The launchers multiply log2(e) into the softmax scale (a host float);
# each program multiplies it into its one ALiBi slope as it loads it (`_program_sequence`, the same constant),
# so no extra device op runs per call.
_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 128
_OP_NAMESPACE = "mosaic_bert"


def _seqlen_bucket(max_seqlen):
    """Autotune key for a max_seqlen: the next power of two (at least 16), so ragged batches whose longest
    sequence moves around (97, 113, 120, ...) share one tuned config instead of re-tuning per batch."""
    return max(16, next_power_of_2(max(max_seqlen, 1)))


if HAS_TRITON:
    # ----------------------------------------------------------------------------------------------------
    # Autotune lists. Hopper (H100/H200) and d=64 are the tuning target; each list is short because every
    # entry is compiled and timed once per (seqlen bucket, head dim, dtype) key. BENCHMARKS.md records the
    # measurements behind each entry.
    # ----------------------------------------------------------------------------------------------------
    if _INTERPRET:
        # 16x16 tiles make the small test shapes (lengths 17, 40, ...) cross several blocks and a ragged tail.
        _FWD_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
        _BWD_KV_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
        _BWD_Q_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    else:
        # Forward: a 128-row query tile on one warpgroup with 64-key steps, 3 or 4 stages deep.
        _FWD_CONFIGS = [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
            # Two warpgroups per query tile: half the registers per thread, for d=128 (one warpgroup spills).
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
            # Short sequences: smaller query tiles waste less work on ragged tails and fill the SMs better.
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        ]
        # Backward: the key/value kernel holds dK and dV accumulators (2 x BLOCK_N x d fp32) and steps over
        # queries; the dQ kernel is the mirror image. 64-wide tiles on one warpgroup are the usual winners;
        # 32 x 128 needs 8 warps, as on 4 warps its accumulators spill at d=64.
        _BWD_KV_CONFIGS = [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        ]
        _BWD_Q_CONFIGS = [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        ]
    _TUNE_KEY = ["max_seqlen_bucket", "HEAD_DIM"]
    # The lse/delta row stride is total_tokens, which changes every ragged batch; without this, Triton would
    # compile a second variant whenever its divisibility by 16 flips.
    _NO_SPECIALIZE = ["stride_lh"]

    # What an inner loop masks (its MASK constexpr); each mode compiles to its own loop body, so the bulk of
    # the blocks runs without any mask.
    _MASK_NONE = tl.constexpr(0)  # whole blocks inside the sequence
    _MASK_TAIL = tl.constexpr(1)  # the last, partial block: positions past the sequence end
    _MASK_CAUSAL = tl.constexpr(2)  # the tail mask, plus keys after each query's diagonal

    @triton.jit
    def _program_sequence(CuSeqlensQ, CuSeqlensK, Slopes, stride_sb, stride_sh, HAS_ALIBI: tl.constexpr):
        # The preamble of every attention program. Grid: (blocks along a sequence, heads, sequences). Heads
        # and sequences on separate axes keep each below the 65535 limit of grid axes 1 and 2; axis 0 varies
        # fastest, so the blocks of one (sequence, head) run together and share its K/V (or Q) in L2.
        # Returns the head, where the query and key sequences start, their lengths and the head's slope.
        off_h = tl.program_id(1).to(tl.int64)
        off_b = tl.program_id(2).to(tl.int64)
        q_start = tl.load(CuSeqlensQ + off_b).to(tl.int64)
        seqlen_q = tl.load(CuSeqlensQ + off_b + 1) - q_start.to(tl.int32)
        k_start = tl.load(CuSeqlensK + off_b).to(tl.int64)
        seqlen_k = tl.load(CuSeqlensK + off_b + 1) - k_start.to(tl.int32)
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Slopes + off_b * stride_sb + off_h * stride_sh) * 1.4426950408889634  # log2(e)
        return off_h, q_start, seqlen_q, k_start, seqlen_k, slope

    @triton.jit
    def _tile_ptrs(X, seq_start, rows, stride_t, off_h, stride_h, offs_d):
        # Pointers to the (rows, BLOCK_D) tile of head off_h, rows counted from the sequence start (int64).
        return X + (seq_start + rows[:, None]) * stride_t + off_h * stride_h + offs_d[None, :]

    @triton.jit
    def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr,
                   EVEN_D: tl.constexpr):
        # A (rows, BLOCK_D) tile; masks only what can be out of bounds so full tiles load unpredicated.
        if MASK_ROWS:
            if EVEN_D:
                tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
            else:
                tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            if EVEN_D:
                tile = tl.load(ptrs)
            else:
                tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        return tile

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, offs_d, pos_q,
                   lo, hi, seqlen_k, shift, qk_scale, slope,
                   MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                   EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # One query tile against key blocks [lo, hi); k_ptrs/v_ptrs already point at key row `lo`.
        # Scores are in base-2 units: qk_scale and slope carry log2(e).
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            cols = start_n + offs_n
            k = _load_tile(k_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, MASK_ROWS=MASK != _MASK_NONE, EVEN_D=EVEN_D)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            if HAS_ALIBI:
                qk = qk * qk_scale - slope * tl.abs(pos_q[:, None] - cols.to(tl.float32)[None, :])
            if MASK != _MASK_NONE:
                keep = cols[None, :] < seqlen_k
                if MASK == _MASK_CAUSAL:
                    keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
                qk = tl.where(keep, qk, float("-inf"))
            # Without ALiBi the scale is applied after the row max, in one fused multiply-add with the max
            # subtraction: one operation per score fewer.
            if HAS_ALIBI:
                m_new = tl.maximum(m_i, tl.max(qk, 1))
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            if MASK == _MASK_CAUSAL:
                # A query row can have no visible key yet; keep exp2 away from (-inf) - (-inf).
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            if HAS_ALIBI:
                p = tl.exp2(qk - m_new[:, None])
            else:
                p = tl.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_tile(v_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, MASK_ROWS=MASK != _MASK_NONE, EVEN_D=EVEN_D)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new
            k_ptrs += BLOCK_N * stride_kt
            v_ptrs += BLOCK_N * stride_vt
        return acc, l_i, m_i

    @triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _fwd_kernel(
        Q, K, V,  # (t_q, h, d), (t_k, h, d), (t_k, h, d); last dim contiguous
        Out,  # (t_q, h, d)
        Lse,  # (h, t_q) fp32: log2-sum-exp of the base-2 scaled scores, for the backward
        CuSeqlensQ, CuSeqlensK,  # (b + 1,) int32
        Slopes,  # (b, h) or (h,) fp32 (stride_sb = 0), natural units; unused without ALiBi
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_lh, stride_sb, stride_sh,
        qk_scale,  # softmax_scale * log2(e)
        max_seqlen_bucket,  # autotune key only
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_ALIBI: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
        STORE_LSE: tl.constexpr,  # False when nothing will run the backward (Lse unused)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        tl.static_assert(BLOCK_D >= HEAD_DIM)
        EVEN_D = BLOCK_D == HEAD_DIM  # a constexpr: no head-dim mask when d is a power of two
        off_h, q_start, seqlen_q, k_start, seqlen_k, slope = _program_sequence(
            CuSeqlensQ, CuSeqlensK, Slopes, stride_sb, stride_sh, HAS_ALIBI=HAS_ALIBI)
        start_m = tl.program_id(0) * BLOCK_M
        if start_m >= seqlen_q:
            return  # this sequence is shorter than max_seqlen_q
        # Query i sits at key position i + shift (flash-attn's bottom-right alignment; 0 for self-attention).
        shift = seqlen_k - seqlen_q

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_tile(_tile_ptrs(Q, q_start, offs_m, stride_qt, off_h, stride_qh, offs_d), offs_m, seqlen_q,
                       offs_d, HEAD_DIM, MASK_ROWS=True, EVEN_D=EVEN_D)
        k_ptrs = _tile_ptrs(K, k_start, offs_n, stride_kt, off_h, stride_kh, offs_d)
        v_ptrs = _tile_ptrs(V, k_start, offs_n, stride_vt, off_h, stride_vh, offs_d)
        pos_q = (offs_m + shift).to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if CAUSAL:
            hi = tl.minimum(seqlen_k, start_m + BLOCK_M + shift)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n,
                                       offs_d, pos_q, 0, hi, seqlen_k, shift, qk_scale, slope,
                                       MASK=_MASK_CAUSAL, HAS_ALIBI=HAS_ALIBI, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
                                       EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION)
        else:
            full_n = (seqlen_k // BLOCK_N) * BLOCK_N
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n,
                                       offs_d, pos_q, 0, full_n, seqlen_k, shift, qk_scale, slope,
                                       MASK=_MASK_NONE, HAS_ALIBI=HAS_ALIBI, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
                                       EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION)
            tail = full_n.to(tl.int64)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs + tail * stride_kt, v_ptrs + tail * stride_vt,
                                       stride_kt, stride_vt, offs_m, offs_n, offs_d, pos_q, full_n, seqlen_k,
                                       seqlen_k, shift, qk_scale, slope,
                                       MASK=_MASK_TAIL, HAS_ALIBI=HAS_ALIBI, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
                                       EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION)

        # A row that saw no key at all (empty key sequence, or causal with seqlen_q > seqlen_k) outputs 0
        # and gets lse = +inf, which makes its probabilities exactly 0 in the backward.
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(_tile_ptrs(Out, q_start, offs_m, stride_ot, off_h, stride_oh, offs_d), acc.to(Out.dtype.element_ty),
                 mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))
        if STORE_LSE:
            lse = tl.where(empty, float("inf"), m_i + tl.log2(l_i))
            tl.store(Lse + off_h * stride_lh + q_start + offs_m, lse, mask=offs_m < seqlen_q)

    @triton.jit(do_not_specialize=["total_tokens"])
    def _bwd_preprocess_kernel(
        Out, DO,  # (t, h, d)
        Delta,  # (h, t) fp32: rowsum(dO * O)
        total_tokens,
        stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        off_h = tl.program_id(1).to(tl.int64)
        offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_t[:, None] < total_tokens) & (offs_d[None, :] < HEAD_DIM)
        o = tl.load(_tile_ptrs(Out, 0, offs_t, stride_ot, off_h, stride_oh, offs_d), mask=mask, other=0.0)
        do = tl.load(_tile_ptrs(DO, 0, offs_t, stride_dot, off_h, stride_doh, offs_d), mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(Delta + off_h * stride_dh + offs_t, delta, mask=offs_t < total_tokens)

    @triton.jit
    def _bwd_kv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
                      offs_m, offs_n, offs_d, pos_k, lo, hi, seqlen_q, shift, qk_scale, slope,
                      MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                      EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # One key tile against query blocks [lo, hi), in transposed form (keys on rows) so that dV and dK
        # come out of the dots without transposing the accumulators.
        # q_ptrs/do_ptrs/lse_ptrs/delta_ptrs already point at query row `lo`.
        for start_m in range(lo, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            rows = start_m + offs_m
            q = _load_tile(q_ptrs, rows, seqlen_q, offs_d, HEAD_DIM, MASK_ROWS=MASK != _MASK_NONE, EVEN_D=EVEN_D)
            if MASK != _MASK_NONE:
                # lse = +inf zeroes every probability of a query row past the end of the sequence.
                lse = tl.load(lse_ptrs, mask=rows < seqlen_q, other=float("inf"))
            else:
                lse = tl.load(lse_ptrs)
            # qk_t: (BLOCK_N, BLOCK_M) base-2 scores, keys on rows.
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            if HAS_ALIBI:
                qk_t -= slope * tl.abs(pos_k[:, None] - (rows + shift).to(tl.float32)[None, :])
            if MASK == _MASK_CAUSAL:
                qk_t = tl.where(offs_n[:, None] <= rows[None, :] + shift, qk_t, float("-inf"))
            p_t = tl.exp2(qk_t - lse[None, :])
            do = _load_tile(do_ptrs, rows, seqlen_q, offs_d, HEAD_DIM, MASK_ROWS=MASK != _MASK_NONE, EVEN_D=EVEN_D)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            if MASK != _MASK_NONE:
                delta = tl.load(delta_ptrs, mask=rows < seqlen_q, other=0.0)
            else:
                delta = tl.load(delta_ptrs)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
            q_ptrs += BLOCK_M * stride_qt
            do_ptrs += BLOCK_M * stride_dot
            lse_ptrs += BLOCK_M
            delta_ptrs += BLOCK_M
        return dk, dv

    @triton.autotune(configs=_BWD_KV_CONFIGS, key=_TUNE_KEY)
    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _bwd_kv_kernel(
        Q, K, V, DO,  # (t_q, h, d), (t_k, h, d), (t_k, h, d), (t_q, h, d)
        Lse, Delta,  # (h, t_q) fp32 each, same strides
        DK, DV,  # (t_k, h, d)
        CuSeqlensQ, CuSeqlensK,  # (b + 1,) int32
        Slopes,  # (b, h) or (h,) fp32, natural units
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh, stride_sb, stride_sh,
        qk_scale, sm_scale,
        max_seqlen_bucket,  # autotune key only
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_ALIBI: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # dK, dV for one key block, looping over all query blocks: each program owns its output rows, so
        # the backward needs no atomics and is bit-for-bit deterministic.
        EVEN_D = BLOCK_D == HEAD_DIM  # a constexpr: no head-dim mask when d is a power of two
        off_h, q_start, seqlen_q, k_start, seqlen_k, slope = _program_sequence(
            CuSeqlensQ, CuSeqlensK, Slopes, stride_sb, stride_sh, HAS_ALIBI=HAS_ALIBI)
        start_n = tl.program_id(0) * BLOCK_N
        if start_n >= seqlen_k:
            return  # this key sequence is shorter than max_seqlen_k
        shift = seqlen_k - seqlen_q

        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        # Key rows past seqlen_k load as zeros; their (garbage) dK/dV rows are never stored, and they feed
        # nothing else, so the query loop needs no key mask.
        k = _load_tile(_tile_ptrs(K, k_start, offs_n, stride_kt, off_h, stride_kh, offs_d), offs_n, seqlen_k,
                       offs_d, HEAD_DIM, MASK_ROWS=True, EVEN_D=EVEN_D)
        v = _load_tile(_tile_ptrs(V, k_start, offs_n, stride_vt, off_h, stride_vh, offs_d), offs_n, seqlen_k,
                       offs_d, HEAD_DIM, MASK_ROWS=True, EVEN_D=EVEN_D)
        q_ptrs = _tile_ptrs(Q, q_start, offs_m, stride_qt, off_h, stride_qh, offs_d)
        do_ptrs = _tile_ptrs(DO, q_start, offs_m, stride_dot, off_h, stride_doh, offs_d)
        lse_ptrs = Lse + off_h * stride_lh + q_start + offs_m
        delta_ptrs = Delta + off_h * stride_lh + q_start + offs_m
        pos_k = offs_n.to(tl.float32)

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        if CAUSAL:
            # Queries that can see key start_n: i + shift >= start_n; start at the block holding the first.
            lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
            lo64 = lo.to(tl.int64)
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_ptrs + lo64 * stride_qt, do_ptrs + lo64 * stride_dot,
                                   lse_ptrs + lo, delta_ptrs + lo, stride_qt, stride_dot,
                                   offs_m, offs_n, offs_d, pos_k, lo, seqlen_q, seqlen_q, shift, qk_scale, slope,
                                   MASK=_MASK_CAUSAL, HAS_ALIBI=HAS_ALIBI, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M,
                                   EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION)
        else:
            full_m = (seqlen_q // BLOCK_M) * BLOCK_M
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
                                   offs_m, offs_n, offs_d, pos_k, 0, full_m, seqlen_q, shift, qk_scale, slope,
                                   MASK=_MASK_NONE, HAS_ALIBI=HAS_ALIBI, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M,
                                   EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION)
            tail = full_m.to(tl.int64)
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_ptrs + tail * stride_qt, do_ptrs + tail * stride_dot,
                                   lse_ptrs + full_m, delta_ptrs + full_m, stride_qt, stride_dot,
                                   offs_m, offs_n, offs_d, pos_k, full_m, seqlen_q, seqlen_q, shift, qk_scale,
                                   slope,
                                   MASK=_MASK_TAIL, HAS_ALIBI=HAS_ALIBI, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M,
                                   EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION)

        dk *= sm_scale  # d(score)/dk = softmax_scale * q; the log2(e) in qk_scale only lived inside exp2
        out_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
        tl.store(_tile_ptrs(DK, k_start, offs_n, stride_dkt, off_h, stride_dkh, offs_d), dk.to(DK.dtype.element_ty),
                 mask=out_mask)
        tl.store(_tile_ptrs(DV, k_start, offs_n, stride_dvt, off_h, stride_dvh, offs_d), dv.to(DV.dtype.element_ty),
                 mask=out_mask)

    @triton.jit
    def _bwd_q_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, offs_d, pos_q,
                     lo, hi, seqlen_k, shift, qk_scale, slope,
                     MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                     EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # One query tile against key blocks [lo, hi); k_ptrs/v_ptrs already point at key row `lo`.
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            cols = start_n + offs_n
            k = _load_tile(k_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, MASK_ROWS=MASK != _MASK_NONE, EVEN_D=EVEN_D)
            v = _load_tile(v_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, MASK_ROWS=MASK != _MASK_NONE, EVEN_D=EVEN_D)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if HAS_ALIBI:
                qk -= slope * tl.abs(pos_q[:, None] - cols.to(tl.float32)[None, :])
            if MASK != _MASK_NONE:
                keep = cols[None, :] < seqlen_k
                if MASK == _MASK_CAUSAL:
                    keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
                qk = tl.where(keep, qk, float("-inf"))
            p = tl.exp2(qk - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
            k_ptrs += BLOCK_N * stride_kt
            v_ptrs += BLOCK_N * stride_vt
        return dq

    @triton.autotune(configs=_BWD_Q_CONFIGS, key=_TUNE_KEY)
    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _bwd_q_kernel(
        Q, K, V, DO,  # (t_q, h, d), (t_k, h, d), (t_k, h, d), (t_q, h, d)
        Lse, Delta,  # (h, t_q) fp32 each, same strides
        DQ,  # (t_q, h, d)
        CuSeqlensQ, CuSeqlensK,  # (b + 1,) int32
        Slopes,  # (b, h) or (h,) fp32, natural units
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dqt, stride_dqh, stride_lh, stride_sb, stride_sh,
        qk_scale, sm_scale,
        max_seqlen_bucket,  # autotune key only
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_ALIBI: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # dQ for one query block, looping over all key blocks (no atomics; see _bwd_kv_kernel).
        EVEN_D = BLOCK_D == HEAD_DIM  # a constexpr: no head-dim mask when d is a power of two
        off_h, q_start, seqlen_q, k_start, seqlen_k, slope = _program_sequence(
            CuSeqlensQ, CuSeqlensK, Slopes, stride_sb, stride_sh, HAS_ALIBI=HAS_ALIBI)
        start_m = tl.program_id(0) * BLOCK_M
        if start_m >= seqlen_q:
            return  # this sequence is shorter than max_seqlen_q
        shift = seqlen_k - seqlen_q

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < seqlen_q
        q = _load_tile(_tile_ptrs(Q, q_start, offs_m, stride_qt, off_h, stride_qh, offs_d), offs_m, seqlen_q,
                       offs_d, HEAD_DIM, MASK_ROWS=True, EVEN_D=EVEN_D)
        do = _load_tile(_tile_ptrs(DO, q_start, offs_m, stride_dot, off_h, stride_doh, offs_d), offs_m, seqlen_q,
                        offs_d, HEAD_DIM, MASK_ROWS=True, EVEN_D=EVEN_D)
        lse = tl.load(Lse + off_h * stride_lh + q_start + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + off_h * stride_lh + q_start + offs_m, mask=row_ok, other=0.0)
        k_ptrs = _tile_ptrs(K, k_start, offs_n, stride_kt, off_h, stride_kh, offs_d)
        v_ptrs = _tile_ptrs(V, k_start, offs_n, stride_vt, off_h, stride_vh, offs_d)
        pos_q = (offs_m + shift).to(tl.float32)

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if CAUSAL:
            hi = tl.minimum(seqlen_k, start_m + BLOCK_M + shift)
            dq = _bwd_q_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                              pos_q, 0, hi, seqlen_k, shift, qk_scale, slope,
                              MASK=_MASK_CAUSAL, HAS_ALIBI=HAS_ALIBI, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
                              EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION)
        else:
            full_n = (seqlen_k // BLOCK_N) * BLOCK_N
            dq = _bwd_q_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                              pos_q, 0, full_n, seqlen_k, shift, qk_scale, slope,
                              MASK=_MASK_NONE, HAS_ALIBI=HAS_ALIBI, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
                              EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION)
            tail = full_n.to(tl.int64)
            dq = _bwd_q_inner(dq, q, do, lse, delta, k_ptrs + tail * stride_kt, v_ptrs + tail * stride_vt,
                              stride_kt, stride_vt, offs_m, offs_n, offs_d, pos_q, full_n, seqlen_k, seqlen_k, shift,
                              qk_scale, slope,
                              MASK=_MASK_TAIL, HAS_ALIBI=HAS_ALIBI, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
                              EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION)
        dq *= sm_scale
        tl.store(_tile_ptrs(DQ, q_start, offs_m, stride_dqt, off_h, stride_dqh, offs_d), dq.to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------------------
# Validation. Only `check_max_seqlen` reads tensor values (and says so); the rest reads shapes, dtypes and
# devices, so the attention functions never wait for the device.
# --------------------------------------------------------------------------------------------------------
def _require_triton():
    if not HAS_TRITON:
        raise ImportError(
            "flash_attn_triton needs the `triton` package (pip install triton) and torch >= 2.4; "
            f"{'triton is not installed' if triton is None else f'this is torch {torch.__version__}'}. "
            "Use the model's PyTorch attention path instead."
        )


def _check_options(dropout_p, softmax_scale, head_dim):
    """Returns the softmax scale as a float (1 / sqrt(head_dim) by default)."""
    _require_triton()
    if dropout_p != 0.0:
        raise ValueError(
            f"dropout_p={dropout_p} is not supported: this kernel has no attention dropout (use dropout_p=0.0, "
            "or the model's PyTorch attention path for attention-probability dropout)"
        )
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, torch.Tensor):
        raise TypeError("softmax_scale must be a Python float, not a tensor (reading it would wait for the device)")
    if not softmax_scale > 0:  # the forward takes the row max before scaling, which needs a positive scale
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale}")
    return float(softmax_scale)


def _check_qkv_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (total_tokens, heads, head_dim), got {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: float16, bfloat16, float32")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, got strides {x.stride()}")


def _check_device_and_head_dim(q):
    if q.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"flash_attn_triton runs on CUDA tensors, got a tensor on {q.device} (on CPU it runs only under "
            "Triton's interpreter: set TRITON_INTERPRET=1 before importing this module)"
        )
    head_dim = q.shape[2]
    if not (_MIN_HEAD_DIM <= head_dim <= _MAX_HEAD_DIM) or head_dim % 8 != 0:
        raise ValueError(
            f"head_dim {head_dim} is not supported: it must be a multiple of 8 between {_MIN_HEAD_DIM} and "
            f"{_MAX_HEAD_DIM}"
        )


def _check_qkv(q, k, v):
    """Shapes, dtypes, devices and layout of q/k/v; returns (heads, head_dim)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_qkv_tensor(name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    heads, head_dim = q.shape[1], q.shape[2]
    if k.shape != v.shape or k.shape[1:] != q.shape[1:]:
        raise ValueError(
            f"k and v must have shape (total_tokens_k, {heads}, {head_dim}) like q's heads and head_dim, "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    _check_device_and_head_dim(q)
    return heads, head_dim


def _check_cu_seqlens(name, cu_seqlens, device):
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor of batch + 1 cumulative lengths starting at 0")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but q is on {device}")
    if cu_seqlens.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous")


def _max_seqlen_arg(name, max_seqlen):
    """max_seqlen as an int, or as the SymInt it is under torch.compile (e.g. the padded width of the batch);
    never a tensor, which would have to be read back from the device on every call."""
    if not isinstance(max_seqlen, (int, torch.SymInt)):
        if isinstance(max_seqlen, torch.Tensor) or not hasattr(type(max_seqlen), "__index__"):
            raise TypeError(
                f"{name} must be a Python int, got {type(max_seqlen).__name__} (a tensor would have to be read "
                "back from the device on every call)"
            )
        max_seqlen = operator.index(max_seqlen)  # numpy integers too
    if max_seqlen < 0:
        raise ValueError(f"{name} must be >= 0, got {max_seqlen}")
    return max_seqlen


def _check_slopes(alibi_slopes, batch, heads, device):
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a tensor or None, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(
            f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}) (heads, or batch x heads), "
            f"got {tuple(alibi_slopes.shape)}"
        )


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes):
    heads, _ = _check_qkv(q, k, v)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k describe different batch sizes "
            f"({cu_seqlens_q.numel() - 1} vs {cu_seqlens_k.numel() - 1})"
        )
    if alibi_slopes is not None:
        _check_slopes(alibi_slopes, cu_seqlens_q.numel() - 1, heads, q.device)


def check_max_seqlen(cu_seqlens, max_seqlen, name="max_seqlen"):
    """Checks `cu_seqlens` and `max_seqlen` by reading them on the host; returns the longest sequence length.

    Raises `ValueError` if `cu_seqlens` does not start at 0, decreases anywhere, or if `max_seqlen` is below
    its longest sequence. This waits for the device once (one small copy): call it once per forward where
    `cu_seqlens`/`max_seqlen` come from the caller, not once per layer. It does not need Triton.

    Args:
        cu_seqlens (`torch.Tensor` of shape `(batch + 1,)`, integer): cumulative sequence lengths.
        max_seqlen (`int`): the value to be passed to the attention functions.
    """
    cu_seqlens = cu_seqlens.reshape(-1)
    if cu_seqlens.numel() < 2:
        return 0
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    first, shortest, longest = torch.stack([cu_seqlens[0], lengths.min(), lengths.max()]).tolist()
    if first != 0 or shortest < 0:
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got first={first}, smallest step "
                         f"{shortest}")
    if max_seqlen < longest:
        raise ValueError(f"{name}={max_seqlen} is below the longest sequence ({longest}) in cu_seqlens")
    return longest


def _assert_max_seqlen(name, cu_seqlens, max_seqlen):
    """Fails if `max_seqlen` is below the longest sequence of `cu_seqlens`, without waiting for the device.

    The launch grid has max_seqlen / BLOCK programs per sequence, so a too-small value would leave rows of the
    output unwritten. On CPU (the interpreter) reading is free: `check_max_seqlen`'s ValueError, with both
    numbers. On a GPU, `torch._assert_async`: a device-side assert that stops the CUDA context at the next
    synchronization, before anything reads the output (its message cannot carry the device's numbers; call
    `check_max_seqlen` for a readable error).
    """
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        check_max_seqlen(cu_seqlens, max_seqlen, name)
    else:
        longest = (cu_seqlens[1:] - cu_seqlens[:-1]).max()
        # (the message names no value: formatting a symbolic max_seqlen would specialize a compiled graph on it)
        torch._assert_async(longest <= max_seqlen, f"{name} is below the longest sequence in cu_seqlens")


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------
def _slopes_strides(alibi_slopes):
    """(slopes, stride over sequences, stride over heads) for slopes of shape (h,) or (b, h), or (None, 0, 0)
    without ALiBi. The slopes are read in place (the kernels multiply in log2(e) as they load them)."""
    if alibi_slopes is None:
        return None, 0, 0
    if alibi_slopes.dim() == 1:
        return alibi_slopes, 0, alibi_slopes.stride(0)
    return alibi_slopes, alibi_slopes.stride(0), alibi_slopes.stride(1)


# The config the autotuner chose, per (kernel, seqlen bucket, dtype, device, constexprs). After a key's first
# launch (which tunes), later launches go straight to the tuned kernel: the autotuner's per-call bookkeeping costs
# about as much host time as the launch itself, which is what a small batch's attention call waits on.
_TUNED_CONFIGS = {}


def _launch_tuned(kernel, grid, bucket, x, *args, **constexprs):
    """kernel[grid](*args, **constexprs) for an autotuned kernel whose tuning key is (bucket, constexprs['HEAD_DIM']);
    grid: a function of the launch's meta-parameters; x: a tensor of the launch, whose dtype and device join the
    key. Returns (the kept kernel, the grid) for `relaunch` once a tuned launch is kept, else (None, None)."""
    key = (kernel, bucket, x.dtype, x.device.index, *constexprs.values())
    config = _TUNED_CONFIGS.get(key)
    if config is None:
        kernel[grid](*args, **constexprs)
        _TUNED_CONFIGS[key] = kernel.best_config.all_kwargs()
        return None, None
    grid = grid(config)
    return launch(kernel.fn, grid, args, x.device.index, **constexprs, **config), grid


def _forward_pointers(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, slopes):
    """The forward kernel's eight pointer arguments in its order; an unused lse or slopes gets a placeholder."""
    return q, k, v, out, out if lse is None else lse, cu_seqlens_q, cu_seqlens_k, q if slopes is None else slopes


def _forward_launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                    causal, alibi_slopes):
    """Launches the forward kernel into out (and lse unless None); returns (the kept kernel or None, the grid, the
    arguments after the eight pointers), which `PackedSelfAttention` relaunches layer after layer."""
    heads, head_dim = q.shape[1], q.shape[2]
    batch = cu_seqlens_q.numel() - 1
    slopes, stride_sb, stride_sh = _slopes_strides(alibi_slopes)
    grid = lambda meta: (cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    bucket = _seqlen_bucket(max(max_seqlen_q, max_seqlen_k))
    scalars = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), 0 if lse is None else lse.stride(0), stride_sb, stride_sh,
        softmax_scale * _LOG2E, bucket,
    )
    with device_context(q):
        kept, grid = _launch_tuned(
            _fwd_kernel, grid, bucket, q,
            *_forward_pointers(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, slopes), *scalars,
            HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)),
            HAS_ALIBI=slopes is not None, CAUSAL=causal,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else None, STORE_LSE=lse is not None,
        )
    return kept, grid, scalars


def _flash_attn_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                        causal, alibi_slopes, store_lse=True):
    """Launch the forward kernel (inputs already checked by `_check_inputs`).

    q: (t_q, h, d), k/v: (t_k, h, d), fp16/bf16/fp32, last dim contiguous (other strides free, so views of a
    packed qkv work); cu_seqlens_q/k: (b + 1,) int32; alibi_slopes: None, (h,) or (b, h) fp32.
    max_seqlen_q/k must be at least the longest query/key sequence (they size the grids; the ops check that
    with `_assert_max_seqlen` before calling the ops, unless the caller vouches for them).
    Returns out (t_q, h, d) in q's dtype, contiguous, and lse (h, t_q) fp32 (base-2 log-sum-exp), or None with
    store_lse=False (a forward no backward will follow: one allocation and store fewer).
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device) if store_lse else None
    if q.shape[0] == 0 or max_seqlen_q == 0:
        return out, lse
    _forward_launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                    alibi_slopes)
    return out, lse


def _flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, causal, alibi_slopes, dq, dk, dv):
    """Launch the three backward kernels (delta = rowsum(dO * O), then dK/dV per key block, then dQ per
    query block; deterministic, no atomics), writing into dq/dk/dv.

    Shapes as in `_flash_attn_forward`; dout: (t_q, h, d). dq/dk/dv: (t_q, h, d), (t_k, h, d), (t_k, h, d),
    last dim contiguous, possibly strided views, e.g. the three slices of one (t, 3, h, d) gradient.
    """
    heads, head_dim = q.shape[1], q.shape[2]
    batch = cu_seqlens_q.numel() - 1
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if k.shape[0] > 0 and q.shape[0] == 0:
        dk.zero_()
        dv.zero_()
    if q.shape[0] == 0 or k.shape[0] == 0:
        dq.zero_()
        return
    block_d = max(16, next_power_of_2(head_dim))
    bucket = _seqlen_bucket(max(max_seqlen_q, max_seqlen_k))
    slopes, stride_sb, stride_sh = _slopes_strides(alibi_slopes)
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_ALIBI=slopes is not None, CAUSAL=causal,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else None)
    slopes = q if slopes is None else slopes
    delta = torch.empty_like(lse)
    with device_context(q):
        block_t = 64
        launch(
            _bwd_preprocess_kernel, (cdiv(q.shape[0], block_t), heads, 1),
            (out, dout, delta, q.shape[0], out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
             delta.stride(0)),
            q.device.index, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t,
        )
        # Key sequences shorter than max_seqlen_k exit at once; a key block with no query rows (seqlen_q = 0)
        # still stores zeros.
        kv_grid = lambda meta: (cdiv(max_seqlen_k, meta["BLOCK_N"]), heads, batch)  # noqa: E731
        _launch_tuned(
            _bwd_kv_kernel, kv_grid, bucket, q,
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, slopes,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            lse.stride(0), stride_sb, stride_sh,
            softmax_scale * _LOG2E, softmax_scale, bucket, **consts,
        )
        q_grid = lambda meta: (cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
        _launch_tuned(
            _bwd_q_kernel, q_grid, bucket, q,
            q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, slopes,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            lse.stride(0), stride_sb, stride_sh,
            softmax_scale * _LOG2E, softmax_scale, bucket, **consts,
        )


# --------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, which sees only their fake implementations (shapes and dtypes) and
# their registered backward. max_seqlen is a SymInt, so a symbolic padded width traces without specializing.
# --------------------------------------------------------------------------------------------------------
def _varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                alibi_slopes):
    return _flash_attn_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                               causal, alibi_slopes)


def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                     alibi_slopes):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                causal, alibi_slopes):
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    _flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, causal, alibi_slopes, dq, dk, dv)
    return dq, dk, dv


def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, causal, alibi_slopes):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, alibi_slopes = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    ctx.max_seqlen_q, ctx.max_seqlen_k = max_seqlen_q, max_seqlen_k
    ctx.softmax_scale, ctx.causal = softmax_scale, causal
    ctx.mark_non_differentiable(lse)  # the backward has no formula for it
    ctx.set_materialize_grads(False)  # so no zero tensor is made for its gradient


def _varlen_backward(ctx, dout, dlse):
    if dout is None:
        return (None,) * 10
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes = ctx.saved_tensors
    bwd = _varlen_bwd if backward_direct(dout, q, k, v) else torch.ops.mosaic_bert.flash_attn_varlen_bwd.default
    dq, dk, dv = bwd(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.softmax_scale,
        ctx.causal, alibi_slopes,
    )
    return dq, dk, dv, None, None, None, None, None, None, None


def _qkvpacked_fwd(qkv, cu_seqlens, max_seqlen, softmax_scale, causal, alibi_slopes):
    q, k, v = qkv.unbind(1)  # strided views into qkv (t, 3, h, d), never copies
    return _flash_attn_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale, causal,
                               alibi_slopes)


def _qkvpacked_fwd_fake(qkv, cu_seqlens, max_seqlen, softmax_scale, causal, alibi_slopes):
    t, _, h, d = qkv.shape
    return qkv.new_empty((t, h, d)), qkv.new_empty((h, t), dtype=torch.float32)


def _qkvpacked_bwd(dout, qkv, out, lse, cu_seqlens, max_seqlen, softmax_scale, causal, alibi_slopes):
    # One (t, 3, h, d) gradient; the kernels write dq/dk/dv straight into its three slices.
    dqkv = qkv.new_empty(qkv.shape)
    q, k, v = qkv.unbind(1)
    _flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale,
                         causal, alibi_slopes, *dqkv.unbind(1))
    return dqkv


def _qkvpacked_bwd_fake(dout, qkv, out, lse, cu_seqlens, max_seqlen, softmax_scale, causal, alibi_slopes):
    return qkv.new_empty(qkv.shape)


def _qkvpacked_setup_context(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, softmax_scale, causal, alibi_slopes = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cu_seqlens, alibi_slopes)
    ctx.max_seqlen, ctx.softmax_scale, ctx.causal = max_seqlen, softmax_scale, causal
    ctx.mark_non_differentiable(lse)  # the backward has no formula for it
    ctx.set_materialize_grads(False)  # so no zero tensor is made for its gradient


def _qkvpacked_backward(ctx, dout, dlse):
    if dout is None:
        return (None,) * 6
    qkv, out, lse, cu_seqlens, alibi_slopes = ctx.saved_tensors
    bwd = (_qkvpacked_bwd if backward_direct(dout, qkv)
           else torch.ops.mosaic_bert.flash_attn_varlen_qkvpacked_bwd.default)
    dqkv = bwd(
        dout, qkv, out, lse, cu_seqlens, ctx.max_seqlen, ctx.softmax_scale, ctx.causal, alibi_slopes
    )
    return dqkv, None, None, None, None, None


_VARLEN_ARGS = ("Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
                "float softmax_scale, bool causal, Tensor? alibi_slopes")
_PACKED_ARGS = "Tensor cu_seqlens, SymInt max_seqlen, float softmax_scale, bool causal, Tensor? alibi_slopes"
_OPS = {
    # name: (schema, implementation, fake implementation, backward, setup_context)
    "flash_attn_varlen_fwd": (f"(Tensor q, Tensor k, Tensor v, {_VARLEN_ARGS}) -> (Tensor, Tensor)",
                              _varlen_fwd, _varlen_fwd_fake, _varlen_backward, _varlen_setup_context),
    "flash_attn_varlen_bwd": (
        f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_VARLEN_ARGS}) "
        "-> (Tensor, Tensor, Tensor)",
        _varlen_bwd, _varlen_bwd_fake, None, None),
    "flash_attn_varlen_qkvpacked_fwd": (f"(Tensor qkv, {_PACKED_ARGS}) -> (Tensor, Tensor)",
                                        _qkvpacked_fwd, _qkvpacked_fwd_fake, _qkvpacked_backward,
                                        _qkvpacked_setup_context),
    "flash_attn_varlen_qkvpacked_bwd": (f"(Tensor dout, Tensor qkv, Tensor out, Tensor lse, {_PACKED_ARGS}) -> Tensor",
                                        _qkvpacked_bwd, _qkvpacked_bwd_fake, None, None),
}


def _register_ops():
    namespace = getattr(torch.ops, _OP_NAMESPACE)
    for name, (schema, impl, fake, backward, setup_context) in _OPS.items():
        if hasattr(namespace, name):
            # This file was imported before under another module name (say from the repo root and as
            # transformers' copy of the remote code); the ops that copy registered serve both.
            continue
        op = torch.library.custom_op(f"{_OP_NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)


if HAS_TRITON:
    _register_ops()
# What eager autograd calls instead of the ops with a backward (`route`): the same implementation and formula.
_FUNCTIONS = {name: autograd_function(name, impl, setup_context, backward)
              for name, (_, impl, _, backward, setup_context) in _OPS.items() if backward is not None}


# --------------------------------------------------------------------------------------------------------
# Public API (flash-attn 2 vocabulary)
# --------------------------------------------------------------------------------------------------------
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, alibi_slopes=None, deterministic=True,
                           max_seqlen_checked=False):
    """Attention over a packed batch of variable-length sequences, with optional ALiBi.

    Args:
        q (`torch.Tensor` of shape `(total_tokens_q, heads, head_dim)`): queries, fp16/bf16/fp32, CUDA.
        k, v (`torch.Tensor` of shape `(total_tokens_k, heads, head_dim)`): keys and values, q's dtype.
            Only the last dimension must be contiguous.
        cu_seqlens_q, cu_seqlens_k (`torch.Tensor` of shape `(batch + 1,)`, int32): cumulative sequence
            lengths starting at 0.
        max_seqlen_q, max_seqlen_k (`int`): at least the longest query / key sequence (they size the launch
            grids; a larger value, such as the padded width of the batch, only launches programs that exit at
            once). A smaller value fails: a ValueError on CPU, a device-side assert on a GPU (see
            `check_max_seqlen` for a readable error).
        dropout_p (`float`): must be 0.0; attention dropout is not implemented (ValueError otherwise).
        softmax_scale (`float`, *optional*): defaults to 1 / sqrt(head_dim).
        causal (`bool`): mask key j > i + (seqlen_k - seqlen_q) (flash-attn's bottom-right alignment).
        alibi_slopes (`torch.Tensor` of shape `(heads,)` or `(batch, heads)`, fp32, *optional*): adds
            `-slope * |i + seqlen_k - seqlen_q - j|` to the scores (`-slope * |i - j|` for self-attention),
            with positions counted from 0 inside each sequence.
        deterministic (`bool`): accepted for flash-attn compatibility; the backward is always deterministic.
        max_seqlen_checked (`bool`): the caller guarantees the max_seqlen bounds (e.g. it passes the padded width
            of the batch, or validated them once with `check_max_seqlen`); skips the per-call device check.

    Returns:
        `torch.Tensor` of shape `(total_tokens_q, heads, head_dim)` in q's dtype.
    """
    softmax_scale = _check_options(dropout_p, softmax_scale, q.shape[-1])
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    max_seqlen_q = _max_seqlen_arg("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _max_seqlen_arg("max_seqlen_k", max_seqlen_k)
    if not max_seqlen_checked:
        _assert_max_seqlen("max_seqlen_q", cu_seqlens_q, max_seqlen_q)
        _assert_max_seqlen("max_seqlen_k", cu_seqlens_k, max_seqlen_k)
    how = route(q, k, v)
    if how is not None:
        op = torch.ops.mosaic_bert.flash_attn_varlen_fwd.default if how == "op" else (
            _FUNCTIONS["flash_attn_varlen_fwd"].apply)
        out, _ = op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, bool(causal),
                    alibi_slopes)
    else:
        out, _ = _flash_attn_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                     bool(causal), alibi_slopes, store_lse=False)
    return out


def _check_packed(qkv, cu_seqlens, dropout_p, softmax_scale, alibi_slopes):
    """The checks of a packed self-attention call (shapes, dtypes, devices; no values read). Returns the softmax
    scale as a float."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must have shape (total_tokens, 3, heads, head_dim), got {shape}")
    softmax_scale = _check_options(dropout_p, softmax_scale, qkv.shape[-1])
    # k and v are views of qkv like q: the same dtype, device, shape and strides, so q is checked for all three
    q = qkv.select(1, 0)
    _check_qkv_tensor("qkv", q)
    _check_device_and_head_dim(q)
    _check_cu_seqlens("cu_seqlens", cu_seqlens, q.device)
    if alibi_slopes is not None:
        _check_slopes(alibi_slopes, cu_seqlens.numel() - 1, q.shape[1], q.device)
    return softmax_scale


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     alibi_slopes=None, deterministic=True, max_seqlen_checked=False):
    """Self-attention over a packed batch, taking q, k and v as one tensor.

    Args:
        qkv (`torch.Tensor` of shape `(total_tokens, 3, heads, head_dim)`): e.g. a fused Linear output
            reshaped; read in place through strides (no copy), last dimension contiguous. Its gradient is one
            tensor of the same shape.
        cu_seqlens (`torch.Tensor` of shape `(batch + 1,)`, int32), max_seqlen (`int`): as in
            `flash_attn_varlen_func`; the other arguments too.

    Returns:
        `torch.Tensor` of shape `(total_tokens, heads, head_dim)` in qkv's dtype.
    """
    softmax_scale = _check_packed(qkv, cu_seqlens, dropout_p, softmax_scale, alibi_slopes)
    max_seqlen = _max_seqlen_arg("max_seqlen", max_seqlen)
    if not max_seqlen_checked:
        _assert_max_seqlen("max_seqlen", cu_seqlens, max_seqlen)
    how = route(qkv)
    if how is not None:
        op = torch.ops.mosaic_bert.flash_attn_varlen_qkvpacked_fwd.default if how == "op" else (
            _FUNCTIONS["flash_attn_varlen_qkvpacked_fwd"].apply)
        out, _ = op(qkv, cu_seqlens, max_seqlen, softmax_scale, bool(causal), alibi_slopes)
    else:  # the views of qkv checked above, straight to the launcher
        q, k, v = qkv.unbind(1)
        out, _ = _flash_attn_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale,
                                     bool(causal), alibi_slopes, store_lse=False)
    return out


class PackedSelfAttention:
    """`flash_attn_varlen_qkvpacked_func` over one packed batch, for a caller that runs it layer after layer (the
    model's encoder makes one per forward): `attention(qkv)` for each layer's qkv.

    max_seqlen is checked against cu_seqlens once, here (unless max_seqlen_checked). A qkv with the shape,
    strides, dtype and device of the one before is not checked again; when nothing records a graph and
    torch.compile is not tracing, its launch also reuses the previous launch's kernel and arguments (`relaunch`)
    if q's and the output's addresses have the same alignment as then, so a layer's host work is the output's
    allocation and the launcher call. Autograd and torch.compile take `flash_attn_varlen_qkvpacked_func`.

    Args:
        cu_seqlens, max_seqlen, softmax_scale, causal, alibi_slopes, max_seqlen_checked: as in
            `flash_attn_varlen_qkvpacked_func` (no dropout).
    """

    def __init__(self, cu_seqlens, max_seqlen, softmax_scale=None, causal=False, alibi_slopes=None,
                 max_seqlen_checked=False):
        _require_triton()
        self.cu_seqlens, self.alibi_slopes = cu_seqlens, alibi_slopes
        self.softmax_scale, self.causal = softmax_scale, bool(causal)
        self.max_seqlen = _max_seqlen_arg("max_seqlen", max_seqlen)
        if not max_seqlen_checked:
            _assert_max_seqlen("max_seqlen", cu_seqlens, self.max_seqlen)
        self._checked = None  # (shape, strides, dtype, device) of the last qkv, and its softmax scale
        self._kept = None  # (kept kernel, grid, non-pointer arguments, (q, out) addresses mod 16) of the last launch

    def __call__(self, qkv):
        if isinstance(qkv, torch.Tensor) and route(qkv) is not None:
            return flash_attn_varlen_qkvpacked_func(
                qkv, self.cu_seqlens, self.max_seqlen, softmax_scale=self.softmax_scale, causal=self.causal,
                alibi_slopes=self.alibi_slopes, max_seqlen_checked=True,
            )
        layout = (qkv.shape, qkv.stride(), qkv.dtype, qkv.device) if isinstance(qkv, torch.Tensor) else None
        if self._checked is None or layout is None or layout != self._checked[0]:
            scale = _check_packed(qkv, self.cu_seqlens, 0.0, self.softmax_scale, self.alibi_slopes)
            self._checked, self._kept = (layout, scale), None
        q, k, v = qkv.unbind(1)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if q.shape[0] == 0 or self.max_seqlen == 0:
            return out
        cu, slopes, kept = self.cu_seqlens, self.alibi_slopes, self._kept
        alignment = (q.data_ptr() % 16, out.data_ptr() % 16)
        if kept is not None and kept[3] == alignment:
            entry, grid, scalars, _ = kept
            with device_context(q):
                relaunch(entry, grid, (*_forward_pointers(q, k, v, out, None, cu, cu, slopes), *scalars),
                         q.device.index)
        else:
            entry, grid, scalars = _forward_launch(q, k, v, out, None, cu, cu, self.max_seqlen, self.max_seqlen,
                                                   self._checked[1], self.causal, slopes)
            self._kept = None if entry is None else (entry, grid, scalars, alignment)
        return out
