"""Inputs that used to give a wrong number with no error: each now gives the right answer or a clear error."""

from pathlib import Path

import pytest
import torch
import transformers

from conftest import REPO, package_module, ragged_batch, tiny_config, tiny_model

HEADS = ["AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
         "AutoModelForTokenClassification", "AutoModelForQuestionAnswering"]


def alone(model, ids, **kwargs):
    """The model on one unpadded sequence."""
    return model(input_ids=ids[None], **kwargs)


# ------------------------------------------------------------------------------------------------ NaN isolation


@pytest.mark.parametrize("output_attentions", [False, True])  # plain (bucketed) path and dense path
def test_nan_in_one_sequence_stays_in_that_sequence(output_attentions):
    model = tiny_model("AutoModel")
    ids, mask = ragged_batch([6, 3, 5], seed=3)
    embeds = model.get_input_embeddings()(ids).detach()
    embeds[0, 2, 5] = float("nan")
    out = model(inputs_embeds=embeds, attention_mask=mask, output_attentions=output_attentions).last_hidden_state
    assert torch.isnan(out[0, :6]).any()
    for row, n in ((1, 3), (2, 5)):
        expected = model(inputs_embeds=embeds[row : row + 1, :n]).last_hidden_state[0]
        torch.testing.assert_close(out[row, :n], expected, rtol=1e-5, atol=1e-6)
        assert (out[row, n:] == 0).all()


def test_nan_at_a_padded_position_changes_nothing():
    model = tiny_model("AutoModel")
    ids, mask = ragged_batch([6, 3], seed=4)
    embeds = model.get_input_embeddings()(ids).detach()
    clean = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    embeds[1, 4] = float("nan")  # padding of row 1
    for output_attentions in (False, True):
        out = model(inputs_embeds=embeds, attention_mask=mask, output_attentions=output_attentions)
        torch.testing.assert_close(out.last_hidden_state, clean, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ empty batch


@pytest.mark.parametrize("auto_class", HEADS + ["AutoModelForMultipleChoice"])
@pytest.mark.parametrize("output_attentions", [False, True])
def test_batch_of_only_padding_is_a_value_error_on_every_head(auto_class, output_attentions):
    model = tiny_model(auto_class)
    ids = torch.randint(1, 99, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.long)
    if auto_class == "AutoModelForMultipleChoice":
        ids, mask = ids[None], mask[None]
    with pytest.raises(ValueError, match="all zeros"):
        model(input_ids=ids, attention_mask=mask, output_attentions=output_attentions)


# ------------------------------------------------------------------------------------------------ pooler


@pytest.mark.parametrize("auto_class", ["AutoModel", "AutoModelForSequenceClassification"])
def test_pooler_reads_the_first_valid_token_with_left_padding(auto_class):
    model = tiny_model(auto_class, num_labels=3)
    ids = torch.randint(1, 99, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    out = model(input_ids=ids * mask, attention_mask=mask)
    key = "pooler_output" if auto_class == "AutoModel" else "logits"
    torch.testing.assert_close(out[key][0], alone(model, ids[0, 3:])[key][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[key][1], alone(model, ids[1])[key][0], rtol=1e-5, atol=1e-6)


def test_multiple_choice_pools_left_padded_choices_like_unpadded_ones():
    model = tiny_model("AutoModelForMultipleChoice")
    ids = torch.randint(1, 99, (1, 2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[[0, 0, 1, 1, 1, 1], [1] * 6]])
    logits = model(input_ids=ids * mask, attention_mask=mask).logits
    right = torch.stack([torch.cat([ids[0, 0, 2:], ids[0, 0, :2] * 0]), ids[0, 1]])[None]
    right_mask = torch.tensor([[[1, 1, 1, 1, 0, 0], [1] * 6]])
    torch.testing.assert_close(logits, model(input_ids=right, attention_mask=right_mask).logits, rtol=1e-5, atol=1e-6)


def test_shipped_folder_has_pooler_weights_and_two_loads_agree():
    from safetensors import safe_open

    index = (REPO / "model.safetensors.index.json").read_text()
    assert "bert.pooler.dense.weight" in index and "bert.pooler.dense.bias" in index
    outputs = []
    for _ in range(2):
        torch.manual_seed(len(outputs))  # a different random state each time: nothing may depend on it
        model = transformers.AutoModel.from_pretrained(str(REPO), trust_remote_code=True).eval()
        outputs.append(model(input_ids=torch.tensor([[101, 2023, 2003, 102]])).pooler_output)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    with safe_open(str(REPO / "model-00002-of-00002.safetensors"), "pt") as f:
        weight = f.get_tensor("bert.pooler.dense.weight").float()
    torch.testing.assert_close(model.pooler.dense.weight, weight)


def test_masked_lm_load_does_not_warn_about_the_shipped_pooler(caplog):
    with caplog.at_level("WARNING"):
        transformers.AutoModelForMaskedLM.from_pretrained(str(REPO), trust_remote_code=True)
    assert "pooler" not in caplog.text


# ------------------------------------------------------------------------------------------------ packed rows


def test_packed_rows_give_one_classification_result_per_document():
    model = tiny_model("AutoModelForSequenceClassification", num_labels=3)
    lengths = [4, 2, 5]
    ids, mask = ragged_batch(lengths, seed=6)
    expected = model(input_ids=ids, attention_mask=mask).logits  # (3, 3): one row per sequence
    packed = ids[mask.bool()][None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    by_positions = model(input_ids=packed, position_ids=positions).logits
    by_cu = model(input_ids=packed, cu_seqlens=torch.tensor([0, 4, 6, 11])).logits
    torch.testing.assert_close(by_positions, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(by_cu, expected, rtol=1e-5, atol=1e-6)
    labels = torch.tensor([0, 2, 1])
    loss = model(input_ids=packed, position_ids=positions, labels=labels).loss
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(expected, labels))
    with pytest.raises(ValueError, match="per document"):
        model(input_ids=packed, position_ids=positions, labels=torch.tensor([1]))


def test_packed_position_ids_are_refused_by_multiple_choice():
    model = tiny_model("AutoModelForMultipleChoice")
    ids = torch.randint(1, 99, (1, 2, 6))
    positions = torch.tensor([[[0, 1, 2, 0, 1, 2]] * 2])
    with pytest.raises(ValueError, match="packed"):
        model(input_ids=ids, position_ids=positions)


# ------------------------------------------------------------------------------------------------ max_seqlen


def test_max_seqlen_below_the_longest_document_is_an_error():
    model = tiny_model()
    ids = torch.randint(1, 99, (1, 9))
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen=4 is below the longest sequence \\(6\\)"):
        model(input_ids=ids, cu_seqlens=cu, max_seqlen=4)
    torch.testing.assert_close(model(input_ids=ids, cu_seqlens=cu, max_seqlen=6).logits,
                               model(input_ids=ids, cu_seqlens=cu).logits)


# ------------------------------------------------------------------------------------------------ masks, labels


@pytest.mark.parametrize("bad", [-10000.0, 2, -1])
def test_attention_mask_other_than_zero_one_is_an_error(bad):
    model = tiny_model()
    ids, mask = ragged_batch([4, 2])
    additive = torch.where(mask.bool(), 0.0, float(bad))
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=ids, attention_mask=additive)


def test_bool_and_float_zero_one_masks_are_the_same_mask():
    model = tiny_model()
    ids, mask = ragged_batch([4, 2])
    ref = model(input_ids=ids, attention_mask=mask).logits
    for m in (mask.bool(), mask.float(), mask.to(torch.int8)):
        torch.testing.assert_close(model(input_ids=ids, attention_mask=m).logits, ref)


@pytest.mark.parametrize("auto_class, labels", [
    ("AutoModelForTokenClassification", lambda ids: torch.full_like(ids, 7)),
    ("AutoModelForTokenClassification", lambda ids: torch.full_like(ids, -5)),
    ("AutoModelForSequenceClassification", lambda ids: torch.tensor([0, 3])),
    ("AutoModelForMaskedLM", lambda ids: torch.full_like(ids, 99)),
])
def test_out_of_range_labels_are_a_value_error_naming_the_value(auto_class, labels):
    model = tiny_model(auto_class, num_labels=3)
    ids, mask = ragged_batch([4, 2])
    with pytest.raises(ValueError, match="`labels` contains"):
        model(input_ids=ids, attention_mask=mask, labels=labels(ids))


def test_labels_at_padding_and_ignore_index_are_not_checked():
    model = tiny_model("AutoModelForTokenClassification", num_labels=3)
    ids, mask = ragged_batch([4, 2])
    labels = torch.where(mask.bool(), 1, -100)
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


# ------------------------------------------------------------------------------------------------ habits


def test_flash_attention_kwargs_of_data_collator_with_flattening_are_packed_input():
    from transformers import DataCollatorWithFlattening

    model = tiny_model()
    feats = [{"input_ids": [2, 5, 7]}, {"input_ids": [9, 4]}, {"input_ids": [3, 3, 8, 1]}]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(feats)
    assert "cu_seq_lens_q" in batch and "seq_idx" in batch
    batch.pop("labels")  # the collator copies input_ids into labels; without them every logit is returned
    out = model(**batch).logits[0]
    for start, f in zip((0, 3, 5), feats):
        expected = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
        torch.testing.assert_close(out[start : start + len(f["input_ids"])], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cu_seq_lens_k"):
        model(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"],
              cu_seq_lens_k=torch.tensor([0, 9], dtype=torch.int32))


@pytest.mark.parametrize("attn_implementation, backend", [("sdpa", "torch"), ("flash_attention_2", "triton"),
                                                          ("eager", "auto")])
def test_attn_implementation_maps_to_attention_backend(tmp_path, attn_implementation, backend):
    model = transformers.AutoModelForMaskedLM.from_pretrained(
        str(REPO), trust_remote_code=True, attn_implementation=attn_implementation
    )
    assert model.config.attention_backend == backend
    assert model.bert.config.attention_backend == backend


def test_unknown_attn_implementation_names_attention_backend():
    with pytest.raises(ValueError, match="attention_backend"):
        transformers.AutoModelForMaskedLM.from_pretrained(
            str(REPO), trust_remote_code=True, attn_implementation="flex_attention"
        )


def test_config_like_transformers_bert_tester_builds_it():
    # transformers' BERT ConfigTester: hidden_size=37 with the default 12 heads is a valid config...
    config = tiny_config(hidden_size=37, num_attention_heads=12)
    assert config.hidden_size == 37
    # ...that no model can be built from.
    with pytest.raises(ValueError, match="not a multiple"):
        transformers.AutoModel.from_config(config, trust_remote_code=True)


def test_fused_triton_path_matches_plain_ops_in_the_model(monkeypatch):
    """The model with the fused Triton kernels (interpreter on CPU) against the same model on plain PyTorch ops."""
    model = tiny_model()
    fused_ops = package_module(model, "fused_ops")
    if not fused_ops.HAS_TRITON or not fused_ops.fused_kernels_available(torch.zeros(1)):
        pytest.skip("triton (or its interpreter) is not available")
    ids, mask = ragged_batch([5, 3], seed=8)
    labels = torch.where(mask.bool(), ids, -100)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    monkeypatch.setattr(fused_ops, "DEFAULT_USE_TRITON", True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_readme_states_each_behaviour():
    text = Path(REPO / "README.md").read_text()
    for phrase in ("all zeros", "first valid token", "per document", "0/1", "attn_implementation",
                   "pooler is not trained"):
        assert phrase in text, phrase
