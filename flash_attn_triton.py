# Copyright 2026 The MosaicBERT package authors. Apache-2.0.
"""Varlen FlashAttention with in-kernel ALiBi, forward and backward, for Triton 3.x.

Axis legend: `t` total tokens of a packed (unpadded) batch, `b` sequences, `h` heads, `d` head dim.

Sequences are packed back to back along the token axis and delimited by `cu_seqlens` (int32, (b + 1,),
cumulative lengths starting at 0), the flash-attn 2 "varlen" convention. Attention never crosses a sequence
boundary. The ALiBi bias `-slope[h] * |i - j|` (positions restart at 0 in every sequence) is computed inside
the kernels from two aranges, so no (L, L) tensor exists anywhere and memory stays O(total_tokens).

Layers, top to bottom: Triton kernels -> launchers (validate, allocate, launch) -> autograd Functions ->
the public functions `flash_attn_varlen_func` and `flash_attn_varlen_qkvpacked_func`.

The file imports without Triton (Triton is optional for the model); the public functions then raise an
ImportError. On a machine without a GPU the kernels run under Triton's interpreter when `TRITON_INTERPRET=1`
is set before this module is imported (slow; meant for tests).
"""

import contextlib
import math
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the model falls back to its PyTorch attention path
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func"]

# Triton decides at decoration time whether `@triton.jit` builds an interpreted function, so we read the same
# switch once, here, to pick a tiny autotune list for the (very slow) interpreter.
_INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 128


def _seqlen_bucket(max_seqlen):
    """Autotune key for a max_seqlen: the next power of two (at least 16), so ragged batches whose longest
    sequence moves around (97, 113, 120, ...) share one tuned config instead of re-tuning per batch."""
    return max(16, triton.next_power_of_2(max(int(max_seqlen), 1)))


if HAS_TRITON:
    # ----------------------------------------------------------------------------------------------------
    # Autotune lists. Hopper (H100/H200) and d=64 are the tuning target; each list is short because every
    # entry is compiled and timed once per (seqlen bucket, head dim, dtype) key.
    # ----------------------------------------------------------------------------------------------------
    if _INTERPRET:
        # 16x16 tiles make the small test shapes (lengths 17, 40, ...) cross several blocks and a ragged tail.
        _FWD_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
        _BWD_KV_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
        _BWD_Q_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    else:
        # Chosen on an H200 (bench/attention.py --extra-configs, 2026-12-01): at d=64 the forward always
        # picked a 128-row query tile on one warpgroup with 64-key steps, 3 or 4 stages deep; 128-key steps
        # never won and were dropped.
        _FWD_CONFIGS = [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
            # Two warpgroups per query tile: half the registers per thread, for d=128 (one warpgroup spills).
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
            # Short sequences: smaller query tiles waste less work on ragged tails and fill 132 SMs better.
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        ]
        # Backward: the key/value kernel holds dK and dV accumulators (2 x BLOCK_N x d fp32) and steps over
        # queries; the dQ kernel is the mirror image. On the H200 both picked 64-wide tiles on one warpgroup
        # (32 query steps for the key/value kernel at short lengths); 64 x 128 on 8 warps never won.
        # (32 x 128 on 4 warps spills its accumulators at d=64: ptxas on sm_90a, 2026-12-01; on 8 warps not.)
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
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, CAUSAL: tl.constexpr, MASK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
        # One query tile against key blocks [lo, hi). MASK_N: this range may hold keys past seqlen_k (the
        # ragged tail) or, for causal, keys past the diagonal; the bulk of the blocks runs without masks.
        # k_ptrs/v_ptrs already point at key row `lo`.
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            cols = start_n + offs_n
            k = _load_tile(k_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, MASK_N, EVEN_D)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            if HAS_ALIBI:
                # Scores in base-2 units: log2(e) is folded into qk_scale and slope.
                qk = qk * qk_scale - slope * tl.abs(pos_q[:, None] - cols.to(tl.float32)[None, :])
            if MASK_N:
                keep = cols[None, :] < seqlen_k
                if CAUSAL:
                    keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
                qk = tl.where(keep, qk, float("-inf"))
            # Without ALiBi the scale is applied after the row max, inside one fused multiply-add with the
            # max subtraction (one op per score fewer: +7 to +12% forward at d=64 on an H200, 2026-12-01).
            if HAS_ALIBI:
                m_new = tl.maximum(m_i, tl.max(qk, 1))
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            if CAUSAL:
                # A query row can have no visible key yet; keep exp2 away from (-inf) - (-inf).
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            if HAS_ALIBI:
                p = tl.exp2(qk - m_new[:, None])
            else:
                p = tl.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_tile(v_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, MASK_N, EVEN_D)
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
        Slopes,  # (b, h) or (h,) fp32 (stride_sb = 0); unused without ALiBi
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_lh, stride_sb, stride_sh,
        qk_scale,  # softmax_scale * log2(e)
        max_seqlen_bucket,  # autotune key only
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_ALIBI: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        tl.static_assert(BLOCK_D >= HEAD_DIM)
        EVEN_D = BLOCK_D == HEAD_DIM  # a constexpr: no head-dim mask when d is a power of two
        # Grid: (query blocks of max_seqlen_q, heads, batch). Heads and batch on separate axes keep each
        # below the 65535 limit of grid axes 1 and 2; axis 0 varies fastest, so the query blocks of one
        # (sequence, head) run together and share its K/V in L2.
        pid_m = tl.program_id(0)
        off_h = tl.program_id(1).to(tl.int64)
        off_b = tl.program_id(2).to(tl.int64)
        q_start = tl.load(CuSeqlensQ + off_b).to(tl.int64)
        seqlen_q = tl.load(CuSeqlensQ + off_b + 1) - q_start.to(tl.int32)
        start_m = pid_m * BLOCK_M
        if start_m >= seqlen_q:
            return  # this sequence is shorter than max_seqlen_q
        k_start = tl.load(CuSeqlensK + off_b).to(tl.int64)
        seqlen_k = tl.load(CuSeqlensK + off_b + 1) - k_start.to(tl.int32)
        # Query i sits at key position i + shift (flash-attn's bottom-right alignment; 0 for self-attention).
        shift = seqlen_k - seqlen_q

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q_ptrs = Q + (q_start + offs_m[:, None]) * stride_qt + off_h * stride_qh + offs_d[None, :]
        k_ptrs = K + (k_start + offs_n[:, None]) * stride_kt + off_h * stride_kh + offs_d[None, :]
        v_ptrs = V + (k_start + offs_n[:, None]) * stride_vt + off_h * stride_vh + offs_d[None, :]
        q = _load_tile(q_ptrs, offs_m, seqlen_q, offs_d, HEAD_DIM, True, EVEN_D)

        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Slopes + off_b * stride_sb + off_h * stride_sh) * 1.4426950408889634
        pos_q = (offs_m + shift).to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if CAUSAL:
            hi = tl.minimum(seqlen_k, start_m + BLOCK_M + shift)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n,
                                       offs_d, pos_q, 0, hi, seqlen_k, shift, qk_scale, slope,
                                       HEAD_DIM, BLOCK_N, EVEN_D, HAS_ALIBI, True, True, DOT_PRECISION)
        else:
            full_n = (seqlen_k // BLOCK_N) * BLOCK_N
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n,
                                       offs_d, pos_q, 0, full_n, seqlen_k, shift, qk_scale, slope,
                                       HEAD_DIM, BLOCK_N, EVEN_D, HAS_ALIBI, False, False, DOT_PRECISION)
            tail = full_n.to(tl.int64)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs + tail * stride_kt, v_ptrs + tail * stride_vt,
                                       stride_kt, stride_vt, offs_m, offs_n,
                                       offs_d, pos_q, full_n, seqlen_k, seqlen_k, shift, qk_scale, slope,
                                       HEAD_DIM, BLOCK_N, EVEN_D, HAS_ALIBI, False, True, DOT_PRECISION)

        # A row that saw no key at all (empty key sequence, or causal with seqlen_q > seqlen_k) outputs 0
        # and gets lse = +inf, which makes its probabilities exactly 0 in the backward.
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log2(l_i))
        o_ptrs = Out + (q_start + offs_m[:, None]) * stride_ot + off_h * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))
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
        o = tl.load(Out + offs_t[:, None] * stride_ot + off_h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + offs_t[:, None] * stride_dot + off_h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(Delta + off_h * stride_dh + offs_t, delta, mask=offs_t < total_tokens)

    @triton.jit
    def _bwd_kv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
                      offs_m, offs_n, offs_d, pos_k, lo, hi, seqlen_q, shift, qk_scale, slope,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr,
                      HAS_ALIBI: tl.constexpr, CAUSAL: tl.constexpr, MASK_M: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
        # One key tile against query blocks [lo, hi), in transposed form (keys on rows) so that dV and dK
        # come out of the dots without transposing the accumulators.
        # q_ptrs/do_ptrs/lse_ptrs/delta_ptrs already point at query row `lo`.
        for start_m in range(lo, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            rows = start_m + offs_m
            q = _load_tile(q_ptrs, rows, seqlen_q, offs_d, HEAD_DIM, MASK_M, EVEN_D)
            if MASK_M:
                # lse = +inf zeroes every probability of a query row past the end of the sequence.
                lse = tl.load(lse_ptrs, mask=rows < seqlen_q, other=float("inf"))
            else:
                lse = tl.load(lse_ptrs)
            # qk_t: (BLOCK_N, BLOCK_M) base-2 scores, keys on rows.
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            if HAS_ALIBI:
                qk_t -= slope * tl.abs(pos_k[:, None] - (rows + shift).to(tl.float32)[None, :])
            if CAUSAL:
                qk_t = tl.where(offs_n[:, None] <= rows[None, :] + shift, qk_t, float("-inf"))
            p_t = tl.exp2(qk_t - lse[None, :])
            do = _load_tile(do_ptrs, rows, seqlen_q, offs_d, HEAD_DIM, MASK_M, EVEN_D)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            if MASK_M:
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
        Slopes,  # (b, h) or (h,) fp32
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
        pid_n = tl.program_id(0)
        off_h = tl.program_id(1).to(tl.int64)
        off_b = tl.program_id(2).to(tl.int64)
        k_start = tl.load(CuSeqlensK + off_b).to(tl.int64)
        seqlen_k = tl.load(CuSeqlensK + off_b + 1) - k_start.to(tl.int32)
        start_n = pid_n * BLOCK_N
        if start_n >= seqlen_k:
            return
        q_start = tl.load(CuSeqlensQ + off_b).to(tl.int64)
        seqlen_q = tl.load(CuSeqlensQ + off_b + 1) - q_start.to(tl.int32)
        shift = seqlen_k - seqlen_q

        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        # Key rows past seqlen_k load as zeros; their (garbage) dK/dV rows are never stored, and they feed
        # nothing else, so the query loop needs no key mask.
        k = _load_tile(K + (k_start + offs_n[:, None]) * stride_kt + off_h * stride_kh + offs_d[None, :],
                       offs_n, seqlen_k, offs_d, HEAD_DIM, True, EVEN_D)
        v = _load_tile(V + (k_start + offs_n[:, None]) * stride_vt + off_h * stride_vh + offs_d[None, :],
                       offs_n, seqlen_k, offs_d, HEAD_DIM, True, EVEN_D)
        q_ptrs = Q + (q_start + offs_m[:, None]) * stride_qt + off_h * stride_qh + offs_d[None, :]
        do_ptrs = DO + (q_start + offs_m[:, None]) * stride_dot + off_h * stride_doh + offs_d[None, :]
        lse_ptrs = Lse + off_h * stride_lh + q_start + offs_m
        delta_ptrs = Delta + off_h * stride_lh + q_start + offs_m

        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Slopes + off_b * stride_sb + off_h * stride_sh) * 1.4426950408889634
        pos_k = offs_n.to(tl.float32)

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        if CAUSAL:
            # Queries that can see key start_n: i + shift >= start_n.
            lo = tl.maximum(start_n - shift, 0)
            lo = (lo // BLOCK_M) * BLOCK_M
            lo64 = lo.to(tl.int64)
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_ptrs + lo64 * stride_qt, do_ptrs + lo64 * stride_dot,
                                   lse_ptrs + lo, delta_ptrs + lo, stride_qt, stride_dot,
                                   offs_m, offs_n, offs_d, pos_k, lo, seqlen_q, seqlen_q, shift, qk_scale, slope,
                                   HEAD_DIM, BLOCK_M, EVEN_D, HAS_ALIBI, True, True, DOT_PRECISION)
        else:
            full_m = (seqlen_q // BLOCK_M) * BLOCK_M
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
                                   offs_m, offs_n, offs_d, pos_k, 0, full_m, seqlen_q, shift, qk_scale, slope,
                                   HEAD_DIM, BLOCK_M, EVEN_D, HAS_ALIBI, False, False, DOT_PRECISION)
            tail = full_m.to(tl.int64)
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_ptrs + tail * stride_qt, do_ptrs + tail * stride_dot,
                                   lse_ptrs + full_m, delta_ptrs + full_m, stride_qt, stride_dot,
                                   offs_m, offs_n, offs_d, pos_k, full_m, seqlen_q, seqlen_q, shift, qk_scale,
                                   slope, HEAD_DIM, BLOCK_M, EVEN_D, HAS_ALIBI, False, True, DOT_PRECISION)

        dk *= sm_scale  # d(score)/dk = softmax_scale * q; the log2(e) in qk_scale only lived inside exp2
        out_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
        tl.store(DK + (k_start + offs_n[:, None]) * stride_dkt + off_h * stride_dkh + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV + (k_start + offs_n[:, None]) * stride_dvt + off_h * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _bwd_q_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, offs_d, pos_q,
                     lo, hi, seqlen_k, shift, qk_scale, slope,
                     HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                     HAS_ALIBI: tl.constexpr, CAUSAL: tl.constexpr, MASK_N: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
        # k_ptrs/v_ptrs already point at key row `lo`.
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            cols = start_n + offs_n
            k = _load_tile(k_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, MASK_N, EVEN_D)
            v = _load_tile(v_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, MASK_N, EVEN_D)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if HAS_ALIBI:
                qk -= slope * tl.abs(pos_q[:, None] - cols.to(tl.float32)[None, :])
            if MASK_N:
                keep = cols[None, :] < seqlen_k
                if CAUSAL:
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
        Slopes,  # (b, h) or (h,) fp32
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
        pid_m = tl.program_id(0)
        off_h = tl.program_id(1).to(tl.int64)
        off_b = tl.program_id(2).to(tl.int64)
        q_start = tl.load(CuSeqlensQ + off_b).to(tl.int64)
        seqlen_q = tl.load(CuSeqlensQ + off_b + 1) - q_start.to(tl.int32)
        start_m = pid_m * BLOCK_M
        if start_m >= seqlen_q:
            return
        k_start = tl.load(CuSeqlensK + off_b).to(tl.int64)
        seqlen_k = tl.load(CuSeqlensK + off_b + 1) - k_start.to(tl.int32)
        shift = seqlen_k - seqlen_q

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < seqlen_q
        q = _load_tile(Q + (q_start + offs_m[:, None]) * stride_qt + off_h * stride_qh + offs_d[None, :],
                       offs_m, seqlen_q, offs_d, HEAD_DIM, True, EVEN_D)
        do = _load_tile(DO + (q_start + offs_m[:, None]) * stride_dot + off_h * stride_doh + offs_d[None, :],
                        offs_m, seqlen_q, offs_d, HEAD_DIM, True, EVEN_D)
        lse = tl.load(Lse + off_h * stride_lh + q_start + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + off_h * stride_lh + q_start + offs_m, mask=row_ok, other=0.0)
        k_ptrs = K + (k_start + offs_n[:, None]) * stride_kt + off_h * stride_kh + offs_d[None, :]
        v_ptrs = V + (k_start + offs_n[:, None]) * stride_vt + off_h * stride_vh + offs_d[None, :]

        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Slopes + off_b * stride_sb + off_h * stride_sh) * 1.4426950408889634
        pos_q = (offs_m + shift).to(tl.float32)

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if CAUSAL:
            hi = tl.minimum(seqlen_k, start_m + BLOCK_M + shift)
            dq = _bwd_q_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                              pos_q, 0, hi, seqlen_k, shift, qk_scale, slope,
                              HEAD_DIM, BLOCK_N, EVEN_D, HAS_ALIBI, True, True, DOT_PRECISION)
        else:
            full_n = (seqlen_k // BLOCK_N) * BLOCK_N
            dq = _bwd_q_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                              pos_q, 0, full_n, seqlen_k, shift, qk_scale, slope,
                              HEAD_DIM, BLOCK_N, EVEN_D, HAS_ALIBI, False, False, DOT_PRECISION)
            tail = full_n.to(tl.int64)
            dq = _bwd_q_inner(dq, q, do, lse, delta, k_ptrs + tail * stride_kt, v_ptrs + tail * stride_vt,
                              stride_kt, stride_vt, offs_m, offs_n, offs_d,
                              pos_q, full_n, seqlen_k, seqlen_k, shift, qk_scale, slope,
                              HEAD_DIM, BLOCK_N, EVEN_D, HAS_ALIBI, False, True, DOT_PRECISION)
        dq *= sm_scale
        tl.store(DQ + (q_start + offs_m[:, None]) * stride_dqt + off_h * stride_dqh + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------
def _require_triton():
    if not HAS_TRITON:
        raise ImportError(
            "flash_attn_triton needs the `triton` package (pip install triton); it is not installed. "
            "Use the model's PyTorch attention path instead."
        )


def _check_qkv(q, k, v):
    """Shapes, dtypes, devices and layout of q/k/v; returns (heads, head_dim)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape (total_tokens, heads, head_dim), got {tuple(x.shape)}")
        if x.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; supported: float16, bfloat16, float32")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, got strides {x.stride()}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"flash_attn_triton runs on CUDA tensors, got a tensor on {q.device} (on CPU it runs only under "
            "Triton's interpreter: set TRITON_INTERPRET=1 before importing this module)"
        )
    heads, head_dim = q.shape[1], q.shape[2]
    if k.shape != v.shape or k.shape[1:] != q.shape[1:]:
        raise ValueError(
            f"k and v must have shape (total_tokens_k, {heads}, {head_dim}) like q's heads and head_dim, "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if not (_MIN_HEAD_DIM <= head_dim <= _MAX_HEAD_DIM) or head_dim % 8 != 0:
        raise ValueError(
            f"head_dim {head_dim} is not supported: it must be a multiple of 8 between {_MIN_HEAD_DIM} and "
            f"{_MAX_HEAD_DIM}"
        )
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


def _check_slopes(alibi_slopes, batch, heads, device):
    """Returns (stride over sequences, stride over heads) for `alibi_slopes` of shape (h,) or (b, h)."""
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
    if tuple(alibi_slopes.shape) == (heads,):
        return 0, alibi_slopes.stride(0)
    if tuple(alibi_slopes.shape) == (batch, heads):
        return alibi_slopes.stride(0), alibi_slopes.stride(1)
    raise ValueError(
        f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}) (heads, or batch x heads), "
        f"got {tuple(alibi_slopes.shape)}"
    )


def _flash_attn_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                        causal, alibi_slopes):
    """Launch the forward kernel.

    q: (t_q, h, d), k/v: (t_k, h, d), fp16/bf16/fp32, last dim contiguous (other strides free, so views of a
    packed qkv work); cu_seqlens_q/k: (b + 1,) int32; alibi_slopes: None, (h,) or (b, h) fp32.
    max_seqlen_q must be at least the longest query sequence (it sizes the grid; it is not checked, as that
    would synchronize with the device).
    Returns out (t_q, h, d) in q's dtype, contiguous, and lse (h, t_q) fp32 (base-2 log-sum-exp).
    """
    _require_triton()
    heads, head_dim = _check_qkv(q, k, v)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k describe different batch sizes "
            f"({cu_seqlens_q.numel() - 1} vs {cu_seqlens_k.numel() - 1})"
        )
    batch = cu_seqlens_q.numel() - 1
    if alibi_slopes is not None:
        stride_sb, stride_sh = _check_slopes(alibi_slopes, batch, heads, q.device)
    else:
        stride_sb, stride_sh = 0, 0
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError(f"max_seqlen_q/k must be >= 0, got {max_seqlen_q}, {max_seqlen_k}")

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, q.shape[0]), dtype=torch.float32, device=q.device)
    if q.shape[0] == 0 or max_seqlen_q == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _fwd_kernel[grid](
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
            alibi_slopes if alibi_slopes is not None else q,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), stride_sb, stride_sh,
            softmax_scale * _LOG2E,
            _seqlen_bucket(max(max_seqlen_q, max_seqlen_k)),
            HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            HAS_ALIBI=alibi_slopes is not None, CAUSAL=bool(causal),
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        )
    return out, lse


def _flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, causal, alibi_slopes, dq=None, dk=None, dv=None):
    """Launch the three backward kernels (delta = rowsum(dO * O), then dK/dV per key block, then dQ per
    query block; deterministic, no atomics).

    Shapes as in `_flash_attn_forward`; dout: (t_q, h, d). dq/dk/dv, when given, are (possibly strided)
    output views to write into, e.g. the three slices of one (t, 3, h, d) gradient; else they are allocated.
    Returns (dq, dk, dv).
    """
    heads, head_dim = q.shape[1], q.shape[2]
    batch = cu_seqlens_q.numel() - 1
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if alibi_slopes is not None:
        stride_sb, stride_sh = _check_slopes(alibi_slopes, batch, heads, q.device)
    else:
        stride_sb, stride_sh = 0, 0
    if k.shape[0] > 0 and q.shape[0] == 0:
        dk.zero_()
        dv.zero_()
    if q.shape[0] == 0 or k.shape[0] == 0:
        dq.zero_()
        return dq, dk, dv
    block_d = max(16, triton.next_power_of_2(head_dim))
    bucket = _seqlen_bucket(max(max_seqlen_q, max_seqlen_k))
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_ALIBI=alibi_slopes is not None, CAUSAL=bool(causal),
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else None)
    slopes = alibi_slopes if alibi_slopes is not None else q
    delta = torch.empty_like(lse)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        block_t = 64
        _bwd_preprocess_kernel[(triton.cdiv(q.shape[0], block_t), heads)](
            out, dout, delta, q.shape[0],
            out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t,
        )
        # Key sequences shorter than max_seqlen_k exit at once; a key block with no query rows (seqlen_q = 0)
        # still stores zeros.
        kv_grid = lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), heads, batch)  # noqa: E731
        _bwd_kv_kernel[kv_grid](
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, slopes,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            lse.stride(0), stride_sb, stride_sh,
            softmax_scale * _LOG2E, softmax_scale, bucket, **consts,
        )
        q_grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
        _bwd_q_kernel[q_grid](
            q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, slopes,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            lse.stride(0), stride_sb, stride_sh,
            softmax_scale * _LOG2E, softmax_scale, bucket, **consts,
        )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------
class _FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                alibi_slopes):
        out, lse = _flash_attn_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       softmax_scale, causal, alibi_slopes)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
        ctx.max_seqlen_q, ctx.max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
        ctx.softmax_scale, ctx.causal = softmax_scale, causal
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes = ctx.saved_tensors
        dq, dk, dv = _flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q,
                                          ctx.max_seqlen_k, ctx.softmax_scale, ctx.causal, alibi_slopes)
        return dq, dk, dv, None, None, None, None, None, None, None


class _FlashAttnVarlenQKVPackedFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cu_seqlens, max_seqlen, softmax_scale, causal, alibi_slopes):
        # qkv: (t, 3, h, d); q/k/v are strided views into it, never copies.
        q, k, v = qkv.unbind(1)
        out, lse = _flash_attn_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale,
                                       causal, alibi_slopes)
        ctx.save_for_backward(qkv, out, lse, cu_seqlens, alibi_slopes)
        ctx.max_seqlen, ctx.softmax_scale, ctx.causal = int(max_seqlen), softmax_scale, causal
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse, cu_seqlens, alibi_slopes = ctx.saved_tensors
        q, k, v = qkv.unbind(1)
        # One (t, 3, h, d) gradient; the kernels write dq/dk/dv straight into its three slices.
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        dq, dk, dv = dqkv.unbind(1)
        _flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_seqlen, ctx.max_seqlen,
                             ctx.softmax_scale, ctx.causal, alibi_slopes, dq=dq, dk=dk, dv=dv)
        return dqkv, None, None, None, None, None


# --------------------------------------------------------------------------------------------------------
# Public API (flash-attn 2 vocabulary)
# --------------------------------------------------------------------------------------------------------
def _check_options(dropout_p, softmax_scale, head_dim):
    _require_triton()
    if dropout_p != 0.0:
        raise ValueError(
            f"dropout_p={dropout_p} is not supported: this kernel has no attention dropout (use dropout_p=0.0, "
            "or the model's PyTorch attention path for attention-probability dropout)"
        )
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not softmax_scale > 0:  # the forward takes the row max before scaling, which needs a positive scale
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale}")
    return float(softmax_scale)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, alibi_slopes=None, deterministic=True):
    """Attention over a packed batch of variable-length sequences, with optional ALiBi.

    Args:
        q (`torch.Tensor` of shape `(total_tokens_q, heads, head_dim)`): queries, fp16/bf16/fp32, CUDA.
        k, v (`torch.Tensor` of shape `(total_tokens_k, heads, head_dim)`): keys and values, q's dtype.
            Only the last dimension must be contiguous.
        cu_seqlens_q, cu_seqlens_k (`torch.Tensor` of shape `(batch + 1,)`, int32): cumulative sequence
            lengths starting at 0.
        max_seqlen_q, max_seqlen_k (`int`): longest query / key sequence (sizes the launch grid).
        dropout_p (`float`): must be 0.0; attention dropout is not implemented (ValueError otherwise).
        softmax_scale (`float`, *optional*): defaults to 1 / sqrt(head_dim).
        causal (`bool`): mask key j > i + (seqlen_k - seqlen_q) (flash-attn's bottom-right alignment).
        alibi_slopes (`torch.Tensor` of shape `(heads,)` or `(batch, heads)`, fp32, *optional*): adds
            `-slope * |i + seqlen_k - seqlen_q - j|` to the scores (`-slope * |i - j|` for self-attention),
            with positions counted from 0 inside each sequence.
        deterministic (`bool`): accepted for flash-attn compatibility; the backward is always deterministic.

    Returns:
        `torch.Tensor` of shape `(total_tokens_q, heads, head_dim)` in q's dtype.
    """
    softmax_scale = _check_options(dropout_p, softmax_scale, q.shape[-1])
    return _FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      softmax_scale, causal, alibi_slopes)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     alibi_slopes=None, deterministic=True):
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
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must have shape (total_tokens, 3, heads, head_dim), got {shape}")
    softmax_scale = _check_options(dropout_p, softmax_scale, qkv.shape[-1])
    return _FlashAttnVarlenQKVPackedFunc.apply(qkv, cu_seqlens, max_seqlen, softmax_scale, causal, alibi_slopes)
