# Copyright 2026 The MosaicBERT package authors. Apache-2.0.
"""Launching the package's Triton kernels with less host time than `kernel[grid](...)`.

On every call, `JITFunction.run` works out how each argument specializes the kernel (dtype, 16-byte alignment,
integer width, divisibility by 16, the value 1), formats the compile options into a cache key, looks the device and
stream up and checks the kernel's globals before it reaches the compiled launcher: 20-60 µs of host time a launch,
which is what a small batch's forward waits on. `launch` makes a key's first call through Triton (which compiles or
finds the kernel) and keeps the compiled kernel that call returns; later calls with the same key go straight to its
launcher (the compiled kernel's `run`, as `JITFunction.run` calls it). The key is at least as fine as Triton's own
specialization (`test_triton_launch.py` checks that against Triton's specializer), so a kept kernel only runs where
Triton would have picked the same one.

The shortcut is taken only with the Triton releases whose launch path it was checked against (`FAST_LAUNCH`);
otherwise, and under Triton's interpreter, every call goes through `kernel[grid](...)`. The file imports without
Triton.
"""

import contextlib
import inspect
import os

import torch
from torch import Tensor

try:
    import triton
    from triton.compiler import CompiledKernel
except ImportError:
    triton = None
    CompiledKernel = None
try:
    from triton import knobs
    from triton.knobs import HookChain
except ImportError:  # triton < 3.4: no fast path (FAST_LAUNCH below is off)
    knobs = HookChain = None

__all__ = [
    "FAST_LAUNCH",
    "MAX_KEPT",
    "autograd_function",
    "backward_direct",
    "cdiv",
    "device_context",
    "launch",
    "launch_signature",
    "next_power_of_2",
    "relaunch",
    "route",
    "tracing",
]


_PLAIN = (Tensor, torch.nn.Parameter)
# bound once: `tracing` runs before every kernel call, and each attribute lookup on torch._C costs host time
_is_compiling = torch.compiler.is_compiling
_jit_tracing_state = torch._C._get_tracing_state
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_interpreter = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)
try:
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
except ImportError:  # pragma: no cover - older torch

    def _unwrap_dead_wrappers(args):
        return args


def tracing(*tensors):
    """True while something traces or intercepts a kernel call: torch.compile, torch.export or torch.jit, a
    `__torch_dispatch__` mode (fake tensors, make_fx, FlopCounterMode), a functorch transform, or tensor subclasses
    among `tensors` (fake or functional tensors). Such calls take the custom op, whose fake implementation and
    registered autograd those tracers understand; launching a kernel on them directly would fail or go unseen."""
    if _is_compiling() or _dispatch_modes() or _jit_tracing_state() is not None:
        return True
    if _functorch_interpreter() is not None:
        return True
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return True
    return False


def route(*tensors):
    """How a call of a kernel with a custom op runs: "op" while something traces it (`tracing`: the op, with its
    fake implementation and registered backward); "function" when eager autograd records it (`autograd_function`:
    the op's own implementation, setup and backward, without the dispatcher and torch.library's wrappers, which cost
    more host time than the launch); None otherwise: the launcher directly."""
    if tracing(*tensors):
        return "op"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "function"
    return None


def backward_direct(*tensors):
    """Whether an autograd formula may call its backward op's implementation directly instead of the op: in the
    autograd engine's eager backward (grad mode off) with nothing tracing (`tracing`). Under `create_graph=True`
    grad mode is on and the formula takes the op, which has no autograd of its own and says so when a second
    derivative reaches it, rather than handing back a gradient with no history."""
    return not torch.is_grad_enabled() and not tracing(*tensors)


_function_apply = torch.autograd.Function.apply.__func__  # the classmethod's function, for any subclass
_functorch_active = torch._C._are_functorch_transforms_active


def _apply_all_positional(cls, *args, **kwargs):
    # `Function.apply` binds the arguments to forward's signature on every call of a Function with setup_context
    # (`inspect.signature`: 15-40 µs of host time a call, 50 calls a training step), only to fill in defaults.
    # With every parameter given positionally there is nothing to fill: straight to the C apply (what
    # `Function.apply` itself calls then), after the same functorch handling. Anything else: `Function.apply`.
    if kwargs or len(args) != cls._num_params or _functorch_active():
        return _function_apply(cls, *args, **kwargs)
    return super(torch.autograd.Function, cls).apply(*_unwrap_dead_wrappers(args))


def autograd_function(name, forward, setup_context, backward):
    """A `torch.autograd.Function` named `name` from a custom op's implementation (`forward`, the op's arguments)
    and the `setup_context` and `backward` registered as its autograd formula: the same computation and gradients as
    the op, for eager autograd (`route`). Its `apply` skips `Function.apply`'s per-call signature binding when every
    argument of `forward` is given positionally."""
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "apply": classmethod(_apply_all_positional),
        "_num_params": len(inspect.signature(forward).parameters),
    })


def _triton_version():
    try:
        return tuple(int(part) for part in triton.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        return (0, 0)


_INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET", "0").lower() in (
    "1", "true", "yes", "on", "y"
)
# The releases whose `JITFunction.run` and `CompiledKernel.__getitem__` this was written against (3.6 and 3.9 read;
# 3.6 run on a GPU). A module-level switch, so a test or a user can turn the shortcut off.
FAST_LAUNCH = knobs is not None and not _INTERPRET and (3, 6) <= _triton_version() < (3, 10)

try:
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # pragma: no cover - older torch

    def _raw_stream(index):
        return torch.cuda.current_stream(index).cuda_stream


def cdiv(a, b):
    """ceil(a / b) for host ints (`triton.cdiv` is a constexpr function whose host call costs a few µs)."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n for host ints (0 for n = 0, as `triton.next_power_of_2`)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


_NO_SWITCH = contextlib.nullcontext()


def device_context(tensor):
    """Triton launches on the current CUDA device: a context that makes `tensor`'s device current for the launch
    when it is another one (none to enter otherwise)."""
    device = tensor.device
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _NO_SWITCH
    return torch.cuda.device(device)


def _signature(args):
    # Two entries an argument: a tensor's dtype and 16-byte alignment; anything else's type and value (may be
    # unhashable). Flat, not a tuple an argument: a fifth less host time. Unambiguous: a first entry is a dtype
    # for a tensor, a type otherwise.
    signature = []
    for a in args:
        if isinstance(a, Tensor):
            signature.append(a.dtype)
            signature.append(a.data_ptr() % 16 == 0)
        else:
            signature.append(type(a))
            signature.append(a)
    return tuple(signature)


def launch_signature(args):
    """The key part of positional launch arguments: a tensor's dtype and whether its address is 16-byte aligned
    (what Triton specializes a pointer on); any other argument's type and value, which is finer than Triton's
    specialization (an int's width, whether it is 1, whether 16 divides it; a float's type). None when an
    argument is not hashable (a tensor descriptor)."""
    signature = _signature(args)
    try:
        hash(signature)
    except TypeError:
        return None
    return signature


def _constexpr_tail(kernel, n_args, kwargs):
    """The values of the kernel's parameters after the `n_args` positional ones, in signature order, when all of
    them are constexprs (given in kwargs or defaulted); else None (such a launch is not kept)."""
    tail = []
    for param in kernel.params[n_args:]:
        if not param.is_constexpr:
            return None
        if param.name in kwargs:
            tail.append(kwargs[param.name])
        elif param.has_default:
            tail.append(param.default)
        else:
            return None
    return tuple(tail)


def _no_hook(hook):
    """A launch hook that does nothing: None, or an empty chain (Triton's default: `knobs.runtime.launch_*_hook`
    are `HookChain`s that profilers such as proton add to)."""
    return hook is None or (type(hook) is HookChain and not hook.calls)


# (kernel, device index, keyword arguments, argument signature) -> (compiled kernel, constexpr values). Keys carry
# the values of integer arguments (strides, sizes; a ragged training batch's token count), so the number of keys is
# capped: when full, the table starts over (each key then takes Triton's path once more; Triton keeps its kernels).
_COMPILED = {}
MAX_KEPT = 4096


def launch(kernel, grid, args, device_index, **kwargs):
    """`kernel[grid](*args, **kwargs)` for a `triton.jit` function, with the host work after a key's first launch
    cut to the launcher call. grid: a tuple of three ints; args: the non-constexpr arguments, positionally;
    kwargs: constexprs and launch options (num_warps, num_stages); device_index: the CUDA device the arguments
    live on, current at the call.

    Returns the kept kernel for this key (for `relaunch`), or None when the launch was not kept."""
    if not FAST_LAUNCH:
        kernel[grid](*args, **kwargs)
        return None
    key = (kernel, device_index, *kwargs.items(), _signature(args))
    try:
        entry = _COMPILED.get(key)  # hashing the key is the check that it can be one
    except TypeError:  # an unhashable argument or option value: not kept
        kernel[grid](*args, **kwargs)
        return None
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        tail = _constexpr_tail(kernel, len(args), kwargs)
        if tail is None or not isinstance(compiled, CompiledKernel):
            return None
        if len(_COMPILED) >= MAX_KEPT:  # e.g. training on ever-new token counts: start over
            _COMPILED.clear()
        entry = _COMPILED[key] = (compiled, tail)
        return entry
    relaunch(entry, grid, args, device_index)
    return entry


def relaunch(entry, grid, args, device_index):
    """Launches a kernel `launch` kept (its return value) without working out the key again. The caller
    guarantees that `args` would give the same key: every tensor of the same dtype and 16-byte alignment as at
    that launch, every other argument equal (e.g. a layer's tensors of the same shape, strides and alignment as
    the previous layer's). grid, device_index: as for `launch`."""
    compiled, tail = entry
    hooks = knobs.runtime
    if _no_hook(hooks.launch_enter_hook) and _no_hook(hooks.launch_exit_hook):
        compiled.run(
            grid[0], grid[1], grid[2], _raw_stream(device_index), compiled.function, compiled.packed_metadata,
            None, None, None, *args, *tail,
        )
    else:  # a profiler's launch hooks: Triton's own runner calls them
        compiled[grid](*args, *tail, stream=_raw_stream(device_index))
