"""Where an encoder forward spends its time on one GPU (bf16, `inference_mode`).

    python bench/profile_forward.py --part pieces                  # host and wall µs per call of each piece
    python bench/profile_forward.py --part kernels --rows fixed    # GPU kernels and host ops of one forward
    python bench/profile_forward.py --part python --rows "latency 1"   # Python functions by own time (cProfile)
    python bench/profile_forward.py --part kernels --rows fixed --compile   # the same for the compiled models
    python bench/profile_forward.py --repo PATH                    # MosaicBERT from another checkout

Pieces: the fused gated GELU, the gated GEMM (the GLU's Linear with the gated GELU in its epilogue: the pointer-load
kernel below `fused_ops.GATED_GEMM_TMA_ROWS`, the TMA one from there; against the Linear + gated GELU kernel),
residual + LayerNorm and the attention kernel (also as `PackedSelfAttention`, the model's way: one object per
forward, relaunched layer after layer) at base size, each called through its public function, through its
`torch.library` custom op, through its launcher, and as the PyTorch ops it replaces (or that transformers' BERT
runs), at 128 tokens (one
sequence: host-bound, so the time per call is host time) and 32768 tokens (256 x 128: GPU-bound). "host µs" times
issuing 200 calls without waiting; "wall µs" times the same calls up to a device synchronize, so wall ≈ max(host, GPU).

Kernels: torch.profiler over 5 forwards of MosaicBERT-base and transformers' BertModel-base (sdpa) on the rows
of `bench/infer.py`; prints the wall time per forward, the GPU kernels' time per forward, the top GPU kernels and
the top host-side ops by self time.
"""

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import infer  # noqa: E402  (rows, batches and model builders shared with the inference benchmark)

DTYPE = torch.bfloat16


def per_call_us(fn, calls=200):
    """(host µs per call, wall µs per call) over `calls` calls after 20 warm-up calls."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return host / calls * 1e6, wall / calls * 1e6


def pieces(package):
    fused_ops, fa = package["fused_ops"], package["flash_attn_triton"]
    hidden, inter, heads, head_dim, seqlen = 768, 3072, 12, 64, 128
    lines = ["| piece | way | tokens | host µs | wall µs |", "|---|---|---:|---:|---:|"]
    for tokens in (seqlen, 256 * seqlen):
        g = torch.randn(tokens, 2 * inter, device="cuda", dtype=DTYPE)
        x, res = (torch.randn(tokens, hidden, device="cuda", dtype=DTYPE) for _ in range(2))
        w, b = torch.ones(hidden, device="cuda", dtype=DTYPE), torch.zeros(hidden, device="cuda", dtype=DTYPE)
        qkv = torch.randn(tokens, 3, heads, head_dim, device="cuda", dtype=DTYPE)
        cu = torch.arange(0, tokens + 1, seqlen, device="cuda", dtype=torch.int32)
        slopes = torch.rand(heads, device="cuda")
        qkv_pad = qkv.view(-1, seqlen, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        w_glu = torch.randn(2 * inter, hidden, device="cuda", dtype=DTYPE) * hidden**-0.5
        ln_fwd = fused_ops._add_dropout_layer_norm_forward
        packed = getattr(fa, "PackedSelfAttention", lambda *a, **k: None)(cu, seqlen, alibi_slopes=slopes,
                                                                          max_seqlen_checked=True)
        glu_fwd = fused_ops._gated_gelu_forward
        ways = [
            ("gated GELU", "public function", lambda: fused_ops.gated_gelu(g)),
            ("gated GELU", "custom op", lambda: torch.ops.mosaic_bert.gated_gelu_fwd(g, None, 0.0)),
            ("gated GELU", "launcher", lambda: glu_fwd(g)),
            ("gated GELU", "PyTorch: gelu(a) * b", lambda: F.gelu(g[:, :inter]) * g[:, inter:]),
            ("gated Linear + GELU", "fused GEMM, public function",
             lambda: fused_ops.gated_linear_gelu(x, w_glu, use_triton=True)),
            ("gated Linear + GELU", "fused GEMM, launcher", lambda: fused_ops._gated_linear_gelu_forward(x, w_glu)),
            ("gated Linear + GELU", "Linear + gated GELU kernel", lambda: fused_ops.gated_gelu(F.linear(x, w_glu))),
            ("add + LayerNorm", "public function", lambda: fused_ops.add_dropout_layer_norm(x, res, w, b, 1e-12)),
            ("add + LayerNorm", "custom op", lambda: torch.ops.mosaic_bert.add_dropout_layer_norm_fwd(
                x, None, res, w, b, None, 1e-12, 0.0, DTYPE, None)),
            ("add + LayerNorm", "launcher", lambda: ln_fwd(x, res, w, b, None, 1e-12, 0.0, DTYPE)),
            ("add + LayerNorm", "PyTorch: layer_norm(x + r) (BERT)", lambda: F.layer_norm(x + res, (hidden,), w, b)),
            ("attention", "public function", lambda: fa.flash_attn_varlen_qkvpacked_func(
                qkv, cu, seqlen, alibi_slopes=slopes, max_seqlen_checked=True)),
            ("attention", "PackedSelfAttention, called again", lambda: packed(qkv)),
            ("attention", "custom op", lambda: torch.ops.mosaic_bert.flash_attn_varlen_qkvpacked_fwd.default(
                qkv, cu, seqlen, head_dim ** -0.5, False, slopes)),
            ("attention", "launcher", lambda: fa._qkvpacked_fwd(qkv, cu, seqlen, head_dim ** -0.5, False, slopes)),
            ("attention", "PyTorch: SDPA, no bias (BERT)", lambda: F.scaled_dot_product_attention(*qkv_pad.unbind(0))),
            ("linear", "PyTorch: addmm 768 -> 768", lambda: F.linear(x, torch.empty(hidden, hidden, device="cuda",
                                                                                     dtype=DTYPE), b)),
            ("empty", "torch.empty", lambda: torch.empty(tokens, hidden, device="cuda", dtype=DTYPE)),
        ]
        for piece, way, fn in ways:
            try:
                with torch.inference_mode():
                    host, wall = per_call_us(fn)
                lines.append(f"| {piece} | {way} | {tokens} | {host:.1f} | {wall:.1f} |")
            except Exception as e:  # a way the checkout lacks is reported, the rest still run
                lines.append(f"| {piece} | {way} | {tokens} | failed: {type(e).__name__}: {str(e)[:80]} | |")
    return "\n".join(lines)


def kernel_name(name, width=70):
    return name if len(name) <= width else name[: width - 3] + "..."


def profile_model(name, model, batch, forwards=5, top=12):
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(5):
            model(**batch)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            model(**batch)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) / 20 * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(forwards):
                model(**batch)
            torch.cuda.synchronize()
    gpu_us, gpu_calls = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            gpu_us[event.name] += event.time_range.elapsed_us() / forwards
            gpu_calls[event.name] += 1
    total = sum(gpu_us.values())
    lines = [f"### {name}: wall {wall_ms:.2f} ms / forward, GPU kernels {total / 1e3:.2f} ms / forward, "
             f"{sum(gpu_calls.values()) // forwards} kernels / forward", "",
             "| GPU kernel | µs / forward | share | calls / forward |", "|---|---:|---:|---:|"]
    for kernel, us in sorted(gpu_us.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {kernel_name(kernel)} | {us:.0f} | {us / total:.1%} | {gpu_calls[kernel] // forwards} |")
    host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=50)
    return "\n".join(lines) + "\n\nhost ops by self CPU time (all 5 forwards):\n" + host


def kernels(rows, compiled=False):
    out = []
    for row in [r for r in infer.ROWS if any(s in r for s in rows)]:
        batch, real = infer.make_batch(row)
        out.append(f"## {row} ({real} real tokens)")
        for name, build in (("MosaicBERT-base", infer.ours), ("BERT-base sdpa", infer.hf_bert)):
            torch.manual_seed(0)
            model = build().to("cuda", DTYPE).eval()
            if compiled:  # as bench/infer.py compiles them
                model = torch.compile(model, fullgraph=name.startswith("Mosaic"))
                name += ", torch.compile"
            out.append(profile_model(name, model, batch))
            del model
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    return "\n\n".join(out)


def python_profile(rows, forwards=50, top=30):
    """cProfile of MosaicBERT's forwards on a row: where the host time goes, Python function by function (C calls
    such as a kernel launch count as their caller's callee)."""
    import cProfile
    import io
    import pstats

    out = []
    for row in [r for r in infer.ROWS if any(s in r for s in rows)]:
        batch, _ = infer.make_batch(row)
        torch.manual_seed(0)
        model = infer.ours().to("cuda", DTYPE).eval()
        with torch.inference_mode():
            for _ in range(5):
                model(**batch)
            torch.cuda.synchronize()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(forwards):
                model(**batch)
            torch.cuda.synchronize()
            profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
        out.append(f"## {row}: MosaicBERT-base, {forwards} forwards under cProfile\n{text.getvalue()}")
        del model
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["pieces", "kernels", "python", "both"], default="both",
                        help="both: pieces and kernels")
    parser.add_argument("--rows", nargs="*", default=["fixed", "latency"],
                        help="bench/infer.py rows whose names contain one of these")
    parser.add_argument("--repo", default=str(REPO), help="checkout to load MosaicBERT from")
    parser.add_argument("--compile", action="store_true", help="kernels: profile the torch.compile'd models")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    # as bench/infer.py: unpadding's data-dependent sizes are captured in the graph
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.capture_scalar_outputs = True
    infer.MODEL_REPO = Path(args.repo).resolve()
    sys.path.insert(0, str(infer.MODEL_REPO))
    import flash_attn_triton
    import fused_ops

    package = {"fused_ops": fused_ops, "flash_attn_triton": flash_attn_triton}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, MosaicBERT from {infer.MODEL_REPO}", flush=True)
    if args.part in ("pieces", "both"):
        print(pieces(package), flush=True)
    if args.part in ("kernels", "both"):
        print(kernels(args.rows, args.compile), flush=True)
    if args.part == "python":
        print(python_profile(args.rows), flush=True)


if __name__ == "__main__":
    main()
