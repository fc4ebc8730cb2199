"""The encoder and every head against an independent padded float64 reference (tests/reference.py)."""

import json
import math
import sys

import pytest
import torch
import transformers

from conftest import REPO, package_module, ragged_batch, tiny_config, tiny_model
from reference import closed_form_slopes, reference_encoder, reference_mlm_logits, varlen_attention


def assert_close_rel(actual, expected, rtol=1e-5):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * max(scale, 1.0), f"max abs error {err:.3e} vs scale {scale:.3e}"


# ------------------------------------------------------------------------------------------------ ALiBi


@pytest.mark.parametrize("heads", range(1, 33))
def test_alibi_slopes_closed_form(heads):
    model = tiny_model(num_attention_heads=1, hidden_size=32)
    slopes = package_module(model).alibi_slopes(heads)
    assert slopes.dtype == torch.float32
    torch.testing.assert_close(slopes, torch.tensor(closed_form_slopes(heads), dtype=torch.float32))


def test_alibi_slopes_twelve_heads_match_architecture_notes():
    model = tiny_model()
    expected = [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    torch.testing.assert_close(package_module(model).alibi_slopes(12), torch.tensor(expected))


def test_slopes_buffer_filled_on_init_and_exact_after_cast():
    model = tiny_model()
    enc = model.bert.encoder
    torch.testing.assert_close(enc.alibi_slopes, torch.tensor(closed_form_slopes(4), dtype=torch.float32))
    assert "bert.encoder.alibi_slopes" not in model.state_dict()
    model.to(torch.bfloat16)
    assert enc.slopes().dtype == torch.float32
    torch.testing.assert_close(enc.slopes(), torch.tensor(closed_form_slopes(4), dtype=torch.float32))
    # the cast keeps the buffer itself exact in fp32: a forward reads it, computing nothing
    assert enc.alibi_slopes.dtype == torch.float32
    torch.testing.assert_close(enc.alibi_slopes, torch.tensor(closed_form_slopes(4), dtype=torch.float32))
    model.half()
    assert enc.alibi_slopes.dtype == torch.float32 and enc.slopes() is enc.alibi_slopes
    assert torch.equal(enc.alibi_slopes, torch.tensor(closed_form_slopes(4), dtype=torch.float32))


@pytest.mark.parametrize("rows", [
    [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 1, 0, 1]],  # right, none, empty, holes
    [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]],  # left padding
    [[1, 1, 1], [1, 1, 1]],  # nothing padded
])
@pytest.mark.parametrize("with_labels", [False, True])
def test_layout_prepared_before_the_read_matches_plain_indexing(rows, with_labels):
    # prepare_layout queues the layout's device work before the count is read; cut to the counts, its positions,
    # row offsets and labelled rows equal plain boolean indexing of the mask and labels.
    model = tiny_model()
    mb = package_module(model)
    mask = torch.tensor(rows)
    b, s = mask.shape
    ids = torch.randint(1, 50, (b, s)) * mask
    labels = torch.where(torch.rand(b, s, generator=torch.Generator().manual_seed(1)) < 0.5, ids, -100)
    labels[0, 0] = 7  # labelled padding or not: only labelled valid tokens count
    inputs = mb.validate_inputs(
        model.config, input_ids=ids, attention_mask=mask, subset_labels=labels if with_labels else None,
        before_read=lambda early: mb.prepare_layout(early, "torch", labels if with_labels else None),
    )
    prep = inputs.prepared
    valid = mask.reshape(-1).bool()
    total = int(valid.sum())
    assert inputs.total == total
    assert torch.equal(prep.positions[:total], torch.arange(b * s)[valid])
    assert prep.cu_rows.dtype == torch.int32
    assert prep.cu_rows.tolist() == [0] + torch.cumsum(mask.sum(-1), 0).tolist()
    layout = mb.build_layout(inputs, "torch")
    # each row's first token, as a row of the computed tokens (-1 for an empty row)
    counts = mask.sum(-1).tolist()
    assert layout.first_index.tolist() == [sum(counts[:i]) if counts[i] else -1 for i in range(b)]
    if total == b * s:
        assert layout.indices is None
    else:
        assert torch.equal(layout.indices, torch.arange(b * s)[valid])
    if with_labels:
        chosen = (labels.reshape(-1) != -100) & valid
        # the row of each labelled token among the computed (valid) tokens
        expected = [int(valid[:p].sum()) for p in range(b * s) if chosen[p]]
        assert inputs.labelled == len(expected)
        assert prep.subset[: inputs.labelled].tolist() == expected
    else:
        assert prep.subset is None


def test_forward_queues_the_layout_before_the_read_and_only_cuts_it_after(monkeypatch):
    # The one device read waits for the GPU's earlier work; the layout's device work must be queued before it (its
    # host time then overlaps that work), and after it nothing is computed again: unpadding and the labelled
    # tokens' indices come from the prepared buffers. Outputs as without the preparation.
    model = tiny_model("AutoModelForMaskedLM").train()
    mb = package_module(model)
    ids, mask = ragged_batch([9, 4, 7])
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, ::2] = -100
    torch.manual_seed(0)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels)
    order = []
    real_prepare, real_tolist = mb.prepare_layout, torch.Tensor.tolist

    def prepare(*args, **kwargs):
        order.append("prepare")
        return real_prepare(*args, **kwargs)

    def tolist(tensor):
        order.append("read")
        return real_tolist(tensor)

    def recomputed(*args, **kwargs):
        raise AssertionError("the layout was computed again after the read")

    monkeypatch.setattr(mb, "prepare_layout", prepare)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(mb, "unpad_input", recomputed)
    monkeypatch.setattr(mb, "valid_token_indices", recomputed)
    torch.manual_seed(0)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
    assert order[:2] == ["prepare", "read"]  # (the plain path, CPU, reads its bucket lengths later)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)


def test_scatter_by_rank_puts_flagged_values_first_in_order():
    mb = package_module(tiny_model())
    bp = sys.modules[mb.__name__.rsplit(".", 1)[0] + ".bert_padding"]
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 100):
        flags = torch.rand(n, generator=g) < 0.4
        values = torch.randint(-1000, 1000, (n,), generator=g)
        out = bp.scatter_by_rank(flags, values)
        assert out.shape == (n + 1,)
        k = int(flags.sum())
        assert torch.equal(out[:k], values[flags])


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("heads", [1, 3, 4, 6])
def test_encoder_matches_reference_fp32(heads):
    model = tiny_model("AutoModel", num_attention_heads=heads, hidden_size=48)
    ids, mask = ragged_batch([7, 1, 12, 4])
    tt = (torch.arange(12) >= 5).long().expand(4, -1) * mask
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
    sd = {"bert." + k: v for k, v in model.state_dict().items()}
    ref, ref_hidden, _ = reference_encoder(sd, model.config, ids, mask, tt, return_probs=True)
    assert_close_rel(out.last_hidden_state, ref)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    for ours, theirs in zip(out.hidden_states, ref_hidden):
        assert_close_rel(ours, theirs)
    assert (out.last_hidden_state[mask == 0] == 0).all()
    pooled = torch.tanh(ref[:, 0] @ sd["bert.pooler.dense.weight"].double().T + sd["bert.pooler.dense.bias"].double())
    assert_close_rel(out.pooler_output, pooled)


def test_mlm_logits_and_attentions_match_reference():
    model = tiny_model()
    ids, mask = ragged_batch([9, 3, 6])
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    sd = model.state_dict()
    hidden, _, probs = reference_encoder(sd, model.config, ids, mask, return_probs=True)
    ref_logits = reference_mlm_logits(sd, model.config, hidden)
    valid = mask.bool()
    assert_close_rel(out.logits[valid], ref_logits[valid])
    assert out.logits.shape == (3, 9, model.config.vocab_size)
    for ours, theirs in zip(out.attentions, probs):
        assert ours.shape == (3, 4, 9, 9)
        assert_close_rel(ours * valid[:, None, :, None], theirs)


def test_padding_invariance_row_alone_vs_ragged_batch():
    model = tiny_model("AutoModel")
    ids, mask = ragged_batch([5, 11, 1, 8], seed=3)
    batched = model(input_ids=ids, attention_mask=mask).last_hidden_state
    for i, n in enumerate([5, 11, 1, 8]):
        alone = model(input_ids=ids[i : i + 1, :n]).last_hidden_state
        torch.testing.assert_close(batched[i, :n], alone[0], rtol=1e-5, atol=1e-6)


def test_left_padding_counts_positions_among_valid_tokens():
    model = tiny_model("AutoModel")
    ids, _ = ragged_batch([6], seed=4)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = model(input_ids=left, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[0, 3:], model(input_ids=ids).last_hidden_state[0], rtol=1e-5, atol=1e-6)
    assert (out[0, :3] == 0).all()


def test_packed_input_equals_padded_batch():
    model = tiny_model()
    lengths = [4, 7, 1, 5]
    ids, mask = ragged_batch(lengths, seed=5)
    padded = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    packed_ids = ids[mask.bool()][None]  # (1, t)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    by_positions = model(input_ids=packed_ids, position_ids=position_ids).logits[0]
    torch.testing.assert_close(by_positions, padded, rtol=1e-5, atol=1e-5)
    cu = torch.tensor([0, 4, 11, 12, 17], dtype=torch.int32)
    by_cu = model(input_ids=packed_ids, cu_seqlens=cu, max_seqlen=7).logits[0]
    torch.testing.assert_close(by_cu, padded, rtol=1e-5, atol=1e-5)
    # Attention probabilities of a packed row are block diagonal.
    att = model(input_ids=packed_ids, cu_seqlens=cu, output_attentions=True).attentions[0][0]
    assert att[:, :4, 4:].abs().max() == 0 and att[:, 4:11, :4].abs().max() == 0


def test_data_collator_with_flattening_output_is_accepted():
    from transformers import DataCollatorWithFlattening

    model = tiny_model()
    feats = [{"input_ids": [2, 5, 7], "labels": [2, 5, 7]}, {"input_ids": [9, 4], "labels": [9, 4]}]
    batch = DataCollatorWithFlattening(return_position_ids=True)(feats)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    alone = model(input_ids=torch.tensor([[9, 4]])).logits[0]
    torch.testing.assert_close(out.logits[0, 3:], alone, rtol=1e-5, atol=1e-5)


def test_length_beyond_alibi_starting_size_equals_larger_config():
    small = tiny_model("AutoModel", alibi_starting_size=8)
    large = tiny_model("AutoModel", alibi_starting_size=64)
    large.load_state_dict(small.state_dict())
    ids, mask = ragged_batch([32, 20], seed=6)
    torch.testing.assert_close(
        small(input_ids=ids, attention_mask=mask).last_hidden_state,
        large(input_ids=ids, attention_mask=mask).last_hidden_state,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_edge_rows_finite_and_correct_in_every_dtype(dtype):
    model = tiny_model("AutoModel", alibi_starting_size=16)
    lengths = [64, 1, 0, 37]  # 4x alibi_starting_size, a length-1 row, an all-padding row
    ids, mask = ragged_batch(lengths, seed=7)
    sd = {"bert." + k: v for k, v in model.state_dict().items()}
    ref = reference_encoder(sd, model.config, ids, mask)
    model.to(dtype)
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all()
    tol = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 0.02}[dtype]
    assert_close_rel(out, ref, rtol=tol)


def test_fp32_stays_fp32_and_autocast_is_respected():
    model = tiny_model()
    ids, mask = ragged_batch([5, 3])
    assert model(input_ids=ids, attention_mask=mask).logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask)
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.logits.float()).all()


def test_inputs_embeds_equals_input_ids():
    model = tiny_model("AutoModel")
    ids, mask = ragged_batch([6, 4])
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(
        model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state,
        model(input_ids=ids, attention_mask=mask).last_hidden_state,
    )


def test_return_dict_false_gives_tuples():
    model = tiny_model()
    ids, mask = ragged_batch([6, 4])
    labels = torch.full_like(ids, -100)
    labels[0, 2] = 5
    loss, logits = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert loss.dim() == 0 and logits.shape == (2, 6, 99)


# ------------------------------------------------------------------------------------------------ sparse MLM


def test_sparse_mlm_loss_logits_and_gradients_match_dense_computation():
    model = tiny_model()
    ids, mask = ragged_batch([8, 5, 3], seed=8)
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4]] = torch.tensor([3, 9])
    labels[2, 0] = 11
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    dense = model(input_ids=ids, attention_mask=mask).logits
    sel = labels != -100
    expected = torch.nn.functional.cross_entropy(dense[sel], labels[sel])
    expected.backward()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logits[sel], dense[sel].detach())
    assert (out.logits[~sel] == 0).all()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(sparse_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_mlm_loss_with_no_masked_tokens_is_zero_not_nan():
    model = tiny_model()
    ids, mask = ragged_batch([4, 2])
    out = model(input_ids=ids, attention_mask=mask, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0


def test_num_items_in_batch_gradient_accumulation_2x4_equals_1x8():
    model = tiny_model()
    ids, mask = ragged_batch([9, 3, 6, 8, 2, 7, 5, 4], seed=9)
    g = torch.Generator().manual_seed(1)
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.4) & mask.bool(), ids, -100)
    labels[1, 0] = ids[1, 0]
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = (labels != -100).sum()
    for part in (slice(0, 4), slice(4, 8)):
        out = model(input_ids=ids[part], attention_mask=mask[part], labels=labels[part], num_items_in_batch=total)
        out.loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[n], rtol=1e-4, atol=1e-7, msg=n)


# ------------------------------------------------------------------------------------------------ training


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny_model()
    model.train()
    ids, mask = ragged_batch([7, 4, 6], seed=10)
    labels = torch.where(mask.bool(), ids, -100)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.bert.encoder.layer)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_attention_dropout_is_applied_by_plain_path_in_training():
    model = tiny_model(attention_probs_dropout_prob=0.5)
    ids, mask = ragged_batch([8, 8])
    model.eval()
    a = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, model(input_ids=ids, attention_mask=mask).logits)
    model.train()
    torch.manual_seed(0)
    b = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(a, b)


def test_backend_selection_is_explicit():
    model = tiny_model()
    mb = package_module(model)
    cpu = torch.device("cpu")
    assert mb.resolve_attention(model.config, cpu, torch.float32, 0.0) == "torch"
    assert mb.resolve_attention(model.config, cpu, torch.float32, 0.0, output_attentions=True) == "dense"
    cfg = tiny_config(attention_backend="triton")
    with pytest.raises(ValueError, match="attention_backend='triton'"):
        mb.resolve_attention(cfg, cpu, torch.bfloat16, 0.0)
    # every entry of the table is reachable and names the sequences it reads
    assert set(mb.ATTENTION_FUNCTIONS) == {"triton", "torch", "dense"}


def test_compiled_forward_keeps_the_kernel(monkeypatch):
    # Where the kernel can run, torch.compile traces it (a custom op), even where torch reports is_exporting()
    # inside compile (torch 2.11 did, and compiled models silently took the slower dense path); only torch.onnx and
    # torch.jit tracing take the dense path.
    import torch._dynamo

    model = tiny_model()
    mb = package_module(model)
    monkeypatch.setattr(mb, "kernel_available", lambda device, dtype: True)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True, raising=False)
    names = {}

    def pick(x):
        names["compiled"] = mb.resolve_attention(model.config, x.device, torch.bfloat16, 0.0)
        return x + 1

    torch._dynamo.reset()
    torch.compile(pick, backend="eager", fullgraph=True)(torch.zeros(2))
    torch._dynamo.reset()
    assert names["compiled"] == "triton"

    # The whole model: its compiled graph holds the kernel's op (run by Triton's interpreter on CPU) and matches eager
    flash = sys.modules[mb.__name__.rsplit(".", 1)[0] + ".flash_attn_triton"]
    if flash.HAS_TRITON and flash._INTERPRET:
        model = tiny_model("AutoModel", num_attention_heads=2).eval()  # head_dim 16, the kernel's smallest
        mb = package_module(model)
        monkeypatch.setattr(mb, "kernel_available", lambda device, dtype: True)
        ids, mask = ragged_batch([8, 5])
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
            explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
            assert explained.graph_break_count == 0
            assert any("flash_attn_varlen_qkvpacked_fwd" in g.code for g in explained.graphs)
            compiled = torch.compile(model, backend="eager", fullgraph=True)(input_ids=ids, attention_mask=mask)
        torch._dynamo.reset()
        eager = model(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(compiled.last_hidden_state, eager.last_hidden_state)

    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert mb.resolve_attention(model.config, torch.device("cpu"), torch.bfloat16, 0.0) == "dense"


# ------------------------------------------------------------------------------------------------ heads


def test_sequence_classification_matches_reference_and_losses():
    model = tiny_model("AutoModelForSequenceClassification", num_labels=3)
    ids, mask = ragged_batch([5, 9, 2])
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    sd = {k: v for k, v in model.state_dict().items()}
    h = reference_encoder(sd, model.config, ids, mask)
    pooled = torch.tanh(h[:, 0] @ sd["bert.pooler.dense.weight"].double().T + sd["bert.pooler.dense.bias"].double())
    logits = pooled @ sd["classifier.weight"].double().T + sd["classifier.bias"].double()
    assert_close_rel(out.logits, logits)
    torch.testing.assert_close(out.loss.double(), torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2, 1])),
                               rtol=1e-5, atol=1e-6)

    reg = tiny_model("AutoModelForSequenceClassification", num_labels=1)
    out = reg(input_ids=ids, attention_mask=mask, labels=torch.tensor([0.5, 1.0, -1.0]))
    torch.testing.assert_close(out.loss, ((out.logits.squeeze(-1) - torch.tensor([0.5, 1.0, -1.0])) ** 2).mean())

    ml = tiny_model("AutoModelForSequenceClassification", num_labels=3, problem_type="multi_label_classification")
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    out = ml(input_ids=ids, attention_mask=mask, labels=target)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, target))


def test_token_classification_head():
    model = tiny_model("AutoModelForTokenClassification", num_labels=5)
    ids, mask = ragged_batch([6, 3])
    labels = torch.where(mask.bool(), ids % 5, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    sd = model.state_dict()
    h = reference_encoder(sd, model.config, ids, mask)
    logits = h @ sd["classifier.weight"].double().T + sd["classifier.bias"].double()
    valid = mask.bool()
    assert_close_rel(out.logits[valid], logits[valid])
    expected = torch.nn.functional.cross_entropy(logits[valid], labels[valid])
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_question_answering_head():
    model = tiny_model("AutoModelForQuestionAnswering")
    ids, mask = ragged_batch([7, 5])
    start, end = torch.tensor([1, 2]), torch.tensor([3, 4])
    out = model(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end)
    sd = model.state_dict()
    h = reference_encoder(sd, model.config, ids, mask)
    logits = h @ sd["qa_outputs.weight"].double().T + sd["qa_outputs.bias"].double()
    assert_close_rel(out.start_logits, logits[..., 0])
    assert_close_rel(out.end_logits, logits[..., 1])
    ce = torch.nn.functional.cross_entropy
    expected = (ce(logits[..., 0], start) + ce(logits[..., 1], end)) / 2
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_multiple_choice_head():
    model = tiny_model("AutoModelForMultipleChoice")
    ids, mask = ragged_batch([6, 4, 5, 3, 6, 2])
    ids, mask = ids.view(2, 3, 6), mask.view(2, 3, 6)
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([2, 0]))
    assert out.logits.shape == (2, 3)
    sd = model.state_dict()
    h = reference_encoder(sd, model.config, ids.view(6, 6), mask.view(6, 6))
    pooled = torch.tanh(h[:, 0] @ sd["bert.pooler.dense.weight"].double().T + sd["bert.pooler.dense.bias"].double())
    logits = (pooled @ sd["classifier.weight"].double().T + sd["classifier.bias"].double()).view(2, 3)
    assert_close_rel(out.logits, logits)
    with pytest.raises(ValueError, match="num_choices"):
        model(input_ids=ids.view(6, 6))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "make_kwargs, message",
    [
        (lambda ids, m: dict(input_ids=ids[:0]), "empty"),
        (lambda ids, m: dict(input_ids=ids, attention_mask=m[:, :3]), "attention_mask"),
        (lambda ids, m: dict(input_ids=ids + 1000), "outside"),
        (lambda ids, m: dict(input_ids=ids - 1000), "outside"),
        (lambda ids, m: dict(), "exactly one"),
        (lambda ids, m: dict(input_ids=ids, inputs_embeds=torch.zeros(2, 5, 32)), "exactly one"),
        (lambda ids, m: dict(input_ids=ids[0]), "shape"),
        (lambda ids, m: dict(input_ids=ids[None]), "shape"),
        (lambda ids, m: dict(inputs_embeds=torch.zeros(2, 5, 7)), "inputs_embeds"),
        (lambda ids, m: dict(input_ids=ids.float()), "integer"),
        (lambda ids, m: dict(input_ids=ids, token_type_ids=torch.full_like(ids, 2)), "token_type_ids"),
        (lambda ids, m: dict(input_ids=ids, labels=ids[:, :2]), "labels"),
        (lambda ids, m: dict(input_ids=ids, labels=ids + 500), "labels"),
        (lambda ids, m: dict(input_ids=ids[:1], cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32)), "cu_seqlens"),
        (lambda ids, m: dict(input_ids=ids, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "one row"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(make_kwargs, message):
    model = tiny_model()
    ids, mask = ragged_batch([5, 3])
    with pytest.raises(ValueError, match=message):
        model(**make_kwargs(ids, mask))


def test_unexpected_keyword_is_an_error():
    model = tiny_model()
    with pytest.raises(TypeError, match="unexpected"):
        model(input_ids=torch.tensor([[1, 2]]), bogus=1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
        (dict(layer_norm_eps=-1e-5), "layer_norm_eps"),
        (dict(attention_backend="flash"), "attention_backend"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (dict(pad_token_id=500), "pad_token_id"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_heads_not_dividing_hidden_size_is_rejected_when_the_model_is_built():
    # As transformers' BERT: the config accepts it (transformers' ConfigTester builds hidden_size=37 with 12 heads),
    # the model does not.
    config = tiny_config(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="not a multiple"):
        transformers.AutoModel.from_config(config, trust_remote_code=True)


# ------------------------------------------------------------------------------------------------ layout


def test_state_dict_keys_match_upstream_mosaic_bert_base():
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification

    for auto, keys_file, kwargs in (
        (AutoModelForMaskedLM, "keys_mosaic_bert_base.txt", {}),
        (AutoModelForSequenceClassification, "keys_mosaic_bert_base_seqcls.txt", {"num_labels": 2}),
    ):
        expected = {}
        for line in (REPO / "tests" / "data" / keys_file).read_text().splitlines():
            if line and not line.startswith("#"):
                key, shape, _ = line.split("\t")
                expected[key] = tuple(int(x) for x in shape.strip("[]").split(","))
        base = json.loads((REPO / "train" / "configs" / "mosaic-bert-base.json").read_text())
        config = AutoConfig.from_pretrained(str(REPO), trust_remote_code=True, **base, **kwargs)
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=True)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert ours == expected
        if auto is AutoModelForMaskedLM:
            assert sum(p.numel() for p in model.parameters()) == pytest.approx(137.4e6, rel=1e-3)


def test_parameters_initialised_as_documented():
    model = tiny_model(hidden_size=64, num_attention_heads=4, vocab_size=3000, initializer_range=0.02)
    w = model.bert.encoder.layer[0].mlp.gated_layers.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert (model.bert.embeddings.word_embeddings.weight[0] == 0).all()
    assert (model.bert.encoder.layer[0].attention.self.Wqkv.bias == 0).all()
    assert (model.bert.embeddings.LayerNorm.weight == 1).all()
    assert math.isclose(model.cls.predictions.decoder.weight.data_ptr(),
                        model.bert.embeddings.word_embeddings.weight.data_ptr())


# ------------------------------------------------------------------------------------------------ low-precision LN


def test_low_precision_layernorm_runs_in_autocast_dtype_only_under_autocast():
    model = tiny_model(low_precision_layernorm=True)
    plain = tiny_model()
    ids, mask = ragged_batch([7, 4])
    # Outside autocast: identical to the fp32 model.
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits)
    ln = model.bert.encoder.layer[0].mlp.layernorm
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ln(x)
        high = plain.bert.encoder.layer[0].mlp.layernorm(x)
    assert low.dtype == torch.bfloat16 and high.dtype == torch.float32
    # float32 statistics of the input as given, the result rounded once to the autocast dtype
    expected = torch.nn.functional.layer_norm(x.double(), (32,), ln.weight.double(), ln.bias.double(), ln.eps)
    torch.testing.assert_close(low, expected.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask).logits
        ref = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("lengths", [[7, 7, 7], [7, 7, 3, 7, 7], [5, 9, 9, 2, 9], [4, 4, 0, 4]])
def test_plain_attention_over_every_bucket_kind_matches_float64(lengths):
    """Runs of equal full-length sequences are read as views, the rest gathered into padded buckets; either way
    the output and gradients equal per-sequence float64 attention, with a NaN in one sequence kept to itself."""
    mb = package_module(tiny_model())
    heads, head_dim, total = 4, 8, sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    sequences = mb.VarlenSequences(cu, max(lengths))
    sequences.build_buckets()
    kinds = {bucket.valid is None for bucket in sequences.buckets}
    assert kinds == ({True} if len(set(lengths) - {0}) == 1 else {True, False}), sequences.buckets
    slopes = mb.alibi_slopes(heads)
    qkv = torch.randn(total, 3, heads, head_dim, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out, _ = mb.torch_attention(qkv, sequences, slopes)
    qkv64 = qkv.detach().double().requires_grad_()
    expected = varlen_attention(*qkv64.unbind(1), cu, cu, alibi_slopes=slopes.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, atol=1e-5, rtol=1e-5)

    poisoned = qkv.detach().clone()
    poisoned[cu[1] - 1] = float("nan")  # a token of sequence 0
    out, _ = mb.torch_attention(poisoned, sequences, slopes)
    assert out[: cu[1]].isnan().any() and not out[cu[1] :].isnan().any()


class DoubledLinear(torch.nn.Linear):
    """A Linear subclass (as adapters and quantized layers are) whose output is twice the plain one."""

    def forward(self, hidden_states):
        return 2 * super().forward(hidden_states)


@pytest.mark.parametrize("forced_kernels", [False, True])
def test_glu_mlp_honours_a_hooked_or_replaced_gated_linear(monkeypatch, forced_kernels):
    # The MLP hands a plain Linear's weight to the fused GEMM; a forward hook or a replaced module (an adapter, a
    # quantized Linear) or a global module hook must still run. A hook doubling the output equals a doubled weight.
    model = tiny_model("AutoModel")
    mb = package_module(model)
    ops = sys.modules[mb.__name__.rsplit(".", 1)[0] + ".fused_ops"]
    fused_calls = []
    if forced_kernels:
        if not (ops.HAS_TRITON and ops._INTERPRET and ops.TensorDescriptor is not None):
            pytest.skip("forcing the kernels on CPU needs triton's interpreter")
        monkeypatch.setattr(ops, "DEFAULT_USE_TRITON", True)
        launch = ops._gated_linear_gelu_forward
        monkeypatch.setattr(ops, "_gated_linear_gelu_forward", lambda *a: fused_calls.append(1) or launch(*a))
    mlp = model.encoder.layer[0].mlp
    x = torch.randn(7, model.config.hidden_size)
    with torch.no_grad():
        plain = mlp(x)
        assert len(fused_calls) == int(forced_kernels)
        handle = mlp.gated_layers.register_forward_hook(lambda module, args, out: out * 2)
        hooked = mlp(x)
        handle.remove()
        double_gated = lambda module, args, out: out * 2 if module is mlp.gated_layers else None  # noqa: E731
        handle = torch.nn.modules.module.register_module_forward_hook(double_gated)
        try:
            globally_hooked = mlp(x)
        finally:
            handle.remove()
        original = mlp.gated_layers
        mlp.gated_layers = DoubledLinear(original.in_features, original.out_features, bias=False)
        mlp.gated_layers.weight.copy_(original.weight)
        replaced = mlp(x)
        mlp.gated_layers = original
        original.weight.mul_(2)
        doubled = mlp(x)
    assert len(fused_calls) == 2 * int(forced_kernels)
    assert not torch.allclose(plain, doubled)
    torch.testing.assert_close(hooked, doubled)
    torch.testing.assert_close(globally_hooked, doubled)
    torch.testing.assert_close(replaced, doubled)


def test_cpu_forward_reuses_one_gemm_buffer_with_identical_results(monkeypatch):
    # The encoder runs its layers inside reuse_cpu_gemm_output on CPU (no graph recorded): every layer's GLU GEMM
    # writes the same buffer, and the outputs are bit-identical to fresh allocations; training keeps its own.
    import contextlib

    model = tiny_model("AutoModel", num_hidden_layers=3)
    mb = package_module(model)
    ops = sys.modules[mb.__name__.rsplit(".", 1)[0] + ".fused_ops"]
    ids, mask = ragged_batch([9, 4, 7])
    seen = []
    real_scope = mb.reuse_cpu_gemm_output

    @contextlib.contextmanager
    def watched():
        with real_scope():
            yield
            seen.append(dict(ops._CPU_SCRATCH.buffers))

    monkeypatch.setattr(mb, "reuse_cpu_gemm_output", watched)
    with torch.no_grad():
        reused = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(seen) == 1 and set(seen[0]) == {torch.float32}
    assert seen[0][torch.float32].numel() == int(mask.sum()) * 2 * model.config.intermediate_size
    monkeypatch.setattr(mb, "reuse_cpu_gemm_output", contextlib.nullcontext)
    with torch.no_grad():
        fresh = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(reused, fresh, rtol=0, atol=0)
    # with gradients the buffer stays unused, and the result is the same
    monkeypatch.setattr(mb, "reuse_cpu_gemm_output", watched)
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert seen[-1] == {}
    torch.testing.assert_close(out.detach(), fresh, rtol=0, atol=0)


def force_kernels(monkeypatch, mb):
    """The fused Triton kernels on CPU for this test, through triton's interpreter (skips without it)."""
    ops = sys.modules[mb.__name__.rsplit(".", 1)[0] + ".fused_ops"]
    if not (ops.HAS_TRITON and ops._INTERPRET):
        pytest.skip("forcing the kernels on CPU needs triton's interpreter")
    monkeypatch.setattr(ops, "DEFAULT_USE_TRITON", True)


def record_layer_norm_argument(monkeypatch, mb, name):
    """Wraps the modeling module's `add_dropout_layer_norm`: the returned list gets keyword `name` of every call
    (None when not passed), in call order."""
    real = mb.add_dropout_layer_norm
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get(name))
        return real(*args, **kwargs)

    monkeypatch.setattr(mb, "add_dropout_layer_norm", recording)
    return seen


@pytest.mark.parametrize("forced_kernels", [False, True])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "fp16-autocast"])
def test_training_leaves_linear_biases_to_the_layer_norm(monkeypatch, forced_kernels, autocast):
    # In training with the fused kernels available, the attention output's and the MLP's output Linear run without
    # their bias and the LayerNorm after each adds it (and sums its gradient in its own backward): loss and every
    # gradient as with the Linears adding their biases, also with reentrant checkpointing (its forward runs without
    # grad, its recompute with). Not in eval mode, and not with a hook on either module.
    model = tiny_model("AutoModelForMaskedLM", num_hidden_layers=2).train()
    mb = package_module(model)
    ops = sys.modules[mb.__name__.rsplit(".", 1)[0] + ".fused_ops"]
    if not (ops.HAS_TRITON and ops._INTERPRET):
        pytest.skip("the hand-over needs the fused kernels available: triton's interpreter on CPU")
    if forced_kernels:
        monkeypatch.setattr(ops, "DEFAULT_USE_TRITON", True)
    handed = record_layer_norm_argument(monkeypatch, mb, "x_bias")
    ids, mask = ragged_batch([9, 4, 7])
    labels = torch.where(mask.bool(), ids, -100)

    def step():
        model.zero_grad(set_to_none=True)
        handed.clear()
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step()
    layers = model.bert.encoder.layer
    biases = [b for layer in layers for b in (layer.attention.output.dense.bias, layer.mlp.wo.bias)]
    type_row = model.bert.embeddings.token_type_embeddings.weight[0]

    def encoder_calls(handed):  # the embeddings' LayerNorm comes first (the token-type row), the head's last
        assert torch.equal(handed[0], type_row) and handed[0].data_ptr() == type_row.data_ptr()
        assert handed[-1] is None
        return [id(b) for b in handed[1:-1]]

    assert encoder_calls(handed) == [id(b) for b in biases]
    model.eval()  # inference: the Linears add their biases (free in the GEMM)
    handed.clear()
    model(input_ids=ids, attention_mask=mask)
    model.train()
    assert torch.equal(handed[0], type_row) and handed[1:] == [None] * (len(biases) + 1)  # + the head
    handle = layers[0].mlp.layernorm.register_forward_hook(lambda *args: None)
    step()
    handle.remove()
    assert encoder_calls(handed) == [id(biases[0]), id(None)] + [id(b) for b in biases[2:]]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed_loss, checkpointed_grads = step()
    model.gradient_checkpointing_disable()
    # every bias handed over twice: in the checkpoint's no-grad forward and in its recompute
    handed_biases = [id(b) for b in handed if b is not None and b.shape == biases[0].shape and b is not handed[0]]
    assert sorted(handed_biases) == sorted(id(b) for b in biases * 2)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(checkpointed_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)
    monkeypatch.setattr(mb, "fused_kernels_available", lambda tensor: False)
    plain_loss, plain_grads = step()
    assert all(b is None for b in handed[1:])
    # under fp16 autocast the Linear adds its bias in fp16, the LayerNorm in fp32: a rounding apart
    tol = dict(rtol=2e-3, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, plain_loss, **tol)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], **tol, msg=name)


@pytest.mark.parametrize("forced_kernels", [False, True])
@pytest.mark.parametrize("types", ["none", "given"])
def test_embeddings_add_the_token_type_in_the_layer_norm(monkeypatch, forced_kernels, types):
    # The token-type row (no token_type_ids) or rows are added inside the LayerNorm's pass: output and the
    # embedding tables' gradients as LayerNorm(word + type) in float64; bf16 inputs_embeds on an fp32 model still
    # give fp32 (the sum's promotion); a hook on the LayerNorm sees the sum it sees unfused.
    model = tiny_model("AutoModel").train()
    mb = package_module(model)
    if forced_kernels:
        force_kernels(monkeypatch, mb)
    emb = model.embeddings
    with torch.no_grad():
        emb.token_type_embeddings.weight.normal_()  # rows far apart: a dropped or wrong row shows
    ids = torch.randint(1, model.config.vocab_size, (13,))
    type_ids = torch.randint(0, 2, (13,)) if types == "given" else None
    out = emb(input_ids=ids, token_type_ids=type_ids)
    grad = torch.randn_like(out)
    out.backward(grad)

    word = emb.word_embeddings.weight.detach().double().requires_grad_(True)
    table = emb.token_type_embeddings.weight.detach().double().requires_grad_(True)
    typed = table[torch.zeros_like(ids) if type_ids is None else type_ids]
    ln = emb.LayerNorm
    ref = torch.nn.functional.layer_norm(word[ids] + typed, ln.weight.shape, ln.weight.double(), ln.bias.double(),
                                         ln.eps)
    ref.backward(grad.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb.token_type_embeddings.weight.grad.double(), table.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(emb.word_embeddings.weight.grad.double(), word.grad, rtol=1e-4, atol=1e-5)
    if type_ids is None:
        assert emb.token_type_embeddings.weight.grad[1].abs().max() == 0

    with torch.no_grad():  # bf16 inputs_embeds onto fp32 tables: the fp32 sum, as unfused
        low = emb.word_embeddings(ids).bfloat16()
        mixed = emb(inputs_embeds=low, token_type_ids=type_ids)
        assert mixed.dtype == torch.float32
        torch.testing.assert_close(mixed, ln(low.float() + typed.float()), rtol=1e-5, atol=1e-5)
        seen = []
        handle = ln.register_forward_hook(lambda module, args, output: seen.append(args))
        hooked = emb(input_ids=ids, token_type_ids=type_ids)
        handle.remove()
        assert len(seen) == 1 and len(seen[0]) == 1  # one input: the sum
        torch.testing.assert_close(seen[0][0].double(), (word[ids] + typed).detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(hooked.double(), ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("forced_kernels", [False, True])
def test_autocast_layer_norm_copies_feed_the_next_gemm(monkeypatch, forced_kernels):
    # Under autocast with fp32 LayerNorm outputs, each LayerNorm whose output a plain Linear reads next also writes
    # the autocast-dtype copy (one pass) and that Linear reads it: loss and every gradient as with autocast casting
    # the fp32 output itself, and the same fp32 hidden states. Kernels forced on CPU through triton's interpreter
    # (fp16: the interpreter rounds fp32 -> bf16 toward zero); with output_hidden_states no copies are made.
    model = tiny_model("AutoModelForMaskedLM", num_hidden_layers=3).train()
    mb = package_module(model)
    if forced_kernels:
        force_kernels(monkeypatch, mb)
    # the Linears keep their biases (test_training_leaves_linear_biases_to_the_layer_norm covers handing them over)
    monkeypatch.setattr(mb, "fused_kernels_available", lambda tensor: False)
    copies = record_layer_norm_argument(monkeypatch, mb, "copy_dtype")
    ids, mask = ragged_batch([9, 4, 7])
    labels = torch.where(mask.bool(), ids, -100)

    def step(**kwargs):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with_copies, grads = step()
    # 3 layers: both LayerNorms of layers 1-2 and the attention one of layer 3 make a copy; not the embeddings'
    # (its output goes through dropout first), the last layer's or the MLM head's
    half = torch.float16
    assert copies == [None, half, half, half, half, half, None, None]
    copies.clear()
    hidden_run, _ = step(output_hidden_states=True)
    assert copies == [None, half, None, half, None, half, None, None]
    # a forward hook on a module whose output would get a copy sees that output alone, and that copy is not made
    seen = []
    layer = model.bert.encoder.layer[0]
    hooked = (layer.attention, layer.attention.output, layer.attention.output.LayerNorm, layer.mlp,
              layer.mlp.layernorm)
    handles = [m.register_forward_hook(lambda m, args, out: seen.append(type(out))) for m in hooked]
    copies.clear()
    hooked_run, hooked_grads = step()
    for handle in handles:
        handle.remove()
    # in the order the modules finish: LayerNorm, attention output, attention ((output, probs)), LayerNorm, MLP
    assert seen == [torch.Tensor, torch.Tensor, tuple, torch.Tensor, torch.Tensor]
    assert copies == [None, None, None, half, half, half, None, None]
    torch.testing.assert_close(hooked_run.loss, with_copies.loss, rtol=0, atol=0)
    for reentrant in (True, False):  # the copy is a layer input like the hidden states: recomputed, not lost
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        checkpointed, checkpointed_grads = step()
        model.gradient_checkpointing_disable()
        torch.testing.assert_close(checkpointed.loss, with_copies.loss, rtol=0, atol=0)
        for name in grads:
            torch.testing.assert_close(checkpointed_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)
    monkeypatch.setattr(mb, "_plain_linear", lambda linear: False)
    copies.clear()
    cast, cast_grads = step()
    assert all(c is None for c in copies)
    torch.testing.assert_close(with_copies.loss, cast.loss, rtol=0, atol=0)
    torch.testing.assert_close(hidden_run.loss, cast.loss, rtol=0, atol=0)
    assert grads.keys() == cast_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], cast_grads[name], rtol=1e-6, atol=1e-7, msg=name)


LINEARS = ("attention.self.Wqkv", "attention.output.dense", "mlp.gated_layers", "mlp.wo")


@pytest.mark.parametrize("kind", ["full backward", "backward pre", "global full backward", "instance forward"])
@pytest.mark.parametrize("mode", ["train", "eval", "train, kernels"])
def test_every_linear_of_a_layer_runs_its_hooks(monkeypatch, kind, mode):
    # The encoder runs a plain Linear as F.linear on its parameters (in training with the kernels, the attention
    # output's and wo without their bias, which the LayerNorm adds); one with hooks of any kind (or a forward set on
    # the instance, as accelerate's offloading does) must be called as a module, so that its hooks see it.
    model = tiny_model("AutoModelForMaskedLM", num_hidden_layers=2)
    if mode == "train, kernels":
        force_kernels(monkeypatch, package_module(model))
    model.train(mode.startswith("train"))
    ids, mask = ragged_batch([5, 9], vocab=model.config.vocab_size)
    layer = model.bert.encoder.layer[1]
    modules = {name: layer.get_submodule(name) for name in LINEARS}
    seen, handles = [], []
    for name, module in modules.items():
        if kind == "full backward":
            handles.append(module.register_full_backward_hook(lambda m, gi, go, name=name: seen.append(name)))
        elif kind == "backward pre":
            handles.append(module.register_full_backward_pre_hook(lambda m, go, name=name: seen.append(name)))
        elif kind == "instance forward":
            def forward(x, module=module, name=name):
                seen.append(name)
                return torch.nn.Linear.forward(module, x)

            module.forward = forward
    if kind == "global full backward":
        names = {module: name for name, module in modules.items()}
        handles.append(torch.nn.modules.module.register_module_full_backward_hook(
            lambda m, gi, go: seen.append(names[m]) if m in names else None))
    try:
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        if "backward" in kind:
            out.loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(seen) == sorted(LINEARS), seen
