"""sentence-transformers loads this folder (modules.json, sentence_bert_config.json, 1_Pooling/) with mean pooling."""

import json
import shutil

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from conftest import CODE_FILES, REPO, TOKENIZER_FILES, tiny_model

pytest.importorskip("sentence_transformers")

ST_FILES = ["modules.json", "sentence_bert_config.json", "1_Pooling/config.json"]
CODE_AND_TOKENIZER = CODE_FILES + TOKENIZER_FILES
TEXTS = ["The cat sat on the mat.", "A much longer second sentence, so that the first one is padded.", "Hi."]


def test_shipped_files_describe_mean_pooling_over_the_encoder():
    modules = json.loads((REPO / "modules.json").read_text())
    kinds = [(m["path"], m["type"].rsplit(".", 1)[-1]) for m in modules]
    assert kinds == [("", "Transformer"), ("1_Pooling", "Pooling")]
    pooling = json.loads((REPO / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True
    assert not any(v for k, v in pooling.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens")
    assert pooling["word_embedding_dimension"] == json.loads((REPO / "config.json").read_text())["hidden_size"]
    # ALiBi runs past the training length (alibi_starting_size); the tokenizer's limit is max_position_embeddings.
    st_config = json.loads((REPO / "sentence_bert_config.json").read_text())
    assert st_config["max_seq_length"] <= json.loads((REPO / "config.json").read_text())["max_position_embeddings"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """This folder as shipped, with a tiny random encoder standing in for the weights."""
    folder = tmp_path_factory.mktemp("st")
    for f in CODE_AND_TOKENIZER + ST_FILES:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / f, folder / f)
    model = tiny_model("AutoModel", vocab_size=30528)
    model.save_pretrained(folder)
    # The stand-in is 32 wide, not 768: the pooling module's declared width follows the weights.
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = model.config.hidden_size
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


def manual_mean_pooling(folder, texts):
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (b, s, hidden)
    mask = batch["attention_mask"][..., None].float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("batch_size", [1, 32])
def test_sentence_transformer_embeddings_are_mean_pooled_encoder_outputs(folder, batch_size):
    from sentence_transformers import SentenceTransformer

    embedder = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    assert type(embedder[0].auto_model).__name__ == "BertModel"
    embeddings = embedder.encode(TEXTS, batch_size=batch_size, convert_to_tensor=True)
    assert embeddings.shape == (len(TEXTS), 32)
    torch.testing.assert_close(embeddings, manual_mean_pooling(folder, TEXTS), rtol=1e-5, atol=1e-5)


def test_shipped_model_loads_as_sentence_transformer():
    """This folder itself, with the weights it ships."""
    from sentence_transformers import SentenceTransformer

    if not list(REPO.glob("*.safetensors")):
        pytest.skip("this folder ships no weights")
    embedder = SentenceTransformer(str(REPO), trust_remote_code=True, device="cpu")
    hidden = json.loads((REPO / "config.json").read_text())["hidden_size"]
    embeddings = embedder.encode(TEXTS, convert_to_tensor=True)
    assert embeddings.shape == (len(TEXTS), hidden)
    torch.testing.assert_close(embeddings, manual_mean_pooling(REPO, TEXTS), rtol=1e-5, atol=1e-5)
