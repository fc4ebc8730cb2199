"""Tests for `triton_launch`: the launch key is at least as fine as Triton's own specialization, the kept kernel
gets its arguments in signature order, and on a GPU the shortcut gives bit-identical results to `kernel[grid]`."""

import inspect
import itertools
from types import SimpleNamespace

import pytest
import torch

import triton_launch
from conftest import REPO  # noqa: F401  (puts the repo root on sys.path)

try:
    import triton
except ImportError:
    triton = None
try:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
except ImportError:  # no triton, or a release without the native specializer
    native_specialize_impl = None


def _triton_specialization(arg):
    return native_specialize_impl(BaseBackend, arg, False, True, True)


@pytest.mark.skipif(native_specialize_impl is None, reason="needs triton's native specializer")
def test_key_is_at_least_as_fine_as_triton_specialization():
    base = torch.zeros(64, dtype=torch.float32)
    values = [
        0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 1, -(2**31) - 16,
        2**32, 2**63 - 1, 2**63, 2**63 + 16,
        0.0, 1.0, 0.5, None, True, False,
        base, base[1:], base[4:], base[2:], base.to(torch.bfloat16), base.to(torch.bfloat16)[8:],
        base.to(torch.bfloat16)[1:], base.to(torch.int32), base.to(torch.int64)[1:],
    ]
    keys = [triton_launch.launch_signature([v]) for v in values]
    assert all(k is not None for k in keys)
    for (a, key_a), (b, key_b) in itertools.combinations(zip(values, keys), 2):
        if key_a == key_b:
            assert _triton_specialization(a) == _triton_specialization(b), (a, b)
    # and it tells apart what it must: alignment, dtype, width, 1, divisibility
    assert len({triton_launch.launch_signature([v]) for v in (base, base[1:], base.double())}) == 3
    assert len({triton_launch.launch_signature([v]) for v in (1, 2, 16, 2**31, 2**63)}) == 5


def test_unhashable_arguments_are_not_keyed():
    assert triton_launch.launch_signature([torch.zeros(1), [16, 16]]) is None
    assert triton_launch.launch_signature([torch.zeros(1), 16]) is not None


@pytest.mark.parametrize("n", [0, 1, 2, 3, 15, 16, 17, 1000, 1024, 1025, 2**40 + 1])
def test_host_helpers_match_triton(n):
    power = triton_launch.next_power_of_2(n)
    assert power == (0 if n == 0 else min(p for p in (2**k for k in range(64)) if p >= n))
    for d in (1, 3, 16, 64):
        assert triton_launch.cdiv(n, d) == (n + d - 1) // d
    if triton is not None:
        assert triton_launch.next_power_of_2(n) == triton.next_power_of_2(n)
        assert triton_launch.cdiv(n, 64) == triton.cdiv(n, 64)


class _Param:
    def __init__(self, name, constexpr, default=inspect.Parameter.empty):
        self.name, self.is_constexpr, self.default = name, constexpr, default
        self.has_default = default is not inspect.Parameter.empty


class _FakeCompiled:
    """A compiled kernel: its launcher `run`, and the runner Triton's `__getitem__` gives (used with launch hooks)."""

    function, packed_metadata = "function", "metadata"

    def __init__(self, log):
        self.log = log

    def run(self, g0, g1, g2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args):
        assert (function, packed_metadata, launch_metadata, enter_hook, exit_hook) == (
            "function", "metadata", None, None, None)
        self.log.append(("compiled", (g0, g1, g2), args, stream))

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            self.log.append(("compiled with hooks", grid, args, stream))

        return runner


class _FakeKernel:
    """A `triton.jit` function's launch interface: kernel[grid](*args, **kwargs) returns the compiled kernel."""

    def __init__(self, params):
        self.params = params
        self.log = []
        self.compiled = _FakeCompiled(self.log)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return self.compiled

        return run


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(triton_launch, "FAST_LAUNCH", True)
    monkeypatch.setattr(triton_launch, "CompiledKernel", _FakeCompiled)
    monkeypatch.setattr(triton_launch, "_raw_stream", lambda index: 1000 + index)
    monkeypatch.setattr(triton_launch, "_COMPILED", {})
    hooks = SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    monkeypatch.setattr(triton_launch, "knobs", SimpleNamespace(runtime=hooks))
    return hooks


def test_kept_kernel_gets_arguments_in_signature_order(fast):
    kernel = _FakeKernel([_Param("X", False), _Param("n", False), _Param("BLOCK", True), _Param("FLAG", True, 7)])
    x = torch.zeros(32)
    triton_launch.launch(kernel, (4, 1, 1), (x, 32), 0, BLOCK=16, num_warps=4)
    triton_launch.launch(kernel, (5, 2, 1), (x, 32), 0, BLOCK=16, num_warps=4)
    assert kernel.log[0] == ("jit", (4, 1, 1), (x, 32), {"BLOCK": 16, "num_warps": 4})
    # constexprs after the positional arguments, the default filled in; launch options left out
    assert kernel.log[1] == ("compiled", (5, 2, 1), (x, 32, 16, 7), 1000)
    # with a profiler's launch hooks set, Triton's runner launches (it calls them)
    fast.launch_enter_hook = print
    triton_launch.launch(kernel, (6, 1, 1), (x, 32), 0, BLOCK=16, num_warps=4)
    assert kernel.log[2] == ("compiled with hooks", (6, 1, 1), (x, 32, 16, 7), 1000)


def test_launch_returns_the_kept_kernel_for_relaunch(fast):
    kernel = _FakeKernel([_Param("X", False), _Param("n", False), _Param("BLOCK", True)])
    x, y = torch.zeros(32), torch.ones(32)
    entry = triton_launch.launch(kernel, (4, 1, 1), (x, 32), 0, BLOCK=16)
    assert entry is not None and triton_launch.launch(kernel, (4, 1, 1), (x, 32), 0, BLOCK=16) is entry
    # relaunch: the kept kernel with new tensors of the same key, no key worked out, the constexprs appended
    triton_launch.relaunch(entry, (2, 3, 1), (y, 32), 1)
    assert kernel.log[-1] == ("compiled", (2, 3, 1), (y, 32, 16), 1001)
    fast.launch_enter_hook = print
    triton_launch.relaunch(entry, (2, 3, 1), (y, 32), 0)
    assert kernel.log[-1] == ("compiled with hooks", (2, 3, 1), (y, 32, 16), 1000)
    # nothing to relaunch where the launch was not kept
    assert triton_launch.launch(kernel, (1, 1, 1), ([1],), 0, BLOCK=16) is None


@pytest.mark.skipif(triton_launch.HookChain is None, reason="needs triton.knobs")
def test_empty_hook_chains_count_as_no_hooks(fast):
    # Triton's defaults are empty chains, not None: the kept kernel's launcher is called directly
    fast.launch_enter_hook, fast.launch_exit_hook = triton_launch.HookChain(), triton_launch.HookChain(reversed=True)
    kernel = _FakeKernel([_Param("X", False)])
    x = torch.zeros(4)
    for _ in range(2):
        triton_launch.launch(kernel, (1, 1, 1), (x,), 0)
    assert [entry[0] for entry in kernel.log] == ["jit", "compiled"]
    fast.launch_exit_hook.add(print)  # a chain with a hook in it
    triton_launch.launch(kernel, (1, 1, 1), (x,), 0)
    assert kernel.log[-1][0] == "compiled with hooks"


def test_a_changed_specialization_goes_back_through_triton(fast):
    kernel = _FakeKernel([_Param("X", False), _Param("n", False), _Param("BLOCK", True)])
    x = torch.zeros(64)
    calls = [
        ((x, 32), {"BLOCK": 16}),
        ((x[1:], 32), {"BLOCK": 16}),  # misaligned address
        ((x, 33), {"BLOCK": 16}),  # not divisible by 16
        ((x, 1), {"BLOCK": 16}),  # the value 1
        ((x.double(), 32), {"BLOCK": 16}),  # dtype
        ((x, 32), {"BLOCK": 32}),  # constexpr value
        ((x, 2**31), {"BLOCK": 16}),  # 64-bit integer
    ]
    for args, kwargs in calls:
        triton_launch.launch(kernel, (1, 1, 1), args, 0, **kwargs)
    assert [entry[0] for entry in kernel.log] == ["jit"] * len(calls)
    triton_launch.launch(kernel, (1, 1, 1), (x, 32), 1, BLOCK=16)  # another device
    assert kernel.log[-1][0] == "jit"
    for args, kwargs in calls:  # now each is kept
        triton_launch.launch(kernel, (1, 1, 1), args, 0, **kwargs)
    assert [entry[0] for entry in kernel.log[len(calls) + 1:]] == ["compiled"] * len(calls)


def test_kept_kernels_are_capped(fast, monkeypatch):
    monkeypatch.setattr(triton_launch, "MAX_KEPT", 2)
    kernel = _FakeKernel([_Param("n", False)])
    for _ in range(2):
        for n in (2, 3, 4):
            triton_launch.launch(kernel, (1, 1, 1), (n,), 0)
    # the third key found the table full and started it over; each key then launched through Triton once more
    assert len(triton_launch._COMPILED) <= 2
    assert [entry[0] for entry in kernel.log] == ["jit"] * 6
    triton_launch.launch(kernel, (1, 1, 1), (4,), 0)  # the last key is kept
    assert kernel.log[-1][0] == "compiled"


def test_launches_that_cannot_be_kept_always_go_through_triton(fast):
    # a non-constexpr parameter after the positional ones
    kernel = _FakeKernel([_Param("X", False), _Param("n", False)])
    for _ in range(2):
        triton_launch.launch(kernel, (1, 1, 1), (torch.zeros(4),), 0, n=3)
    assert [entry[0] for entry in kernel.log] == ["jit", "jit"]
    # an unhashable argument, and an unhashable option
    kernel = _FakeKernel([_Param("X", False), _Param("BLOCK", True)])
    for _ in range(2):
        triton_launch.launch(kernel, (1, 1, 1), ([1, 2],), 0, BLOCK=16)
        triton_launch.launch(kernel, (1, 1, 1), (torch.zeros(4),), 0, BLOCK=[16])
    assert [entry[0] for entry in kernel.log] == ["jit"] * 4
    # a first launch that returns no compiled kernel (the interpreter's)
    kernel = _FakeKernel([_Param("X", False)])
    kernel.compiled = None
    for _ in range(2):
        triton_launch.launch(kernel, (1, 1, 1), (torch.zeros(4),), 0)
    assert [entry[0] for entry in kernel.log] == ["jit", "jit"]


def test_switched_off_every_launch_goes_through_triton(monkeypatch):
    monkeypatch.setattr(triton_launch, "FAST_LAUNCH", False)
    kernel = _FakeKernel([_Param("X", False)])
    for _ in range(3):
        triton_launch.launch(kernel, (1, 1, 1), (torch.zeros(4),), 0)
    assert [entry[0] for entry in kernel.log] == ["jit"] * 3


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fused_calls(dtype, offset):
    """Each kernel of the package once, forward and backward, on inputs starting `offset` elements into their
    storage (offset 1: no input address is 16-byte aligned). Returns every output and gradient."""
    import flash_attn_triton as fa
    import fused_ops

    torch.manual_seed(0)
    t, n, i, h, d = 200, 96, 80, 4, 32
    dev = "cuda"

    def leaf(*shape):  # the same values whatever the offset
        values = torch.randn(shape, device=dev, dtype=dtype)
        storage = torch.empty(offset + values.numel(), device=dev, dtype=dtype)
        storage[offset:] = values.flatten()
        return storage[offset:].view(shape)

    g, x, r, qkv = leaf(t, 2 * i), leaf(t, n), leaf(t, n), leaf(t, 3, h, d)
    w, b = torch.randn(n, device=dev, dtype=dtype), torch.randn(n, device=dev, dtype=dtype)
    cu = torch.tensor([0, 7, 7, 120, t], device=dev, dtype=torch.int32)
    slopes = torch.rand(h, device=dev)
    outs = []
    with torch.inference_mode():
        outs.append(fused_ops.gated_gelu(g, use_triton=True))
        outs.append(fused_ops.add_dropout_layer_norm(x, r, w, b, 1e-5, use_triton=True))
        outs.append(fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 113, alibi_slopes=slopes))
        attention = fa.PackedSelfAttention(cu, 113, alibi_slopes=slopes)
        outs += [attention(qkv), attention(qkv * 2)]  # the second relaunches the first's kernel
        if fused_ops._gated_gemm_capable(qkv.device):
            weight = torch.randn(2 * i, n, device=dev, dtype=dtype) / n**0.5
            outs.append(fused_ops.gated_linear_gelu(x, weight, use_triton=True))
    leaves = [a.detach().clone().requires_grad_() for a in (g, x, r, qkv)]
    gl, xl, rl, ql = leaves
    y = fused_ops.gated_gelu(gl, use_triton=True).float().sum()
    y = y + fused_ops.add_dropout_layer_norm(xl, rl, w, b, 1e-5, use_triton=True).float().square().sum()
    y = y + fa.flash_attn_varlen_qkvpacked_func(ql, cu, 113, alibi_slopes=slopes).float().square().sum()
    y.backward()
    return outs + [a.grad for a in leaves]


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_shortcut_matches_triton_launch_bit_for_bit(monkeypatch, dtype):
    import triton

    if not triton_launch.FAST_LAUNCH:
        pytest.skip(f"the shortcut is off for triton {triton.__version__}")
    monkeypatch.setattr(triton_launch, "_COMPILED", {})
    # Triton's default launch hooks (empty chains) take the direct launcher call, the path timed in BENCHMARKS.md
    runtime = triton_launch.knobs.runtime
    assert triton_launch._no_hook(runtime.launch_enter_hook) and triton_launch._no_hook(runtime.launch_exit_hook)
    results = {}
    for offset in (0, 1, 0, 1):  # aligned, misaligned, then both again: the second round runs kept kernels
        monkeypatch.setattr(triton_launch, "FAST_LAUNCH", False)
        reference = _fused_calls(dtype, offset)
        monkeypatch.setattr(triton_launch, "FAST_LAUNCH", True)
        results[offset] = _fused_calls(dtype, offset)
        for got, want in zip(results[offset], reference):
            assert torch.equal(got, want)
    # every kernel of the package (gated GELU and LayerNorm forward and backward, the attention forward and its
    # three backward kernels, the small gated GEMM on a Hopper) was kept, under aligned and misaligned keys
    import fused_ops

    gemm = fused_ops._gated_gemm_capable(torch.device("cuda"))
    assert len({key[0] for key in triton_launch._COMPILED}) == 8 + gemm
    assert {key[-1][1] for key in triton_launch._COMPILED} == {True, False}  # the first argument's alignment
    # the same values at a misaligned address give the same numbers
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _scaled_product(x, y, scale=2.0):
    return x * y * scale


def _scaled_product_setup(ctx, inputs, output):
    x, y, scale = (*inputs, 2.0)[:3]  # `inputs` as the Function received them: scale only when given
    ctx.save_for_backward(x, y)
    ctx.scale = scale


def _scaled_product_backward(ctx, grad):
    x, y = ctx.saved_tensors
    grads = (grad * y * ctx.scale, grad * x * ctx.scale)
    return grads + (None,) * (len(ctx.needs_input_grad) - 2)


ScaledProduct = triton_launch.autograd_function("ScaledProduct", _scaled_product, _scaled_product_setup,
                                                _scaled_product_backward)


@pytest.mark.parametrize("call", ["positional", "default", "keyword"])
def test_autograd_function_apply_matches_torch_and_skips_the_bind_only_when_all_are_given(call, monkeypatch):
    # Every forward parameter given positionally: no `inspect.signature` call (the per-call bind of
    # `Function.apply`), and the same values, graph node and gradients as `Function.apply` gives. A defaulted
    # parameter left out, or one given by keyword, goes through `Function.apply`, which binds and fills it in.
    args, kwargs = {"positional": ((3.0,), {}), "default": ((), {}), "keyword": ((), {"scale": 3.0})}[call]
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, dtype=torch.float64, requires_grad=True)
    scale = args[0] if args else kwargs.get("scale", 2.0)
    binds = []
    signature = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: binds.append(a) or signature(*a, **k))
    out = ScaledProduct.apply(x, y, *args, **kwargs)
    assert (len(binds) == 0) == (call == "positional"), binds
    monkeypatch.undo()
    assert type(out.grad_fn).__name__ == "ScaledProductBackward"
    torch.testing.assert_close(out, x * y * scale, rtol=0, atol=0)
    grad = torch.randn(5, dtype=torch.float64)
    dx, dy = torch.autograd.grad(out, (x, y), grad)
    torch.testing.assert_close(dx, grad * y * scale, rtol=0, atol=0)
    torch.testing.assert_close(dy, grad * x * scale, rtol=0, atol=0)
    if call == "positional":  # the gradient check of the function itself, against finite differences
        assert torch.autograd.gradcheck(lambda a, b: ScaledProduct.apply(a, b, 3.0), (x, y))


def test_autograd_function_apply_under_functorch_takes_torch_path():
    # torch.func.grad over the Function: `Function.apply`'s functorch path (setup_context is defined, so it is
    # supported), with the Function's own backward.
    x = torch.randn(4, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    dx = torch.func.grad(lambda a: ScaledProduct.apply(a, y, 3.0).sum())(x)
    torch.testing.assert_close(dx, y * 3.0, rtol=0, atol=0)
