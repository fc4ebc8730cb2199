"""What a training step's Linears cost around their GEMMs under bf16 autocast, and what two changes would save:
one encoder layer's four Linears (QKV with its bias, attention output, gated_layers, W_o) forward + backward.

    python bench/linear_grad.py [--rows 32768] [--iters 20]

- "autocast": `F.linear` under `torch.autocast` with fp32 parameters, as the model runs today. Autocast casts each
  weight to bf16; the backward makes each weight gradient in bf16 as a transposed view and casts it to fp32 with a
  strided copy, and reduces the QKV bias gradient in a separate kernel.
- "fp32-out dW": an autograd Function doing the same forward, whose backward has cuBLAS write the weight gradient
  in fp32 directly (`torch.mm(..., out_dtype=torch.float32)`) in the parameter's layout: no cast kernel.
- "+ ones column": as above, and the QKV input carries a column of ones (a (t, n + 8) buffer, the GEMM reading the
  first n columns), so one GEMM gives [dW | db] and the bias-gradient reduction goes.
GPU ms per layer (CUDA events over --iters forward + backward passes, best of 5); gradients checked against the
autocast pass first.
"""

import argparse
import sys

import torch
import torch.nn.functional as F

HIDDEN, INTER = 768, 3072


class Fp32GradLinear(torch.autograd.Function):
    """y = x W^T (+ b) in bf16; dW (and db) returned in fp32 straight from cuBLAS. x_aug: x with a ones column (and
    zero padding) after its n columns, or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_aug):
        w16 = weight.to(torch.bfloat16)
        ctx.save_for_backward(x, w16, x_aug)
        ctx.has_bias = bias is not None
        return F.linear(x, w16, None if bias is None else bias.to(torch.bfloat16))

    @staticmethod
    def backward(ctx, grad):
        x, w16, x_aug = ctx.saved_tensors
        dx = grad @ w16
        n = x.shape[1]
        if x_aug is not None:
            both = torch.mm(grad.t(), x_aug, out_dtype=torch.float32)
            return dx, both[:, :n], both[:, n], None
        dw = torch.mm(grad.t(), x, out_dtype=torch.float32)
        db = grad.sum(0, dtype=torch.float32) if ctx.has_bias else None
        return dx, dw, db, None


def layer_params(device):
    torch.manual_seed(0)
    shapes = {"qkv": (3 * HIDDEN, HIDDEN), "out": (HIDDEN, HIDDEN), "gated": (2 * INTER, HIDDEN),
              "wo": (HIDDEN, INTER)}
    weights = {k: (torch.randn(*s, device=device) * s[1] ** -0.5).requires_grad_(True) for k, s in shapes.items()}
    return weights, torch.zeros(3 * HIDDEN, device=device, requires_grad=True)


def run(mode, weights, qkv_bias, xs, grads):
    """Forward + backward of the four Linears; each gets its own input and upstream gradient."""
    for p in (*weights.values(), qkv_bias):
        p.grad = None
    outs = []
    for name, w in weights.items():
        x = xs["qkv_view"] if (mode == "ones" and name == "qkv") else xs[name]
        bias = qkv_bias if name == "qkv" else None
        if mode == "autocast":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                outs.append(F.linear(x, w, bias))
        else:
            aug = xs["qkv_aug"] if (mode == "ones" and name == "qkv") else None
            outs.append(Fp32GradLinear.apply(x, w, bias, aug))
    torch.autograd.backward(outs, [grads[name] for name in weights])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    dev, t = "cuda", args.rows
    weights, qkv_bias = layer_params(dev)
    g = torch.Generator(device=dev).manual_seed(1)
    ins = {"qkv": HIDDEN, "out": HIDDEN, "gated": HIDDEN, "wo": INTER}
    xs = {k: torch.randn(t, n, device=dev, generator=g, dtype=torch.bfloat16) for k, n in ins.items()}
    aug = torch.zeros(t, HIDDEN + 8, device=dev, dtype=torch.bfloat16)
    aug[:, :HIDDEN] = xs["qkv"]
    aug[:, HIDDEN] = 1
    xs["qkv_view"], xs["qkv_aug"] = aug[:, :HIDDEN], aug  # "+ ones column": the GEMM reads the first n columns
    grads = {k: torch.randn(t, w.shape[0], device=dev, generator=g, dtype=torch.bfloat16) / 100
             for k, w in weights.items()}

    run("autocast", weights, qkv_bias, xs, grads)
    expected = [p.grad.clone() for p in (*weights.values(), qkv_bias)]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {t} rows, bf16 autocast, fp32 parameters; "
          "one layer's four Linears, forward + backward")
    print("| variant | GPU ms a layer | max gradient error ÷ max gradient |\n|---|---:|---:|")
    for mode, label in (("autocast", "autocast (today)"), ("fp32", "fp32-out dW"), ("ones", "+ ones column")):
        run(mode, weights, qkv_bias, xs, grads)
        got = [p.grad for p in (*weights.values(), qkv_bias)]
        err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, expected))
        for _ in range(3):
            run(mode, weights, qkv_bias, xs, grads)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                run(mode, weights, qkv_bias, xs, grads)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / args.iters)
        print(f"| {label} | {best:.3f} | {err:.2e} |", flush=True)


if __name__ == "__main__":
    main()
