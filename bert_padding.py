"""Moving tokens between the padded (batch, seqlen, ...) layout and the unpadded (total_tokens, ...) one.

This module is the one home of padding and unpadding: the model removes padding once at its input with
`unpad_input` and restores it once at its output with `pad_input`.

Axes: b batch, s padded sequence length, t total valid tokens.
The gather/scatter are autograd Functions because the indices are unique: the backward of a gather is a plain
scatter (no accumulation), which is cheaper and deterministic on every device.
"""

import torch


class IndexFirstAxis(torch.autograd.Function):
    """`x[indices]` along the first axis, with a scatter (not a scatter-add) as backward."""

    @staticmethod
    def forward(ctx, x, indices):
        # x: (n, ...), indices: (t,) int64 unique -> (t, ...)
        ctx.save_for_backward(indices)
        ctx.first_axis = x.shape[0]
        return x.index_select(0, indices)

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        grad_in = grad_out.new_zeros((ctx.first_axis, *grad_out.shape[1:]))
        grad_in.index_copy_(0, indices, grad_out)
        return grad_in, None


class IndexPutFirstAxis(torch.autograd.Function):
    """Scatter `values` into a zero tensor of `first_axis` rows at `indices`."""

    @staticmethod
    def forward(ctx, values, indices, first_axis):
        # values: (t, ...), indices: (t,) int64 unique -> (first_axis, ...)
        ctx.save_for_backward(indices)
        out = values.new_zeros((first_axis, *values.shape[1:]))
        out.index_copy_(0, indices, values)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        return grad_out.index_select(0, indices), None, None


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return IndexFirstAxis.apply(x, indices)


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis: int) -> torch.Tensor:
    return IndexPutFirstAxis.apply(values, indices, first_axis)


def cu_seqlens_from_lengths(seqlens: torch.Tensor) -> torch.Tensor:
    """(n,) lengths -> (n + 1,) int32 cumulative offsets starting at 0."""
    return torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))


def valid_token_indices(attention_mask: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """(t,) int64 positions of the nonzero entries of `attention_mask` in its flattened layout, in order.

    With `total` (the number of valid tokens, known on the host) no device value is read: each valid position is
    scattered to its rank among the valid ones. Without it this is `nonzero`, which reads the count back.
    """
    flat = attention_mask.reshape(-1) != 0
    if total is None:
        return torch.nonzero(flat, as_tuple=False).flatten()
    return scatter_by_rank(flat, torch.arange(flat.numel(), device=flat.device))[:total]


def scatter_by_rank(flags: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(n + 1,) buffer, n = flags.numel(), whose first k entries are `values` at the flagged positions, in order
    (k = the number of flags, which the caller knows or reads later); the entries after them are unspecified.

    Sizes do not depend on the flags' values, so nothing is read from the device: each flagged value is scattered
    to its rank among the flagged ones, the others to a spare slot past the end.
    """
    flags = flags.reshape(-1)
    rank = torch.cumsum(flags, 0) - 1
    target = torch.where(flags, rank, flags.numel())
    return values.new_empty(flags.numel() + 1).scatter_(0, target, values.reshape(-1))


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, total: int | None = None):
    """Gather the valid tokens of a padded batch.

    Args:
        hidden_states: (b, s, ...) any dtype.
        attention_mask: (b, s), nonzero where the token is valid. Valid tokens need not be contiguous.
        total: the number of valid tokens if the caller knows it (then nothing is read from the device).

    Returns:
        hidden_states: (t, ...) the valid tokens in row-major order.
        indices: (t,) int64 positions of those tokens in the flattened (b * s) layout.
        cu_seqlens: (b + 1,) int32 offsets of each row's tokens; rows without valid tokens have length 0.
        max_seqlen: s, an upper bound of the longest row (the kernels need a bound, and reading the true
            maximum would cost a device-to-host copy).
    """
    seqlens = (attention_mask != 0).sum(dim=-1, dtype=torch.int32)
    indices = valid_token_indices(attention_mask, total)
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens_from_lengths(seqlens), attention_mask.shape[1]


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of `unpad_input`: (t, ...) -> (b, s, ...) with zeros at padded positions."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.view(batch, seqlen, *hidden_states.shape[1:])


__all__ = [
    "IndexFirstAxis",
    "IndexPutFirstAxis",
    "cu_seqlens_from_lengths",
    "index_first_axis",
    "index_put_first_axis",
    "pad_input",
    "scatter_by_rank",
    "unpad_input",
    "valid_token_indices",
]
