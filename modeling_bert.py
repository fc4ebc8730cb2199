"""MosaicBERT: BERT with ALiBi attention, a gated-GELU MLP and unpadded tokens end to end.

Axes used in shape comments:
    b batch, s padded sequence length, t total valid tokens, n sequences (documents), h heads, d head dim,
    m masked (labelled) tokens, v vocabulary, c choices.

The encoder gathers the valid tokens once (`bert_padding.unpad_input`), runs every Linear, LayerNorm, MLP and
attention on `(total_tokens, hidden)`, and pads back once at the end. Attention sees the batch as
`cu_seqlens` / `max_seqlen` (flash-attn's varlen vocabulary); `varlen_attention` is the one place that picks
the implementation.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import __version__ as transformers_version
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import logging

from .bert_padding import cu_seqlens_from_lengths, index_first_axis, index_put_first_axis
from .configuration_bert import BertConfig
from .flash_attn_triton import HAS_TRITON, flash_attn_varlen_qkvpacked_func

try:  # transformers >= 5: init functions that leave loaded weights alone
    from transformers import initialization as init
except ImportError:  # transformers 4.x
    from torch.nn import init

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # transformers < 4.52
    GradientCheckpointingLayer = nn.Module

TRANSFORMERS_V4 = int(transformers_version.split(".")[0]) < 5

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
# Elements of one (sequences, heads, L, L) score block in the plain attention path before it is split.
_PLAIN_ATTENTION_CHUNK = 1 << 26


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The standard ALiBi slopes, (h,) float32.

    For a power of two n: 2^(-8/n), 2^(-16/n), ... Otherwise the slopes of the largest power of two p below n,
    followed by the first n - p of the even-indexed slopes of 2p heads.
    """

    def power_of_two_slopes(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (k + 1) for k in range(n)]

    p = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(p)
    if p < num_heads:
        slopes += power_of_two_slopes(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Attention over unpadded tokens


@dataclass
class VarlenBatch:
    """The sequences of a batch as offsets into the unpadded token axis, shared by every layer of one forward.

    `cu_seqlens` (n + 1,) int32 and `max_seqlen` describe the sequences. The plain attention path groups
    sequences of similar length into buckets, built on first use and reused by every layer.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    _buckets: list = field(default=None, repr=False)
    _bias: dict = field(default_factory=dict, repr=False)

    def buckets(self):
        """Groups of sequences whose lengths lie within 20% of the group's longest: [(seq ids, length), ...]."""
        if self._buckets is None:
            seqlens = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()
            order = sorted((i for i, n in enumerate(seqlens) if n > 0), key=lambda i: -seqlens[i])
            groups = []
            for i in order:
                if groups and seqlens[i] >= 0.8 * groups[-1][1]:
                    groups[-1][0].append(i)
                else:
                    groups.append(([i], seqlens[i]))
            self._buckets = []
            device = self.cu_seqlens.device
            cu = self.cu_seqlens.long()
            for ids, length in groups:
                # Split so one block of scores stays bounded (the plain path materializes it).
                per_chunk = max(1, _PLAIN_ATTENTION_CHUNK // (length * length * 16))
                for k in range(0, len(ids), per_chunk):
                    chunk = torch.tensor(ids[k : k + per_chunk], device=device)
                    starts, lengths = cu[chunk], cu[chunk + 1] - cu[chunk]
                    offsets = torch.arange(length, device=device)
                    valid = offsets[None, :] < lengths[:, None]  # (n, L)
                    token_index = torch.where(valid, starts[:, None] + offsets[None, :], 0)  # (n, L)
                    self._buckets.append((chunk, length, token_index, valid))
        return self._buckets

    def bias(self, bucket_id, slopes, dtype):
        """ALiBi plus key padding for one bucket, (n, h, L, L) in `dtype`, cached across layers."""
        key = (bucket_id, dtype)
        if key not in self._bias:
            _, length, _, valid = self._buckets[bucket_id]
            pos = torch.arange(length, device=slopes.device)
            distance = (pos[None, :] - pos[:, None]).abs().to(torch.float32)  # (L, L)
            alibi = -slopes.float()[:, None, None] * distance  # (h, L, L)
            pad = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
            pad.masked_fill_(~valid, float("-inf"))
            self._bias[key] = (alibi[None] + pad[:, None, None, :]).to(dtype)
        return self._bias[key]


def torch_varlen_attention(qkv, batch: VarlenBatch, slopes, dropout_p=0.0):
    """Reference attention in plain PyTorch, one SDPA call per bucket of similar lengths.

    Args:
        qkv: (t, 3, h, d).
        batch: the sequences.
        slopes: (h,) float32 ALiBi slopes.
    Returns:
        context (t, h, d) in qkv's dtype.
    Half-precision inputs are computed in float32 (the ALiBi bias of distant tokens does not fit fp16/bf16
    resolution) and cast back.
    """
    total, _, heads, head_dim = qkv.shape
    compute_dtype = torch.float32 if qkv.dtype in (torch.float16, torch.bfloat16) else qkv.dtype
    values, token_ids = [], []
    for bucket_id, (seq_ids, length, token_index, valid) in enumerate(batch.buckets()):
        n = seq_ids.numel()
        x = qkv.index_select(0, token_index.flatten()).view(n, length, 3, heads, head_dim).to(compute_dtype)
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)  # each (n, h, L, d)
        bias = batch.bias(bucket_id, slopes, compute_dtype)  # (n, h, L, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        out = out.transpose(1, 2)  # (n, L, h, d)
        values.append(out[valid])
        token_ids.append(token_index[valid])
    return index_put_first_axis(torch.cat(values), torch.cat(token_ids), total).to(qkv.dtype)


@dataclass
class DenseBatch:
    """The sequences of a batch in the padded (b, s) layout, for the dense path (the alternative to VarlenBatch).

    `valid` (b, s) bool marks real tokens; `seq_id` (b, s) numbers the sequences within each row (a row may hold
    several packed documents); `rank` (b, s) counts the valid tokens of the row before each token, so within one
    sequence |rank_i - rank_j| is the ALiBi distance. Everything is a tensor: the dense path never syncs the host.
    """

    valid: torch.Tensor
    seq_id: torch.Tensor
    rank: torch.Tensor
    _bias: dict = field(default_factory=dict, repr=False)

    def bias(self, slopes, dtype):
        """(b, h, s, s) in `dtype`: ALiBi between tokens of one sequence, float32's lowest value elsewhere (keys
        that are padding or in another document). Finite, so a row with no valid key cannot produce NaN."""
        if dtype not in self._bias:
            distance = (self.rank[:, None, :] - self.rank[:, :, None]).abs().to(torch.float32)  # (b, s, s)
            alibi = -slopes.float()[None, :, None, None] * distance[:, None]  # (b, h, s, s)
            visible = self.valid[:, None, :] & (self.seq_id[:, :, None] == self.seq_id[:, None, :])  # (b, s, s)
            hidden = torch.tensor(torch.finfo(torch.float32).min, device=alibi.device)
            self._bias[dtype] = torch.where(visible[:, None], alibi, hidden).to(dtype)
        return self._bias[dtype]


def dense_attention(qkv, batch: DenseBatch, slopes, dropout_p=0.0):
    """Attention over the padded layout with one dense mask: no unpadding and no host sync, so it traces and exports.

    Args:
        qkv: (b * s, 3, h, d), every position of the padded batch.
        batch: the sequences, as masks over (b, s).
        slopes: (h,) float32 ALiBi slopes.
    Returns:
        context (b * s, h, d) in qkv's dtype, and the probabilities (b, h, s, s): zero for keys outside the
        query's sequence and for padded queries. Exact: hidden keys get probability exactly 0.
    """
    b, s = batch.valid.shape
    heads, head_dim = qkv.shape[2], qkv.shape[3]
    compute_dtype = torch.float32 if qkv.dtype in (torch.float16, torch.bfloat16) else qkv.dtype
    q, k, v = qkv.view(b, s, 3, heads, head_dim).to(compute_dtype).permute(2, 0, 3, 1, 4).unbind(0)  # (b, h, s, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim) + batch.bias(slopes, compute_dtype)
    probs = torch.softmax(scores, dim=-1) * batch.valid[:, None, :, None].to(compute_dtype)  # (b, h, s, s)
    out = torch.matmul(F.dropout(probs, p=dropout_p), v).transpose(1, 2)  # (b, s, h, d)
    return out.reshape(b * s, heads, head_dim).to(qkv.dtype), probs


def exporting():
    """True while torch.onnx, torch.export or torch.jit traces the model."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or bool(is_exporting and is_exporting())


def use_dense_path(output_attentions):
    """Whether the encoder runs on the padded layout with dense attention instead of unpadded tokens.

    For `output_attentions` (the probabilities are formed anyway, and stay on the gradient path) and while
    exporting (the unpadded path sizes its tensors on the host). Slower on ragged batches; outputs are the same.
    """
    return output_attentions or exporting()


_logged_backends = set()


def select_attention_backend(config, qkv, dropout_p, output_attentions):
    """The one place that picks the attention implementation: "triton" or "torch".

    "auto" takes the Triton kernel on CUDA for fp16/bf16 when triton is installed, else the plain path.
    `output_attentions=True` always uses the plain path (the kernel never forms the probabilities). Attention
    dropout is not implemented in the kernel: asking for both is an error, never a silent switch.
    """
    requested = config.attention_backend
    kernel_ok = HAS_TRITON and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16)
    if requested == "torch" or output_attentions:
        backend = "torch"
    elif requested == "triton":
        if not kernel_ok:
            raise ValueError(
                "attention_backend='triton' needs triton installed and fp16/bf16 CUDA inputs; got "
                f"triton installed={HAS_TRITON}, device={qkv.device}, dtype={qkv.dtype}."
            )
        backend = "triton"
    else:
        backend = "triton" if kernel_ok else "torch"
    if backend == "triton" and dropout_p > 0:
        raise ValueError(
            f"attention_probs_dropout_prob={dropout_p} is not supported by the Triton attention kernel; set "
            "config.attention_probs_dropout_prob=0.0 or config.attention_backend='torch'."
        )
    if (requested, backend) not in _logged_backends:
        _logged_backends.add((requested, backend))
        logger.info(f"MosaicBERT attention: backend {backend!r} (attention_backend={requested!r}).")
    return backend


def varlen_attention(config, qkv, batch, slopes, dropout_p, output_attentions=False):
    """Attention over the tokens of `batch`. qkv: (t, 3, h, d) -> ((t, h, d), probabilities (b, h, s, s) or None).

    A `DenseBatch` takes the dense path (t = b * s); a `VarlenBatch` the kernel or the plain path.
    """
    if isinstance(batch, DenseBatch):
        return dense_attention(qkv, batch, slopes, dropout_p)
    backend = select_attention_backend(config, qkv, dropout_p, output_attentions)
    if backend == "triton":
        out = flash_attn_varlen_qkvpacked_func(
            qkv, batch.cu_seqlens, batch.max_seqlen, alibi_slopes=slopes.float()
        )
        return out, None
    return torch_varlen_attention(qkv, batch, slopes, dropout_p), None


# ----------------------------------------------------------------------------------------------------------------
# Modules (names follow the upstream checkpoints)


class BertLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` that can run in low precision under autocast.

    Autocast runs LayerNorm in float32 and returns float32, which doubles the bytes of the residual stream. With
    `config.low_precision_layernorm`, inside a bf16/fp16 autocast region the input, weight and bias are cast to
    the autocast dtype and the normalization runs (and returns) in it, as MosaicBERT pretraining did. Outside
    autocast it is a plain LayerNorm: fp32 models stay fp32.
    """

    def __init__(self, hidden_size, eps, low_precision=False):
        super().__init__(hidden_size, eps=eps)
        self.low_precision = low_precision

    def forward(self, x):
        device_type = x.device.type
        if self.low_precision and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return F.layer_norm(
                    x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype), self.eps
                )
        return super().forward(x)


def layer_norm(config):
    return BertLayerNorm(config.hidden_size, config.layer_norm_eps, config.low_precision_layernorm)


class BertEmbeddings(nn.Module):
    """Word + token-type embeddings, LayerNorm, dropout. No position embeddings: ALiBi carries position."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = layer_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, inputs_embeds=None):
        # input_ids, token_type_ids: (t,); inputs_embeds: (t, hidden)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if token_type_ids is None:
            token_type = self.token_type_embeddings.weight[0]
        else:
            token_type = self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(inputs_embeds + token_type))


class BertUnpadSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden_states, batch, slopes, output_attentions=False):
        # hidden_states: (t, hidden) -> qkv: (t, 3, h, d)
        qkv = self.Wqkv(hidden_states).view(-1, 3, self.num_attention_heads, self.attention_head_size)
        dropout_p = self.dropout_p if self.training else 0.0
        context, probs = varlen_attention(self.config, qkv, batch, slopes, dropout_p, output_attentions)
        return context.reshape(context.shape[0], -1), probs  # (t, hidden)


class BertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = layer_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BertUnpadAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertUnpadSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, batch, slopes, subset_idx=None, output_attentions=False):
        context, probs = self.self(hidden_states, batch, slopes, output_attentions)
        if subset_idx is not None:  # only these rows are needed after attention (sparse MLM, last layer)
            context = index_first_axis(context, subset_idx)
            hidden_states = index_first_axis(hidden_states, subset_idx)
        return self.output(context, hidden_states), probs


class BertGatedLinearUnitMLP(nn.Module):
    """Gated-GELU MLP: GELU(x W_g) * (x W_v), then W_o, dropout, residual and post-LayerNorm."""

    def __init__(self, config):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gated_layers = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.act = nn.GELU(approximate="none")
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layernorm = layer_norm(config)

    def forward(self, hidden_states):
        gated, non_gated = self.gated_layers(hidden_states).split(self.intermediate_size, dim=-1)
        out = self.wo(self.dropout(self.act(gated) * non_gated))
        return self.layernorm(out + hidden_states)


class BertLayer(GradientCheckpointingLayer):
    def __init__(self, config):
        super().__init__()
        self.attention = BertUnpadAttention(config)
        self.mlp = BertGatedLinearUnitMLP(config)

    def forward(self, hidden_states, batch, slopes, subset_idx=None, output_attentions=False):
        hidden_states, probs = self.attention(hidden_states, batch, slopes, subset_idx, output_attentions)
        return self.mlp(hidden_states), probs


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])
        self.register_buffer("alibi_slopes", alibi_slopes(config.num_attention_heads), persistent=False)
        self.gradient_checkpointing = False

    def slopes(self):
        # A dtype cast of the whole model (model.half()) also casts this buffer; the slopes stay exact in fp32.
        if self.alibi_slopes.dtype != torch.float32:
            return alibi_slopes(self.config.num_attention_heads).to(self.alibi_slopes.device)
        return self.alibi_slopes


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, first_token):
        return self.activation(self.dense(first_token))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act
        self.LayerNorm = layer_norm(config)

    def forward(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, hidden_states):
        return self.predictions(hidden_states)


# ----------------------------------------------------------------------------------------------------------------
# Input layout


@dataclass
class TokenLayout:
    """Where the valid tokens of an input of shape (b, s) are, and how they split into sequences."""

    batch_size: int
    seqlen: int
    indices: torch.Tensor | None  # (t,) positions in the flattened (b * s) input; None when every position is a token
    batch: VarlenBatch | DenseBatch  # DenseBatch: every position is computed, padding masked in attention

    @property
    def total_tokens(self):
        return self.batch_size * self.seqlen if self.indices is None else self.indices.numel()

    def unpad(self, x):
        """(b, s, ...) -> (t, ...)"""
        flat = x.reshape(self.batch_size * self.seqlen, *x.shape[2:])
        return flat if self.indices is None else index_first_axis(flat, self.indices)

    def pad(self, x):
        """(t, ...) -> (b, s, ...) with zeros at padding."""
        if self.indices is not None:
            x = index_put_first_axis(x, self.indices, self.batch_size * self.seqlen)
        elif isinstance(self.batch, DenseBatch):
            x = torch.where(self.batch.valid.reshape(-1, *[1] * (x.dim() - 1)), x, 0)
        return x.view(self.batch_size, self.seqlen, *x.shape[1:])

    def flat_positions(self, token_idx):
        """Positions in the flattened (b * s) input of the unpadded tokens `token_idx`."""
        return token_idx if self.indices is None else self.indices[token_idx]


def _input_shape(input_ids, inputs_embeds):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Specify exactly one of `input_ids` and `inputs_embeds`.")
    return (input_ids if input_ids is not None else inputs_embeds).shape[:2]


def _check_shape(name, tensor, shape):
    if tensor is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"`{name}` has shape {tuple(tensor.shape)}, expected {tuple(shape)} (the shape of the input).")


def build_token_layout(config, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, cu_seqlens,
                       max_seqlen, dense=False):
    """Validate the inputs and find the sequences.

    Sequences are the rows of the batch, split further wherever `position_ids` restarts at 0 (packed documents,
    as `DataCollatorWithFlattening` produces) or as given by `cu_seqlens` (packed input of one row). With `dense`,
    nothing is unpadded and the sequences are described by masks (`DenseBatch`).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Specify exactly one of `input_ids` and `inputs_embeds`.")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, seq_len), got shape {tuple(input_ids.shape)}.")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"`input_ids` must be an integer tensor, got dtype {input_ids.dtype}.")
        batch_size, seqlen = input_ids.shape
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must have shape (batch, seq_len, {config.hidden_size}), "
                f"got shape {tuple(inputs_embeds.shape)}."
            )
        batch_size, seqlen = inputs_embeds.shape[:2]
    if batch_size == 0 or seqlen == 0:
        raise ValueError(f"The batch is empty: input shape (batch={batch_size}, seq_len={seqlen}).")
    _check_shape("attention_mask", attention_mask, (batch_size, seqlen))
    _check_shape("token_type_ids", token_type_ids, (batch_size, seqlen))
    if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] == 1 and batch_size > 1:
        position_ids = position_ids.expand(batch_size, -1)
    _check_shape("position_ids", position_ids, (batch_size, seqlen))

    # One host sync for every value check (none while exporting: a traced graph cannot raise on values).
    checks = []
    if input_ids is not None and not exporting():
        checks += [input_ids.min(), input_ids.max()]
    if token_type_ids is not None and not exporting():
        checks += [token_type_ids.min(), token_type_ids.max()]
    if checks:
        values = torch.stack([c.long() for c in checks]).tolist()
        if input_ids is not None:
            lo, hi = values[:2]
            if lo < 0 or hi >= config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"`input_ids` contains id {bad}, outside [0, vocab_size={config.vocab_size}).")
            values = values[2:]
        if token_type_ids is not None:
            lo, hi = values
            if lo < 0 or hi >= config.type_vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"`token_type_ids` contains {bad}, outside [0, type_vocab_size={config.type_vocab_size})."
                )

    device = (input_ids if input_ids is not None else inputs_embeds).device
    if cu_seqlens is not None:
        if batch_size != 1:
            raise ValueError(f"`cu_seqlens` describes a packed input of one row, but the batch has {batch_size} rows.")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("Packed input with `cu_seqlens` cannot have padding in `attention_mask`.")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"`cu_seqlens` must be a 1-D integer tensor of length n + 1, got {cu_seqlens!r}.")
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        first, last = cu_seqlens[0].item(), cu_seqlens[-1].item()
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if first != 0 or last != seqlen or bool((lengths < 0).any()):
            raise ValueError(
                f"`cu_seqlens` must rise from 0 to the input length {seqlen}; got first={first}, last={last}."
            )
        if dense:
            return dense_token_layout(batch_size, seqlen, attention_mask, position_ids, cu_seqlens, device)
        if max_seqlen is None:
            max_seqlen = int(lengths.max().item())
        return TokenLayout(batch_size, seqlen, None, VarlenBatch(cu_seqlens, int(max_seqlen)))
    if dense:
        return dense_token_layout(batch_size, seqlen, attention_mask, position_ids, None, device)

    indices = None
    if attention_mask is not None:
        valid = attention_mask.bool()
        row_lengths = valid.sum(-1, dtype=torch.int32)
        indices = torch.nonzero(valid.flatten(), as_tuple=False).flatten()
        if indices.numel() == batch_size * seqlen:
            indices = None
    else:
        row_lengths = torch.full((batch_size,), seqlen, dtype=torch.int32, device=device)
    cu_rows = cu_seqlens_from_lengths(row_lengths)
    if position_ids is None:
        max_rows = seqlen if indices is None else int(row_lengths.max().item())
        return TokenLayout(batch_size, seqlen, indices, VarlenBatch(cu_rows, max_rows))

    # Packed documents: a sequence starts at each row's first valid token and wherever position_ids is 0.
    flat_positions = position_ids.reshape(-1)
    positions = flat_positions if indices is None else flat_positions[indices]
    starts = positions == 0
    starts[cu_rows[:-1][row_lengths > 0].long()] = True
    total = positions.numel()
    cu = torch.cat([torch.nonzero(starts).flatten(), torch.tensor([total], device=device)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item()) if total else 0
    return TokenLayout(batch_size, seqlen, indices, VarlenBatch(cu, max_len))


def dense_token_layout(batch_size, seqlen, attention_mask, position_ids, cu_seqlens, device):
    """The layout of the dense path: the same sequences as the unpadded one, as (b, s) masks, without a host sync."""
    if attention_mask is None:
        valid = torch.ones(batch_size, seqlen, dtype=torch.bool, device=device)
    else:
        valid = attention_mask.bool()
    rank = valid.long().cumsum(-1) - 1  # (b, s): valid tokens before each one in its row
    starts = valid & (rank == 0)  # each row's first valid token
    if position_ids is not None:
        starts = starts | (valid & (position_ids == 0))
    if cu_seqlens is not None:  # one row; a trailing empty document marks index seqlen, dropped by the slice
        marks = torch.zeros(seqlen + 1, dtype=torch.bool, device=device)
        starts = starts | marks.index_fill(0, cu_seqlens[:-1].long(), True)[None, :seqlen]
    return TokenLayout(batch_size, seqlen, None, DenseBatch(valid, starts.long().cumsum(-1), rank))


@dataclass
class EncoderState:
    """What the encoder computed, unpadded: (t, hidden), or (rows of subset_idx, hidden) for sparse MLM."""

    hidden: torch.Tensor
    layout: TokenLayout
    subset_idx: torch.Tensor | None
    hidden_states: tuple | None
    attentions: tuple | None


# ----------------------------------------------------------------------------------------------------------------
# Models


class BertPreTrainedModel(PreTrainedModel):
    config_class = BertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BertEmbeddings", "BertLayer"]
    # Each head names its Auto class (`_auto_class`), so save_pretrained always writes the code files and auto_map.
    # transformers 4.x records it on load only when the config's class name is not a library one; ours is BertConfig.

    def __init__(self, config, *inputs, **kwargs):
        config.validate_mosaic_bert()  # attributes may have been edited since the config was built
        super().__init__(config, *inputs, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)  # Linear/Embedding ~ N(0, initializer_range), zero biases and pad row, LN 1/0
        if isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, BertEncoder):
            # Non-persistent, so never loaded: always computed (torch.nn.init of transformers 4.x has no copy_).
            with torch.no_grad():
                module.alibi_slopes.copy_(alibi_slopes(self.config.num_attention_heads))

    def _unexpected_kwargs(self, kwargs):
        if kwargs:
            raise TypeError(f"{type(self).__name__}.forward got unexpected arguments: {sorted(kwargs)}.")


class BertModel(BertPreTrainedModel):
    """The MosaicBERT encoder, with an optional pooler (tanh(dense) of the first token)."""

    _auto_class = "AutoModel"

    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def encode(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        cu_seqlens=None,
        max_seqlen=None,
        output_attentions=False,
        output_hidden_states=False,
        subset_labels=None,
    ) -> EncoderState:
        """Run the encoder and keep the result unpadded.

        With `subset_labels` (b, s), the last layer computes its attention output and MLP only for the tokens
        whose label is not -100 (the only rows the MLM head needs); `EncoderState.subset_idx` lists them.
        """
        layout = build_token_layout(
            self.config, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, cu_seqlens,
            max_seqlen, dense=use_dense_path(output_attentions),
        )
        hidden = self.embeddings(
            input_ids=None if input_ids is None else layout.unpad(input_ids),
            token_type_ids=None if token_type_ids is None else layout.unpad(token_type_ids),
            inputs_embeds=None if inputs_embeds is None else layout.unpad(inputs_embeds),
        )  # (t, hidden)
        subset_idx = None
        if subset_labels is not None:
            labelled = layout.unpad(subset_labels) != IGNORE_INDEX
            if isinstance(layout.batch, DenseBatch):  # labels at padding are not tokens, as when unpadded
                labelled = labelled & layout.batch.valid.reshape(-1)
            subset_idx = torch.nonzero(labelled).flatten()  # (m,)

        slopes = self.encoder.slopes()
        all_hidden = None
        if output_hidden_states:
            # Each returned hidden state is the tensor the next layer reads, so gradients reach it.
            all_hidden = [layout.pad(hidden)]
            hidden = layout.unpad(all_hidden[-1])
        all_attentions = [] if output_attentions else None
        n_layers = len(self.encoder.layer)
        for i, layer in enumerate(self.encoder.layer):
            last_subset = subset_idx if (i == n_layers - 1 and not output_hidden_states) else None
            hidden, probs = layer(hidden, layout.batch, slopes, last_subset, output_attentions)
            if output_hidden_states:
                all_hidden.append(layout.pad(hidden))
                hidden = layout.unpad(all_hidden[-1])
            if output_attentions:
                all_attentions.append(probs)  # (b, h, s, s) from the dense path
        if subset_idx is not None and output_hidden_states:
            hidden = index_first_axis(hidden, subset_idx)
        return EncoderState(
            hidden=hidden,
            layout=layout,
            subset_idx=subset_idx,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        cu_seqlens=None,
        max_seqlen=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): token ids; or `inputs_embeds`
                (`(batch, seq_len, hidden)`), not both.
            attention_mask (`(batch, seq_len)`, *optional*): 1 for tokens, 0 for padding. Padding is removed
                before the first layer; its outputs are zeros.
            token_type_ids (`(batch, seq_len)`, *optional*): segment ids, 0 when absent.
            position_ids (`(batch, seq_len)`, *optional*): not embedded (ALiBi carries position); a restart at 0
                inside a row starts a new document there (packed input, as `DataCollatorWithFlattening` makes).
            cu_seqlens (`(n + 1,)` int, *optional*), max_seqlen (`int`, *optional*): document offsets of a packed
                input of one row, instead of `position_ids`; passing `max_seqlen` avoids a host sync.

        Returns:
            `BaseModelOutputWithPooling`: `last_hidden_state` (batch, seq_len, hidden); `pooler_output`
            (batch, hidden) when the model has a pooler; `hidden_states` (embeddings + one per layer, padded) and
            `attentions` ((batch, heads, seq_len, seq_len), computed by the plain path) when asked.
        """
        self._unexpected_kwargs(kwargs)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        state = self.encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, cu_seqlens, max_seqlen,
            output_attentions, output_hidden_states,
        )
        sequence_output = state.layout.pad(state.hidden)  # (b, s, hidden)
        pooled = self.pooler(sequence_output[:, 0]) if self.pooler is not None else None
        if not return_dict:
            return tuple(
                v for v in (sequence_output, pooled, state.hidden_states, state.attentions) if v is not None
            )
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=pooled,
            hidden_states=state.hidden_states,
            attentions=state.attentions,
        )


def _resolve_flags(config, output_attentions, output_hidden_states, return_dict):
    return (
        config.output_attentions if output_attentions is None else output_attentions,
        config.output_hidden_states if output_hidden_states is None else output_hidden_states,
        config.return_dict if return_dict is None else return_dict,
    )


def _as_tuple(loss, *outputs):
    out = tuple(o for o in outputs if o is not None)
    return ((loss,) + out) if loss is not None else out


class BertForMaskedLM(BertPreTrainedModel):
    _auto_class = "AutoModelForMaskedLM"
    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}
    if TRANSFORMERS_V4:  # 4.x lists the tied parameters; 5.x maps each to its source
        _tied_weights_keys = list(_tied_weights_keys)
    accepts_loss_kwargs = True

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        cu_seqlens=None,
        max_seqlen=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        r"""
        Inputs as `BertModel.forward`, plus:
            labels (`(batch, seq_len)`, *optional*): target ids at the masked positions, -100 elsewhere.
            num_items_in_batch (*optional*): the number of labelled tokens over all gradient-accumulation
                micro-batches (Trainer passes it); the loss is then sum / num_items_in_batch.

        Returns `MaskedLMOutput`. Without labels, `logits` (batch, seq_len, vocab) for every token. With labels the
        last layer's attention output, MLP and the head run only on labelled tokens (sparse MLM): `logits` still has
        shape (batch, seq_len, vocab) but is zero at positions whose label is -100, and `loss` is the mean
        cross-entropy over the labelled tokens.
        """
        self._unexpected_kwargs(kwargs)
        output_attentions, output_hidden_states, return_dict = _resolve_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        if labels is not None:
            _check_shape("labels", labels, _input_shape(input_ids, inputs_embeds))
        state = self.bert.encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, cu_seqlens, max_seqlen,
            output_attentions, output_hidden_states, subset_labels=labels,
        )
        layout = state.layout
        logits = self.cls(state.hidden)  # (t, v), or (m, v) with labels
        loss = None
        if labels is not None:
            flat_pos = layout.flat_positions(state.subset_idx)  # (m,)
            target = labels.reshape(-1)[flat_pos]
            loss = masked_lm_loss(logits, target, self.config.vocab_size, num_items_in_batch)
            full = index_put_first_axis(logits, flat_pos, layout.batch_size * layout.seqlen)
            logits = full.view(*layout_shape(layout), -1)
        else:
            logits = layout.pad(logits)
        if not return_dict:
            return _as_tuple(loss, logits, state.hidden_states, state.attentions)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=state.hidden_states, attentions=state.attentions)


def layout_shape(layout):
    return layout.batch_size, layout.seqlen


def masked_lm_loss(logits, target, vocab_size, num_items_in_batch=None):
    """Cross-entropy summed over the labelled tokens / their count (or `num_items_in_batch`), in float32."""
    if target.numel():
        lo, hi = torch.stack([target.min(), target.max()]).tolist()
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"`labels` contains {lo if lo < 0 else hi}, outside [0, vocab_size={vocab_size}) and not -100.")
    total = F.cross_entropy(logits.float(), target, reduction="sum")
    if num_items_in_batch is None:
        return total / max(target.numel(), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class BertForSequenceClassification(BertPreTrainedModel):
    """Pooled first token -> dropout -> linear. Loss by `config.problem_type` (regression, single- or
    multi-label), inferred as transformers does when unset."""

    _auto_class = "AutoModelForSequenceClassification"
    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        cu_seqlens=None,
        max_seqlen=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        kwargs.pop("num_items_in_batch", None)
        self._unexpected_kwargs(kwargs)
        outputs = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, cu_seqlens, max_seqlen,
            output_attentions, output_hidden_states, return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))  # (b, num_labels)
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(self.config, logits, labels)
        if not _resolve_flags(self.config, None, None, return_dict)[2]:
            return _as_tuple(loss, logits, outputs.hidden_states, outputs.attentions)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def sequence_classification_loss(config, logits, labels):
    num_labels = logits.shape[-1]
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1)) if num_labels == 1 else F.mse_loss(
            logits.float(), labels.float()
        )
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.float().view(-1, num_labels), labels.view(-1))
    if config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    raise ValueError(f"Unknown problem_type {config.problem_type!r}.")


class BertForTokenClassification(BertPreTrainedModel):
    _auto_class = "AutoModelForTokenClassification"
    accepts_loss_kwargs = True

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        cu_seqlens=None,
        max_seqlen=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        """`logits` (batch, seq_len, num_labels), zero at padding; loss = cross-entropy over labels != -100."""
        self._unexpected_kwargs(kwargs)
        output_attentions, output_hidden_states, return_dict = _resolve_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        state = self.bert.encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, cu_seqlens, max_seqlen,
            output_attentions, output_hidden_states,
        )
        logits = state.layout.pad(self.classifier(self.dropout(state.hidden)))  # (b, s, num_labels)
        loss = None
        if labels is not None:
            _check_shape("labels", labels, logits.shape[:2])
            total = F.cross_entropy(
                logits.float().view(-1, self.num_labels), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            count = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE_INDEX).sum().clamp(min=1)
            loss = total / (count.to(total.device) if torch.is_tensor(count) else count)
        if not return_dict:
            return _as_tuple(loss, logits, state.hidden_states, state.attentions)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=state.hidden_states, attentions=state.attentions
        )


class BertForQuestionAnswering(BertPreTrainedModel):
    _auto_class = "AutoModelForQuestionAnswering"
    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = 2
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        cu_seqlens=None,
        max_seqlen=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        """Span start/end logits (batch, seq_len); loss = mean of start and end cross-entropy (positions past
        the sequence are ignored, as in transformers' BERT)."""
        kwargs.pop("num_items_in_batch", None)
        self._unexpected_kwargs(kwargs)
        outputs = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, cu_seqlens, max_seqlen,
            output_attentions, output_hidden_states, return_dict=True,
        )
        logits = self.qa_outputs(outputs.last_hidden_state)  # (b, s, 2)
        start_logits, end_logits = (x.squeeze(-1).contiguous() for x in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]
            start = start_positions.reshape(-1).clamp(0, ignored)
            end = end_positions.reshape(-1).clamp(0, ignored)
            loss = (
                F.cross_entropy(start_logits.float(), start, ignore_index=ignored)
                + F.cross_entropy(end_logits.float(), end, ignore_index=ignored)
            ) / 2
        if not _resolve_flags(self.config, None, None, return_dict)[2]:
            return _as_tuple(loss, start_logits, end_logits, outputs.hidden_states, outputs.attentions)
        return QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class BertForMultipleChoice(BertPreTrainedModel):
    _auto_class = "AutoModelForMultipleChoice"
    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        """Inputs of shape (batch, num_choices, seq_len) (`inputs_embeds`: (batch, num_choices, seq_len, hidden));
        `logits` (batch, num_choices); loss = cross-entropy against `labels` (batch,)."""
        kwargs.pop("num_items_in_batch", None)
        self._unexpected_kwargs(kwargs)
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("Specify exactly one of `input_ids` and `inputs_embeds`.")
        expected_rank = 3 if input_ids is not None else 4
        if ref.dim() != expected_rank:
            raise ValueError(
                f"Multiple choice inputs must have {expected_rank} dimensions (batch, num_choices, seq_len"
                f"{', hidden' if expected_rank == 4 else ''}), got shape {tuple(ref.shape)}."
            )
        num_choices = ref.shape[1]

        def flat(x):
            return None if x is None else x.reshape(-1, *x.shape[2:])

        outputs = self.bert(
            flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids), flat(inputs_embeds),
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output)).view(-1, num_choices)  # (b, c)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        if not _resolve_flags(self.config, None, None, return_dict)[2]:
            return _as_tuple(loss, logits, outputs.hidden_states, outputs.attentions)
        return MultipleChoiceModelOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "BertForMaskedLM",
    "BertForMultipleChoice",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "BertPreTrainedModel",
    "alibi_slopes",
    "varlen_attention",
]
