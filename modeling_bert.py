"""MosaicBERT: BERT with ALiBi attention, a gated-GELU MLP and unpadded tokens end to end.

Axes used in shape comments:
    b batch, s padded sequence length, t total valid tokens, n sequences (documents), h heads, d head dim,
    m masked (labelled) tokens, v vocabulary, c choices.

One forward pass, top to bottom:
    inputs -> `resolve_attention` (pick the attention function once)
           -> `validate_inputs` (every check, at most one device-to-host read; before it, `prepare_layout`
              queues the layout's device work, whose sizes do not depend on the values)
           -> `build_layout` (unpad once: the valid tokens' positions, cut to the count read with the checks)
           -> `BertEmbeddings` -> `BertEncoder.forward` (the layer loop) -> subset for sparse MLM
           -> `TokenLayout.pad` (pad back once) -> heads.
Attention implementations are plain functions in one table, `ATTENTION_FUNCTIONS`; `resolve_attention` is the
one place that picks an entry.
"""

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import __version__ as transformers_version
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .bert_padding import (
    cu_seqlens_from_lengths,
    index_first_axis,
    index_put_first_axis,
    pad_input,
    scatter_by_rank,
    unpad_input,
    valid_token_indices,
)
from .configuration_bert import BertConfig
from .flash_attn_triton import HAS_TRITON, PackedSelfAttention
from .fused_ops import (
    add_dropout_layer_norm,
    cross_entropy,
    fused_kernels_available,
    gated_gelu,
    gated_linear_gelu,
    reuse_cpu_gemm_output,
)

# Not used here: transformers 4.x copies only the modeling file's own relative imports of a local model folder into
# its module cache, and fused_ops.py and flash_attn_triton.py import this one.
from .triton_launch import FAST_LAUNCH  # noqa: F401

try:  # transformers >= 5: init functions that leave loaded weights alone
    from transformers import initialization as init
except ImportError:  # transformers 4.x
    from torch.nn import init

TRANSFORMERS_V4 = int(transformers_version.split(".")[0]) < 5

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
# The plain attention path materializes one (sequences, heads, L, L) block of scores per bucket; buckets are split
# so that a block holds at most this many elements.
_PLAIN_ATTENTION_SCORES = 1 << 26
# Keyword arguments of transformers' DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True).
FLASH_ATTN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """The standard ALiBi slopes, (h,) float32, computed on `device` (no host-to-device copy).

    For a power of two n: 2^(-8/n), 2^(-16/n), ... Otherwise the slopes of the largest power of two p below n,
    followed by the first n - p of the even-indexed slopes of 2p heads.
    """
    p = 2 ** math.floor(math.log2(num_heads))
    exponents = torch.arange(1, p + 1, device=device, dtype=torch.float64) * (-8.0 / p)
    if p < num_heads:  # even-indexed slopes of 2p heads: exponents 1, 3, 5, ... of -8 / (2p)
        extra = torch.arange(1, 2 * (num_heads - p), 2, device=device, dtype=torch.float64) * (-8.0 / (2 * p))
        exponents = torch.cat([exponents, extra])
    return torch.exp2(exponents).to(torch.float32)


def exporting():
    """True while torch.onnx or torch.jit traces the model: a graph that must not hold the Triton custom op.

    Not `torch.compiler.is_exporting()`: torch 2.11 reports it True inside a plain `torch.compile` as well, which
    sent compiled models down the dense attention path. torch.export keeps custom ops, so it needs no path of its
    own (on CPU, tracing takes the dense path anyway).
    """
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def tracing():
    """True while any tracer runs the model (export or torch.compile): nothing may be read back to the host."""
    return exporting() or torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------------------------
# Sequences: how the tokens of one forward split into sequences, shared by every layer


@dataclass
class Bucket:
    """Sequences of similar length that the plain path attends to in one call, padded to the longest, `length`.

    `token_index` (n, L) are the rows of each slot's token (0 past a sequence's end) and `valid` (n, L) marks the
    real slots; `slot_seq`, `slot_pos` and `rows` (m,) list the m real slots and their token rows, so no layer
    indexes with a mask. A bucket of n consecutive sequences of exactly `length` tokens (every fixed-length batch)
    has none of these: its tokens are rows `start ... start + n * length` in order, read as a view.
    """

    length: int
    count: int
    start: int | None = None
    token_index: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    slot_seq: torch.Tensor | None = None
    slot_pos: torch.Tensor | None = None
    rows: torch.Tensor | None = None


@dataclass
class VarlenSequences:
    """Sequences as offsets into the unpadded token axis (flash-attn's varlen vocabulary).

    `cu_seqlens` (n + 1,) int32; `max_seqlen` an upper bound of the longest sequence (the padded width unless the
    caller gave a tighter one). `buckets` groups sequences of similar length for the plain path; it is built with
    the layout when that path runs, so no layer reads the device.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    buckets: list[Bucket] | None = None
    _bias: dict = field(default_factory=dict, repr=False)
    kernel: PackedSelfAttention | None = field(default=None, repr=False)  # the Triton path's, made at its first layer

    def build_buckets(self):
        """Groups of sequences whose lengths lie within 20% of the group's longest, split to bound the scores."""
        starts = self.cu_seqlens.tolist()
        seqlens = [end - start for start, end in zip(starts, starts[1:])]
        order = sorted((i for i, n in enumerate(seqlens) if n > 0), key=lambda i: -seqlens[i])
        groups = []
        for i in order:
            if groups and seqlens[i] >= 0.8 * groups[-1][1]:
                groups[-1][0].append(i)
            else:
                groups.append(([i], seqlens[i]))
        self.buckets, gathered = [], []
        for ids, length in groups:
            per_chunk = max(1, _PLAIN_ATTENTION_SCORES // (length * length * 16))  # 16: heads of a large model
            for k in range(0, len(ids), per_chunk):
                chunk = ids[k : k + per_chunk]
                # sorted() is stable: sequences of one length keep their order, so adjacent ones stay adjacent
                first = starts[chunk[0]]
                if all(seqlens[i] == length and starts[i] == first + j * length for j, i in enumerate(chunk)):
                    self.buckets.append(Bucket(length, len(chunk), first))
                    continue
                # built on the host from the lengths read above
                lengths = torch.tensor([seqlens[i] for i in chunk])
                offsets = torch.arange(length)
                valid = offsets[None, :] < lengths[:, None]  # (n, L)
                token_index = torch.where(valid, torch.tensor([starts[i] for i in chunk])[:, None] + offsets, 0)
                slot_seq, slot_pos = valid.nonzero(as_tuple=True)
                self.buckets.append(Bucket(length, len(chunk)))
                gathered += [token_index, valid, slot_seq, slot_pos, token_index[slot_seq, slot_pos]]
        if gathered:  # every gathered bucket's index tensors reach the device in one copy
            flat = torch.cat([t.flatten().long() for t in gathered]).to(self.cu_seqlens.device)
            parts = flat.split([t.numel() for t in gathered])
            for k, bucket in enumerate(b for b in self.buckets if b.start is None):
                token_index, valid, bucket.slot_seq, bucket.slot_pos, bucket.rows = parts[5 * k : 5 * k + 5]
                bucket.token_index = token_index.view(bucket.count, bucket.length)
                bucket.valid = valid.view(bucket.count, bucket.length).bool()

    def bias(self, bucket_id, slopes, dtype):
        """ALiBi plus key padding for one bucket, (n, h, L, L) in `dtype` ((1, h, L, L) for a bucket without
        padding), cached across layers."""
        key = (bucket_id, dtype)
        if key not in self._bias:
            bucket = self.buckets[bucket_id]
            pos = torch.arange(bucket.length, device=slopes.device)
            distance = (pos[None, :] - pos[:, None]).abs().to(torch.float32)  # (L, L)
            bias = -slopes.float()[None, :, None, None] * distance  # (1, h, L, L)
            if bucket.valid is not None:
                pad = torch.zeros(bucket.valid.shape, dtype=torch.float32, device=bucket.valid.device)
                bias = bias + pad.masked_fill_(~bucket.valid, float("-inf"))[:, None, None, :]
            self._bias[key] = bias.to(dtype)
        return self._bias[key]


@dataclass
class DenseSequences:
    """Sequences of the padded (b, s) layout as masks, for the dense path: nothing is unpadded, nothing is read
    back to the host, so it traces and exports.

    `valid` (b, s) bool marks real tokens; `seq_id` (b, s) numbers the sequences within each row (a row may hold
    several packed documents); `rank` (b, s) counts the valid tokens of the row before each token, so within one
    sequence |rank_i - rank_j| is the ALiBi distance.
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


# ----------------------------------------------------------------------------------------------------------------
# Attention functions: (qkv (t, 3, h, d), sequences, slopes (h,) float32, dropout_p) -> (context (t, h, d), probs)


def _compute_dtype(dtype):
    # The ALiBi bias of distant tokens does not fit fp16/bf16 resolution: the plain paths compute in float32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def triton_attention(qkv, sequences: VarlenSequences, slopes, dropout_p=0.0):
    """The FlashAttention kernel with in-kernel ALiBi (flash_attn_triton.py); never forms the probabilities. One
    `PackedSelfAttention` serves every layer of a forward: the first layer's call checks and launches, the later
    ones (qkv of the same layout) relaunch."""
    attention = sequences.kernel
    if attention is None or attention.alibi_slopes is not slopes:
        # max_seqlen is the padded width, or the caller's value checked with the inputs: no per-layer device check
        attention = sequences.kernel = PackedSelfAttention(
            sequences.cu_seqlens, sequences.max_seqlen, alibi_slopes=slopes, max_seqlen_checked=True
        )
    return attention(qkv), None


def torch_attention(qkv, sequences: VarlenSequences, slopes, dropout_p=0.0):
    """Plain PyTorch over unpadded tokens: one SDPA call per bucket of similar lengths (no tensor larger than a
    bucket's longest sequence). Slots past a sequence's end are zeros, so nothing (not even a NaN) crosses from
    one sequence into another."""
    total, _, heads, head_dim = qkv.shape
    compute_dtype = _compute_dtype(qkv.dtype)
    values, token_ids = [], []
    for bucket_id, bucket in enumerate(sequences.buckets):
        n, length = bucket.count, bucket.length
        if bucket.valid is None:  # consecutive full-length sequences: a view of the rows, no gather
            x = qkv[bucket.start : bucket.start + n * length].view(n, length, 3, heads, head_dim)
        else:
            x = qkv.index_select(0, bucket.token_index.flatten()).view(n, length, 3, heads, head_dim)
            x = x.masked_fill_(~bucket.valid[:, :, None, None, None], 0)  # a fresh copy: filled in place
        q, k, v = x.to(compute_dtype).permute(2, 0, 3, 1, 4).unbind(0)  # each (n, h, L, d)
        bias = sequences.bias(bucket_id, slopes, compute_dtype)  # (n or 1, h, L, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)  # (n, h, L, d)
        if bucket.valid is None:
            if n * length == total:  # the only bucket: every token in order
                return out.transpose(1, 2).reshape(total, heads, head_dim).to(qkv.dtype), None
            values.append(out.transpose(1, 2).reshape(n * length, heads, head_dim))
            token_ids.append(torch.arange(bucket.start, bucket.start + n * length, device=qkv.device))
        else:
            values.append(out[bucket.slot_seq, :, bucket.slot_pos])  # (m, h, d): the real slots, one gather
            token_ids.append(bucket.rows)
    return index_put_first_axis(torch.cat(values), torch.cat(token_ids), total).to(qkv.dtype), None


def dense_attention(qkv, sequences: DenseSequences, slopes, dropout_p=0.0):
    """Attention over the padded layout with one dense mask; returns the probabilities (b, h, s, s).

    qkv: (b * s, 3, h, d), every position of the padded batch. Probabilities are exactly zero for keys outside the
    query's sequence and for padded queries; padded positions' q/k/v are zeroed first so they cannot leak NaN.
    """
    b, s = sequences.valid.shape
    heads, head_dim = qkv.shape[2], qkv.shape[3]
    valid = sequences.valid.reshape(-1)
    x = torch.where(valid[:, None, None, None], qkv, 0).to(_compute_dtype(qkv.dtype))
    q, k, v = x.view(b, s, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # each (b, h, s, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim) + sequences.bias(slopes, x.dtype)
    probs = torch.softmax(scores, dim=-1) * sequences.valid[:, None, :, None].to(x.dtype)  # (b, h, s, s)
    out = torch.matmul(F.dropout(probs, p=dropout_p, training=dropout_p > 0), v).transpose(1, 2)  # (b, s, h, d)
    return out.reshape(b * s, heads, head_dim).to(qkv.dtype), probs


# name -> (function, sequences it reads, implements attention dropout)
ATTENTION_FUNCTIONS = {
    "triton": (triton_attention, VarlenSequences, False),
    "torch": (torch_attention, VarlenSequences, True),
    "dense": (dense_attention, DenseSequences, True),
}

_logged_backends = set()


def kernel_available(device, dtype):
    return HAS_TRITON and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def resolve_attention(config, device, dtype, dropout_p, output_attentions=False):
    """The one place that picks the attention function, once per forward: a key of `ATTENTION_FUNCTIONS`.

    `output_attentions`, export and torch.compile of the plain path take "dense" (the probabilities are formed,
    nothing is read back to the host). Otherwise `config.attention_backend`: "auto" takes the Triton kernel on
    CUDA for fp16/bf16 when triton is installed, else "torch"; "triton" requires the kernel. An attention dropout
    the chosen function does not implement is an error, never a silent switch.
    """
    requested = config.attention_backend
    if output_attentions or exporting():
        name = "dense"
    elif requested == "triton" or (requested == "auto" and kernel_available(device, dtype)):
        if not kernel_available(device, dtype):
            raise ValueError(
                "attention_backend='triton' needs triton installed and fp16/bf16 CUDA inputs; got "
                f"triton installed={HAS_TRITON}, device={device}, dtype={dtype}."
            )
        name = "triton"
    else:
        name = "dense" if torch.compiler.is_compiling() else "torch"
    if dropout_p > 0 and not ATTENTION_FUNCTIONS[name][2]:
        raise ValueError(
            f"attention_probs_dropout_prob={dropout_p} is not supported by the {name!r} attention; set "
            "config.attention_probs_dropout_prob=0.0 or config.attention_backend='torch'."
        )
    if (requested, name) not in _logged_backends and not tracing():
        _logged_backends.add((requested, name))
        logger.info(f"MosaicBERT attention: {name!r} (attention_backend={requested!r}).")
    return name


# ----------------------------------------------------------------------------------------------------------------
# Inputs: validation and the token layout


@dataclass
class ModelInputs:
    """The inputs of one forward, validated. `total` is the number of valid tokens when it was read (None while
    tracing or without a mask); `packed` is True when `position_ids` or `cu_seqlens` split rows into documents.
    `static`: the layout keeps every padded position (`config.static_shapes`); `pending`: with it, outside tracing,
    the value checks not yet read, to call once the forward's work is queued (it reads them and raises)."""

    batch_size: int
    seqlen: int
    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    attention_mask: torch.Tensor | None
    token_type_ids: torch.Tensor | None
    position_ids: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    max_seqlen: int | None
    total: int | None
    labelled: int | None = None
    prepared: "LayoutPrep | None" = None
    static: bool = False
    pending: Callable[[], None] | None = None

    @property
    def device(self):
        return (self.input_ids if self.input_ids is not None else self.inputs_embeds).device

    @property
    def packed(self):
        return self.position_ids is not None or self.cu_seqlens is not None


def _check_shape(name, tensor, shape):
    if tensor is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"`{name}` has shape {tuple(tensor.shape)}, expected {tuple(shape)} (the shape of the input)."
        )


def _range_check(name, tensor, low, high, ignore=None):
    """Deferred check that `tensor` lies in [low, high) (entries equal to `ignore` aside): its (min, max) as 0-d
    int64 tensors to read, and a function raising on them. The caller reads the bounds of every check at once."""
    if tensor.numel() == 0:
        return []
    values = tensor.long()
    if ignore is not None:
        values = torch.where(values != ignore, values, low)  # ignored entries read as in range
    bounds = torch.aminmax(values)  # one reduction for both

    def check(lo, hi):
        if lo < low or hi >= high:
            what = f"[{low}, {high})" + ("" if ignore is None else f" and not {ignore}")
            raise ValueError(f"`{name}` contains {lo if lo < low else hi}, outside {what}.")

    return [(bounds, check)]


def packed_kwargs(kwargs, cu_seqlens, max_seqlen):
    """Take transformers' flash-attention kwargs (DataCollatorWithFlattening(return_flash_attn_kwargs=True)) out
    of `kwargs` as the same packed input as `cu_seqlens` / `max_seqlen`."""
    given = {k: kwargs.pop(k) for k in FLASH_ATTN_KWARGS if k in kwargs}
    if not given:
        return cu_seqlens, max_seqlen
    cu_q, cu_k = given.get("cu_seq_lens_q"), given.get("cu_seq_lens_k")
    if cu_q is None or (cu_k is not None and not torch.equal(cu_q.cpu(), cu_k.cpu())):
        raise ValueError("MosaicBERT is an encoder: `cu_seq_lens_q` is required and `cu_seq_lens_k` must equal it.")
    if cu_seqlens is not None:
        raise ValueError("Pass the document offsets once: either `cu_seqlens` or `cu_seq_lens_q`/`cu_seq_lens_k`.")
    max_q = given.get("max_length_q", max_seqlen)
    max_k = given.get("max_length_k", max_q)
    if max_q is not None and int(max_q) != int(max_k):
        raise ValueError(f"`max_length_q` ({max_q}) and `max_length_k` ({max_k}) must be equal for an encoder.")
    return cu_q, None if max_q is None else int(max_q)


def validate_inputs(config, input_ids=None, inputs_embeds=None, attention_mask=None, token_type_ids=None,
                    position_ids=None, cu_seqlens=None, max_seqlen=None, label_checks=(),
                    subset_labels=None, before_read=None, static=False) -> ModelInputs:
    """Every check of the inputs, in one place. Shapes and dtypes are checked on the host; values (ids in range,
    a 0/1 mask, labels in range, the number of valid tokens) are read from the device together, in one read, and
    not at all while tracing. `label_checks`: (name, tensor, low, high, ignore) of the head's labels;
    `subset_labels` (b, s): also count the labelled (not -100) tokens, for sparse MLM. `before_read`: called with
    the shape-checked inputs just before the read (not while tracing) to queue device work whose sizes do not
    depend on the values; its result is `prepared` of the returned inputs. `static` (`config.static_shapes`, not
    packed): the layout needs no count, so nothing is read here: the checks' values are copied to the host behind
    the GPU's queue and `pending` of the returned inputs reads them and raises."""
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
    device = (input_ids if input_ids is not None else inputs_embeds).device
    _check_shape("attention_mask", attention_mask, (batch_size, seqlen))
    _check_shape("token_type_ids", token_type_ids, (batch_size, seqlen))
    if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] == 1 and batch_size > 1:
        position_ids = position_ids.expand(batch_size, -1)
    _check_shape("position_ids", position_ids, (batch_size, seqlen))
    _check_shape("labels", subset_labels, (batch_size, seqlen))
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        if attention_mask.dtype.is_complex:
            raise ValueError(f"`attention_mask` must hold 0/1 or bool, got dtype {attention_mask.dtype}.")
    if cu_seqlens is not None:
        cu_seqlens = _validate_cu_seqlens(cu_seqlens, batch_size, seqlen, device)

    if tracing():  # a traced graph cannot read values back: under torch.compile they are asserted on the device
        if not exporting():
            _assert_on_device(config, seqlen, input_ids, token_type_ids, attention_mask, cu_seqlens, max_seqlen,
                              label_checks)
        return ModelInputs(batch_size, seqlen, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids,
                           cu_seqlens, max_seqlen, None, static=static)
    checks = []
    if input_ids is not None:
        checks += _range_check("input_ids", input_ids, 0, config.vocab_size)
    if token_type_ids is not None:
        checks += _range_check("token_type_ids", token_type_ids, 0, config.type_vocab_size)
    for name, tensor, low, high, ignore in label_checks:
        if tensor is not None:
            checks += _range_check(name, tensor, low, high, ignore)
    # 0-d int64 tensors, stacked once for the one read
    values = [bound for bounds, _ in checks for bound in bounds]
    if attention_mask is not None:
        # entries other than 0/1 (an additive 0/-10000 mask, say), and the number of valid tokens
        valid = attention_mask != 0
        values += [(valid & (attention_mask != 1)).sum(), valid.sum()]
    if cu_seqlens is not None:
        values += torch.aminmax((cu_seqlens[1:] - cu_seqlens[:-1]).long())
    if subset_labels is not None:
        labelled = subset_labels != IGNORE_INDEX
        if attention_mask is not None:
            labelled = labelled & valid
        values.append(labelled.sum())
    values = torch.stack(values) if values else None
    if static:
        pending = None
        if values is not None:
            host = values.to("cpu", non_blocking=True)  # pinned memory when values is on a GPU
            event = None
            if host.device != values.device:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(values.device))  # the copy's stream, on values' device

            def pending():
                if event is not None:
                    event.synchronize()  # the checks' kernels ran at the start of the queue: no wait for the rest
                _read_checks(host.tolist(), checks, attention_mask, cu_seqlens, max_seqlen, subset_labels)

        return ModelInputs(batch_size, seqlen, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids,
                           cu_seqlens, max_seqlen, None, static=True, pending=pending)
    prepared = None
    if before_read is not None:  # its host time overlaps the GPU's work on earlier calls, which the read waits for
        prepared = before_read(ModelInputs(batch_size, seqlen, input_ids, inputs_embeds, attention_mask,
                                           token_type_ids, position_ids, cu_seqlens, max_seqlen, None))
    read = values.tolist() if values is not None else []  # the one device-to-host read
    total, max_seqlen, labelled = _read_checks(read, checks, attention_mask, cu_seqlens, max_seqlen, subset_labels)
    return ModelInputs(batch_size, seqlen, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids,
                       cu_seqlens, max_seqlen, total, labelled, prepared)


def _read_checks(read, checks, attention_mask, cu_seqlens, max_seqlen, subset_labels):
    """Raise `ValueError` on the values `validate_inputs` read (`read`, in the order it queued them); else return
    the number of valid tokens (None without a mask), max_seqlen (the longest document when not given) and the
    number of labelled tokens (None without `subset_labels`)."""
    for k, (_, check) in enumerate(checks):
        check(*read[2 * k : 2 * k + 2])
    read = read[2 * len(checks) :]
    total = None
    if attention_mask is not None:
        bad, total = read[:2]
        read = read[2:]
        if bad:
            raise ValueError(
                "`attention_mask` must hold 1 for tokens and 0 for padding (or bool); it has other values, e.g. "
                f"{attention_mask[(attention_mask != 0) & (attention_mask != 1)].flatten()[0].item()}. An additive "
                "mask (0 / -10000) is not accepted: pass `(additive_mask == 0).long()`."
            )
        if total == 0:
            raise ValueError(
                "`attention_mask` is all zeros: the batch has no tokens to encode. Drop empty batches before the "
                "model (a batch with some empty rows is fine: their outputs are zeros)."
            )
    if cu_seqlens is not None:
        shortest, longest = read[:2]
        if shortest < 0:
            raise ValueError(f"`cu_seqlens` must not decrease; got {cu_seqlens.tolist()}.")
        if max_seqlen is not None and int(max_seqlen) < longest:
            raise ValueError(
                f"max_seqlen={int(max_seqlen)} is below the longest sequence ({longest}) in `cu_seqlens`."
            )
        max_seqlen = longest if max_seqlen is None else int(max_seqlen)
        read = read[2:]
    labelled = read[0] if subset_labels is not None else None
    return total, max_seqlen, labelled


# The message of the compiled graph's input check. CUDA's `_assert_async` takes at most 254 characters.
COMPILED_INPUT_ERROR = (
    "MosaicBERT: an input value is out of range inside torch.compile (ids, token types or labels outside their "
    "range, an attention_mask not 0/1 or all zeros, or bad cu_seqlens). Run the batch uncompiled for the error "
    "that names it."
)


def _assert_on_device(config, seqlen, input_ids, token_type_ids, attention_mask, cu_seqlens, max_seqlen,
                      label_checks):
    """The value checks of `validate_inputs` inside a compiled graph, which cannot read values back: one
    `torch._assert_async` over all of them, so a bad batch fails (a RuntimeError on CPU, a device-side assert on
    a GPU) instead of giving wrong numbers. Its message cannot name the bad value; the same batch run eagerly
    raises the ValueError that does."""
    ok = []

    def in_range(tensor, low, high, ignore=None):
        inside = (tensor >= low) & (tensor < high)
        ok.append((inside if ignore is None else inside | (tensor == ignore)).all())

    if input_ids is not None:
        in_range(input_ids, 0, config.vocab_size)
    if token_type_ids is not None:
        in_range(token_type_ids, 0, config.type_vocab_size)
    for _, tensor, low, high, ignore in label_checks:
        if tensor is not None and tensor.numel():
            in_range(tensor, low, high, ignore)
    if attention_mask is not None:
        ok.append(((attention_mask == 0) | (attention_mask == 1)).all() & (attention_mask != 0).any())
    if cu_seqlens is not None:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        ok.append((cu_seqlens[0] == 0) & (cu_seqlens[-1] == seqlen) & (lengths >= 0).all())
        if max_seqlen is not None:
            ok.append((lengths <= max_seqlen).all())
    if ok:
        torch._assert_async(torch.stack(ok).all(), COMPILED_INPUT_ERROR)


def _validate_cu_seqlens(cu_seqlens, batch_size, seqlen, device):
    if batch_size != 1:
        raise ValueError(f"`cu_seqlens` describes a packed input of one row, but the batch has {batch_size} rows.")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"`cu_seqlens` must be a 1-D integer tensor of length n + 1, got {cu_seqlens!r}.")
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
    if not tracing():
        first, last = cu_seqlens[[0, -1]].tolist()
        if first != 0 or last != seqlen:
            raise ValueError(
                f"`cu_seqlens` must rise from 0 to the input length {seqlen}; got first={first}, last={last}."
            )
    return cu_seqlens


@dataclass
class TokenLayout:
    """Where the tokens of a (b, s) input are, how they split into sequences, and which attention function runs.

    `indices` (t,) are the flat (b * s) positions of the tokens that are computed (None: every position, as for
    an input without padding or the dense path); `sequences` describes the sequences for attention; `attention`
    is the key of `ATTENTION_FUNCTIONS` chosen for this forward; `first_index` (n,) is the row of each sequence's
    first token among the computed tokens (-1 for an empty row), for the pooler. `valid_rows` (t,) bool marks the
    computed rows that are tokens when padding is computed too (`config.static_shapes`); None: all are.
    """

    batch_size: int
    seqlen: int
    indices: torch.Tensor | None
    sequences: VarlenSequences | DenseSequences
    attention: str
    first_index: torch.Tensor
    packed: bool
    valid_rows: torch.Tensor | None = None

    def unpad(self, x):
        """(b, s, ...) -> (t, ...)"""
        flat = x.reshape(self.batch_size * self.seqlen, *x.shape[2:])
        return flat if self.indices is None else index_first_axis(flat, self.indices)

    def pad(self, x):
        """(t, ...) -> (b, s, ...) with zeros at padding."""
        if self.valid_rows is not None:
            x = torch.where(self.valid_rows.view(-1, *[1] * (x.dim() - 1)), x, 0)
        if self.indices is not None:
            return pad_input(x, self.indices, self.batch_size, self.seqlen)
        if isinstance(self.sequences, DenseSequences):
            x = torch.where(self.sequences.valid.reshape(-1, *[1] * (x.dim() - 1)), x, 0)
        return x.view(self.batch_size, self.seqlen, *x.shape[1:])

    def flat_index(self, token_idx):
        """Positions in the flattened (b * s) input of the computed tokens `token_idx`."""
        return token_idx if self.indices is None else self.indices[token_idx]

    def first_tokens(self, hidden):
        """(t, hidden) -> (n, hidden): each sequence's first valid token (zeros for an empty row)."""
        picked = hidden.index_select(0, self.first_index.clamp(min=0, max=max(hidden.shape[0] - 1, 0)))
        return torch.where((self.first_index >= 0)[:, None], picked, 0)


@dataclass
class LayoutPrep:
    """The layout's device work whose sizes do not depend on the input's values (`prepare_layout`), queued before
    the one device read so that its host time overlaps the GPU's work on earlier calls.

    `cu_rows` (b + 1,) int32 offsets of each row's valid tokens; `first_rows` (b,) the row of each one's first token
    among the computed tokens (-1 for an empty row); `positions` (b * s + 1,) the flat positions of the valid
    tokens first, in order (None without a mask); `subset` (b * s + 1,) the computed-token rows of the labelled
    tokens first (sparse MLM), or None. The counts read with the checks cut the buffers.
    """

    cu_rows: torch.Tensor
    first_rows: torch.Tensor
    positions: torch.Tensor | None
    subset: torch.Tensor | None


def first_rows(cu):
    """(n,) int64 row of each sequence's first token among the computed tokens, from its (n + 1,) offsets; -1 for
    an empty sequence, which has none."""
    return torch.where(cu[1:] > cu[:-1], cu[:-1].long(), -1)


def _full_rows(b, s, device):
    """(b + 1,) int32 row offsets of a batch without padding."""
    return torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device)


def prepare_layout(inputs: ModelInputs, attention: str, subset_labels=None) -> LayoutPrep | None:
    """`LayoutPrep` for the unpadded layouts; None for the padded one (`DenseSequences`), which needs nothing read."""
    if ATTENTION_FUNCTIONS[attention][1] is DenseSequences:
        return None
    b, s = inputs.batch_size, inputs.seqlen
    device = inputs.device
    if inputs.attention_mask is None:
        valid, positions = None, None
        cu_rows = _full_rows(b, s, device)
    else:
        valid = (inputs.attention_mask != 0).reshape(-1)
        cu_rows = cu_seqlens_from_lengths(valid.view(b, s).sum(-1, dtype=torch.int32))
        positions = scatter_by_rank(valid, torch.arange(b * s, device=device))
    subset = None
    if subset_labels is not None:
        labelled = subset_labels.reshape(-1) != IGNORE_INDEX
        if valid is None:
            rows = torch.arange(b * s, device=device)
        else:  # each valid position's row among the computed tokens (its own position when nothing is padding)
            labelled = labelled & valid
            rows = torch.cumsum(valid, 0) - 1
        subset = scatter_by_rank(labelled, rows)
    return LayoutPrep(cu_rows, first_rows(cu_rows), positions, subset)


def build_layout(inputs: ModelInputs, attention: str) -> TokenLayout:
    """The layout for the attention function `attention`: unpadded tokens (`VarlenSequences`) or the padded
    batch with masks (`DenseSequences`). Reads nothing from the device (the number of valid tokens was read with
    the other checks); cuts `inputs.prepared` when it was made, and builds it while tracing."""
    b, s = inputs.batch_size, inputs.seqlen
    mask = inputs.attention_mask
    if ATTENTION_FUNCTIONS[attention][1] is DenseSequences:
        return _dense_layout(inputs, attention)
    if inputs.static and mask is not None:  # without a mask the layout below has no mask-dependent size either
        return _static_layout(inputs, attention)

    prep = inputs.prepared
    if prep is not None:
        cu_rows = prep.cu_rows
        indices = None if mask is None or inputs.total == b * s else prep.positions[: inputs.total]
    elif mask is None:
        indices, cu_rows = None, _full_rows(b, s, inputs.device)
    else:  # tracing: the count is not read, the positions are (nonzero, a data-dependent size)
        _, indices, cu_rows, _ = unpad_input(mask[..., None], mask, inputs.total)
    max_seqlen = s
    if inputs.cu_seqlens is not None:  # one row of packed documents, no padding
        cu, max_seqlen = inputs.cu_seqlens, inputs.max_seqlen
    elif inputs.position_ids is not None:
        # Packed documents: a sequence starts at each row's first token and wherever position_ids is 0.
        positions = inputs.position_ids.reshape(-1)
        positions = positions if indices is None else positions[indices]
        starts = positions == 0
        starts[cu_rows[:-1][cu_rows[1:] > cu_rows[:-1]].long()] = True  # each non-empty row's first token
        cu = torch.cat([torch.nonzero(starts).flatten(), starts.new_tensor([starts.numel()], dtype=torch.long)])
        cu = cu.to(torch.int32)
    else:
        cu = cu_rows
    sequences = VarlenSequences(cu, max_seqlen)
    if attention == "torch":
        sequences.build_buckets()
    first_index = prep.first_rows if prep is not None and cu is prep.cu_rows else first_rows(cu)
    return TokenLayout(b, s, indices, sequences, attention, first_index, inputs.packed)


def _static_layout(inputs: ModelInputs, attention: str) -> TokenLayout:
    """For an input with a mask: every padded position computed (`config.static_shapes`), sizes fixed by the
    input's shape alone. In each row the tokens come first, in order, then the padding, and the two are separate
    sequences for attention (2b of them, either may be empty), so tokens attend to the row's tokens at their
    unpadded ALiBi distances, as when the padding is removed."""
    b, s = inputs.batch_size, inputs.seqlen
    device = inputs.device
    valid = inputs.attention_mask != 0  # (b, s)
    lengths = valid.sum(-1)  # (b,)
    # column of each position once the row's tokens are moved ahead of its padding, both in order
    column = torch.where(valid, valid.cumsum(-1) - 1, lengths[:, None] + (~valid).cumsum(-1) - 1)
    starts = torch.arange(0, b * s, s, device=device)  # (b,) each row's first flat position
    positions = torch.arange(s, device=device)
    indices = (torch.empty_like(column).scatter_(1, column, positions.expand(b, s)) + starts[:, None]).flatten()
    cu = torch.cat([torch.stack([starts, starts + lengths], 1).flatten(), starts.new_full((1,), b * s)])
    cu = cu.to(torch.int32)  # (2b + 1,): row i's tokens, then its padding
    valid_rows = (positions[None, :] < lengths[:, None]).flatten()  # (b * s,)
    first_index = torch.where(lengths > 0, starts, -1)
    sequences = VarlenSequences(cu, s)
    if attention == "torch":
        sequences.build_buckets()
    return TokenLayout(b, s, indices, sequences, attention, first_index, False, valid_rows)


def _dense_layout(inputs: ModelInputs, attention: str) -> TokenLayout:
    b, s = inputs.batch_size, inputs.seqlen
    device = inputs.device
    valid = (
        torch.ones(b, s, dtype=torch.bool, device=device) if inputs.attention_mask is None
        else inputs.attention_mask != 0
    )
    rank = valid.long().cumsum(-1) - 1  # (b, s): valid tokens before each one in its row
    starts = valid & (rank == 0)  # each row's first valid token
    if inputs.position_ids is not None:
        starts = starts | (valid & (inputs.position_ids == 0))
    if inputs.cu_seqlens is not None:  # one row; a trailing empty document marks index s, dropped by the slice
        marks = torch.zeros(s + 1, dtype=torch.bool, device=device)
        starts = starts | marks.index_fill(0, inputs.cu_seqlens[:-1].long(), True)[None, :s]
    if inputs.cu_seqlens is not None:  # one row: flat positions are the offsets; an empty document has none
        first_index = first_rows(inputs.cu_seqlens)
    elif inputs.packed:
        first_index = torch.nonzero(starts.flatten()).flatten()
    else:  # each row's first valid token: the first maximum of `valid`
        first = valid.to(torch.int8).argmax(-1) + torch.arange(b, device=device) * s
        first_index = torch.where(valid.any(-1), first, -1)
    sequences = DenseSequences(valid, starts.long().cumsum(-1), rank)
    return TokenLayout(b, s, None, sequences, attention, first_index, inputs.packed)


# ----------------------------------------------------------------------------------------------------------------
# Modules (names follow the upstream checkpoints)


class BertLayerNorm(nn.LayerNorm):
    """LayerNorm whose normalization runs fused with the residual add and dropout before it
    (`fused_ops.add_dropout_layer_norm`: one pass, float32 statistics).

    Output dtype: outside autocast, the promoted dtype of the inputs (fp32 models stay fp32). Under autocast,
    float32 as autocast's own LayerNorm gives, or with `config.low_precision_layernorm` the autocast dtype, as
    MosaicBERT pretraining did (half the bytes in the residual stream).
    """

    def __init__(self, hidden_size, eps, low_precision=False):
        super().__init__(hidden_size, eps=eps)
        self.low_precision = low_precision

    def forward(self, x, residual=None, dropout_p=0.0, with_copy=False, x_bias=None):
        """LayerNorm(dropout(x + x_bias) + residual); dropout only in training. x_bias: see `linear_layer_norm`.

        With `with_copy`, returns (output, copy): under autocast with an fp32 output and a 16-bit autocast dtype,
        copy is the output in that dtype, written by the same kernel pass, for a Linear to read instead of casting
        the output itself (one pass and, in the backward, one gradient add fewer); otherwise None.
        """
        out_dtype = copy_dtype = None
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            autocast_dtype = torch.get_autocast_dtype(device_type)
            out_dtype = autocast_dtype if self.low_precision else torch.float32
            if with_copy and out_dtype == torch.float32 and autocast_dtype in (torch.float16, torch.bfloat16):
                copy_dtype = autocast_dtype
        out = add_dropout_layer_norm(
            x, residual, self.weight, self.bias, self.eps, dropout_p=dropout_p, training=self.training,
            out_dtype=out_dtype, copy_dtype=copy_dtype, x_bias=x_bias,
        )
        if not with_copy:
            return out
        return out if copy_dtype is not None else (out, None)


def layer_norm(config):
    return BertLayerNorm(config.hidden_size, config.layer_norm_eps, config.low_precision_layernorm)


def classifier_dropout(config):
    p = config.classifier_dropout
    return nn.Dropout(config.hidden_dropout_prob if p is None else p)


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
            token_type = self.token_type_embeddings.weight[0]  # (hidden,): type 0 for every token
        else:
            token_type = self.token_type_embeddings(token_type_ids)  # (t, hidden)
        if _has_hooks(self.LayerNorm) or inputs_embeds.dtype != token_type.dtype:
            # a hook sees the sum it would see unfused; mixed dtypes keep the promotion of the sum
            return self.dropout(self.LayerNorm(inputs_embeds + token_type))
        # the sum is formed inside the LayerNorm kernel's pass (no add pass of its own)
        if token_type_ids is None:
            return self.dropout(self.LayerNorm(inputs_embeds, x_bias=token_type))
        return self.dropout(self.LayerNorm(inputs_embeds, token_type))


class BertUnpadSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"The hidden size ({config.hidden_size}) is not a multiple of the number of attention heads "
                f"({config.num_attention_heads})."
            )
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden_states, layout, slopes, gemm_input=None):
        # gemm_input: hidden_states in the autocast dtype (the LayerNorm's copy), or None
        wqkv = self.Wqkv
        if _plain_linear(wqkv):
            x = hidden_states if gemm_input is None else gemm_input
            qkv = F.linear(x, wqkv.weight, wqkv.bias)
        else:
            qkv = wqkv(hidden_states)
        qkv = qkv.view(-1, 3, self.num_attention_heads, self.attention_head_size)  # (t, 3, h, d)
        attend = ATTENTION_FUNCTIONS[layout.attention][0]
        context, probs = attend(qkv, layout.sequences, slopes, self.dropout_p if self.training else 0.0)
        return context.reshape(context.shape[0], -1), probs  # (t, hidden), (b, h, s, s) or None


class BertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = layer_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual, with_copy=False):
        return linear_layer_norm(self.dense, hidden_states, self.LayerNorm, residual, self.dropout.p, with_copy)


class BertUnpadAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertUnpadSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, layout, slopes, subset_idx=None, gemm_input=None, with_copy=False):
        context, probs = self.self(hidden_states, layout, slopes, gemm_input)
        if subset_idx is not None:  # only these rows are needed after attention (sparse MLM, last layer)
            context = index_first_axis(context, subset_idx)
            hidden_states = index_first_axis(hidden_states, subset_idx)
        return self.output(context, hidden_states, with_copy=with_copy), probs


def _plain_linear(linear):
    """A plain nn.Linear without hooks, which the encoder may run as its parts: `F.linear` on its parameters (no
    module call), reading the LayerNorm's autocast-dtype copy of its input (what autocast would cast the input to)
    instead of the input, or leaving its bias to the LayerNorm after it. A replaced or hooked module (forward or
    backward hooks, its own or global ones, or a `forward` set on the instance, as accelerate's offloading hooks
    do) runs as itself, on the input as it is."""
    return type(linear) is nn.Linear and "forward" not in linear.__dict__ and not _has_hooks(linear)


def linear_layer_norm(linear, x, layer_norm, residual, dropout_p, with_copy=False):
    """layer_norm(dropout(linear(x)) + residual). In training mode with the fused kernels, a plain Linear's trainable
    bias is added by the LayerNorm kernel instead of the GEMM, so that its gradient is summed in the LayerNorm
    backward's pass rather than by a reduction kernel of its own (not with hooks on either module: they see what
    they would see unfused). Decided by the module's mode, not by grad mode, so a reentrant checkpoint's no-grad
    forward and its recompute take the same path."""
    if not _plain_linear(linear):
        return layer_norm(linear(x), residual, dropout_p, with_copy)
    bias = linear.bias
    if (
        linear.training and bias is not None and bias.requires_grad and not _has_hooks(layer_norm)
        and fused_kernels_available(x)
    ):
        return layer_norm(F.linear(x, linear.weight), residual, dropout_p, with_copy, x_bias=bias)
    return layer_norm(F.linear(x, linear.weight, bias), residual, dropout_p, with_copy)


_TORCH_MODULE = nn.modules.module  # holds the global hooks of `register_module_forward_hook` and the like


def _has_hooks(module):
    """True when calling `module` would run hooks: its own forward (pre-)hooks or backward (pre-)hooks, or the global
    ones of `torch.nn.modules.module.register_module_forward_hook` and its siblings. A module with hooks runs as
    itself, on what it would see unfused. Called a few times a layer on every forward: attribute reads only."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _TORCH_MODULE._global_forward_hooks
        or _TORCH_MODULE._global_forward_pre_hooks
        or _TORCH_MODULE._global_backward_hooks
        or _TORCH_MODULE._global_backward_pre_hooks
    )


class BertGatedLinearUnitMLP(nn.Module):
    """Gated-GELU MLP: dropout(GELU(x W_g) * (x W_v)) in one fused pass, W_o, then residual + post-LayerNorm."""

    def __init__(self, config):
        super().__init__()
        self.gated_layers = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layernorm = layer_norm(config)

    def forward(self, hidden_states, gemm_input=None, with_copy=False):
        # (t, hidden) -> (t, intermediate). A plain bias-free Linear is handed over as its weight, so inference can
        # apply the gated GELU in the GEMM's epilogue; a replaced or hooked module (an adapter, a quantized Linear,
        # a hook of any kind) runs as itself. gemm_input: hidden_states in the autocast dtype, or None.
        gated, dropout_p = self.gated_layers, self.dropout.p
        if _plain_linear(gated) and gated.bias is None:
            x = hidden_states if gemm_input is None else gemm_input
            glu = gated_linear_gelu(x, gated.weight, dropout_p=dropout_p, training=self.training)
        else:
            glu = gated_gelu(gated(hidden_states), dropout_p=dropout_p, training=self.training)
        return linear_layer_norm(self.wo, glu, self.layernorm, hidden_states, dropout_p, with_copy)


class BertLayer(GradientCheckpointingLayer):
    def __init__(self, config):
        super().__init__()
        self.attention = BertUnpadAttention(config)
        self.mlp = BertGatedLinearUnitMLP(config)

    def forward(self, hidden_states, layout, slopes, subset_idx=None, gemm_input=None, with_copy=False):
        """-> (hidden states, their autocast-dtype copy or None, attention probabilities or None).

        gemm_input: hidden_states in the autocast dtype (the previous LayerNorm's copy), or None; with_copy: return
        this layer's output's copy too (`BertLayerNorm`), for the next layer.
        """
        # A module whose output gets a copy returns a pair: with a hook on it, it returns its output alone,
        # as the hook expects
        attention, mlp = self.attention, self.mlp
        output = attention.output
        mid_copy = _plain_linear(mlp.gated_layers) and not (
            _has_hooks(attention) or _has_hooks(output) or _has_hooks(output.LayerNorm)
        )
        with_copy = with_copy and not (_has_hooks(mlp) or _has_hooks(mlp.layernorm))
        out, probs = attention(hidden_states, layout, slopes, subset_idx, gemm_input, with_copy=mid_copy)
        hidden_states, copy = out if mid_copy else (out, None)
        out = mlp(hidden_states, copy, with_copy=with_copy)
        hidden_states, copy = out if with_copy else (out, None)
        return hidden_states, copy, probs


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])
        self.register_buffer("alibi_slopes", alibi_slopes(config.num_attention_heads), persistent=False)
        self.gradient_checkpointing = False

    def _apply(self, fn, recurse=True):
        # A dtype cast of the whole model (model.half(), .to(torch.bfloat16)) casts buffers too: the slopes are
        # computed again in fp32 instead, exact, so that a forward reads them as they are.
        super()._apply(fn, recurse)
        if self.alibi_slopes.dtype != torch.float32:
            self.alibi_slopes = alibi_slopes(self.config.num_attention_heads, device=self.alibi_slopes.device)
        return self

    def slopes(self):
        # a buffer cast around _apply (a wrapper assigning buffers itself): the slopes stay exact in fp32
        if self.alibi_slopes.dtype != torch.float32:
            return alibi_slopes(self.config.num_attention_heads, device=self.alibi_slopes.device)
        return self.alibi_slopes

    def forward(self, hidden, layout, subset_idx=None, output_hidden_states=False, output_attentions=False):
        """hidden (t, hidden) -> (hidden, hidden states per layer (padded) or None, attentions or None).

        With `subset_idx`, the last layer computes its attention output and MLP only for those rows (sparse MLM).
        Each returned hidden state is the tensor the next layer reads, so gradients reach it.
        """
        slopes = self.slopes()
        all_hidden = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None

        def keep(h):
            all_hidden.append(layout.pad(h))
            return layout.unpad(all_hidden[-1])

        if output_hidden_states:
            hidden = keep(hidden)
        # On CPU the GLU's GEMM output goes to one buffer reused by every layer (no fresh pages to fault in)
        reuse = hidden.device.type == "cpu" and not tracing()
        # Each layer's output LayerNorm also writes the autocast-dtype copy the next layer's Wqkv reads (under
        # autocast with fp32 LayerNorm outputs); not when hidden states are returned, whose gradients must carry
        # all of the next layer's.
        copy = None
        layers = list(self.layer)
        with reuse_cpu_gemm_output() if reuse else contextlib.nullcontext():
            for i, layer in enumerate(layers):
                last = i == len(layers) - 1
                rows = subset_idx if last and not output_hidden_states else None
                with_copy = not (last or output_hidden_states) and _plain_linear(layers[i + 1].attention.self.Wqkv)
                hidden, copy, probs = layer(hidden, layout, slopes, rows, copy, with_copy=with_copy)
                if output_hidden_states:
                    hidden = keep(hidden)
                if output_attentions:
                    all_attentions.append(probs)  # (b, h, s, s) from the dense path
        if subset_idx is not None and output_hidden_states:
            hidden = index_first_axis(hidden, subset_idx)
        return (
            hidden,
            tuple(all_hidden) if output_hidden_states else None,
            tuple(all_attentions) if output_attentions else None,
        )


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
# Models


@dataclass
class EncoderState:
    """What the encoder computed, unpadded: (t, hidden), or (rows of subset_idx, hidden) for sparse MLM."""

    hidden: torch.Tensor
    layout: TokenLayout
    subset_idx: torch.Tensor | None
    hidden_states: tuple | None
    attentions: tuple | None


# transformers' `attn_implementation` mapped onto `config.attention_backend`. "eager" changes nothing: transformers
# sets it by itself (for `output_attentions`, say), and MosaicBERT forms attention probabilities on any backend.
ATTN_IMPLEMENTATIONS = {"eager": None, "sdpa": "torch", "flash_attention_2": "triton"}


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

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        """`from_pretrained(..., attn_implementation=...)`: "sdpa" -> the plain path, "flash_attention_2" -> the
        Triton kernel (`config.attention_backend`); anything else is an error that says what to set instead."""
        if requested_attention is None:
            return "eager"
        if requested_attention not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={requested_attention!r} is not available for MosaicBERT, whose attention is "
                "chosen by `config.attention_backend` ('auto', 'torch' or 'triton'). attn_implementation 'sdpa' "
                "maps to 'torch', 'flash_attention_2' to 'triton'."
            )
        backend = ATTN_IMPLEMENTATIONS[requested_attention]
        if backend is not None:
            self.config.attention_backend = backend
        return "eager"

    def _init_weights(self, module):
        super()._init_weights(module)  # Linear/Embedding ~ N(0, initializer_range), zero biases and pad row, LN 1/0
        if isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, BertEncoder):
            # Non-persistent, so never loaded: always computed (torch.nn.init of transformers 4.x has no copy_).
            with torch.no_grad():
                module.alibi_slopes.copy_(alibi_slopes(self.config.num_attention_heads))


def _flag(value, default):
    return default if value is None else value


def _unexpected_kwargs(model, kwargs):
    kwargs.pop("num_items_in_batch", None)
    if kwargs:
        raise TypeError(f"{type(model).__name__}.forward got unexpected arguments: {sorted(kwargs)}.")


class BertModel(BertPreTrainedModel):
    """The MosaicBERT encoder, with an optional pooler (tanh(dense) of each sequence's first token)."""

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

    def run(self, *, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
            cu_seqlens=None, max_seqlen=None, output_attentions=None, output_hidden_states=None, label_checks=(),
            subset_labels=None, **kwargs) -> EncoderState:
        """Validate, lay out, embed and encode; the result stays unpadded. The heads' entry point.

        `label_checks`: (name, labels, low, high, ignore) checked with the inputs in one read. With `subset_labels`
        (b, s), the last layer runs only on the tokens whose label is not -100 (sparse MLM); `subset_idx` lists them.
        """
        cu_seqlens, max_seqlen = packed_kwargs(kwargs, cu_seqlens, max_seqlen)
        _unexpected_kwargs(self, kwargs)
        output_attentions = _flag(output_attentions, self.config.output_attentions)
        output_hidden_states = _flag(output_hidden_states, self.config.output_hidden_states)
        given = input_ids if input_ids is not None else inputs_embeds
        attention = None
        if given is not None:  # else validate_inputs says what is missing
            device = given.device
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else self.embeddings.word_embeddings.weight.dtype
            dropout_p = self.config.attention_probs_dropout_prob if self.training else 0.0
            attention = resolve_attention(self.config, device, dtype, dropout_p, output_attentions)
        static = (
            self.config.static_shapes and attention is not None and position_ids is None and cu_seqlens is None
            and ATTENTION_FUNCTIONS[attention][1] is VarlenSequences
        )
        inputs = validate_inputs(
            self.config, input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            label_checks=label_checks, subset_labels=subset_labels,
            before_read=lambda early: prepare_layout(early, attention, subset_labels), static=static,
        )
        layout = build_layout(inputs, attention)
        if inputs.pending is not None:  # values not read yet: the embedding gathers stay in bounds until they are
            if input_ids is not None:
                input_ids = input_ids.clamp(0, self.config.vocab_size - 1)
            if token_type_ids is not None:
                token_type_ids = token_type_ids.clamp(0, self.config.type_vocab_size - 1)

        hidden = self.embeddings(
            input_ids=None if input_ids is None else layout.unpad(input_ids),
            token_type_ids=None if token_type_ids is None else layout.unpad(token_type_ids),
            inputs_embeds=None if inputs_embeds is None else layout.unpad(inputs_embeds),
        )  # (t, hidden)
        subset_idx = None
        if subset_labels is not None and inputs.prepared is not None:
            subset_idx = inputs.prepared.subset[: inputs.labelled]  # (m,)
        elif subset_labels is not None:
            labelled = layout.unpad(subset_labels) != IGNORE_INDEX  # (t,)
            if isinstance(layout.sequences, DenseSequences):  # labels at padding are not tokens, as when unpadded
                labelled = labelled & layout.sequences.valid.reshape(-1)
            if layout.valid_rows is not None:
                labelled = labelled & layout.valid_rows
            subset_idx = valid_token_indices(labelled, inputs.labelled)  # (m,)
        hidden, hidden_states, attentions = self.encoder(
            hidden, layout, subset_idx, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        if inputs.pending is not None:
            inputs.pending()  # the checks, read now that the forward is queued: raises on a bad input
        return EncoderState(hidden, layout, subset_idx, hidden_states, attentions)

    def pool(self, state: EncoderState):
        """(n, hidden): the pooler over each sequence's first token (documents of packed input count apart)."""
        return self.pooler(state.layout.first_tokens(state.hidden))

    @can_return_tuple
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
            attention_mask (`(batch, seq_len)`, *optional*): 1 (or True) for tokens, 0 for padding; other values
                are an error. Padding is removed before the first layer, on either side; its outputs are zeros.
            token_type_ids (`(batch, seq_len)`, *optional*): segment ids, 0 when absent.
            position_ids (`(batch, seq_len)`, *optional*): not embedded (ALiBi carries position); a restart at 0
                inside a row starts a new document there (packed input, as `DataCollatorWithFlattening` makes).
            cu_seqlens (`(n + 1,)` int, *optional*), max_seqlen (`int`, *optional*): document offsets of a packed
                input of one row, instead of `position_ids`. transformers' flash-attention kwargs
                (`cu_seq_lens_q/k`, `max_length_q/k`, `seq_idx`) are accepted as the same.

        Returns:
            `BaseModelOutputWithPooling`: `last_hidden_state` (batch, seq_len, hidden); `pooler_output` when the
            model has a pooler: (batch, hidden) from each row's first valid token, or (documents, hidden) for packed
            input; `hidden_states` (embeddings + one per layer, padded) and `attentions` (batch, heads, seq_len,
            seq_len) when asked.
        """
        state = self.run(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, **kwargs,
        )
        return BaseModelOutputWithPooling(
            last_hidden_state=state.layout.pad(state.hidden),  # (b, s, hidden)
            pooler_output=self.pool(state) if self.pooler is not None else None,
            hidden_states=state.hidden_states,
            attentions=state.attentions,
        )


def _check_token_labels(labels, input_ids, inputs_embeds):
    ref = input_ids if input_ids is not None else inputs_embeds
    if labels is not None and ref is not None:
        _check_shape("labels", labels, ref.shape[:2])


def mean_loss(total, count, num_items_in_batch=None):
    """A summed loss over `count` items, divided by `num_items_in_batch` when Trainer passes it (gradient
    accumulation over micro-batches), else by the count (at least 1, so no labelled item gives 0, not NaN)."""
    if num_items_in_batch is not None:
        count = num_items_in_batch
    elif torch.is_tensor(count):
        count = count.clamp(min=1)
    else:
        count = max(count, 1)
    return total / (count.to(total.device) if torch.is_tensor(count) else count)


class BertForMaskedLM(BertPreTrainedModel):
    _auto_class = "AutoModelForMaskedLM"
    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}
    if TRANSFORMERS_V4:  # 4.x lists the tied parameters; 5.x maps each to its source
        _tied_weights_keys = list(_tied_weights_keys)
    _keys_to_ignore_on_load_unexpected = [r"^bert\.pooler\."]
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

    @can_return_tuple
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
        last layer's attention output, MLP and the head run only on labelled tokens (sparse MLM) and `loss` is the
        mean cross-entropy over them; `logits` is (batch, seq_len, vocab), zero at positions whose label is -100,
        or with `config.sparse_prediction` only the labelled tokens' rows, (m, vocab) in row-major order
        (`labels[labels != -100]` are their targets).
        """
        _check_token_labels(labels, input_ids, inputs_embeds)
        state = self.bert.run(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            label_checks=[("labels", labels, 0, self.config.vocab_size, IGNORE_INDEX)], subset_labels=labels,
            **kwargs,
        )
        layout = state.layout
        logits = self.cls(state.hidden)  # (t, v), or (m, v) with labels
        loss = None
        if labels is not None:
            flat_index = layout.flat_index(state.subset_idx)  # (m,)
            target = labels.reshape(-1)[flat_index]
            # ids checked at entry (label_checks); the fused kernel reads the logits in their dtype, no fp32 copy
            total = cross_entropy(logits, target).sum()
            loss = mean_loss(total, target.shape[0], num_items_in_batch)
            if not self.config.sparse_prediction:
                logits = index_put_first_axis(logits, flat_index, layout.batch_size * layout.seqlen)
                logits = logits.view(layout.batch_size, layout.seqlen, -1)
        else:
            logits = layout.pad(logits)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=state.hidden_states, attentions=state.attentions)


def sequence_classification_loss(config, logits, labels):
    """Loss by `config.problem_type` (regression, single- or multi-label), inferred as transformers does."""
    num_labels = logits.shape[-1]
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
        return F.mse_loss(logits.float(), labels.float())
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.float().view(-1, num_labels), labels.view(-1))
    if config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    raise ValueError(f"Unknown problem_type {config.problem_type!r}.")


def _class_label_checks(config, labels, num_classes):
    """Range check of class-index labels (single-label classification), to run with the input checks."""
    single_label = config.problem_type in (None, "single_label_classification") and num_classes > 1
    if labels is None or not single_label or labels.dtype not in (torch.long, torch.int):
        return []
    return [("labels", labels, 0, num_classes, None)]


def _check_sentence_labels(labels, rows, what):
    if labels is not None and labels.shape[0] != rows:
        raise ValueError(
            f"`labels` has {labels.shape[0]} rows but the input has {rows} {what} (packed rows give one result per "
            "document, so labels are per document)."
        )


class BertForSequenceClassification(BertPreTrainedModel):
    """Pooled first token of each sequence -> dropout -> linear. Packed input (several documents per row) gives
    one row of logits per document."""

    _auto_class = "AutoModelForSequenceClassification"
    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        self.dropout = classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
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
        """`logits` (batch, num_labels), or (documents, num_labels) for packed input; `labels` likewise per row."""
        state = self.bert.run(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            label_checks=_class_label_checks(self.config, labels, self.num_labels), **kwargs,
        )
        logits = self.classifier(self.dropout(self.bert.pool(state)))  # (n, num_labels)
        loss = None
        if labels is not None:
            _check_sentence_labels(labels, logits.shape[0], "documents" if state.layout.packed else "rows")
            loss = sequence_classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=state.hidden_states, attentions=state.attentions
        )


class BertForTokenClassification(BertPreTrainedModel):
    _auto_class = "AutoModelForTokenClassification"
    _keys_to_ignore_on_load_unexpected = [r"^bert\.pooler\."]
    accepts_loss_kwargs = True

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
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
        _check_token_labels(labels, input_ids, inputs_embeds)
        state = self.bert.run(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            label_checks=[("labels", labels, 0, self.num_labels, IGNORE_INDEX)], **kwargs,
        )
        logits = state.layout.pad(self.classifier(self.dropout(state.hidden)))  # (b, s, num_labels)
        loss = None
        if labels is not None:
            total = F.cross_entropy(
                logits.float().view(-1, self.num_labels), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            loss = mean_loss(total, (labels != IGNORE_INDEX).sum(), num_items_in_batch)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=state.hidden_states, attentions=state.attentions
        )


class BertForQuestionAnswering(BertPreTrainedModel):
    _auto_class = "AutoModelForQuestionAnswering"
    _keys_to_ignore_on_load_unexpected = [r"^bert\.pooler\."]
    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = 2
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
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
        state = self.bert.run(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, **kwargs,
        )
        logits = self.qa_outputs(state.layout.pad(state.hidden))  # (b, s, 2)
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
        return QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=state.hidden_states,
            attentions=state.attentions,
        )


class BertForMultipleChoice(BertPreTrainedModel):
    _auto_class = "AutoModelForMultipleChoice"
    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config)
        self.dropout = classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    @can_return_tuple
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
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is not None and ref.dim() != (3 if input_ids is not None else 4):
            raise ValueError(
                f"Multiple choice inputs must have shape (batch, num_choices, seq_len"
                f"{', hidden' if input_ids is None else ''}), got shape {tuple(ref.shape)}."
            )
        num_choices = ref.shape[1] if ref is not None else 1

        def flat(x):  # (b, c, s, ...) -> (b * c, s, ...)
            return None if x is None else x.reshape(-1, *x.shape[2:])

        state = self.bert.run(
            input_ids=flat(input_ids), attention_mask=flat(attention_mask), token_type_ids=flat(token_type_ids),
            position_ids=flat(position_ids), inputs_embeds=flat(inputs_embeds), output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            label_checks=_class_label_checks(self.config, labels, num_choices), **kwargs,
        )
        pooled = self.bert.pool(state)  # (b * c, hidden)
        if pooled.shape[0] != state.layout.batch_size:
            raise ValueError("Multiple choice takes one sequence per choice: packed `position_ids` are not accepted.")
        logits = self.classifier(self.dropout(pooled)).view(-1, num_choices)  # (b, c)
        loss = None
        if labels is not None:
            _check_sentence_labels(labels, logits.shape[0], "rows")
            loss = F.cross_entropy(logits.float(), labels)
        return MultipleChoiceModelOutput(
            loss=loss, logits=logits, hidden_states=state.hidden_states, attentions=state.attentions
        )


__all__ = [
    "ATTENTION_FUNCTIONS",
    "BertForMaskedLM",
    "BertForMultipleChoice",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "BertPreTrainedModel",
    "alibi_slopes",
]
