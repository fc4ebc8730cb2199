"""The checkpoint shipped in this folder (mosaic-bert-mini, pretrained on the project corpus) fills masks sensibly.

The probes were written for this test; none of their sentences occurs in the pretraining corpus (checked with a
case-insensitive search of the training shards for each probe's answer phrase).
"""

import json

import pytest
import torch
import transformers

from conftest import REPO

PROBES = {
    "she poured a cup of [MASK] and read the newspaper.": {"tea", "coffee", "milk", "water", "wine", "cocoa"},
    "he opened the [MASK] and walked into the room.": {"door", "gate", "window", "doors"},
    "he wrote a long [MASK] to his aunt.": {"letter", "note", "poem", "message", "telegram", "card"},
    "she quietly [MASK] the window behind her.": {"closed", "shut", "opened", "locked", "pushed", "drew"},
    "the old man [MASK] his coffee slowly.": {"drank", "sipped", "stirred", "drinks", "sips", "poured", "finished"},
    "paris is the capital of [MASK].": {"france"},
    "the president of the united [MASK] gave a speech.": {"states", "nations", "kingdom"},
    "my [MASK] is john smith.": {"name"},
}


@pytest.fixture(scope="module")
def fill_mask():
    if not (REPO / "model.safetensors.index.json").exists():
        pytest.skip("no checkpoint shipped in this folder")
    return transformers.pipeline("fill-mask", model=str(REPO), trust_remote_code=True)


def test_shipped_checkpoint_is_the_documented_model(fill_mask):
    model = fill_mask.model
    config = json.loads((REPO / "config.json").read_text())
    assert model.dtype == torch.float32  # stored in bf16 to keep the folder small, loaded as fp32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(12.1e6, rel=0.01)
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (256, 4, 4)
    index = json.loads((REPO / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert all((REPO / s).stat().st_size <= 16 * 2**20 for s in shards)


@pytest.mark.parametrize("probe", list(PROBES))
def test_plausible_token_in_top5(fill_mask, probe):
    top5 = [r["token_str"] for r in fill_mask(probe, top_k=5)]
    assert set(top5) & PROBES[probe], (probe, top5)


def test_mlm_accuracy_on_held_out_sentences_beats_unigram_guessing(fill_mask):
    """Mask every content word of a few held-out sentences: the model must get a fair share right."""
    tok, model = fill_mask.tokenizer, fill_mask.model
    sentences = [
        "the little girl ran across the garden to meet her grandmother.",
        "after the storm the fishermen pulled their boats onto the beach.",
        "he put the book back on the shelf and turned off the lamp.",
    ]
    correct = total = 0
    for text in sentences:
        ids = tok(text, return_tensors="pt")["input_ids"]
        for pos in range(1, ids.shape[1] - 1):
            masked = ids.clone()
            masked[0, pos] = tok.mask_token_id
            with torch.no_grad():
                pred = model(input_ids=masked).logits[0, pos].argmax().item()
            correct += int(pred == ids[0, pos].item())
            total += 1
    assert correct / total > 0.3, (correct, total)
