"""What the gated GEMM's epilogue costs per element in instructions: each GELU(gate) * value form compiled for a GPU
target offline (no GPU needed), its SASS counted.

    python bench/epilogue_sass.py [--arch 90]

One element per thread (a 128-element block, 4 warps), so the counts are per element; "beyond gate * value" is the
form's count less that of the plain product, i.e. what the GELU adds to every output of the epilogue. Forms: the
shipped exact GELU (`fused_ops._gelu_times`: Phi as the sigmoid of a fitted odd polynomial), and the rational-erfc
and libdevice-erf forms of `bench/gated_gemm_variants.py`. Needs triton with its bundled `cuobjdump` (the CUDA
wheels carry it); run without TRITON_INTERPRET.
"""

import argparse
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compiles for a GPU target: run without TRITON_INTERPRET=1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_ops  # noqa: E402

if not fused_ops.HAS_TRITON:
    sys.exit("needs triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from gated_gemm_variants import _gelu_times_erf, _gelu_times_rational  # noqa: E402
from offline_compile import compile_for, sass_ops  # noqa: E402


@triton.jit
def _form_kernel(Gate, Value, Out, FORM: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    gate = tl.load(Gate + offsets)
    value = tl.load(Value + offsets)
    if FORM == 0:
        out = gate * value
    elif FORM == 1:
        out = fused_ops._gelu_times(gate, value)
    elif FORM == 2:
        out = _gelu_times_rational(gate, value)
    else:
        out = _gelu_times_erf(gate, value)
    tl.store(Out + offsets, out)


FORMS = {"gate * value": 0, "shipped: sigmoid of an odd polynomial": 1, "rational erfc": 2, "erf (libdevice)": 3}


def form_ops(form, arch):
    """{SASS opcode: count} of the kernel for `form`."""
    signature = {"Gate": "*fp32", "Value": "*fp32", "Out": "*fp32", "FORM": "constexpr", "BLOCK": "constexpr"}
    return sass_ops(compile_for(_form_kernel, signature, {"FORM": form, "BLOCK": 128}, arch, num_warps=4))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper")
    args = parser.parse_args()
    counts = {name: form_ops(form, args.arch) for name, form in FORMS.items()}
    base = sum(counts["gate * value"].values())
    print(f"triton {triton.__version__}, sm_{args.arch}; SASS instructions per element (NOPs excluded)")
    print("| form | instructions | beyond gate * value | MUFU (exp, reciprocal) | FFMA + FMUL + FADD |")
    print("|---|---:|---:|---:|---:|")
    for name, ops in counts.items():
        arithmetic = sum(ops.get(op, 0) for op in ("FFMA", "FMUL", "FADD"))
        print(f"| {name} | {sum(ops.values())} | {sum(ops.values()) - base} | {ops.get('MUFU', 0)} | {arithmetic} |")


if __name__ == "__main__":
    main()
