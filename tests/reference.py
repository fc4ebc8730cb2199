"""An independent, padded, float64 MosaicBERT written for the tests: dense ALiBi + padding mask, no unpadding.

It reads a state dict with the upstream key names, so it also pins the checkpoint layout.
"""

import math

import torch


def closed_form_slopes(n):
    """ALiBi slopes written out from the paper's recipe (kept independent of the package's implementation)."""
    p = 1
    while p * 2 <= n:
        p *= 2
    slopes = [2.0 ** (-8.0 * (k + 1) / p) for k in range(p)]
    extra = [2.0 ** (-8.0 * (k + 1) / (2 * p)) for k in range(0, 2 * p, 2)]
    return slopes + extra[: n - p]


def _ln(x, sd, prefix, eps):
    return torch.nn.functional.layer_norm(
        x, x.shape[-1:], sd[prefix + ".weight"].double(), sd[prefix + ".bias"].double(), eps
    )


def _lin(x, sd, prefix, bias=True):
    y = x @ sd[prefix + ".weight"].double().T
    return y + sd[prefix + ".bias"].double() if bias else y


def reference_encoder(sd, cfg, input_ids, attention_mask=None, token_type_ids=None, return_probs=False):
    """Padded forward in float64. Positions are 0..s-1 in each row (right padding).

    Returns the last hidden state (b, s, hidden) (zeros at padding), all hidden states, and the attention
    probabilities per layer (b, h, s, s) when asked.
    """
    b, s = input_ids.shape
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    d = hidden // heads
    eps = cfg.layer_norm_eps
    if attention_mask is None:
        attention_mask = torch.ones(b, s, dtype=torch.long)
    if token_type_ids is None:
        token_type_ids = torch.zeros(b, s, dtype=torch.long)
    valid = attention_mask.bool()
    x = sd["bert.embeddings.word_embeddings.weight"].double()[input_ids]
    x = x + sd["bert.embeddings.token_type_embeddings.weight"].double()[token_type_ids]
    x = _ln(x, sd, "bert.embeddings.LayerNorm", eps)
    slopes = torch.tensor(closed_form_slopes(heads), dtype=torch.float64)
    pos = torch.arange(s)
    alibi = -slopes[:, None, None] * (pos[None, :, None] - pos[None, None, :]).abs().double()  # (h, s, s)
    mask = torch.zeros(b, 1, 1, s, dtype=torch.float64).masked_fill(~valid[:, None, None, :], -1e30)
    all_hidden, all_probs = [x * valid[..., None]], []
    for i in range(cfg.num_hidden_layers):
        p = f"bert.encoder.layer.{i}."
        qkv = _lin(x, sd, p + "attention.self.Wqkv").view(b, s, 3, heads, d)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (b, h, s, d)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + alibi[None] + mask
        probs = torch.softmax(scores, dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, s, hidden)
        x = _ln(_lin(ctx, sd, p + "attention.output.dense") + x, sd, p + "attention.output.LayerNorm", eps)
        h = _lin(x, sd, p + "mlp.gated_layers", bias=False)
        inter = h.shape[-1] // 2
        h = torch.nn.functional.gelu(h[..., :inter]) * h[..., inter:]
        x = _ln(_lin(h, sd, p + "mlp.wo") + x, sd, p + "mlp.layernorm", eps)
        all_hidden.append(x * valid[..., None])
        all_probs.append(probs * valid[:, None, :, None])
    out = x * valid[..., None]
    if return_probs:
        return out, all_hidden, all_probs
    return out


def reference_mlm_logits(sd, cfg, hidden):
    """MLM head in float64: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings."""
    h = _lin(hidden, sd, "cls.predictions.transform.dense")
    h = torch.nn.functional.gelu(h)
    h = _ln(h, sd, "cls.predictions.transform.LayerNorm", cfg.layer_norm_eps)
    weight = sd.get("cls.predictions.decoder.weight", sd["bert.embeddings.word_embeddings.weight"])
    return h @ weight.double().T + sd["cls.predictions.decoder.bias"].double()
