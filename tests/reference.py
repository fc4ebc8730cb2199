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


def alibi_bias(slopes, len_q, len_k):
    """The ALiBi bias of one sequence, (h, len_q, len_k) in slopes' dtype: -slope * |i + len_k - len_q - j|.

    For self-attention that is -slope * |i - j|; with different lengths the queries align to the end of the
    keys (flash-attn's bottom-right convention).
    """
    i = torch.arange(len_q, device=slopes.device)[:, None] + (len_k - len_q)
    j = torch.arange(len_k, device=slopes.device)[None, :]
    return -slopes[:, None, None] * (i - j).abs().to(slopes.dtype)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes=None, causal=False, softmax_scale=None,
                     compute_dtype=torch.float64):
    """Dense attention per packed sequence in `compute_dtype` (float64 unless asked):
    softmax(q k^T * scale + alibi_bias) v, with keys after i + len_k - len_q masked when causal.

    q: (t_q, h, d), k/v: (t_k, h, d); cu_seqlens_q/k: (b + 1,); alibi_slopes: None, (h,) or (b, h).
    A sequence without keys outputs zeros. Returns (t_q, h, d) in compute_dtype; differentiable.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for b in range(len(cq) - 1):
        qs, ks, vs = (x.to(compute_dtype) for x in (q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]]))
        len_q, len_k = qs.shape[0], ks.shape[0]
        if len_k == 0:
            outs.append(torch.zeros_like(qs))
            continue
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * scale  # (h, len_q, len_k)
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            scores = scores + alibi_bias(slopes.to(compute_dtype), len_q, len_k)
        if causal:
            i = torch.arange(len_q, device=q.device)[:, None] + (len_k - len_q)
            j = torch.arange(len_k, device=q.device)[None, :]
            scores = scores.masked_fill(j > i, float("-inf"))
        outs.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), vs))
    return torch.cat(outs)


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
    alibi = alibi_bias(torch.tensor(closed_form_slopes(heads), dtype=torch.float64), s, s)  # (h, s, s)
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
