"""`config.static_shapes`: every padded position through the encoder, no size that depends on the mask, the input
checks read after the forward is queued. Outputs must be those of the unpadded layout (and of the float64
reference) for every padding layout, every head, with gradients; bad inputs still raise `ValueError`; and the
kernel path must trace under torch.compile without dynamo's data-dependent-shape switches."""

import sys

import pytest
import torch

from conftest import package_module, ragged_batch, tiny_model
from reference import reference_encoder


def assert_close_rel(actual, expected, rtol=1e-5):
    scale = expected.abs().max().clamp(min=1.0)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= rtol, f"relative error {err:.3e}"


def pair(auto_class="AutoModel", **overrides):
    """The same weights twice: padding removed (the default) and static shapes."""
    plain = tiny_model(auto_class, **overrides)
    static = tiny_model(auto_class, static_shapes=True, **overrides)
    static.load_state_dict(plain.state_dict())
    return plain, static


def masks():
    """(name, ids, mask) for each layout of padding: right, left, holes, an empty row, none, no mask."""
    ids, right = ragged_batch([7, 3, 10, 1], seqlen=10)
    g = torch.Generator().manual_seed(1)
    full_ids = torch.randint(1, 99, (4, 10), generator=g)
    left = right.flip(-1)
    holes = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 1, 0]] * 2 + [[0, 1, 0, 1, 0, 1, 0, 1, 0, 1]] * 2)
    empty = right.clone()
    empty[1] = 0
    return [
        ("right", ids, right),
        ("left", ids.flip(-1), left),
        ("holes", full_ids * holes, holes),
        ("empty row", ids * empty, empty),
        ("all ones", full_ids, torch.ones_like(full_ids)),
        ("no mask", full_ids, None),
    ]


def kernels_on_cpu(model, monkeypatch):
    """Makes `model` take the Triton attention kernel on CPU (Triton's interpreter), or skips."""
    mb = package_module(model)
    flash = sys.modules[mb.__name__.rsplit(".", 1)[0] + ".flash_attn_triton"]
    if not (flash.HAS_TRITON and flash._INTERPRET):
        pytest.skip("the kernel on CPU needs triton's interpreter")
    monkeypatch.setattr(mb, "kernel_available", lambda device, dtype: True)
    return mb


@pytest.mark.parametrize("path", ["torch", "kernel"])
@pytest.mark.parametrize("layout", [m[0] for m in masks()])
def test_static_shapes_give_the_unpadded_outputs_for_every_padding_layout(path, layout, monkeypatch):
    plain, static = pair(num_attention_heads=2)  # head size 16, the kernel's smallest
    if path == "kernel":
        kernels_on_cpu(plain, monkeypatch)
    _, ids, mask = next(m for m in masks() if m[0] == layout)
    with torch.no_grad():
        want = plain(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = static(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert_close_rel(got.last_hidden_state, want.last_hidden_state)
    assert_close_rel(got.pooler_output, want.pooler_output)
    assert len(got.hidden_states) == len(want.hidden_states)
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert_close_rel(g, w)
    if mask is not None:  # padding's outputs are exactly zero
        assert (got.last_hidden_state[mask == 0] == 0).all()
    if layout == "right":  # and both are the float64 reference's
        sd = {f"bert.{k}": v for k, v in plain.state_dict().items()}
        ref = reference_encoder(sd, plain.config, ids, mask)
        assert_close_rel(got.last_hidden_state, ref)


def test_static_shapes_with_token_types_and_inputs_embeds():
    # Token types and embeddings given instead of ids are laid out like the ids (left padding: moved).
    plain, static = pair()
    _, ids, mask = masks()[1]
    types = (torch.arange(10) >= 5).long().expand(4, 10).contiguous()
    embeds = plain.embeddings.word_embeddings(ids).detach()
    with torch.no_grad():
        for kwargs in (dict(input_ids=ids, token_type_ids=types), dict(inputs_embeds=embeds, token_type_ids=types)):
            want = plain(attention_mask=mask, **kwargs).last_hidden_state
            got = static(attention_mask=mask, **kwargs).last_hidden_state
            assert_close_rel(got, want)


def test_static_shapes_heads_losses_and_gradients_match(monkeypatch):
    # MLM with labels (dense and sparse logits, a label at padding, which is not a token either way), token
    # classification and question answering: outputs, losses and every parameter's gradient.
    _, ids, mask = masks()[1]  # left padding
    labels = torch.where(torch.arange(10) % 3 == 0, ids, -100)
    labels[0, 0] = 5  # row 0 is padding at column 0
    assert mask[0, 0] == 0
    for auto_class, extra, kwargs in [
        ("AutoModelForMaskedLM", {}, dict(labels=labels)),
        ("AutoModelForMaskedLM", {"sparse_prediction": True}, dict(labels=labels)),
        ("AutoModelForTokenClassification", {"num_labels": 3}, dict(labels=torch.where(mask == 1, ids % 3, -100))),
        ("AutoModelForQuestionAnswering", {}, dict(start_positions=torch.tensor([9, 8, 2, 9]),
                                                    end_positions=torch.tensor([9, 9, 5, 9]))),
    ]:
        plain, static = pair(auto_class, **extra)
        outs = []
        for model in (plain, static):
            model.train()  # dropout is 0 in the tiny config: a deterministic training forward
            out = model(input_ids=ids, attention_mask=mask, **kwargs)
            out.loss.backward()
            outs.append(out)
        want, got = outs
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
        for name in ("logits", "start_logits", "end_logits"):
            if getattr(want, name, None) is not None:
                assert getattr(got, name).shape == getattr(want, name).shape, (auto_class, name)
                assert_close_rel(getattr(got, name), getattr(want, name))
        for (name, p), q in zip(plain.named_parameters(), static.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                assert_close_rel(q.grad, p.grad, rtol=1e-4)


@pytest.mark.parametrize("bad", ["id too large", "negative id", "token type", "mask value", "all zeros", "label"])
def test_static_shapes_still_raise_value_error_on_bad_inputs(bad):
    # The checks are read after the forward is queued, and still raise the unpadded mode's errors; the embedding
    # gathers of the queued forward stay in bounds (no out-of-range read) until then.
    plain, static = pair("AutoModelForMaskedLM")
    ids, mask = ragged_batch([6, 4], seqlen=6)
    kwargs = dict(input_ids=ids.clone(), attention_mask=mask.clone())
    if bad == "id too large":
        kwargs["input_ids"][0, 1] = 99
    elif bad == "negative id":
        kwargs["input_ids"][1, 0] = -3
    elif bad == "token type":
        kwargs["token_type_ids"] = torch.full_like(ids, 2)
    elif bad == "mask value":
        kwargs["attention_mask"][0, 2] = 2
    elif bad == "all zeros":
        kwargs["attention_mask"] = torch.zeros_like(mask)
    else:
        kwargs["labels"] = torch.full_like(ids, 99)
    with pytest.raises(ValueError) as want:
        plain(**kwargs)
    with pytest.raises(ValueError) as got:
        static(**kwargs)
    assert str(got.value) == str(want.value)


def test_static_shapes_read_the_checks_after_the_encoder_is_queued(monkeypatch):
    # The order of events in a forward: with padding removed the checks are read first (their count sizes the
    # layout); with static shapes only after the last layer has run (queued, on a GPU).
    order = []
    for model in pair():
        mb = package_module(model)
        read = mb._read_checks
        monkeypatch.setattr(mb, "_read_checks", lambda *a, read=read: order.append("read") or read(*a))
        handle = model.encoder.layer[-1].register_forward_hook(lambda *a: order.append("last layer"))
        ids, mask = ragged_batch([5, 3])
        model(input_ids=ids, attention_mask=mask)
        handle.remove()
        monkeypatch.undo()
    assert order == ["read", "last layer", "last layer", "read"]


def test_static_shapes_compile_without_data_dependent_sizes(monkeypatch):
    # The kernel path traces with dynamo's default switches (no nonzero, no read count: nothing data-dependent)
    # and matches eager; with padding removed the same call breaks the graph at nonzero.
    import torch._dynamo

    plain, static = pair(num_attention_heads=2)
    kernels_on_cpu(plain, monkeypatch)
    ids, mask = ragged_batch([8, 5, 2])
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            explained = torch._dynamo.explain(static)(input_ids=ids, attention_mask=mask)
            assert explained.graph_break_count == 0, explained.break_reasons
            assert any("flash_attn_varlen_qkvpacked_fwd" in g.code for g in explained.graphs)
            compiled = torch.compile(static, backend="eager", fullgraph=True)(input_ids=ids, attention_mask=mask)
            eager = static(input_ids=ids, attention_mask=mask)
            assert_close_rel(compiled.last_hidden_state, eager.last_hidden_state)
            torch._dynamo.reset()
            explained = torch._dynamo.explain(plain)(input_ids=ids, attention_mask=mask)
            assert explained.graph_break_count > 0 and "nonzero" in str(explained.break_reasons[0])
    finally:
        torch._dynamo.reset()


def test_static_shapes_must_be_a_bool():
    from conftest import tiny_config

    with pytest.raises(ValueError, match="`static_shapes` must be True or False, got 'yes'"):
        tiny_config(static_shapes="yes")
