"""`flash_attn_triton` under `torch.compile`: the kernels sit behind `torch.library` custom ops, so a function
calling the public functions compiles with `fullgraph=True` (no graph break), forward and backward, and
max_seqlen may be symbolic.

Without a GPU the kernels run in Triton's interpreter (small shapes); the `aot_eager` backend traces the graph
(fake tensors, AOT autograd) but runs it eagerly, so no C++ or Triton code generation is involved.
"""

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton` (see test_flash_attn.py)

pytest.importorskip("triton", reason="triton is not installed; flash_attn_triton needs it")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import flash_attn_triton as fa  # noqa: E402
from reference import closed_form_slopes  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
runs_kernels = pytest.mark.skipif(
    not HAS_CUDA and not fa._INTERPRET,
    reason="without a GPU the kernels need Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
pytestmark = runs_kernels

LENGTHS = [5, 17, 1, 30]  # ragged, with tails past the interpreter's 16-wide tiles


def cu_seqlens_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def packed_inputs(heads=2, head_dim=16, seed=0):
    torch.manual_seed(seed)
    qkv = torch.randn(sum(LENGTHS), 3, heads, head_dim, device=DEVICE, dtype=DTYPE)
    slopes = torch.tensor(closed_form_slopes(heads), dtype=torch.float32, device=DEVICE)
    return qkv, cu_seqlens_of(LENGTHS), slopes


def packed_attention(qkv, cu_seqlens, max_seqlen, slopes):
    return fa.flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, alibi_slopes=slopes)


def unpacked_attention(q, k, v, cu_seqlens, max_seqlen, slopes):
    return fa.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, alibi_slopes=slopes)


def run_with_grads(fn, leaves, *args, seed=1):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves, *args)
    torch.manual_seed(seed)
    out.backward(torch.randn_like(out))
    return out.detach(), [x.grad for x in leaves]


def assert_same(a, b):
    # aot_eager runs the same kernels on the same inputs: results agree to the bit.
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_ops_are_registered():
    for name in ("flash_attn_varlen_fwd", "flash_attn_varlen_bwd", "flash_attn_varlen_qkvpacked_fwd",
                 "flash_attn_varlen_qkvpacked_bwd"):
        assert hasattr(torch.ops.mosaic_bert, name)
    schema = str(torch.ops.mosaic_bert.flash_attn_varlen_qkvpacked_fwd.default._schema)
    assert "SymInt max_seqlen" in schema


def test_compiled_packed_matches_eager_forward_and_backward():
    qkv, cu, slopes = packed_inputs()
    compiled = torch.compile(packed_attention, backend="aot_eager", fullgraph=True)
    out, (dqkv,) = run_with_grads(compiled, [qkv], cu, max(LENGTHS), slopes)
    ref, (ref_dqkv,) = run_with_grads(packed_attention, [qkv], cu, max(LENGTHS), slopes)
    assert_same(out, ref)
    assert_same(dqkv, ref_dqkv)


def test_compiled_unpacked_matches_eager_forward_and_backward():
    qkv, cu, slopes = packed_inputs(seed=2)
    q, k, v = (x.contiguous() for x in qkv.unbind(1))
    compiled = torch.compile(unpacked_attention, backend="aot_eager", fullgraph=True)
    out, grads = run_with_grads(compiled, [q, k, v], cu, max(LENGTHS), slopes)
    ref, ref_grads = run_with_grads(unpacked_attention, [q, k, v], cu, max(LENGTHS), slopes)
    assert_same(out, ref)
    for g, rg in zip(grads, ref_grads):
        assert_same(g, rg)


def test_no_graph_breaks():
    qkv, cu, slopes = packed_inputs()
    qkv.requires_grad_()

    def loss(qkv, cu_seqlens, max_seqlen, slopes):
        return packed_attention(qkv, cu_seqlens, max_seqlen, slopes).float().square().sum()

    explanation = torch._dynamo.explain(loss)(qkv, cu, max(LENGTHS), slopes)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_symbolic_max_seqlen_from_padded_width():
    # The model passes the padded width of its (b, s) input as max_seqlen: under dynamic shapes a SymInt. A
    # second width must reuse the graph (no recompile) and still give the eager result.
    qkv, cu, slopes = packed_inputs(seed=3)
    frames = []

    def counting_backend(gm, example_inputs):
        frames.append(gm)
        return gm

    def attention_at_padded_width(qkv, cu_seqlens, input_ids, slopes):
        return packed_attention(qkv, cu_seqlens, input_ids.shape[1], slopes)

    compiled = torch.compile(attention_at_padded_width, backend=counting_backend, fullgraph=True, dynamic=True)
    for width in (max(LENGTHS), max(LENGTHS) + 9):
        input_ids = torch.zeros(len(LENGTHS), width, dtype=torch.long, device=DEVICE)
        out = compiled(qkv, cu, input_ids, slopes)
        assert_same(out, packed_attention(qkv, cu, width, slopes))
    assert len(frames) == 1


def test_compiled_too_small_max_seqlen_raises():
    if DEVICE == "cuda":
        pytest.skip("on a GPU the check is a device-side assert, which ends the process's CUDA context: "
                    "tests/test_flash_attn.py::test_gpu_max_seqlen_too_small_stops_the_device runs it in a subprocess")
    qkv, cu, slopes = packed_inputs()
    compiled = torch.compile(packed_attention, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"max_seqlen is below the longest sequence"):
        compiled(qkv, cu, max(LENGTHS) - 1, slopes)


@pytest.mark.parametrize("op", ["packed", "unpacked"])
def test_opcheck(op):
    # torch's own checks of a custom op: schema, fake implementation, autograd registration, AOT dispatch.
    qkv, cu, slopes = packed_inputs(seed=4)
    qkv.requires_grad_()
    if op == "packed":
        torch.library.opcheck(torch.ops.mosaic_bert.flash_attn_varlen_qkvpacked_fwd.default,
                              (qkv, cu, max(LENGTHS), 0.25, False, slopes))
    else:
        q, k, v = (x.detach().contiguous().requires_grad_() for x in qkv.unbind(1))
        torch.library.opcheck(torch.ops.mosaic_bert.flash_attn_varlen_fwd.default,
                              (q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), 0.25, False, slopes))
