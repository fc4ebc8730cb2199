"""Tests for `flash_attn_triton`: the varlen FlashAttention kernel with in-kernel ALiBi.

Without a GPU the kernels run under Triton's interpreter (small shapes, fp16 and fp32; bf16 `tl.dot` is not
reliable in the interpreter). With a GPU, the second half checks realistic lengths and head dims against an
fp32 reference with the flash-attn oracle: our error is at most twice the error of plain PyTorch attention in
the same low dtype, for the output and every gradient.
"""

import importlib.util
import os
import subprocess
import sys
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton 3.x picks interpreted or compiled kernels when `@triton.jit` runs, for its own standard library
    # too, so this must precede the first `import triton` in the process (importing torch first is fine:
    # it does not import triton; `from transformers import PreTrainedModel` does).
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed; flash_attn_triton needs it")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (REPO_ROOT, TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

import flash_attn_triton as fa  # noqa: E402
import triton_launch  # noqa: E402
from flash_attn_triton import check_max_seqlen, flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func  # noqa: E402
from reference import closed_form_slopes, varlen_attention  # noqa: E402


def _interpreter_active():
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    std_zeros = getattr(getattr(triton.language, "standard", None), "zeros", None)
    return isinstance(fa._fwd_kernel.fn, InterpretedFunction) and isinstance(std_zeros, InterpretedFunction)


INTERPRETED = not HAS_CUDA and _interpreter_active()
DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_interpreter = pytest.mark.skipif(
    HAS_CUDA or not INTERPRETED,
    reason="CPU kernel tests need Triton's interpreter (TRITON_INTERPRET=1 before triton is first imported); "
    "with a GPU the GPU tests below cover the kernel",
)
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------------------------------
# Reference and helpers
# ------------------------------------------------------------------------------------------------------------
def alibi_slopes(heads, device=DEVICE):
    return torch.tensor(closed_form_slopes(heads), dtype=torch.float32, device=device)


def cu_seqlens_of(lengths, device=DEVICE):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def reference_with_grads(q, k, v, cu_q, cu_k, dout, compute_dtype, **kwargs):
    leaves = [x.detach().to(compute_dtype).requires_grad_() for x in (q, k, v)]
    out = varlen_attention(*leaves, cu_q, cu_k, compute_dtype=compute_dtype, **kwargs)
    out.backward(dout.to(compute_dtype))
    return out.detach(), [x.grad for x in leaves]


def ours_with_grads(q, k, v, cu_q, cu_k, max_q, max_k, dout, api="unpacked", **kwargs):
    """Runs our kernel forward and backward; 'packed' stacks q/k/v into one (t, 3, h, d) leaf."""
    if api == "packed":
        qkv = torch.stack([q, k, v], dim=1).detach().requires_grad_()
        out = flash_attn_varlen_qkvpacked_func(qkv, cu_q, max_q, **kwargs)
        out.backward(dout)
        assert qkv.grad.shape == qkv.shape
        return out.detach(), list(qkv.grad.unbind(1))
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = flash_attn_varlen_func(*leaves, cu_q, cu_k, max_q, max_k, **kwargs)
    out.backward(dout)
    return out.detach(), [x.grad for x in leaves]


def make_slopes(kind, batch, heads, device=DEVICE):
    if kind == "none":
        return None
    if kind == "heads":
        return alibi_slopes(heads, device)
    if kind == "batch":  # a different slope set per sequence
        return torch.rand(batch, heads, device=device) * 0.9 + 0.05
    if kind == "batch-strided":  # the same, as a transposed (non-contiguous) view, read through its strides
        return (torch.rand(heads, batch, device=device) * 0.9 + 0.05).t()
    raise ValueError(kind)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# Interpreter tolerances (max abs error vs float64) for unit-scale random inputs, about 3x the worst seen;
# fp16 is loose because the interpreter multiplies fp16 tiles with numpy in fp16.
CPU_TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def check_against_reference(lengths, heads, head_dim, dtype, slopes_kind, api, causal=False, softmax_scale=None,
                            lengths_k=None):
    lengths_k = lengths if lengths_k is None else lengths_k
    cu_q, cu_k = cu_seqlens_of(lengths), cu_seqlens_of(lengths_k)
    q = torch.randn(sum(lengths), heads, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(sum(lengths_k), heads, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(sum(lengths_k), heads, head_dim, dtype=dtype, device=DEVICE)
    dout = torch.randn_like(q)
    slopes = make_slopes(slopes_kind, len(lengths), heads)
    kwargs = dict(alibi_slopes=slopes, causal=causal, softmax_scale=softmax_scale)
    out, grads = ours_with_grads(q, k, v, cu_q, cu_k, max(lengths), max(lengths_k), dout, api, **kwargs)
    ref, ref_grads = reference_with_grads(q, k, v, cu_q, cu_k, dout, torch.float64, **kwargs)
    with torch.no_grad():  # no graph recorded: the launcher runs without the custom op, the same kernel
        if api == "packed":
            direct = flash_attn_varlen_qkvpacked_func(torch.stack([q, k, v], dim=1), cu_q, max(lengths), **kwargs)
        else:
            direct = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths), max(lengths_k), **kwargs)
    assert torch.equal(direct, out)
    tol = CPU_TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert max_err(out, ref) <= tol, f"out err {max_err(out, ref)}"
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        # Gradients scale with the sequence length; compare relative to the largest reference value.
        assert max_err(g, rg) <= tol * max(1.0, rg.abs().max().item()), f"d{name} err {max_err(g, rg)}"


# ------------------------------------------------------------------------------------------------------------
# CPU: Triton interpreter (quick; runs in CI)
# ------------------------------------------------------------------------------------------------------------
@requires_interpreter
@pytest.mark.parametrize("api", ["packed", "unpacked"])
@pytest.mark.parametrize("slopes_kind", ["none", "heads", "batch", "batch-strided"])
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 16), (torch.float16, 32)])
def test_interpreter_ragged_batch(dtype, head_dim, slopes_kind, api):
    torch.manual_seed(0)
    # 16x16 interpreter tiles: 17 and 40 cross block edges with ragged tails; 1 is a single-token sequence.
    check_against_reference([1, 5, 17, 40], 2, head_dim, dtype, slopes_kind, api)


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreter_length_one_batch(dtype):
    torch.manual_seed(1)
    check_against_reference([1], 2, 16, dtype, "heads", "packed")


@requires_interpreter
@pytest.mark.parametrize("head_dim", [24, 48])
def test_interpreter_padded_head_dim(head_dim):
    # head dims that are not powers of two run in a power-of-two tile with the extra columns masked.
    torch.manual_seed(2)
    check_against_reference([3, 19], 2, head_dim, torch.float32, "batch", "unpacked")


@requires_interpreter
@pytest.mark.parametrize("slopes_kind", ["none", "heads"])
def test_interpreter_causal(slopes_kind):
    torch.manual_seed(3)
    check_against_reference([1, 18, 33], 2, 16, torch.float32, slopes_kind, "packed", causal=True)


@requires_interpreter
def test_interpreter_cross_lengths_and_scale():
    # Different query and key lengths per sequence: ALiBi uses flash-attn's bottom-right alignment.
    torch.manual_seed(4)
    check_against_reference([3, 17, 1], 2, 16, torch.float32, "heads", "unpacked", softmax_scale=0.3,
                            lengths_k=[20, 2, 33])


@requires_interpreter
def test_interpreter_empty_sequence_in_batch():
    torch.manual_seed(5)
    check_against_reference([4, 0, 9], 2, 16, torch.float32, "heads", "packed")


@requires_interpreter
def test_interpreter_strided_packed_qkv_view():
    # qkv as a strided view (a slice of a wider buffer): read in place, gradient as one (t, 3, h, d) tensor.
    torch.manual_seed(6)
    lengths, heads, head_dim = [7, 20], 2, 16
    buffer = torch.randn(sum(lengths), 3, heads, head_dim + 8)
    qkv = buffer[..., :head_dim].detach().requires_grad_()
    assert not qkv.is_contiguous()
    cu = cu_seqlens_of(lengths)
    slopes = alibi_slopes(heads)
    out = flash_attn_varlen_qkvpacked_func(qkv, cu, max(lengths), alibi_slopes=slopes)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref, ref_grads = reference_with_grads(*qkv.unbind(1), cu, cu, dout, torch.float64, alibi_slopes=slopes)
    assert max_err(out, ref) <= CPU_TOL[torch.float32]
    assert qkv.grad.shape == qkv.shape
    for g, rg in zip(qkv.grad.unbind(1), ref_grads):
        assert max_err(g, rg) <= CPU_TOL[torch.float32] * max(1.0, rg.abs().max().item())


# ------------------------------------------------------------------------------------------------------------
# max_seqlen against cu_seqlens: too small must fail, never return garbage
# ------------------------------------------------------------------------------------------------------------
@requires_interpreter
@pytest.mark.parametrize("api", ["packed", "unpacked"])
def test_interpreter_max_seqlen_too_small_raises(api):
    lengths = [5, 20, 3]
    q, k, v = (torch.randn(sum(lengths), 2, 16) for _ in range(3))
    cu = cu_seqlens_of(lengths)
    for max_seqlen in (19, 16, 0):
        if api == "packed":
            name = "max_seqlen"
            call = lambda: flash_attn_varlen_qkvpacked_func(torch.stack([q, k, v], 1), cu, max_seqlen)  # noqa: E731
        else:
            name = "max_seqlen_q"
            call = lambda: flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, 20)  # noqa: E731
        with pytest.raises(ValueError, match=rf"{name}={max_seqlen} is below the longest sequence \(20\)"):
            call()
    if api == "unpacked":
        with pytest.raises(ValueError, match=r"max_seqlen_k=7 is below the longest sequence \(20\)"):
            flash_attn_varlen_func(q, k, v, cu, cu, 20, 7)


def test_tuned_config_is_reused_with_the_same_result(monkeypatch):
    # A key's first launch goes through the autotuner; later ones straight to the kernel with the config it chose.
    if not (HAS_CUDA or getattr(fa, "_INTERPRET", False)):
        pytest.skip("needs a GPU or Triton's interpreter")
    monkeypatch.setattr(fa, "_TUNED_CONFIGS", {})
    torch.manual_seed(3)
    lengths = [5, 20, 3]
    qkv = torch.randn(sum(lengths), 3, 2, 16, device=DEVICE, dtype=torch.float16)
    cu, slopes = cu_seqlens_of(lengths), alibi_slopes(2)
    first = flash_attn_varlen_qkvpacked_func(qkv, cu, 20, alibi_slopes=slopes)
    assert len(fa._TUNED_CONFIGS) == 1
    (config,) = fa._TUNED_CONFIGS.values()
    assert "BLOCK_M" in config and "num_warps" in config
    second = flash_attn_varlen_qkvpacked_func(qkv, cu, 20, alibi_slopes=slopes)
    assert len(fa._TUNED_CONFIGS) == 1 and torch.equal(first, second)
    ref = varlen_attention(*(x.double() for x in qkv.unbind(1)), cu, cu, alibi_slopes=slopes,
                           compute_dtype=torch.float64)
    assert max_err(second, ref) <= 3e-3


# ------------------------------------------------------------------------------------------------------------
# PackedSelfAttention: one batch, layer after layer
# ------------------------------------------------------------------------------------------------------------
requires_kernel = pytest.mark.skipif(not (HAS_CUDA or INTERPRETED), reason="needs a GPU or Triton's interpreter")


@requires_kernel
def test_packed_self_attention_layer_after_layer(monkeypatch):
    # Each call gives what the function gives, bit for bit: qkv of the layout before (the relaunch on a GPU),
    # qkv of another strides, dtype or alignment (checked and launched anew), with and without ALiBi.
    relaunches = []
    real = fa.relaunch
    monkeypatch.setattr(fa, "relaunch", lambda *a: relaunches.append(1) or real(*a))
    torch.manual_seed(11)
    lengths = [5, 20, 3]
    t, cu, slopes = sum(lengths), cu_seqlens_of(lengths), alibi_slopes(2)
    wide = torch.randn(t * 3 * 2 * 16 + 1, device=DEVICE, dtype=torch.float16)
    cases = [torch.randn(t, 3, 2, 16, device=DEVICE, dtype=torch.float16) for _ in range(4)]
    cases += [
        torch.randn(t, 3, 2, 20, device=DEVICE, dtype=torch.float16)[..., :16],  # other strides
        torch.randn(t, 3, 2, 16, device=DEVICE, dtype=torch.float32),  # other dtype
        wide[1:].view(t, 3, 2, 16),  # misaligned by one element
        torch.randn(t, 3, 2, 16, device=DEVICE, dtype=torch.float16),  # back to the first layout
    ]
    for alibi in (slopes, None):
        attention = fa.PackedSelfAttention(cu, 20, alibi_slopes=alibi)
        for qkv in cases:
            expected = flash_attn_varlen_qkvpacked_func(qkv, cu, 20, alibi_slopes=alibi)
            got = attention(qkv)
            assert got.dtype == qkv.dtype and torch.equal(got, expected)
        ref = varlen_attention(*(x.double() for x in cases[-1].unbind(1)), cu, cu, alibi_slopes=alibi,
                               compute_dtype=torch.float64)
        assert max_err(got, ref) <= 3e-3
    if HAS_CUDA and triton_launch.FAST_LAUNCH:  # the layouts seen before relaunch
        assert len(relaunches) >= 4


@requires_kernel
def test_packed_self_attention_checks(monkeypatch):
    lengths = [5, 20, 3]
    t, cu = sum(lengths), cu_seqlens_of(lengths)
    qkv = torch.randn(t, 3, 2, 16, device=DEVICE, dtype=torch.float16)
    attention = fa.PackedSelfAttention(cu, 20, alibi_slopes=alibi_slopes(2))
    attention(qkv)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(4,\) or \(3, 4\)"):
        attention(torch.randn(t, 3, 4, 16, device=DEVICE, dtype=torch.float16))  # other heads: checked again
    with pytest.raises(ValueError, match="qkv must have shape"):
        attention(qkv[:, :2])
    with pytest.raises(ValueError, match="qkv must have shape .* got list"):
        attention([qkv])
    with pytest.raises(TypeError, match="int64"):
        attention(qkv.long())
    with pytest.raises(ValueError, match="head_dim 12 is not supported"):
        attention(torch.randn(t, 3, 2, 12, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="max_seqlen=19 is below the longest sequence"):
        fa.PackedSelfAttention(cu.cpu(), 19)
    with pytest.raises(TypeError, match="max_seqlen must be a Python int"):
        fa.PackedSelfAttention(cu, torch.tensor(20))


@requires_kernel
def test_packed_self_attention_gradients():
    # With autograd the call goes through the op: the function's gradients
    torch.manual_seed(12)
    lengths = [5, 20, 3]
    t, cu, slopes = sum(lengths), cu_seqlens_of(lengths), alibi_slopes(2)
    qkv = torch.randn(t, 3, 2, 16, device=DEVICE, dtype=torch.float32, requires_grad=True)
    dout = torch.randn(t, 2, 16, device=DEVICE)
    attention = fa.PackedSelfAttention(cu, 20, alibi_slopes=slopes)
    (grad,) = torch.autograd.grad(attention(qkv), qkv, dout)
    (expected,) = torch.autograd.grad(flash_attn_varlen_qkvpacked_func(qkv, cu, 20, alibi_slopes=slopes), qkv, dout)
    assert torch.equal(grad, expected)


@requires_interpreter
def test_interpreter_larger_max_seqlen_same_result():
    # The padded width of a batch is a valid max_seqlen: the extra programs exit without writing.
    torch.manual_seed(7)
    lengths = [5, 20, 3]
    qkv = torch.randn(sum(lengths), 3, 2, 16)
    cu, slopes = cu_seqlens_of(lengths), alibi_slopes(2)
    exact = flash_attn_varlen_qkvpacked_func(qkv, cu, 20, alibi_slopes=slopes)
    padded = flash_attn_varlen_qkvpacked_func(qkv, cu, 53, alibi_slopes=slopes)
    assert torch.equal(exact, padded)


def test_check_max_seqlen():
    cu = cu_seqlens_of([5, 20, 3], device="cpu")
    assert check_max_seqlen(cu, 20) == 20
    assert check_max_seqlen(cu, 512) == 20
    assert check_max_seqlen(cu.long(), 20) == 20
    with pytest.raises(ValueError, match=r"^max_seqlen=19 is below the longest sequence \(20\) in cu_seqlens$"):
        check_max_seqlen(cu, 19)
    with pytest.raises(ValueError, match="never decrease"):
        check_max_seqlen(torch.tensor([0, 5, 3], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="start at 0"):
        check_max_seqlen(torch.tensor([2, 5], dtype=torch.int32), 8)


@requires_cuda
def test_check_max_seqlen_on_gpu():
    cu = cu_seqlens_of([5, 20, 3])
    assert check_max_seqlen(cu, 20) == 20
    with pytest.raises(ValueError, match=r"max_seqlen=4 is below the longest sequence \(20\)"):
        check_max_seqlen(cu, 4)


@requires_cuda
def test_gpu_max_seqlen_too_small_stops_the_device():
    # On a GPU the check is a device-side assert (no host sync), which ends the CUDA context: run it in a
    # subprocess and require that it fails before anything reads the output.
    code = (
        f"import sys; sys.path.insert(0, {REPO_ROOT!r})\n"
        "import torch\n"
        "from flash_attn_triton import flash_attn_varlen_qkvpacked_func\n"
        "qkv = torch.randn(28, 3, 2, 64, device='cuda', dtype=torch.bfloat16)\n"
        "cu = torch.tensor([0, 5, 25, 28], dtype=torch.int32, device='cuda')\n"
        "out = flash_attn_varlen_qkvpacked_func(qkv, cu, 16)\n"
        "print(out.float().sum().item())\n"
        "print('RETURNED')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "RETURNED" not in result.stdout, result.stdout + result.stderr[-2000:]
    assert "assert" in result.stderr.lower(), result.stderr[-2000:]


@requires_cuda
def test_gpu_no_host_sync():
    # Forward and backward must never wait for the device (autotuning does, so warm up first).
    lengths = [97, 513, 1, 255]
    cu = cu_seqlens_of(lengths)
    qkv = torch.randn(sum(lengths), 3, GPU_HEADS, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    slopes = alibi_slopes(GPU_HEADS)
    flash_attn_varlen_qkvpacked_func(qkv, cu, 513, alibi_slopes=slopes).sum().backward()
    q, k, v = (x.detach().requires_grad_() for x in qkv.unbind(1))
    flash_attn_varlen_func(q, k, v, cu, cu, 513, 513, alibi_slopes=slopes).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flash_attn_varlen_qkvpacked_func(qkv, cu, 513, alibi_slopes=slopes).sum().backward()
        flash_attn_varlen_func(q, k, v, cu, cu, 513, 513, alibi_slopes=slopes).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.skipif(HAS_CUDA or INTERPRETED, reason="the interpreter tests run in this process")
def test_interpreter_suite_in_fresh_process():
    # Something imported triton before this module could set TRITON_INTERPRET, so Triton built compiled
    # kernels that cannot run on CPU. Run the interpreter tests in a clean process instead of skipping them.
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interpreter", __file__],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


# ------------------------------------------------------------------------------------------------------------
# Errors at the host boundary (any machine with triton)
# ------------------------------------------------------------------------------------------------------------
def _inputs(total=6, heads=2, head_dim=16, dtype=torch.float16, device=DEVICE):
    q, k, v = (torch.randn(total, heads, head_dim, device=device).to(dtype) for _ in range(3))
    return q, k, v, cu_seqlens_of([2, 4], device=device)


def test_error_dropout():
    q, k, v, cu = _inputs()
    with pytest.raises(ValueError, match=r"dropout_p=0\.1"):
        flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_p=0\.25"):
        flash_attn_varlen_qkvpacked_func(torch.stack([q, k, v], 1), cu, 4, dropout_p=0.25)


def test_error_softmax_scale():
    q, k, v, cu = _inputs()
    with pytest.raises(ValueError, match="softmax_scale must be positive, got -0.5"):
        flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, softmax_scale=-0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_error_dtype(dtype):
    q, k, v, cu = _inputs(dtype=dtype)
    with pytest.raises(TypeError, match="dtype"):
        flash_attn_varlen_func(q, k, v, cu, cu, 4, 4)


def test_error_mixed_dtypes():
    q, k, v, cu = _inputs()
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attn_varlen_func(q, k.float(), v, cu, cu, 4, 4)


@pytest.mark.parametrize("head_dim", [8, 12, 136, 256])
def test_error_head_dim(head_dim):
    q, k, v, cu = _inputs(head_dim=head_dim)
    with pytest.raises(ValueError, match=f"head_dim {head_dim}"):
        flash_attn_varlen_func(q, k, v, cu, cu, 4, 4)


def test_error_shapes():
    q, k, v, cu = _inputs()
    with pytest.raises(ValueError, match=r"\(total_tokens, heads, head_dim\)"):
        flash_attn_varlen_func(q[:, 0], k, v, cu, cu, 4, 4)
    with pytest.raises(ValueError, match="k and v must have shape"):
        flash_attn_varlen_func(q, k[:, :1], v[:, :1], cu, cu, 4, 4)
    with pytest.raises(ValueError, match=r"\(total_tokens, 3, heads, head_dim\)"):
        flash_attn_varlen_qkvpacked_func(torch.stack([q, k], 1), cu, 4)
    with pytest.raises(ValueError, match="last"):
        flash_attn_varlen_func(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cu, cu, 4, 4)


def test_error_cu_seqlens():
    q, k, v, cu = _inputs()
    with pytest.raises(TypeError, match="int32"):
        flash_attn_varlen_func(q, k, v, cu.long(), cu, 4, 4)
    with pytest.raises(ValueError, match="different batch sizes"):
        flash_attn_varlen_func(q, k, v, cu, cu[:2], 4, 4)
    with pytest.raises(ValueError, match="1-D"):
        flash_attn_varlen_func(q, k, v, cu[None], cu, 4, 4)


def test_error_alibi_slopes():
    q, k, v, cu = _inputs()
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(2,\) or \(2, 2\)"):
        flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, alibi_slopes=torch.ones(3, device=DEVICE))
    with pytest.raises(TypeError, match="float32"):
        flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, alibi_slopes=torch.ones(2, device=DEVICE).half())
    with pytest.raises(ValueError, match="alibi_slopes is on"):
        flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, alibi_slopes=torch.ones(2, device="meta"))


def test_error_packed_inputs():
    # the packed function checks q's view of qkv for all three (k and v share its dtype, device and layout)
    q, k, v, cu = _inputs()
    qkv = torch.stack([q, k, v], 1)
    with pytest.raises(TypeError, match="qkv has dtype torch.int32"):
        flash_attn_varlen_qkvpacked_func(qkv.int(), cu, 4)
    with pytest.raises(ValueError, match="qkv must be contiguous in its last"):
        flash_attn_varlen_qkvpacked_func(qkv.transpose(2, 3).contiguous().transpose(2, 3), cu, 4)
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        flash_attn_varlen_qkvpacked_func(qkv, cu.long(), 4)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(2,\) or \(2, 2\)"):
        flash_attn_varlen_qkvpacked_func(qkv, cu, 4, alibi_slopes=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="head_dim 12"):
        flash_attn_varlen_qkvpacked_func(torch.zeros(4, 3, 2, 12, device=DEVICE), cu, 4)


def test_error_max_seqlen_type():
    q, k, v, cu = _inputs()
    with pytest.raises(TypeError, match="max_seqlen_q must be a Python int"):
        flash_attn_varlen_func(q, k, v, cu, cu, torch.tensor(4), 4)
    with pytest.raises(TypeError, match="max_seqlen must be a Python int"):
        flash_attn_varlen_qkvpacked_func(torch.stack([q, k, v], 1), cu, 4.0)
    with pytest.raises(ValueError, match="max_seqlen_k must be >= 0"):
        flash_attn_varlen_func(q, k, v, cu, cu, 4, -1)


@pytest.mark.skipif(not (HAS_CUDA or INTERPRETED), reason="runs the kernel: needs a GPU or Triton's interpreter")
def test_max_seqlen_numpy_int():
    np = pytest.importorskip("numpy")
    q, k, v, cu = _inputs()
    assert flash_attn_varlen_func(q, k, v, cu, cu, np.int64(4), 4).shape == q.shape


def test_error_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setattr(fa, "_INTERPRET", False)
    q, k, v, cu = _inputs(device="cpu")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        flash_attn_varlen_func(q, k, v, cu, cu, 4, 4)


def test_error_without_triton(monkeypatch):
    monkeypatch.setattr(fa, "HAS_TRITON", False)
    q, k, v, cu = _inputs()
    with pytest.raises(ImportError, match="triton"):
        flash_attn_varlen_func(q, k, v, cu, cu, 4, 4)
    with pytest.raises(ImportError, match="triton"):
        flash_attn_varlen_qkvpacked_func(torch.stack([q, k, v], 1), cu, 4)


@requires_cuda
def test_error_device_mismatch():
    q, k, v, cu = _inputs()
    with pytest.raises(ValueError, match="one device"):
        flash_attn_varlen_func(q, k.cpu(), v, cu, cu, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens_q is on"):
        flash_attn_varlen_func(q, k, v, cu.cpu(), cu, 4, 4)


def test_second_copy_of_the_module_imports():
    # transformers imports its own copy of the remote code next to any direct import; the second copy must not
    # fail re-registering the custom ops, and uses the ones already registered.
    path = os.path.join(REPO_ROOT, "flash_attn_triton.py")
    spec = importlib.util.spec_from_file_location("flash_attn_triton_copy", path)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.HAS_TRITON
    assert hasattr(torch.ops.mosaic_bert, "flash_attn_varlen_qkvpacked_fwd")


def test_import_without_triton_is_clean():
    # The module must import where triton is absent (the model then uses its PyTorch path).
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        f"sys.path.insert(0, {REPO_ROOT!r})\n"
        "import flash_attn_triton as fa\n"
        "assert fa.HAS_TRITON is False\n"
        "import torch\n"
        "try:\n"
        "    cu = torch.tensor([0, 2], dtype=torch.int32)\n"
        "    fa.flash_attn_varlen_qkvpacked_func(torch.zeros(2, 3, 1, 16), cu, 2)\n"
        "except ImportError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected ImportError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_on_torch_without_custom_op_is_clean():
    # torch < 2.4 has no torch.library.custom_op: the module imports and reports the kernel as unavailable.
    code = (
        "import torch; del torch.library.custom_op\n"
        f"import sys; sys.path.insert(0, {REPO_ROOT!r})\n"
        "import flash_attn_triton as fa\n"
        "assert fa.HAS_TRITON is False\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------------
# GPU: realistic lengths, head dims, dtypes; oracle vs plain PyTorch attention in the same dtype
# ------------------------------------------------------------------------------------------------------------
GPU_LENGTHS = [1, 17, 97, 128, 255, 513, 1025, 2049, 4096]
GPU_HEADS = 12


def check_oracle(lengths, head_dim, dtype, slopes_kind, api="packed", causal=False):
    torch.manual_seed(zlib.crc32(repr((lengths, head_dim, dtype, slopes_kind, causal)).encode()))
    cu = cu_seqlens_of(lengths)
    total = sum(lengths)
    q, k, v = (torch.randn(total, GPU_HEADS, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    dout = torch.randn_like(q)
    slopes = make_slopes(slopes_kind, len(lengths), GPU_HEADS)
    kwargs = dict(alibi_slopes=slopes, causal=causal)
    out, grads = ours_with_grads(q, k, v, cu, cu, max(lengths), max(lengths), dout, api, **kwargs)
    ref, ref_grads = reference_with_grads(q, k, v, cu, cu, dout, torch.float32, **kwargs)
    pt, pt_grads = reference_with_grads(q, k, v, cu, cu, dout, dtype, **kwargs)
    for name, ours, r, p in zip(["out", "dq", "dk", "dv"], [out] + grads, [ref] + ref_grads, [pt] + pt_grads):
        assert torch.isfinite(ours).all(), f"{name} has non-finite values"
        err, pt_err = max_err(ours, r), max_err(p, r)
        bound = 2 * pt_err + 1e-3 * r.abs().max().item() + 1e-5
        assert err <= bound, f"{name}: error {err:.3g} > 2 x PyTorch {dtype} error {pt_err:.3g} (+atol)"


@requires_cuda
@pytest.mark.parametrize("slopes_kind", ["none", "heads", "batch", "batch-strided"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_ragged_all_lengths_d64(dtype, slopes_kind):
    check_oracle(GPU_LENGTHS, 64, dtype, slopes_kind)


@requires_cuda
@pytest.mark.parametrize("dtype,slopes_kind", [(torch.bfloat16, "none"), (torch.bfloat16, "batch"),
                                               (torch.float16, "heads")])
@pytest.mark.parametrize("head_dim", [32, 128])
def test_gpu_ragged_all_lengths_other_head_dims(head_dim, dtype, slopes_kind):
    check_oracle(GPU_LENGTHS, head_dim, dtype, slopes_kind)


@requires_cuda
@pytest.mark.parametrize("length", GPU_LENGTHS)
def test_gpu_single_length_batches(length):
    # Every sequence of one length: each max_seqlen bucket, and lengths that are not block multiples.
    check_oracle([length] * max(1, 4096 // length), 64, torch.bfloat16, "heads", api="unpacked")


@requires_cuda
def test_gpu_causal():
    check_oracle([1, 97, 513, 1025], 64, torch.bfloat16, "heads", causal=True)


@requires_cuda
def test_gpu_packed_equals_unpacked_bitwise():
    torch.manual_seed(0)
    lengths = [97, 513, 1, 255]
    cu = cu_seqlens_of(lengths)
    q, k, v = (torch.randn(sum(lengths), GPU_HEADS, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    slopes = make_slopes("heads", len(lengths), GPU_HEADS)
    a_out, a_grads = ours_with_grads(q, k, v, cu, cu, 513, 513, dout, "packed", alibi_slopes=slopes)
    b_out, b_grads = ours_with_grads(q, k, v, cu, cu, 513, 513, dout, "unpacked", alibi_slopes=slopes)
    assert torch.equal(a_out, b_out)
    for a, b in zip(a_grads, b_grads):
        assert torch.equal(a, b)


@requires_cuda
def test_gpu_deterministic_backward():
    torch.manual_seed(0)
    lengths = [97, 513, 1025, 2049, 1, 300]
    cu = cu_seqlens_of(lengths)
    qkv = torch.randn(sum(lengths), 3, GPU_HEADS, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(sum(lengths), GPU_HEADS, 64, device="cuda", dtype=torch.bfloat16)
    slopes = make_slopes("batch", len(lengths), GPU_HEADS)
    first_out, first_grad = None, None
    for _ in range(50):
        qkv.grad = None
        out = flash_attn_varlen_qkvpacked_func(qkv, cu, max(lengths), alibi_slopes=slopes)
        out.backward(dout)
        if first_out is None:
            first_out, first_grad = out.detach().clone(), qkv.grad.clone()
        else:
            assert torch.equal(out, first_out)
            assert torch.equal(qkv.grad, first_grad)


@requires_cuda
def test_gpu_memory_linear_in_tokens():
    # One 16k-token sequence: an (h, L, L) fp32 bias alone would take 12.9 GB; we need O(total_tokens).
    torch.manual_seed(0)
    length = 16384
    cu = cu_seqlens_of([length])
    qkv = torch.randn(length, 3, GPU_HEADS, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    slopes = make_slopes("heads", 1, GPU_HEADS)
    # Warm up first: autotuning allocates its own benchmark buffers.
    flash_attn_varlen_qkvpacked_func(qkv, cu, length, alibi_slopes=slopes).sum().backward()
    qkv.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = flash_attn_varlen_qkvpacked_func(qkv, cu, length, alibi_slopes=slopes)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 6 * qkv.numel() * qkv.element_size(), f"peak extra memory {extra / 2**20:.0f} MiB"


@requires_interpreter
@pytest.mark.parametrize("api", ["packed", "varlen"])
def test_eager_autograd_records_the_function_with_the_ops_values_and_gradients(api):
    # Eager autograd takes the autograd.Function over the op's implementation (no op dispatched in the forward);
    # calling the custom op itself, as a traced graph does, gives the same output and gradients bit for bit.
    lengths = [5, 17, 1]
    cu = cu_seqlens_of(lengths)
    qkv = torch.randn(sum(lengths), 3, 2, 16, device=DEVICE, requires_grad=True)
    slopes = make_slopes("heads", len(lengths), 2)
    dout = torch.randn(sum(lengths), 2, 16, device=DEVICE)
    if api == "packed":
        out = flash_attn_varlen_qkvpacked_func(qkv, cu, max(lengths), alibi_slopes=slopes)
        via_op, lse = torch.ops.mosaic_bert.flash_attn_varlen_qkvpacked_fwd.default(
            qkv, cu, max(lengths), 16 ** -0.5, False, slopes)
        name = "flash_attn_varlen_qkvpacked_fwdBackward"
    else:
        q, k, v = qkv.unbind(1)
        out = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), alibi_slopes=slopes)
        via_op, lse = torch.ops.mosaic_bert.flash_attn_varlen_fwd.default(
            q, k, v, cu, cu, max(lengths), max(lengths), 16 ** -0.5, False, slopes)
        name = "flash_attn_varlen_fwdBackward"
    assert type(out.grad_fn).__name__ == name
    assert torch.equal(out, via_op)
    assert not lse.requires_grad  # the backward has no formula for the log-sum-exp: not a silent zero gradient
    from torch.profiler import profile

    with profile() as prof:  # and no zero tensor is made for its gradient
        (grad,) = torch.autograd.grad(out, qkv, dout)
    assert not [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zeros_like", "aten::zero_")]
    (grad_op,) = torch.autograd.grad(via_op, qkv, dout)
    assert torch.equal(grad, grad_op)
