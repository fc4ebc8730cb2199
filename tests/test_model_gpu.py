"""The full model on a GPU: the Triton attention path against the plain path (skipped without CUDA + triton)."""

import pytest
import torch
from conftest import package_module, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def ragged(lengths, vocab, device):
    g = torch.Generator().manual_seed(0)
    s = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), s), generator=g)
    mask = (torch.arange(s)[None] < torch.tensor(lengths)[:, None]).long()
    return (ids * mask).to(device), mask.to(device)


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
    ids, mask = ragged(lengths, 1000, "cuda")
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
    qkv = torch.zeros(4, 3, 4, 8, device="cuda", dtype=torch.bfloat16)
    assert mb.select_attention_backend(model.config, qkv, 0.0, False) == "triton"
    assert mb.select_attention_backend(model.config, qkv.float(), 0.0, False) == "torch"
    with pytest.raises(ValueError, match="attention_probs_dropout_prob"):
        mb.select_attention_backend(model.config, qkv, 0.1, False)


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
