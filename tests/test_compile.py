"""torch.compile(fullgraph=True) traces the model with no graph break on CPU (the plain path takes the dense
layout while compiling), and the compiled model gives the eager model's outputs and gradients."""

import pytest
import torch

from conftest import ragged_batch, tiny_model


@pytest.fixture
def dynamic_shapes():
    # Unpadding sizes tensors by the data (nonzero): dynamo captures that with these two switches on.
    import torch._dynamo

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        yield
    torch._dynamo.reset()


def _batch(with_labels):
    ids, mask = ragged_batch([5, 3, 6], seed=1)
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if with_labels:
        chosen = mask.bool() & (torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.5)
        kwargs["labels"] = torch.where(chosen, ids, -100)
    return kwargs


@pytest.mark.parametrize("with_labels", [False, True])
def test_no_graph_break(dynamic_shapes, with_labels):
    model = tiny_model()
    explained = torch._dynamo.explain(model)(**_batch(with_labels))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("auto_class", ["AutoModelForMaskedLM", "AutoModelForSequenceClassification"])
def test_fullgraph_compile_matches_eager_forward_and_gradients(dynamic_shapes, auto_class):
    model = tiny_model(auto_class, num_labels=3)
    kwargs = _batch(with_labels=auto_class == "AutoModelForMaskedLM")
    if auto_class != "AutoModelForMaskedLM":
        kwargs["labels"] = torch.tensor([0, 2, 1])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for m in (model, compiled):
        model.zero_grad()
        out = m(**kwargs)
        out.loss.backward()
        results.append((out.loss.detach(), out.logits.detach(), [p.grad.clone() for p in model.parameters()
                                                                 if p.grad is not None]))
    (loss, logits, grads), (c_loss, c_logits, c_grads) = results
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_logits, logits, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(c_grads)
    for a, b in zip(c_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "bad",
    ["additive mask", "all-zero mask", "id past the vocabulary", "negative token type", "label past the vocabulary"],
)
def test_compiled_model_fails_on_bad_values_instead_of_answering(dynamic_shapes, bad):
    # A compiled graph cannot read values back to raise the eager ValueError; the checks run on the device and a
    # bad batch fails with the assert's message rather than giving wrong numbers
    model = tiny_model("AutoModelForMaskedLM")
    kwargs = _batch(with_labels=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(**kwargs)  # a good batch runs
    ids, mask, labels = kwargs["input_ids"].clone(), kwargs["attention_mask"].clone(), kwargs["labels"].clone()
    if bad == "additive mask":
        mask = (1 - mask) * -10000
    elif bad == "all-zero mask":
        mask = torch.zeros_like(mask)
    elif bad == "id past the vocabulary":
        ids[0, 1] = model.config.vocab_size
    elif bad == "label past the vocabulary":
        labels[1, 0] = model.config.vocab_size + 3
    token_type_ids = torch.full_like(ids, -1) if bad == "negative token type" else None
    with pytest.raises(ValueError):  # eagerly: the error that names the value
        model(input_ids=ids, attention_mask=mask, labels=labels, token_type_ids=token_type_ids)
    with pytest.raises(RuntimeError, match="out of range inside torch.compile"):
        compiled(input_ids=ids, attention_mask=mask, labels=labels, token_type_ids=token_type_ids)


@pytest.mark.parametrize("bad", [None, "decreasing", "past the input", "max_seqlen too small"])
def test_compiled_packed_input_checks_cu_seqlens_on_the_device(dynamic_shapes, bad):
    model = tiny_model("AutoModelForMaskedLM")
    ids = torch.randint(5, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    cu_seqlens, max_seqlen = torch.tensor([0, 5, 12], dtype=torch.int32), 7
    if bad == "decreasing":
        cu_seqlens = torch.tensor([0, 8, 5, 12], dtype=torch.int32)
    elif bad == "past the input":
        cu_seqlens = torch.tensor([0, 5, 13], dtype=torch.int32)
    elif bad == "max_seqlen too small":
        max_seqlen = 6
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    if bad is None:  # a good packed input runs, and gives the eager answer
        expected = model(input_ids=ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).logits
        got = compiled(input_ids=ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        return
    with pytest.raises(ValueError):
        model(input_ids=ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    with pytest.raises(RuntimeError, match="out of range inside torch.compile"):
        compiled(input_ids=ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def test_compiled_input_error_fits_the_cuda_assert():
    # CUDA's _assert_async rejects messages of 255 characters or more, which would replace the input error on a GPU.
    from conftest import package_module

    message = package_module(tiny_model("AutoModelForMaskedLM")).COMPILED_INPUT_ERROR
    assert "out of range inside torch.compile" in message and len(message) < 255, len(message)
