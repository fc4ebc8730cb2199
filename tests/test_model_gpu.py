"""The full model on a GPU: the Triton attention path against the plain path (skipped without CUDA + triton)."""

import pytest
import torch

from conftest import package_module, ragged_batch, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_model_matches_plain_path(dtype):
    model = tiny_model(hidden_size=256, num_attention_heads=4, intermediate_size=512, num_hidden_layers=3,
                       vocab_size=1000).cuda()
    mb = package_module(model)
    if not mb.HAS_TRITON:
        pytest.skip("triton is not installed")
    lengths = [1, 17, 97, 128, 255, 513, 1025]
    ids, mask = ragged_batch(lengths, 1000, device="cuda")
    labels = torch.where((torch.rand(ids.shape, device="cuda") < 0.3) & mask.bool(), ids, -100)
    ref32 = None
    results = {}
    for backend in ("torch", "triton"):
        model.config.attention_backend = backend
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[backend] = (out.loss.detach(), out.logits.detach(), grads)
    # fp32 reference (plain path, no autocast) to scale the tolerance by what the dtype itself costs.
    model.config.attention_backend = "torch"
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    ref32 = (out.loss.detach(), out.logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                                                if p.grad is not None]))
    for i, name in enumerate(("loss", "logits", "grads")):
        plain_err = rel_err(results["torch"][i], ref32[i])
        kernel_err = rel_err(results["triton"][i], ref32[i])
        assert kernel_err <= 2 * plain_err + 1e-3, (name, kernel_err, plain_err)
    assert rel_err(results["triton"][1], results["torch"][1]) < 3e-2


def test_auto_backend_picks_kernel_on_cuda_half_and_plain_for_fp32():
    model = tiny_model(vocab_size=1000).cuda()
    mb = package_module(model)
    if not mb.HAS_TRITON:
        pytest.skip("triton is not installed")
    cuda = torch.device("cuda")
    assert mb.resolve_attention(model.config, cuda, torch.bfloat16, 0.0) == "triton"
    assert mb.resolve_attention(model.config, cuda, torch.float32, 0.0) == "torch"
    with pytest.raises(ValueError, match="attention_probs_dropout_prob"):
        mb.resolve_attention(model.config, cuda, torch.bfloat16, 0.1)


def test_long_sequence_memory_is_linear():
    """Peak memory of a forward+backward at 4x the tokens in one sequence grows ~4x, not 16x."""
    model = tiny_model(hidden_size=256, num_attention_heads=4, intermediate_size=512, vocab_size=1000).cuda()
    mb = package_module(model)
    if not mb.HAS_TRITON:
        pytest.skip("triton is not installed")
    peaks = []
    for seqlen in (2048, 8192):
        ids = torch.randint(1, 1000, (1, seqlen), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        model.zero_grad(set_to_none=True)
    assert peaks[1] < 6 * peaks[0], peaks


class Syncs(list):
    """Where fn() synchronized with the device ('file:line' of each), from CUDA's sync debug mode."""

    def __eq__(self, count):
        return len(self) == count


def _count_syncs(fn):
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (not the one-time "Synchronization debug mode is a prototype feature" notice)
    return Syncs(f"{w.filename}:{w.lineno}" for w in caught if "called a synchronizing" in str(w.message))


@pytest.mark.parametrize("padded", [False, True])
def test_training_step_reads_the_device_once(padded):
    """Forward and backward of a well-formed batch: one device-to-host read (the batched input checks)."""
    model = tiny_model(hidden_size=128, num_attention_heads=2, intermediate_size=256, vocab_size=1000).cuda().train()
    mb = package_module(model)
    if not mb.HAS_TRITON:
        pytest.skip("triton is not installed")
    ids, mask = ragged_batch([64, 40, 64, 7] if padded else [64] * 4, 1000, device="cuda")
    labels = torch.where((torch.rand(ids.shape, device="cuda") < 0.3) & mask.bool(), ids, -100)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()

    step()  # compile the kernels first
    syncs = _count_syncs(step)
    assert syncs == 1, syncs


def test_inference_forward_reads_the_device_once():
    model = tiny_model("AutoModel", hidden_size=128, num_attention_heads=2, intermediate_size=256,
                       vocab_size=1000).cuda().bfloat16()
    ids, mask = ragged_batch([1, 50, 128], 1000, device="cuda")
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
        syncs = _count_syncs(lambda: model(input_ids=ids, attention_mask=mask))
    assert syncs == 1, syncs


def test_fullgraph_compile_with_the_kernels_matches_eager():
    import torch._dynamo

    model = tiny_model(hidden_size=128, num_attention_heads=2, intermediate_size=256, vocab_size=1000).cuda()
    mb = package_module(model)
    if not mb.HAS_TRITON:
        pytest.skip("triton is not installed")
    ids, mask = ragged_batch([64, 40, 64, 7], 1000, device="cuda")
    labels = torch.where((torch.rand(ids.shape, device="cuda") < 0.3) & mask.bool(), ids, -100)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels)
        assert explained.graph_break_count == 0, explained.break_reasons
        # the attention kernel's op is in the graph (not the dense attention a tracing check could pick)
        assert any("flash_attn_varlen_qkvpacked_fwd" in g.code for g in explained.graphs)
        compiled = torch.compile(model, fullgraph=True)
        results = []
        for m in (model, compiled):
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = m(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            results.append((out.loss.float(), torch.cat([p.grad.flatten() for p in model.parameters()
                                                         if p.grad is not None])))
    torch._dynamo.reset()
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=2e-2)
    rel = ((results[1][1] - results[0][1]).norm() / results[0][1].norm()).item()
    assert rel < 3e-2, rel


_BAD_BATCH_UNDER_COMPILE = """
import sys, torch, torch._dynamo
sys.path.insert(0, sys.argv[1])
from conftest import ragged_batch, tiny_model
torch._dynamo.config.capture_dynamic_output_shape_ops = True
torch._dynamo.config.capture_scalar_outputs = True
model = tiny_model(hidden_size=128, num_attention_heads=2, intermediate_size=256, vocab_size=1000).cuda().eval()
ids, mask = ragged_batch([64, 40, 64, 7], 1000, device="cuda")
compiled = torch.compile(model, fullgraph=True)
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    good = compiled(input_ids=ids, attention_mask=mask).logits.float()
    ref = model(input_ids=ids, attention_mask=mask).logits.float()
    assert ((good - ref).norm() / ref.norm()).item() < 3e-2
    print("GOOD BATCH OK", flush=True)
    out = compiled(input_ids=ids, attention_mask=(1 - mask) * -10000).logits
    torch.cuda.synchronize()
    print("BAD BATCH GAVE AN ANSWER", flush=True)
"""


def test_compiled_model_on_the_gpu_fails_on_a_bad_batch():
    # In a compiled graph the value checks are a device-side assert, which leaves the process's CUDA context
    # unusable: the bad batch runs in a process of its own. An additive mask must fail, not give numbers.
    import subprocess
    import sys
    from pathlib import Path

    model = tiny_model(vocab_size=1000)
    if not package_module(model).HAS_TRITON:
        pytest.skip("triton is not installed")
    done = subprocess.run([sys.executable, "-c", _BAD_BATCH_UNDER_COMPILE, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=600)
    assert "GOOD BATCH OK" in done.stdout, done.stderr[-3000:]
    assert "BAD BATCH GAVE AN ANSWER" not in done.stdout
    assert done.returncode != 0
    assert "out of range inside torch.compile" in done.stderr or "device-side assert" in done.stderr, (
        done.stderr[-3000:]
    )


@pytest.mark.parametrize("padding", ["right", "left", "none"])
def test_static_shapes_on_the_gpu_match_unpadded_and_read_nothing(padding):
    # bf16 through the kernels: static shapes give the unpadded layout's outputs, and an eager forward makes no
    # synchronizing call (the checks' values come back in a non-blocking copy, read after the forward is queued),
    # where the unpadded one makes one.
    plain = tiny_model("AutoModel", hidden_size=128, num_attention_heads=2, intermediate_size=256,
                       vocab_size=1000).cuda().bfloat16()
    static = tiny_model("AutoModel", hidden_size=128, num_attention_heads=2, intermediate_size=256, vocab_size=1000,
                        static_shapes=True).cuda().bfloat16()
    static.load_state_dict(plain.state_dict())
    if not package_module(plain).HAS_TRITON:
        pytest.skip("triton is not installed")
    ids, mask = ragged_batch([64, 40, 128, 7] if padding != "none" else [128] * 4, 1000, device="cuda")
    if padding == "left":
        ids, mask = ids.flip(-1), mask.flip(-1)
    with torch.inference_mode():
        want = plain(input_ids=ids, attention_mask=mask).last_hidden_state
        got = static(input_ids=ids, attention_mask=mask).last_hidden_state
        assert rel_err(got, want) < 1e-2
        assert (got[mask == 0] == 0).all()
        assert _count_syncs(lambda: static(input_ids=ids, attention_mask=mask)) == 0
        assert _count_syncs(lambda: plain(input_ids=ids, attention_mask=mask)) == 1
        bad = ids.clone()
        bad[0, 0] = 1000
        with pytest.raises(ValueError, match="`input_ids` contains 1000"):
            static(input_ids=bad, attention_mask=mask)


def test_static_shapes_compile_into_cuda_graphs():
    # mode="reduce-overhead" with the default dynamo switches: the static forward is captured (replays give the
    # eager outputs for new values of the same shapes).
    import torch._dynamo

    model = tiny_model("AutoModel", hidden_size=128, num_attention_heads=2, intermediate_size=256, vocab_size=1000,
                       static_shapes=True).cuda().bfloat16()
    if not package_module(model).HAS_TRITON:
        pytest.skip("triton is not installed")
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    try:
        with torch.inference_mode():
            for seed in range(4):
                ids, mask = ragged_batch([64, 40, 128, 7], 1000, seed=seed, device="cuda")
                got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state.clone()
                want = model(input_ids=ids, attention_mask=mask).last_hidden_state
                assert rel_err(got, want) < 1e-2, seed
    finally:
        torch._dynamo.reset()
