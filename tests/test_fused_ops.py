"""Tests for `fused_ops`: the gated GELU and the add + dropout + LayerNorm kernels, and their PyTorch fallbacks.

Every check compares against an independent float64 reference written here, for outputs and gradients. Without
a GPU the Triton path runs under Triton's interpreter (`use_triton=True` on CPU tensors; small shapes, fp32 and
fp16); with a GPU the same tests run the compiled kernels on CUDA, and the bf16 / realistic-size tests at the end
run too.
"""

import importlib.util
import math
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the first `import triton` in the process (see tests/conftest.py, which sets it too).
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import fused_ops  # noqa: E402
from fused_ops import (  # noqa: E402
    add_dropout_layer_norm,
    cross_entropy,
    fused_kernels_available,
    gated_gelu,
    gated_linear_gelu,
    reuse_cpu_gemm_output,
)

DEVICE = "cuda" if HAS_CUDA else "cpu"
KERNELS = fused_kernels_available(torch.empty(0, device=DEVICE))

requires_kernels = pytest.mark.skipif(
    not KERNELS,
    reason="the Triton path needs triton and a GPU, or TRITON_INTERPRET=1 set before triton is first imported",
)
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (bf16 and realistic sizes)")

# Both paths run every reference test; the Triton one is skipped where it cannot run.
PATHS = [pytest.param(True, marks=requires_kernels, id="triton"), pytest.param(False, id="torch")]
DTYPES = [torch.float32, torch.float16]
# Allowed error relative to max(1, largest reference magnitude): a few roundings in the storage dtype.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual, expected, dtype, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1.0)
    assert err <= TOL[dtype] * scale, f"{what}: max abs error {err:.3e} vs scale {scale:.3e} ({dtype})"


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


# ------------------------------------------------------------------------------------------------------------
# float64 references
# ------------------------------------------------------------------------------------------------------------
def gated_gelu_reference(x):
    x = x.double()
    inter = x.shape[-1] // 2
    gate, value = x[..., :inter], x[..., inter:]
    return 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0))) * value


def gated_linear_gelu_reference(x, weight):
    return gated_gelu_reference(x.double() @ weight.double().T)


def layer_norm_reference(x, residual, weight, bias, eps, keep=None, dropout_p=0.0):
    """LayerNorm(dropout(x) + residual) in float64, with the dropout mask `keep` given."""
    z = x.double()
    if keep is not None:
        z = torch.where(keep, z / (1.0 - dropout_p), torch.zeros_like(z))
    if residual is not None:
        z = z + residual.double()
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


def grads(out, inputs, grad_out):
    wanted = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, wanted, grad_out.to(out.dtype)))
    return [next(got) if t is not None else None for t in inputs]


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def ln_inputs(rows, hidden, dtype, residual_dtype=None, param_dtype=torch.float32, seed=0):
    x = rand(rows, hidden, dtype=dtype, seed=seed)
    residual = rand(rows, hidden, dtype=residual_dtype, seed=seed + 1, scale=2.0) if residual_dtype else None
    weight = (1.0 + 0.5 * rand(hidden, seed=seed + 2)).to(param_dtype)
    bias = (0.5 * rand(hidden, seed=seed + 3)).to(param_dtype)
    return x, residual, weight, bias


def check_layer_norm_against_reference(out, inputs, dtype, keep=None, dropout_p=0.0, eps=1e-5, seed=10):
    x, residual, weight, bias = inputs
    grad_out = rand(*out.shape, seed=seed).to(out.dtype)  # the reference sees the same rounded values
    got = grads(out, inputs, grad_out)
    ref_inputs = leaves(*(t.double() if t is not None else None for t in inputs))
    ref = layer_norm_reference(*ref_inputs, eps, keep=keep, dropout_p=dropout_p)
    expected = grads(ref, ref_inputs, grad_out.double())
    assert_close(out, ref, dtype, "out")
    for name, t, g, e in zip(("d_x", "d_residual", "d_weight", "d_bias"), inputs, got, expected):
        if t is None:
            continue
        assert g.dtype == t.dtype, f"{name} dtype {g.dtype} != input dtype {t.dtype}"
        # d_weight / d_bias sum over rows: their tolerance scales with the row count
        tol_dtype = dtype if name in ("d_x", "d_residual") else torch.float32
        assert_close(g, e, tol_dtype if t.dtype == torch.float32 else t.dtype, name)


# ------------------------------------------------------------------------------------------------------------
# gated_gelu
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_triton", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,inter", [(1, 40), (3, 37), (17, 40), (2, 16)])
def test_gated_gelu_matches_reference(use_triton, dtype, rows, inter):
    (x,) = leaves(rand(rows, 2 * inter, dtype=dtype, scale=2.0))
    out = gated_gelu(x, use_triton=use_triton)
    assert out.dtype == dtype and out.shape == (rows, inter)
    (x64,) = leaves(x.double())
    ref = gated_gelu_reference(x64)
    assert_close(out, ref, dtype, "out")
    grad_out = rand(rows, inter, seed=5).to(dtype)
    (dx,) = torch.autograd.grad(out, x, grad_out)
    (dx_ref,) = torch.autograd.grad(ref, x64, grad_out.double())
    assert dx.dtype == dtype
    assert_close(dx, dx_ref, dtype, "d_x")


@requires_kernels
def test_gated_gelu_reads_strided_rows_and_leading_dims():
    # A row stride wider than 2 * i (a slice of a wider buffer) and a 3-d input are read in place.
    inter = 24
    wide = rand(5, 2 * inter + 7, scale=2.0)
    x = wide[:, : 2 * inter].detach().requires_grad_()
    assert not x.is_contiguous()
    out = gated_gelu(x, use_triton=True)
    assert_close(out, gated_gelu_reference(x), torch.float32, "strided out")
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    x64 = x.detach().double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(gated_gelu_reference(x64).sum(), x64)
    assert_close(dx, dx_ref, torch.float32, "strided d_x (broadcast grad_out)")

    x3 = rand(2, 3, 2 * inter).requires_grad_()
    out3 = gated_gelu(x3, use_triton=True)
    assert out3.shape == (2, 3, inter)
    assert_close(out3, gated_gelu_reference(x3), torch.float32, "3-d out")


@requires_kernels
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter squaring 3e38 gates
def test_gated_gelu_kernel_is_exact_to_fp32_over_the_whole_range():
    # Over gates far out (an approximated Phi clamped at some bound would make GELU(-1e30) a multiple of a tiny
    # Phi instead of 0), huge, tiny and signed-zero ones, the kernel's fp32 GELU and its gradient must be as exact
    # as an fp32 erf GELU (torch's: 1.1e-6 absolute), relative error small where the GELU is not, and NaN must stay
    # NaN.
    inter = 1024
    special = [0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, -6.0, 6.0, -10.0, 10.0, -1e4, 1e4, -1e30, 1e30, -3e38, 3e38]
    gate = torch.cat([torch.linspace(-30.0, 30.0, inter - len(special)), torch.tensor(special)])
    gate = torch.stack([gate, gate.roll(1), gate * 0.25, gate.flip(0)]).to(DEVICE)
    x = torch.cat([gate, torch.ones_like(gate)], dim=1).requires_grad_()
    out = gated_gelu(x, use_triton=True)
    x64 = x.detach().double().requires_grad_()
    ref = gated_gelu_reference(x64)
    err = (out.double() - ref).abs()
    assert err.max().item() <= 2e-6, f"max abs error {err.max().item():.3e}"
    large = ref.abs() > 1e-3
    assert (err[large] / ref[large].abs()).max().item() <= 1e-4
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    (dx_ref,) = torch.autograd.grad(ref.sum(), x64)
    grad_err = (dx.double() - dx_ref).abs().max().item()
    assert grad_err <= 5e-6, f"gradient max abs error {grad_err:.3e}"
    nan = x.detach().clone()
    nan[0, 3] = float("nan")
    result = gated_gelu(nan, use_triton=True)
    assert result[0, 3].isnan() and not result[0, 4:].isnan().any()


@pytest.mark.parametrize("use_triton", PATHS)
def test_gated_gelu_zero_rows(use_triton):
    x = torch.zeros(0, 80, device=DEVICE, requires_grad=True)
    out = gated_gelu(x, use_triton=use_triton)
    assert out.shape == (0, 40)
    (dx,) = torch.autograd.grad(out, x, torch.zeros_like(out))
    assert dx.shape == (0, 80)


def test_gated_gelu_rejects_odd_width():
    with pytest.raises(ValueError, match="even last dimension"):
        gated_gelu(torch.zeros(2, 7, device=DEVICE))


# ------------------------------------------------------------------------------------------------------------
# add_dropout_layer_norm without dropout
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_triton", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(1, 48), (3, 37), (17, 48)])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
def test_layer_norm_matches_reference(use_triton, dtype, rows, hidden, with_residual):
    inputs = leaves(*ln_inputs(rows, hidden, dtype, residual_dtype=dtype if with_residual else None))
    out = add_dropout_layer_norm(*inputs, 1e-5, use_triton=use_triton)
    assert out.dtype == dtype
    check_layer_norm_against_reference(out, inputs, dtype)


@pytest.mark.parametrize("use_triton", PATHS)
def test_layer_norm_dtype_rules(use_triton):
    """Output dtype: out_dtype if given, else the promotion of x and residual; gradients in input dtypes."""
    half, full = torch.float16, torch.float32
    # a half Linear output onto an fp32 residual stream (autocast): fp32 out, as the unfused x + residual
    inputs = leaves(*ln_inputs(5, 40, half, residual_dtype=full))
    out = add_dropout_layer_norm(*inputs, 1e-5, use_triton=use_triton)
    assert out.dtype == full
    check_layer_norm_against_reference(out, inputs, half)
    # low_precision_layernorm: the caller asks for the autocast dtype
    inputs = leaves(*ln_inputs(5, 40, half, residual_dtype=full))
    out = add_dropout_layer_norm(*inputs, 1e-5, out_dtype=half, use_triton=use_triton)
    assert out.dtype == half
    check_layer_norm_against_reference(out, inputs, half)
    # fp32 everything, half parameters; no residual: x's dtype
    inputs = leaves(*ln_inputs(5, 40, full, param_dtype=half))
    out = add_dropout_layer_norm(*inputs, 1e-5, use_triton=use_triton)
    assert out.dtype == full
    check_layer_norm_against_reference(out, inputs, half)
    # x_bias, a Linear's bias, leaves the dtype to x (and residual): as the Linear's output keeps its dtype
    x, _, weight, bias = ln_inputs(5, 40, half)
    out = add_dropout_layer_norm(x, None, weight, bias, 1e-5, use_triton=use_triton, x_bias=rand(40, seed=9))
    assert out.dtype == half


@pytest.mark.parametrize("use_triton", PATHS)
def test_layer_norm_zero_rows(use_triton):
    inputs = leaves(*ln_inputs(0, 48, torch.float32, residual_dtype=torch.float32))
    out = add_dropout_layer_norm(*inputs, 1e-5, use_triton=use_triton)
    assert out.shape == (0, 48)
    dx, dres, dw, db = torch.autograd.grad(out, inputs, torch.zeros_like(out))
    assert dx.shape == dres.shape == (0, 48)
    assert torch.equal(dw, torch.zeros(48, device=DEVICE)) and torch.equal(db, torch.zeros(48, device=DEVICE))


@requires_kernels
def test_layer_norm_leading_dims_and_strided_rows():
    wide = rand(2, 3, 40)
    x = wide[..., :32].detach().requires_grad_()  # (2, 3, 32) with row stride 40
    _, residual, weight, bias = leaves(*ln_inputs(6, 32, torch.float32, residual_dtype=torch.float32))
    residual = residual.detach().view(2, 3, 32).requires_grad_()
    inputs = [x, residual, weight, bias]
    out = add_dropout_layer_norm(*inputs, 1e-5, use_triton=True)
    assert out.shape == (2, 3, 32)
    check_layer_norm_against_reference(out, inputs, torch.float32)


def test_layer_norm_rejects_bad_shapes():
    x, residual, weight, bias = ln_inputs(3, 16, torch.float32, residual_dtype=torch.float32)
    with pytest.raises(ValueError, match="residual has shape"):
        add_dropout_layer_norm(x, residual[:2], weight, bias, 1e-5)
    with pytest.raises(ValueError, match="weight and bias"):
        add_dropout_layer_norm(x, residual, weight[:8], bias, 1e-5)
    with pytest.raises(ValueError, match="dropout_p"):
        add_dropout_layer_norm(x, residual, weight, bias, 1e-5, dropout_p=1.5, training=True)
    with pytest.raises(ValueError, match=r"x_bias must have shape \(16,\), got \(8,\)"):
        add_dropout_layer_norm(x, residual, weight, bias, 1e-5, x_bias=bias[:8])


# ------------------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------------------
def run_with_dropout(use_triton, dropout_p, rows=17, hidden=37, dtype=torch.float32, seed=0):
    """One forward and backward with dropout on; returns (inputs, out, keep mask recovered from d_x)."""
    inputs = leaves(*ln_inputs(rows, hidden, dtype, residual_dtype=dtype))
    torch.manual_seed(seed)
    out = add_dropout_layer_norm(*inputs, 1e-5, dropout_p=dropout_p, training=True, use_triton=use_triton)
    # d_x = keep * d_z / (1 - p): with a random grad_out, d_z is nonzero almost surely, so d_x's zeros are the
    # dropped elements (computed from the backward's regenerated mask).
    (dx,) = torch.autograd.grad(out, inputs[0], rand(rows, hidden, seed=10).to(out.dtype), retain_graph=True)
    return inputs, out, dx != 0


@pytest.mark.parametrize("use_triton", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_forward_and_backward_agree_on_the_mask(use_triton, dtype):
    # The mask the backward regenerates explains the forward output exactly (reference with that mask), and every
    # gradient matches the reference's.
    p = 0.3
    inputs, out, keep = run_with_dropout(use_triton, p, dtype=dtype)
    assert 0 < keep.sum() < keep.numel()
    check_layer_norm_against_reference(out, inputs, dtype, keep=keep, dropout_p=p)


@pytest.mark.parametrize("use_triton", PATHS)
def test_dropout_keeps_about_one_minus_p(use_triton):
    p = 0.3
    _, _, keep = run_with_dropout(use_triton, p, rows=64, hidden=48)
    fraction = keep.double().mean().item()  # 3072 draws: standard deviation 0.008
    assert abs(fraction - (1 - p)) < 0.04, fraction


@pytest.mark.parametrize("use_triton", PATHS)
def test_dropout_same_seed_same_result(use_triton):
    _, out_a, keep_a = run_with_dropout(use_triton, 0.5, seed=1)
    _, out_b, keep_b = run_with_dropout(use_triton, 0.5, seed=1)
    _, out_c, keep_c = run_with_dropout(use_triton, 0.5, seed=2)
    assert torch.equal(out_a, out_b) and torch.equal(keep_a, keep_b)
    assert not torch.equal(keep_a, keep_c)


@requires_kernels
def test_dropout_masks_differ_across_rows():
    # Philox counters start at row * hidden: rows must not repeat each other's mask.
    _, _, keep = run_with_dropout(True, 0.5, rows=8, hidden=32)
    assert len({tuple(row.tolist()) for row in keep}) == 8


@requires_kernels
def test_dropout_mask_lanes_are_independent():
    # One Philox call gives the uniforms of four neighbouring columns (4q ... 4q + 3): each of the four columns of a
    # quad drops at rate p on its own, and no column repeats another (a wrong interleave would copy one lane into
    # several, or give columns 4q and 4q + 1 the same draw). 100 x 160 draws, gated GELU and LayerNorm kernels.
    p, rows, inter = 0.5, 100, 160
    torch.manual_seed(3)
    out = gated_gelu(torch.ones(rows, 2 * inter, device=DEVICE), dropout_p=p, training=True, use_triton=True)
    _, _, ln_keep = run_with_dropout(True, p, rows=rows, hidden=inter)
    for keep in (out != 0, ln_keep):
        lanes = keep.view(rows, inter // 4, 4).double()
        for k in range(4):  # 4000 draws a lane: standard deviation 0.008
            assert abs(lanes[..., k].mean().item() - (1 - p)) < 0.04, k
        for a in range(4):
            for b in range(a + 1, 4):  # independent lanes agree half the time at p = 0.5
                agree = (lanes[..., a] == lanes[..., b]).double().mean().item()
                assert abs(agree - 0.5) < 0.04, (a, b, agree)


@pytest.mark.parametrize("use_triton", PATHS)
# bf16 on the GPU only: the interpreter rounds fp32 -> bf16 toward zero, where the GPU and torch round to nearest
@pytest.mark.parametrize("copy_dtype", [torch.float16, *([torch.bfloat16] if HAS_CUDA else [])], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_layer_norm_copy_is_the_cast_output_and_both_gradients_count(use_triton, copy_dtype, dropout_p):
    # copy_dtype: the output and its cast in one pass. The copy equals out.to(copy_dtype) bit for bit, and with a
    # loss on both outputs the gradients equal those of the explicit cast (same seed, so the same dropout mask) and,
    # without dropout, the float64 reference's for the summed upstream gradient.
    rows, hidden = 19, 48
    inputs = leaves(*ln_inputs(rows, hidden, torch.float32, residual_dtype=torch.float32))
    g_out, g_copy = rand(rows, hidden, seed=20), rand(rows, hidden, seed=21).to(copy_dtype)
    torch.manual_seed(7)
    out, copy = add_dropout_layer_norm(*inputs, 1e-5, dropout_p=dropout_p, training=True, use_triton=use_triton,
                                       copy_dtype=copy_dtype)
    assert out.dtype == torch.float32 and copy.dtype == copy_dtype
    assert torch.equal(copy, out.to(copy_dtype))
    got = grads((out * g_out).sum() + (copy * g_copy).sum().float(), inputs, torch.ones(()))
    torch.manual_seed(7)
    plain = add_dropout_layer_norm(*inputs, 1e-5, dropout_p=dropout_p, training=True, use_triton=use_triton)
    assert torch.equal(plain, out)
    expected = grads((plain * g_out).sum() + (plain.to(copy_dtype) * g_copy).sum().float(), inputs, torch.ones(()))
    for name, g, e in zip(("d_x", "d_residual", "d_weight", "d_bias"), got, expected):
        assert_close(g, e, torch.float32, name)
    if dropout_p == 0.0:
        ref_inputs = leaves(*(t.double() for t in inputs))
        ref = layer_norm_reference(*ref_inputs, 1e-5)
        ref_grads = grads(ref, ref_inputs, g_out.double() + g_copy.double())
        for name, g, e in zip(("d_x", "d_residual", "d_weight", "d_bias"), got, ref_grads):
            assert_close(g, e, torch.float32, name)


@pytest.mark.parametrize("use_triton", PATHS)
@pytest.mark.parametrize("used", ["copy", "out"])
def test_layer_norm_gradient_through_one_of_its_two_outputs(use_triton, used):
    # With a loss on the copy alone (or the output alone) the gradients are the float64 reference's for that one
    # upstream gradient: the unused output's gradient is taken as zero without a zero tensor being made.
    rows, hidden = 19, 48
    inputs = leaves(*ln_inputs(rows, hidden, torch.float32, residual_dtype=torch.float32))
    out, copy = add_dropout_layer_norm(*inputs, 1e-5, use_triton=use_triton, copy_dtype=torch.float16)
    g = rand(rows, hidden, seed=22).to(torch.float16 if used == "copy" else torch.float32)
    got = grads((copy if used == "copy" else out) * g, inputs, torch.ones(rows, hidden, device=DEVICE))
    ref_inputs = leaves(*(t.double() for t in inputs))
    expected = grads(layer_norm_reference(*ref_inputs, 1e-5), ref_inputs, g.double())
    for name, a, e in zip(("d_x", "d_residual", "d_weight", "d_bias"), got, expected):
        assert_close(a, e, torch.float32, name)


@requires_kernels
def test_kernel_backwards_make_no_zero_gradients_for_outputs_without_one():
    # mean / rstd of the LayerNorm, the empty copy placeholder, the attention's and cross-entropy's log-sum-exp:
    # no gradient flows into them, so their backwards get None instead of zero tensors made (and filled) for them.
    from torch.profiler import profile

    x, residual, weight, bias = leaves(*ln_inputs(6, 32, torch.float32, residual_dtype=torch.float32))
    out = add_dropout_layer_norm(x, residual, weight, bias, 1e-5, use_triton=True)
    logits = rand(4, 10).requires_grad_(True)
    loss = fused_ops.cross_entropy(logits, torch.tensor([1, 0, 9, 3], device=DEVICE), use_triton=True)
    with profile() as prof:
        (out.sum() + loss.sum()).backward()
    made = [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zeros_like", "aten::zero_")]
    assert made == [], made
    assert x.grad is not None and logits.grad is not None


@pytest.mark.parametrize("use_triton", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_layer_norm_x_bias_is_added_before_dropout_and_gets_its_gradient(use_triton, dtype, dropout_p):
    # x_bias, a Linear's bias left to the LayerNorm: LayerNorm(dropout(x + x_bias) + residual), and d_x_bias the
    # row sum of d_(x + x_bias), against float64 with the mask the backward used (recovered from d_x). More rows than
    # the interpreter's 4 backward programs, so the partial sums are reduced across programs.
    rows, hidden = 23, 40
    x, residual, weight, bias = ln_inputs(rows, hidden, dtype, residual_dtype=torch.float32)
    inputs = leaves(x, residual, weight, bias, rand(hidden, seed=30))
    torch.manual_seed(4)
    out = add_dropout_layer_norm(*inputs[:4], 1e-5, dropout_p=dropout_p, training=True, use_triton=use_triton,
                                 x_bias=inputs[4])
    assert out.dtype == torch.float32
    grad_out = rand(rows, hidden, seed=31)
    got = grads(out, inputs, grad_out)
    keep = None
    if dropout_p:
        keep = got[0] != 0
        assert 0 < keep.sum() < keep.numel()
    ref_inputs = leaves(*(t.double() for t in inputs))
    x64, res64, w64, b64, xb64 = ref_inputs
    ref = layer_norm_reference(x64 + xb64, res64, w64, b64, 1e-5, keep=keep, dropout_p=dropout_p)
    expected = grads(ref, ref_inputs, grad_out.double())
    assert_close(out, ref, dtype, "out")
    for name, t, g, e in zip(("d_x", "d_residual", "d_weight", "d_bias", "d_x_bias"), inputs, got, expected):
        assert g.dtype == t.dtype, name
        assert_close(g, e, dtype if name == "d_x" else torch.float32, name)


def test_layer_norm_copy_dtype_must_be_supported():
    inputs = ln_inputs(3, 16, torch.float32, residual_dtype=torch.float32)
    with pytest.raises(ValueError, match="copy_dtype"):
        add_dropout_layer_norm(*inputs, 1e-5, copy_dtype=torch.int8)


@pytest.mark.parametrize("use_triton", PATHS)
@pytest.mark.parametrize("hidden", [1, 2, 3, 5])
def test_dropout_on_rows_narrower_than_a_philox_call(use_triton, hidden):
    # One Philox call covers four columns: rows of fewer (or not a multiple of four) still get the mask that the
    # backward regenerates, and the reference gradients through it.
    p = 0.5
    inputs, out, keep = run_with_dropout(use_triton, p, rows=64, hidden=hidden)
    assert torch.isfinite(out).all()
    # With one or two columns LayerNorm is degenerate (its output is the bias, or ±1 · weight + bias, whatever was
    # kept; the gradient is ill-conditioned): the run itself is the check there.
    if hidden > 2:
        assert 0 < keep.sum() < keep.numel()
        check_layer_norm_against_reference(out, inputs, torch.float32, keep=keep, dropout_p=p)


@pytest.mark.parametrize("use_triton", PATHS)
def test_no_dropout_when_p_zero_or_eval(use_triton):
    inputs = ln_inputs(9, 48, torch.float32, residual_dtype=torch.float32)
    plain = add_dropout_layer_norm(*inputs, 1e-5, use_triton=use_triton)
    rng = torch.get_rng_state()
    eval_mode = add_dropout_layer_norm(*inputs, 1e-5, dropout_p=0.5, training=False, use_triton=use_triton)
    p_zero = add_dropout_layer_norm(*inputs, 1e-5, dropout_p=0.0, training=True, use_triton=use_triton)
    assert torch.equal(eval_mode, plain) and torch.equal(p_zero, plain)
    assert torch.equal(torch.get_rng_state(), rng), "no dropout must not draw from the generator"
    ref = layer_norm_reference(*inputs, 1e-5)
    assert_close(plain, ref, torch.float32, "out")


@pytest.mark.parametrize("use_triton", PATHS)
def test_dropout_p_one_drops_everything(use_triton):
    inputs = ln_inputs(4, 32, torch.float32, residual_dtype=torch.float32)
    out = add_dropout_layer_norm(*inputs, 1e-5, dropout_p=1.0, training=True, use_triton=use_triton)
    x, residual, weight, bias = inputs
    assert_close(out, layer_norm_reference(torch.zeros_like(x), residual, weight, bias, 1e-5), torch.float32)


@pytest.mark.parametrize("use_triton", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_gelu_dropout_forward_and_backward_agree_on_the_mask(use_triton, dtype):
    # dropout(GELU(gate) * value): the kept elements are the reference scaled by 1 / (1 - p), the dropped ones
    # zero, and the backward (which regenerates the mask) gives the reference gradient through that same mask.
    p, rows, inter = 0.3, 19, 40
    x = rand(rows, 2 * inter, dtype=dtype, seed=4).requires_grad_()
    torch.manual_seed(5)
    out = gated_gelu(x, dropout_p=p, training=True, use_triton=use_triton)
    ref = gated_gelu_reference(x.detach())
    keep = out != 0
    assert abs(keep.double().mean().item() - (1 - p)) < 0.06
    assert_close(out, torch.where(keep, ref / (1 - p), torch.zeros_like(ref)), dtype, "out")
    grad_out = rand(rows, inter, seed=6).to(dtype)
    (dx,) = torch.autograd.grad(out, x, grad_out)
    x64 = x.detach().double().requires_grad_()
    masked = torch.where(keep, gated_gelu_reference(x64) / (1 - p), torch.zeros((), dtype=torch.float64))
    (dx_ref,) = torch.autograd.grad(masked, x64, grad_out.double())
    assert_close(dx, dx_ref, dtype, "d_x")
    torch.manual_seed(5)
    assert torch.equal(gated_gelu(x, dropout_p=p, training=True, use_triton=use_triton), out)  # same seed
    assert torch.equal(gated_gelu(x, dropout_p=p, training=False, use_triton=use_triton),
                       gated_gelu(x, use_triton=use_triton))


@requires_kernels
def test_backward_is_deterministic():
    inputs = leaves(*ln_inputs(33, 48, torch.float32, residual_dtype=torch.float32))
    grad_out = rand(33, 48, seed=3)
    torch.manual_seed(0)
    out = add_dropout_layer_norm(*inputs, 1e-5, dropout_p=0.2, training=True, use_triton=True)
    first = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


# ------------------------------------------------------------------------------------------------------------
# Dispatch, torch.compile, re-import
# ------------------------------------------------------------------------------------------------------------
def mosaic_ops_called(fn, *args, **kwargs):
    """Names of the mosaic_bert custom ops that `fn(*args, **kwargs)` dispatches, in order, seen by the profiler
    (which, unlike a dispatch mode, does not itself send the calls through the ops)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn(*args, **kwargs)
    events = sorted(profile.events(), key=lambda event: event.time_range.start)
    return [event.name for event in events if event.name.startswith("mosaic_bert::")]


def test_automatic_choice_never_takes_the_interpreter():
    cpu = torch.zeros(2)
    assert fused_kernels_available(cpu) == (fused_ops.HAS_TRITON and fused_ops._INTERPRET)
    x, residual, weight, bias = ln_inputs(3, 16, torch.float32, residual_dtype=torch.float32)
    if not HAS_CUDA:
        assert mosaic_ops_called(gated_gelu, x) == []
        assert mosaic_ops_called(add_dropout_layer_norm, x, residual, weight, bias, 1e-5) == []
    assert mosaic_ops_called(gated_gelu, x, use_triton=False) == []
    if not fused_kernels_available(cpu):
        with pytest.raises(RuntimeError, match="use_triton=True"):
            gated_gelu(torch.zeros(2, 8), use_triton=True)


@requires_kernels
def test_eager_autograd_takes_the_function_and_its_backward_the_implementation(monkeypatch):
    # Eager autograd records an autograd.Function over the op's implementation (no forward op dispatched: the
    # dispatcher's host cost is skipped); its backward, the op's formula, calls the backward op's implementation
    # directly too.
    x, residual, weight, bias = ln_inputs(3, 16, torch.float32, residual_dtype=torch.float32)
    x.requires_grad_(True)
    outs = {}

    def record(name, fn, *args, **kwargs):
        outs[name] = fn(*args, **kwargs)

    assert mosaic_ops_called(record, "gelu", gated_gelu, x, use_triton=True) == []
    assert mosaic_ops_called(record, "ln", add_dropout_layer_norm, x, residual, weight, bias, 1e-5,
                             use_triton=True) == []
    logits = rand(4, 10).requires_grad_(True)
    assert mosaic_ops_called(record, "ce", fused_ops.cross_entropy, logits, torch.tensor([1, 0, 9, 3], device=DEVICE),
                             use_triton=True) == []
    assert type(outs["gelu"].grad_fn).__name__ == "GatedGeluBackward"
    assert type(outs["ln"].grad_fn).__name__ == "AddDropoutLayerNormBackward"
    assert type(outs["ce"].grad_fn).__name__ == "CrossEntropyBackward"
    for name, bwd in [("gelu", "gated_gelu_bwd"), ("ln", "add_dropout_layer_norm_bwd"), ("ce", "cross_entropy_bwd")]:
        called = mosaic_ops_called(lambda out=outs[name]: out.sum().backward(retain_graph=True))
        assert called == [], (name, called)
    # the module-level default does the same for use_triton=None
    monkeypatch.setattr(fused_ops, "DEFAULT_USE_TRITON", True)
    assert type(gated_gelu(x).grad_fn).__name__ == "GatedGeluBackward"
    monkeypatch.setattr(fused_ops, "DEFAULT_USE_TRITON", False)
    assert mosaic_ops_called(gated_gelu, x.to(DEVICE)) == []


@requires_kernels
def test_eager_function_and_custom_op_give_the_same_values_and_gradients():
    # The two ways autograd can record a kernel call (eager: the Function; traced: the op) compute the same thing.
    x, residual, weight, bias = leaves(*ln_inputs(5, 24, torch.float32, residual_dtype=torch.float32))
    grad = rand(5, 24, seed=3)
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    args = (x, None, residual, weight, bias, seed, 1e-5, 0.25, torch.float32, None)
    via_function = fused_ops._AddDropoutLayerNorm.apply(*args)[0]
    via_op = torch.ops.mosaic_bert.add_dropout_layer_norm_fwd(*args)[0]
    torch.testing.assert_close(via_function, via_op, rtol=0, atol=0)
    inputs = (x, residual, weight, bias)
    for a, b in zip(torch.autograd.grad(via_function, inputs, grad), torch.autograd.grad(via_op, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (g,) = leaves(rand(4, 32, seed=4))
    via_function = fused_ops._GatedGelu.apply(g, seed, 0.5)
    via_op = torch.ops.mosaic_bert.gated_gelu_fwd(g, seed, 0.5)
    torch.testing.assert_close(via_function, via_op, rtol=0, atol=0)
    grad = rand(4, 16, seed=6)
    torch.testing.assert_close(torch.autograd.grad(via_function, g, grad)[0], torch.autograd.grad(via_op, g, grad)[0],
                               rtol=0, atol=0)


@requires_kernels
def test_a_second_derivative_through_a_kernel_fails_clearly():
    # create_graph=True runs the formula with grad mode on: it takes the backward op, which has no formula of its
    # own, so the second backward raises instead of returning a gradient without the kernel's contribution.
    x, residual, weight, bias = leaves(*ln_inputs(3, 16, torch.float32, residual_dtype=torch.float32))
    cases = {
        "gated_gelu_bwd": lambda: gated_gelu(x, use_triton=True),
        "add_dropout_layer_norm_bwd": lambda: add_dropout_layer_norm(x, residual, weight, bias, 1e-5,
                                                                     use_triton=True),
        "cross_entropy_bwd": lambda: fused_ops.cross_entropy(x, torch.tensor([1, 0, 9], device=DEVICE),
                                                                  use_triton=True),
    }
    for name, forward in cases.items():
        (grad,) = torch.autograd.grad(forward().square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match=f"mosaic_bert.{name}.*no autograd formula"):
            grad.sum().backward()


@requires_kernels
def test_dispatch_modes_and_fake_tensors_get_the_ops():
    # Anything that intercepts dispatch (a TorchDispatchMode such as FlopCounterMode, fake tensors) sees the custom
    # ops, forward and backward, instead of a launch it cannot follow; so do functorch transforms.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "mosaic_bert":
                self.names.append(func.name())
            return func(*args, **(kwargs or {}))

    x, residual, weight, bias = leaves(*ln_inputs(3, 16, torch.float32, residual_dtype=torch.float32))
    with Recorder():
        out = add_dropout_layer_norm(gated_gelu(torch.cat([x, x], -1), use_triton=True), residual, weight, bias,
                                     1e-5, use_triton=True)
        out.sum().backward()
    assert Recorder.names == ["mosaic_bert::gated_gelu_fwd", "mosaic_bert::add_dropout_layer_norm_fwd",
                              "mosaic_bert::add_dropout_layer_norm_bwd", "mosaic_bert::gated_gelu_bwd"]
    with FakeTensorMode():
        fake = torch.empty(3, 32, device=DEVICE, requires_grad=True)
        out = gated_gelu(fake, use_triton=True)
        out.sum().backward()
        assert out.shape == (3, 16) and fake.grad.shape == (3, 32)
    with torch.no_grad(), FakeTensorMode():
        assert gated_gelu(torch.empty(3, 32, device=DEVICE), use_triton=True).shape == (3, 16)
    # functorch's vmap: the op (through vmap's per-sample fallback), not a launch on a batched tensor
    batched = rand(2, 3, 32, seed=9)
    torch.testing.assert_close(torch.func.vmap(lambda t: gated_gelu(t, use_triton=True))(batched),
                               torch.stack([gated_gelu(t, use_triton=True) for t in batched]), rtol=0, atol=0)


@requires_kernels
def test_without_autograd_the_kernels_launch_directly_with_the_same_result():
    # No graph to record and nothing tracing: the launcher runs without the dispatcher (a small batch's host cost)
    x, residual, weight, bias = ln_inputs(3, 16, torch.float32, residual_dtype=torch.float32)
    with torch.no_grad():
        assert mosaic_ops_called(gated_gelu, x, use_triton=True) == []
        assert mosaic_ops_called(add_dropout_layer_norm, x, residual, weight, bias, 1e-5, use_triton=True) == []
        direct = gated_gelu(x, use_triton=True), add_dropout_layer_norm(x, residual, weight, bias, 1e-5,
                                                                        use_triton=True)
    recorded = (gated_gelu(x.requires_grad_(True), use_triton=True),
                  add_dropout_layer_norm(x, residual, weight, bias, 1e-5, use_triton=True))
    for a, b in zip(direct, recorded):
        assert b.grad_fn is not None and a.grad_fn is None
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("use_triton", PATHS)
@pytest.mark.parametrize("with_copy", [False, True])
def test_compile_fullgraph_no_graph_breaks(use_triton, with_copy):
    from torch._dynamo.testing import CompileCounterWithBackend

    def block(h, residual, w_in, w_out, weight, bias):
        # (t, hidden) -> GLU MLP -> residual add + dropout + LayerNorm (and its fp16 copy, both used)
        inner = gated_gelu(h @ w_in, use_triton=use_triton)
        out = add_dropout_layer_norm(inner @ w_out, residual, weight, bias, 1e-5, dropout_p=0.1, training=True,
                                     use_triton=use_triton, copy_dtype=torch.float16 if with_copy else None)
        return out[0] + 2 * out[1].float() if with_copy else out

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    hidden, inter = 24, 20
    args = leaves(rand(5, hidden), rand(5, hidden, seed=1), rand(hidden, 2 * inter, seed=2, scale=0.2),
                  rand(inter, hidden, seed=3, scale=0.2), 1.0 + rand(hidden, seed=4, scale=0.1),
                  rand(hidden, seed=5, scale=0.1))
    torch.manual_seed(7)
    out = compiled(*args)
    got = torch.autograd.grad(out, args, torch.ones_like(out))
    assert counter.frame_count == 1
    torch.manual_seed(7)
    eager = block(*args)
    expected = torch.autograd.grad(eager, args, torch.ones_like(eager))
    if use_triton:
        # same seed tensor drawn in both: identical mask, identical numbers
        torch.testing.assert_close(out, eager)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)
    else:
        assert out.shape == eager.shape and all(g.shape == e.shape for g, e in zip(got, expected))


# ------------------------------------------------------------------------------------------------------------
# cross_entropy: the MLM loss
# ------------------------------------------------------------------------------------------------------------
def cross_entropy_reference(logits, target):
    """Per-row -log softmax(logits)[target] in float64, written out (not F.cross_entropy)."""
    x = logits.double()
    shift = x.max(-1, keepdim=True).values
    lse = shift.squeeze(-1) + (x - shift).exp().sum(-1).log()
    return lse - x.gather(-1, target[:, None]).squeeze(-1)


@pytest.mark.parametrize("use_triton", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab", [(1, 16), (5, 37), (9, 100), (0, 20)])
def test_cross_entropy_matches_reference(use_triton, dtype, rows, vocab):
    # Interpreter blocks are 16 columns: 37 and 100 cross several blocks and end in a ragged one
    (logits,) = leaves(rand(rows, vocab, dtype=dtype, scale=3.0))
    target = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    loss = cross_entropy(logits, target, use_triton=use_triton)
    assert loss.dtype == torch.float32 and loss.shape == (rows,)
    (logits64,) = leaves(logits.double())
    ref = cross_entropy_reference(logits64, target)
    assert_close(loss, ref, torch.float32, "loss")
    grad = rand(rows, seed=2)
    (d,) = torch.autograd.grad(loss, logits, grad)
    (d_ref,) = torch.autograd.grad(ref, logits64, grad.double(), retain_graph=True)
    assert d.dtype == dtype
    assert_close(d, d_ref, dtype, "d_logits")
    # the model's use: the sum, whose gradient reaches the op as an expanded scalar
    (d_sum,) = torch.autograd.grad(cross_entropy(logits, target, use_triton=use_triton).sum(), logits)
    (d_sum_ref,) = torch.autograd.grad(ref.sum(), logits64)
    assert_close(d_sum, d_sum_ref, dtype, "d_logits of the sum")


@pytest.mark.parametrize("use_triton", PATHS)
def test_cross_entropy_extreme_logits(use_triton):
    # Large magnitudes (no overflow: the row max is subtracted), -inf columns (a masked vocabulary: zero
    # probability, zero gradient), a whole block of -inf before the first finite value, and a NaN row that stays NaN
    # without touching the others.
    logits = rand(4, 40, scale=3.0)
    logits[0] *= 1e4
    logits[1, :20] = float("-inf")
    logits[2, 5:9] = float("-inf")
    logits[3, 7] = float("nan")
    target = torch.tensor([3, 25, 30, 1], device=DEVICE)
    (leaf,) = leaves(logits)
    loss = cross_entropy(leaf, target, use_triton=use_triton)
    (d,) = torch.autograd.grad(loss[:3].sum(), leaf)
    (leaf64,) = leaves(logits[:3].double())
    ref = cross_entropy_reference(leaf64, target[:3])
    (d_ref,) = torch.autograd.grad(ref.sum(), leaf64)
    assert_close(loss[:3], ref, torch.float32, "loss")
    assert_close(d[:3], d_ref, torch.float32, "d_logits")
    assert torch.isnan(loss[3]) and torch.isfinite(loss[:3]).all()
    assert torch.equal(d[1, :20], torch.zeros(20, device=DEVICE))


@requires_kernels
def test_cross_entropy_kernel_never_reads_past_the_row():
    # The model checks its labels; an id outside [0, v) reaching the kernel gives NaN for that row, not a wrong loss.
    (logits,) = leaves(rand(3, 24))
    target = torch.tensor([2, 24, -1], device=DEVICE)
    loss = cross_entropy(logits, target, use_triton=True)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    (d,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(d[0]).all() and torch.isnan(d[1:]).all()


def test_cross_entropy_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"logits \(m, v\) and target \(m,\), got \(2, 3, 4\) and \(2,\)"):
        cross_entropy(torch.zeros(2, 3, 4, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="got \\(2, 4\\) and \\(3,\\)"):
        cross_entropy(torch.zeros(2, 4, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE))
    if torch.device(DEVICE).type != "cpu":  # a target on another device: named, not a failed kernel launch
        with pytest.raises(ValueError, match="target is on cpu, its logits on cuda"):
            cross_entropy(torch.zeros(2, 4, device=DEVICE), torch.zeros(2, dtype=torch.long))
    meta = torch.zeros(2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="target is on meta, its logits on cpu"):
        cross_entropy(torch.zeros(2, 4), meta)


@pytest.mark.parametrize("use_triton", PATHS)
def test_cross_entropy_compiles_fullgraph(use_triton):
    from torch._dynamo.testing import CompileCounterWithBackend

    def loss_fn(h, w, target):
        return cross_entropy(h @ w, target, use_triton=use_triton).sum()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
    h, w = leaves(rand(6, 8), rand(8, 40, seed=1))
    target = torch.randint(0, 40, (6,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = compiled(h, w, target)
    got = torch.autograd.grad(out, (h, w))
    assert counter.frame_count == 1
    eager = loss_fn(h, w, target)
    expected = torch.autograd.grad(eager, (h, w))
    torch.testing.assert_close(out, eager)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


# ------------------------------------------------------------------------------------------------------------
# gated_linear_gelu: the GEMM with the gated GELU in its epilogue (inference), or the Linear + gated_gelu
# ------------------------------------------------------------------------------------------------------------
GEMM_KERNEL = (
    KERNELS and fused_ops.TensorDescriptor is not None and fused_ops._gated_gemm_capable(torch.device(DEVICE))
)
requires_gemm_kernel = pytest.mark.skipif(
    not GEMM_KERNEL, reason="the gated GEMM needs triton's TMA descriptors and a Hopper+ GPU, or the interpreter"
)


@pytest.fixture
def gemm_launches(monkeypatch):
    """The gated GEMM kernels launched during the test, in order: "tma" (the persistent TMA kernel) or "pointer"
    (the pointer-load kernel)."""
    if not fused_ops.HAS_TRITON:
        return []
    launches, kernel, launch = [], fused_ops._gated_linear_gelu_kernel, fused_ops.launch

    class Spy:
        def __getitem__(self, grid):
            launches.append("tma")
            return kernel[grid]

    def spy_launch(jit_kernel, grid, args, device_index, **kwargs):
        if jit_kernel is fused_ops._gated_linear_gelu_small_kernel:
            launches.append("pointer")
        launch(jit_kernel, grid, args, device_index, **kwargs)

    monkeypatch.setattr(fused_ops, "_gated_linear_gelu_kernel", Spy())
    monkeypatch.setattr(fused_ops, "launch", spy_launch)
    return launches


@pytest.fixture(params=["pointer", "tma"])
def gemm_kernel(request, monkeypatch):
    """Each gated GEMM kernel in turn: the TMA one from the first row on, or the pointer one at every size."""
    monkeypatch.setattr(fused_ops, "GATED_GEMM_TMA_ROWS", 0 if request.param == "tma" else 2**62)
    return request.param


def linear_inputs(rows, hidden, inter, dtype, seed=0):
    return rand(rows, hidden, dtype=dtype, seed=seed), rand(2 * inter, hidden, dtype=dtype, seed=seed + 1,
                                                              scale=hidden ** -0.5)


@requires_gemm_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden,inter", [(1, 24, 24), (37, 40, 40), (70, 48, 16), (100, 64, 72)])
def test_gated_linear_gelu_kernel_matches_reference(gemm_launches, gemm_kernel, dtype, rows, hidden, inter):
    # Several tiles in both directions, ragged edges (rows, columns and the reduction), and for the TMA kernel more
    # tiles than programs (its persistent loop)
    x, weight = linear_inputs(rows, hidden, inter, dtype)
    with torch.no_grad():
        out = gated_linear_gelu(x, weight, use_triton=True)
    assert gemm_launches == [gemm_kernel], "the fused GEMM did not run"
    assert out.dtype == dtype and out.shape == (rows, inter)
    assert_close(out, gated_linear_gelu_reference(x, weight), dtype, "out")


@requires_gemm_kernel
def test_gated_linear_gelu_leading_dims_and_strided_rows(gemm_launches, gemm_kernel):
    x, weight = linear_inputs(12, 32, 24, torch.float32)
    wide = torch.cat([x, rand(12, 8, seed=9)], dim=1)[:, :32]  # rows 160 bytes apart: both kernels read in place
    wide_weight = torch.cat([weight, rand(48, 8, seed=10)], dim=1)[:, :32]  # the weight's rows, too
    with torch.no_grad():
        out = gated_linear_gelu(wide.view(3, 4, 32)[:, :3], wide_weight, use_triton=True)
    assert gemm_launches == [gemm_kernel] and out.shape == (3, 3, 24)
    expected = gated_linear_gelu_reference(wide.view(3, 4, 32)[:, :3].reshape(-1, 32), weight).view(3, 3, 24)
    assert_close(out, expected, torch.float32, "out")


@requires_gemm_kernel
def test_gated_linear_gelu_transposed_weight(gemm_launches, gemm_kernel):
    # A weight whose columns are not contiguous (a transposed view) is read as the values it holds
    x, weight = linear_inputs(10, 32, 24, torch.float32)
    with torch.no_grad():
        out = gated_linear_gelu(x, weight.T.contiguous().T, use_triton=True)
    assert gemm_launches == [gemm_kernel]
    assert_close(out, gated_linear_gelu_reference(x, weight), torch.float32, "out")


@requires_gemm_kernel
@pytest.mark.parametrize(
    "case",
    ["misaligned address", "row stride not 16 bytes", "output row not 16 bytes"],
)
def test_gated_linear_gelu_where_tma_cannot_read_takes_the_pointer_kernel(gemm_launches, monkeypatch, case):
    # TMA needs 16-byte addresses and row strides: anything else goes to the pointer-load kernel, with the right
    # numbers, even at sizes where the TMA kernel would run
    monkeypatch.setattr(fused_ops, "GATED_GEMM_TMA_ROWS", 0)
    if case == "misaligned address":
        x, weight = rand(5 * 32 + 1)[1:].view(5, 32), rand(48, 32, seed=1, scale=0.2)
    elif case == "row stride not 16 bytes":
        x, weight = rand(5, 33)[:, :30], rand(48, 30, seed=1, scale=0.2)
    else:
        x, weight = rand(5, 32), rand(2 * 21, 32, seed=1, scale=0.2)
    with torch.no_grad():
        out = gated_linear_gelu(x, weight, use_triton=True)
    assert gemm_launches == ["pointer"]
    assert_close(out, gated_linear_gelu_reference(x, weight), torch.float32, "out")


@pytest.mark.parametrize("use_triton", PATHS)
def test_gated_linear_gelu_with_autograd_takes_the_linear(gemm_launches, use_triton):
    # The fused GEMM has no backward: a recorded graph goes through F.linear and gated_gelu, with gradients
    x, weight = leaves(*linear_inputs(9, 32, 24, torch.float32))
    out = gated_linear_gelu(x, weight, use_triton=use_triton)
    assert gemm_launches == []
    x64, w64 = leaves(x.double(), weight.double())
    ref = gated_linear_gelu_reference(x64, w64)
    assert_close(out, ref, torch.float32, "out")
    grad_out = rand(9, 24, seed=5)
    for got, expected, name in zip(torch.autograd.grad(out, (x, weight), grad_out),
                                   torch.autograd.grad(ref, (x64, w64), grad_out.double()), ("d_x", "d_weight")):
        assert_close(got, expected, torch.float32, name)


@requires_kernels
def test_gated_linear_gelu_with_dropout_takes_the_linear(gemm_launches):
    x, weight = linear_inputs(9, 32, 24, torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        out = gated_linear_gelu(x, weight, dropout_p=0.5, training=True, use_triton=True)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = gated_gelu(x @ weight.T, dropout_p=0.5, training=True, use_triton=True)
    assert gemm_launches == []
    torch.testing.assert_close(out, expected)
    assert (out == 0).any()


@pytest.mark.parametrize("use_triton", PATHS)
def test_gated_linear_gelu_autocast_and_dtypes_follow_the_linear(gemm_launches, use_triton):
    # Under autocast, or with mixed dtypes, the result is what F.linear + gated_gelu gives: no dtype of our own
    x, weight = linear_inputs(6, 32, 24, torch.float32)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = gated_linear_gelu(x, weight, use_triton=use_triton)
        expected = gated_gelu(torch.nn.functional.linear(x, weight), use_triton=use_triton)
    assert gemm_launches == [] and out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("use_triton", PATHS)
def test_gated_linear_gelu_mismatched_weight_raises(gemm_launches, use_triton):
    # A weight of another dtype or on another device is an error (F.linear's), never a kernel reading it anyway
    x, weight = linear_inputs(4, 32, 16, torch.float32)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            gated_linear_gelu(x, weight.to(torch.float16), use_triton=use_triton)
        if HAS_CUDA:  # x on the GPU, the weight on the CPU
            with pytest.raises(RuntimeError):
                gated_linear_gelu(x.half(), weight.half().cpu(), use_triton=use_triton)
    assert gemm_launches == []


def test_gated_linear_gelu_rejects_bad_shapes():
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match=r"\(6, 9\)"):
        gated_linear_gelu(x, torch.zeros(6, 9))
    with pytest.raises(ValueError, match=r"\(5, 8\)"):
        gated_linear_gelu(x, torch.zeros(5, 8))
    with pytest.raises(ValueError, match="dropout_p"):
        gated_linear_gelu(x, torch.zeros(6, 8), dropout_p=1.5)


@pytest.mark.parametrize("use_triton", [pytest.param(True, marks=requires_gemm_kernel, id="triton"),
                                        pytest.param(False, id="torch")])
def test_gated_linear_gelu_compiles_without_graph_breaks(use_triton):
    # Inference under torch.compile keeps the fused GEMM as one op (its fake gives the shape) and matches eager
    x, weight = linear_inputs(20, 32, 24, torch.float32)
    fn = lambda a, w: gated_linear_gelu(a, w, use_triton=use_triton) * 2.0  # noqa: E731
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(fn)(x, weight)
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, weight)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0
    assert any("gated_linear_gelu" in g.code for g in explained.graphs) == use_triton
    with torch.no_grad():
        torch.testing.assert_close(compiled, fn(x, weight))


# ------------------------------------------------------------------------------------------------------------
# reuse_cpu_gemm_output: the CPU path's (t, 2i) GEMM output in one reused buffer
# ------------------------------------------------------------------------------------------------------------
def scratch_buffers():
    return getattr(fused_ops._CPU_SCRATCH, "buffers", None)


def test_cpu_gemm_output_reused_within_the_block_and_dropped_after():
    x1, weight = (t.cpu() for t in linear_inputs(9, 32, 24, torch.float32))
    x2 = x1.flip(0) * 0.5
    with torch.no_grad():
        plain1 = gated_linear_gelu(x1, weight, use_triton=False)
        plain2 = gated_linear_gelu(x2, weight, use_triton=False)
        assert scratch_buffers() is None
        with reuse_cpu_gemm_output():
            out1 = gated_linear_gelu(x1, weight, use_triton=False)
            buffer = scratch_buffers()[torch.float32]
            out1_copy = out1.clone()
            out2 = gated_linear_gelu(x2, weight, use_triton=False)
            assert scratch_buffers()[torch.float32].data_ptr() == buffer.data_ptr()  # the same memory again
            with reuse_cpu_gemm_output():  # nested: its own buffers, the outer ones back afterwards
                gated_linear_gelu(x1[:3], weight, use_triton=False)
                inner = scratch_buffers()
            assert scratch_buffers()[torch.float32] is buffer and inner is not scratch_buffers()
        assert scratch_buffers() is None
    # a result never aliases the buffer: the second call left the first result as it was
    torch.testing.assert_close(out1, out1_copy, rtol=0, atol=0)
    torch.testing.assert_close(out1, plain1, rtol=0, atol=0)
    torch.testing.assert_close(out2, plain2, rtol=0, atol=0)
    assert_close(out2, gated_linear_gelu_reference(x2, weight), torch.float32, "out")


def test_cpu_gemm_output_not_reused_when_autograd_records_or_autocast():
    # A recorded graph keeps the GEMM output for the backward: the next call must not overwrite it
    x, weight = leaves(*(t.cpu() for t in linear_inputs(9, 32, 24, torch.float32)))
    with reuse_cpu_gemm_output():
        out = gated_linear_gelu(x, weight, use_triton=False)
        assert scratch_buffers() == {}
        gated_linear_gelu(x.detach().flip(0), weight.detach(), use_triton=False)  # would overwrite a shared buffer
        grads_got = torch.autograd.grad(out, (x, weight), torch.ones_like(out))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert gated_linear_gelu(x, weight, use_triton=False).dtype == torch.bfloat16
    assert set(scratch_buffers() or {}) == set()
    x64, w64 = leaves(x.double(), weight.double())
    ref = gated_linear_gelu_reference(x64, w64)
    for got, expected, name in zip(grads_got, torch.autograd.grad(ref, (x64, w64), torch.ones_like(ref)),
                                   ("d_x", "d_weight")):
        assert_close(got, expected, torch.float32, name)


def test_cpu_gemm_output_buffers_are_per_thread():
    import threading

    weight = rand(48, 32, seed=1, scale=0.2).cpu()
    inputs = [rand(40, 32, seed=10 + k).cpu() for k in range(4)]
    expected = [gated_linear_gelu(x, weight, use_triton=False) for x in inputs]
    results, errors = {}, []

    def work(k):
        try:
            with torch.no_grad(), reuse_cpu_gemm_output():
                for _ in range(20):
                    results[k] = gated_linear_gelu(inputs[k], weight, use_triton=False)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(4):
        torch.testing.assert_close(results[k], expected[k], rtol=0, atol=0)


def test_reimport_reuses_the_registered_ops():
    # transformers imports the package as remote code under another module name; a second copy of this file in
    # the same process must import (the dispatcher already holds the mosaic_bert ops) and compute the same.
    spec = importlib.util.spec_from_file_location("fused_ops_second_copy", os.path.join(REPO_ROOT, "fused_ops.py"))
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    x = rand(3, 32)
    torch.testing.assert_close(copy.gated_gelu(x, use_triton=False), gated_gelu(x, use_triton=False))
    if KERNELS:
        torch.testing.assert_close(copy.gated_gelu(x, use_triton=True), gated_gelu(x, use_triton=True))


def test_imports_and_falls_back_without_triton():
    # Triton is optional: with it unimportable the module imports and both functions compute on PyTorch ops.
    import subprocess

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fused_ops\n"
        "assert not fused_ops.HAS_TRITON and not fused_ops.fused_kernels_available(torch.zeros(1))\n"
        "x = torch.randn(3, 8, requires_grad=True)\n"
        "fused_ops.gated_gelu(x).sum().backward()\n"
        "w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)\n"
        "fused_ops.add_dropout_layer_norm(x[:, :4], x[:, 4:], w, b, 1e-5, 0.1, True).sum().backward()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------------
# GPU only: bf16, realistic sizes
# ------------------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows,inter", [(1, 3072), (1000, 3072), (129, 1000)])
def test_gated_gelu_cuda(dtype, rows, inter):
    (x,) = leaves(rand(rows, 2 * inter, dtype=dtype, scale=2.0))
    out = gated_gelu(x)
    (x64,) = leaves(x.double())
    ref = gated_gelu_reference(x64)
    assert_close(out, ref, dtype, "out")
    grad_out = rand(rows, inter, seed=5).to(dtype)
    (dx,) = torch.autograd.grad(out, x, grad_out)
    (dx_ref,) = torch.autograd.grad(ref, x64, grad_out.double())
    assert_close(dx, dx_ref, dtype, "d_x")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,hidden", [(1, 768), (2000, 768), (999, 1024), (300, 1000)])
def test_layer_norm_cuda(dtype, rows, hidden):
    inputs = leaves(*ln_inputs(rows, hidden, dtype, residual_dtype=torch.float32))
    out = add_dropout_layer_norm(*inputs, 1e-12, out_dtype=dtype)
    assert out.dtype == dtype
    check_layer_norm_against_reference(out, inputs, dtype, eps=1e-12)
    inputs = leaves(*ln_inputs(rows, hidden, dtype, residual_dtype=dtype))
    torch.manual_seed(0)
    out = add_dropout_layer_norm(*inputs, 1e-12, dropout_p=0.1, training=True)
    (dx,) = torch.autograd.grad(out, inputs[0], rand(rows, hidden, seed=10).to(dtype), retain_graph=True)
    check_layer_norm_against_reference(out, inputs, dtype, keep=dx != 0, dropout_p=0.1, eps=1e-12)


@requires_cuda
def test_autocast_bf16_matches_unfused():
    # Under autocast a bf16 Linear output plus the fp32 residual stream gives fp32, as the unfused expression.
    linear = torch.nn.Linear(64, 64).cuda()
    norm = torch.nn.LayerNorm(64).cuda()
    h = rand(50, 64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = linear(h)
        fused = add_dropout_layer_norm(y, h, norm.weight, norm.bias, norm.eps)
        unfused = norm(y + h)
    assert fused.dtype == unfused.dtype == torch.float32
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 128, 513, 1000, 4097, 8191, 8192, 9000])
def test_gated_linear_gelu_cuda(gemm_launches, dtype, rows):
    # Base sizes (768 -> 2 x 3072), every tile config of both kernels (the pointer one below
    # GATED_GEMM_TMA_ROWS, the TMA one from there), automatic choice; where the GPU has no gated GEMM, the
    # Linear + gated_gelu
    x, weight = linear_inputs(rows, 768, 3072, dtype)
    with torch.inference_mode():
        out = gated_linear_gelu(x, weight)
    if GEMM_KERNEL:
        assert gemm_launches == ["tma" if rows >= fused_ops.GATED_GEMM_TMA_ROWS else "pointer"]
    else:
        assert gemm_launches == []
    ref = gated_linear_gelu_reference(x, weight)
    assert_close(out, ref, dtype, "out")
    # no worse than the unfused path, which rounds the GEMM output to the dtype before the GELU
    unfused = gated_gelu(torch.nn.functional.linear(x, weight))
    assert (out.double() - ref).abs().max() <= 1.5 * (unfused.double() - ref).abs().max() + 1e-3


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cross_entropy_cuda(dtype):
    # The MLM head's shape: ~30% of 4096 tokens against a 30528-word vocabulary, bf16 logits under autocast
    rows, vocab = 1229, 30528
    (logits,) = leaves(rand(rows, vocab, dtype=dtype, scale=4.0))
    target = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    loss = cross_entropy(logits, target, use_triton=True)
    (logits64,) = leaves(logits.double())
    ref = cross_entropy_reference(logits64, target)
    assert_close(loss, ref, torch.float32, "loss")
    (d,) = torch.autograd.grad(loss.sum(), logits)
    (d_ref,) = torch.autograd.grad(ref.sum(), logits64)
    assert d.dtype == dtype
    assert_close(d, d_ref, dtype, "d_logits")
