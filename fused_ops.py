import torch
import torch.nn.functional as F


def gated_gelu(x):
    gate, value = x.chunk(2, dim=-1)
    return F.gelu(gate) * value


def add_dropout_layer_norm(x, residual, weight, bias, eps, dropout_p=0.0, training=False, out_dtype=None):
    h = F.dropout(x, dropout_p, training) if dropout_p > 0 and training else x
    if residual is not None:
        h = h + residual
    dtype = out_dtype or h.dtype
    with torch.autocast(x.device.type, enabled=False):
        out = F.layer_norm(h.float(), weight.shape, weight.float(), bias.float(), eps)
    return out.to(dtype)
