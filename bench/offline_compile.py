"""Compile a Triton kernel for a GPU target on a machine without one, and read its cubin with the `cuobjdump` that
triton's CUDA backend bundles: SASS instruction counts and resource usage, no device time spent."""

import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_for(fn, signature, constexprs, arch=90, **options):
    """`fn` (a @triton.jit function) compiled for sm_`arch`; `signature` maps every argument to its type
    ("*fp32", "i32", "tensordesc<bf16[64,64]>", "constexpr"); options as at launch (num_warps, num_stages)."""
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def cuobjdump(kernel, flag):
    """`cuobjdump <flag>` (e.g. "-sass", "-res-usage") over the compiled kernel's cubin, as text."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(tool), flag, str(cubin)], capture_output=True, text=True, check=True).stdout


def has_cuobjdump():
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


def sass_ops(kernel):
    """{SASS opcode: count} of the kernel, NOPs dropped."""
    ops = {}
    for line in cuobjdump(kernel, "-sass").splitlines():
        match = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if match and match.group(1) != "NOP":
            ops[match.group(1)] = ops.get(match.group(1), 0) + 1
    return ops


def resources(kernel):
    """(registers a thread, spill bytes a thread (stack + local), shared memory bytes a program)."""
    usage = cuobjdump(kernel, "-res-usage")
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = int(re.search(r"STACK:(\d+)", usage).group(1)) + int(re.search(r"LOCAL:(\d+)", usage).group(1))
    return registers, spills, kernel.metadata.shared
