"""Attention kernel benchmark: our varlen Triton kernel with in-kernel ALiBi against PyTorch's attention backends.

One GPU, 12 heads x 64, bf16, about 64k real tokens per call, on four batches: every sequence 128, 512 or 2048
tokens long, and lengths drawn uniformly from 32..512. Each method runs forward, and forward + backward.

FLOP convention (real tokens only; padding is never credited):
    forward          = 4 * sum_i(L_i^2) * heads * head_dim      (two matmuls, 2 FLOPs per multiply-add)
    forward+backward = 3.5 * forward                             (backward = 2.5 x forward: five matmuls)

Methods:
    ours+alibi        flash_attn_varlen_qkvpacked_func with ALiBi slopes (packed tokens, no padding)
    ours              the same kernel without ALiBi
    cudnn+alibi       SDPA, cuDNN backend, padded batch, materialized (B, H, L, L) bias = ALiBi + key-padding mask
    mem_eff+alibi     SDPA, memory-efficient backend, same bias
    flex+alibi        FlexAttention (torch.compile) on the packed sequence: ALiBi score_mod + document mask
    flash (no bias)   SDPA, flash backend, padded batch, no bias and no mask: the no-bias ceiling
    varlen (no bias)  torch.nn.attention.varlen.varlen_attn on the packed tokens, where that exists

Padding/unpadding for the padded peers is done once, outside the timed region (it favours them). Times are
medians of triton.testing.do_bench (which flushes L2 between runs). A failing peer prints 'n/a'.

Usage:
    python bench/attention.py [--tokens 65536] [--json results.json]
"""

import argparse
import importlib
import json
import os
import random
import sys
import types

import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_package(root=REPO_ROOT):
    """The model folder as a Python package, so that its modules (which import each other relatively, as
    transformers loads them) import as a user's code would see them. Returns (modeling_bert, flash_attn_triton)."""
    if "mosaic_bert_checkout" not in sys.modules:
        package = types.ModuleType("mosaic_bert_checkout")
        package.__path__ = [root]
        sys.modules["mosaic_bert_checkout"] = package
    return (importlib.import_module("mosaic_bert_checkout.modeling_bert"),
            importlib.import_module("mosaic_bert_checkout.flash_attn_triton"))


modeling_bert, flash_attn_triton = import_package()
flash_attn_varlen_qkvpacked_func = flash_attn_triton.flash_attn_varlen_qkvpacked_func

HEADS, HEAD_DIM, DTYPE = 12, 64, torch.bfloat16


def make_lengths(kind, total_tokens, rng):
    if kind.startswith("fixed"):
        length = int(kind.split()[1])
        return [length] * (total_tokens // length)
    lengths = []
    while sum(lengths) < total_tokens:
        lengths.append(rng.randint(32, 512))
    lengths[-1] -= sum(lengths) - total_tokens  # exactly total_tokens real tokens
    return [n for n in lengths if n > 0]


def flops_forward(lengths):
    return 4 * sum(n * n for n in lengths) * HEADS * HEAD_DIM


class Workload:
    """One batch in both layouts: packed (t, 3, h, d) and padded (b, h, L, d)."""

    def __init__(self, name, lengths, device):
        self.name, self.lengths = name, lengths
        self.batch, self.max_len, self.total = len(lengths), max(lengths), sum(lengths)
        self.cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                                       device=device)
        self.qkv = torch.randn(self.total, 3, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
        self.dout = torch.randn(self.total, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
        self.slopes = modeling_bert.alibi_slopes(HEADS).to(device)
        seq_of_token = torch.repeat_interleave(torch.arange(self.batch, device=device),
                                               torch.tensor(lengths, device=device))
        pos_of_token = torch.arange(self.total, device=device) - self.cu_seqlens[:-1].long()[seq_of_token]
        self.seq_of_token, self.pos_of_token = seq_of_token, pos_of_token

    def padded(self, x):
        # x: (t, h, d) -> (b, h, L, d), zeros at pads
        out = x.new_zeros(self.batch, self.max_len, HEADS, HEAD_DIM)
        out[self.seq_of_token, self.pos_of_token] = x
        return out.transpose(1, 2).contiguous()

    def padded_alibi_bias(self):
        # (b, h, L, L) bf16: -slope * |i - j|, and a large negative value on padded keys.
        pos = torch.arange(self.max_len, device=self.qkv.device)
        dist = (pos[:, None] - pos[None, :]).abs().float()
        bias = -self.slopes[:, None, None] * dist  # (h, L, L)
        lengths = torch.tensor(self.lengths, device=self.qkv.device)
        key_pad = pos[None, :] >= lengths[:, None]  # (b, L)
        bias = bias[None].expand(self.batch, -1, -1, -1).clone()
        bias.masked_fill_(key_pad[:, None, None, :], -30000.0)
        return bias.to(DTYPE)


def bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def method_ours(w, with_alibi):
    slopes = w.slopes if with_alibi else None
    qkv = w.qkv.detach().requires_grad_()

    def fwd():
        with torch.no_grad():
            return flash_attn_varlen_qkvpacked_func(qkv, w.cu_seqlens, w.max_len, alibi_slopes=slopes)

    def fwd_bwd():
        out = flash_attn_varlen_qkvpacked_func(qkv, w.cu_seqlens, w.max_len, alibi_slopes=slopes)
        torch.autograd.grad(out, qkv, w.dout)

    return fwd, fwd_bwd


def method_sdpa(w, backend, with_bias):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend)
    q, k, v = (w.padded(x).requires_grad_() for x in w.qkv.unbind(1))
    dout = w.padded(w.dout)
    bias = w.padded_alibi_bias() if with_bias else None

    def fwd():
        with torch.no_grad(), sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def fwd_bwd():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        torch.autograd.grad(out, (q, k, v), dout)

    return fwd, fwd_bwd


_FLEX_COMPILED = None


def method_flex(w):
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    # (1, h, t, d) packed sequence; a document mask keeps attention inside each sequence.
    q, k, v = (x.permute(1, 0, 2)[None].contiguous().requires_grad_() for x in w.qkv.unbind(1))
    dout = w.dout.permute(1, 0, 2)[None].contiguous()
    doc, pos, slopes = w.seq_of_token, w.pos_of_token, w.slopes

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (pos[q_idx] - pos[kv_idx]).abs()

    try:  # building the mask through torch.compile avoids materializing a (t, t) boolean tensor
        block_mask = create_block_mask(same_doc, None, None, w.total, w.total, device=w.qkv.device, _compile=True)
    except TypeError:
        block_mask = create_block_mask(same_doc, None, None, w.total, w.total, device=w.qkv.device)

    def fwd():
        with torch.no_grad():
            return _FLEX_COMPILED(q, k, v, score_mod=alibi, block_mask=block_mask)

    def fwd_bwd():
        out = _FLEX_COMPILED(q, k, v, score_mod=alibi, block_mask=block_mask)
        torch.autograd.grad(out, (q, k, v), dout)

    return fwd, fwd_bwd


def method_torch_varlen(w):
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (x.contiguous().requires_grad_() for x in w.qkv.unbind(1))

    def fwd():
        with torch.no_grad():
            return varlen_attn(q, k, v, w.cu_seqlens, w.cu_seqlens, w.max_len, w.max_len)

    def fwd_bwd():
        out = varlen_attn(q, k, v, w.cu_seqlens, w.cu_seqlens, w.max_len, w.max_len)
        torch.autograd.grad(out, (q, k, v), w.dout)

    return fwd, fwd_bwd


METHODS = {
    "ours+alibi": lambda w: method_ours(w, True),
    "ours": lambda w: method_ours(w, False),
    "cudnn+alibi": lambda w: method_sdpa(w, "CUDNN_ATTENTION", True),
    "mem_eff+alibi": lambda w: method_sdpa(w, "EFFICIENT_ATTENTION", True),
    "flex+alibi": method_flex,
    "flash (no bias)": lambda w: method_sdpa(w, "FLASH_ATTENTION", False),
    "varlen (no bias)": method_torch_varlen,
}


def check_ours_against_mem_efficient(w):
    """Sanity check on this batch: our output vs SDPA memory-efficient with the padded ALiBi bias."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad():
        ours = flash_attn_varlen_qkvpacked_func(w.qkv, w.cu_seqlens, w.max_len, alibi_slopes=w.slopes)
        q, k, v = (w.padded(x) for x in w.qkv.unbind(1))
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            bias = w.padded_alibi_bias().float()
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
        ref = ref.transpose(1, 2)[w.seq_of_token, w.pos_of_token]
    return (ours.float() - ref).abs().max().item()


# Extra autotune candidates for `--extra-configs` (each free of register spills at d=64 on sm_90a, by
# ptxas): (BLOCK_M, BLOCK_N, num_warps, num_stages).
EXTRA_CONFIGS = {
    "_fwd_kernel": [(128, 64, 4, 2), (128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 2)],
    "_bwd_kv_kernel": [(64, 128, 8, 2), (64, 128, 8, 3)],
    "_bwd_q_kernel": [(128, 64, 8, 3), (128, 128, 8, 2)],
}


def widen_autotune_lists():
    import triton

    for name, extra in EXTRA_CONFIGS.items():
        kernel = getattr(flash_attn_triton, name)
        for m, n, warps, stages in extra:
            kernel.configs.append(triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages))


def print_autotune_choices():
    for name in EXTRA_CONFIGS:
        for key, config in getattr(flash_attn_triton, name).cache.items():
            print(f"autotune {name} key={key}: {config}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536, help="real tokens per call")
    parser.add_argument("--workloads", default="fixed 128,fixed 512,fixed 2048,var 32-512")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of methods")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--extra-configs", action="store_true",
                        help="autotune over EXTRA_CONFIGS too, and print the chosen configs")
    args = parser.parse_args()
    if args.extra_configs:
        widen_autotune_lists()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    device = torch.device("cuda")
    rng = random.Random(0)
    torch.manual_seed(0)

    rows = []
    for kind in args.workloads.split(","):
        w = Workload(kind, make_lengths(kind, args.tokens, rng), device)
        f_fwd = flops_forward(w.lengths)
        print(f"== {kind}: {w.batch} sequences, {w.total} tokens, max {w.max_len}; "
              f"max|ours - mem_eff (fp32)| = {check_ours_against_mem_efficient(w):.2e}", flush=True)
        for name in args.methods.split(","):
            row = {"workload": kind, "method": name, "fwd_ms": None, "fwd_bwd_ms": None, "error": None}
            fwd = fwd_bwd = None
            try:
                fwd, fwd_bwd = METHODS[name](w)
                row["fwd_ms"] = bench(fwd)
                row["fwd_bwd_ms"] = bench(fwd_bwd)
            except Exception as e:  # one failing peer must not stop the others
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            for mode, flops in (("fwd", f_fwd), ("fwd_bwd", 3.5 * f_fwd)):
                ms = row[f"{mode}_ms"]
                row[f"{mode}_tflops"] = flops / (ms * 1e-3) / 1e12 if ms else None
            rows.append(row)
            fmt = lambda x: f"{x:7.1f}" if x is not None else "    n/a"  # noqa: E731
            print(f"  {name:18s} fwd {fmt(row['fwd_tflops'])} TFLOP/s"
                  f"   fwd+bwd {fmt(row['fwd_bwd_tflops'])} TFLOP/s"
                  + (f"   [{row['error']}]" if row["error"] else ""), flush=True)
            del fwd, fwd_bwd
            torch.cuda.empty_cache()
        del w
        torch.cuda.empty_cache()

    print_autotune_choices()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": __import__("triton").__version__, "rows": rows}, f, indent=1)

    def get(kind, name, key):
        for r in rows:
            if r["workload"] == kind and r["method"] == name:
                return r[key]
        return None

    print()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}; "
          f"{HEADS} heads x {HEAD_DIM}, {DTYPE}, TFLOP/s over real tokens (fwd+bwd = 3.5 x fwd FLOPs)")
    kinds = args.workloads.split(",")
    header = "| method | " + " | ".join(f"{k} fwd | {k} fwd+bwd" for k in kinds) + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * len(kinds)))
    for name in args.methods.split(","):
        cells = []
        for k in kinds:
            for key in ("fwd_tflops", "fwd_bwd_tflops"):
                x = get(k, name, key)
                cells.append(f"{x:.0f}" if x is not None else "n/a")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    for key, label in (("fwd_tflops", "fwd"), ("fwd_bwd_tflops", "fwd+bwd")):
        ours, cudnn = get("var 32-512", "ours+alibi", key), get("var 32-512", "cudnn+alibi", key)
        if ours and cudnn:
            print(f"target var 32-512 {label}: ours+alibi / cudnn+alibi = {ours / cudnn:.2f}x (target >= 1.5x)")
    x = get("fixed 2048", "ours+alibi", "fwd_tflops")
    if x:
        print(f"target fixed 2048 fwd: {x:.0f} TFLOP/s (target >= 400)")
    for k in kinds:
        a, b = get(k, "ours+alibi", "fwd_bwd_ms"), get(k, "ours", "fwd_bwd_ms")
        c, d = get(k, "ours+alibi", "fwd_ms"), get(k, "ours", "fwd_ms")
        if a and b and c and d:
            print(f"alibi cost {k}: fwd {100 * (c / d - 1):+.1f}%, fwd+bwd {100 * (a / b - 1):+.1f}% (target <= 5%)")


if __name__ == "__main__":
    main()
