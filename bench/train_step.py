"""MLM training-step speed on one GPU in bf16: MosaicBERT-base against transformers' BERT and ModernBERT.

    python bench/train_step.py                      # the table: fixed 256 x 128 and ragged 32-512 x 128
    python bench/train_step.py --batches long:256:128   # other batches: 128 sequences of 256 tokens
    python bench/train_step.py --long               # + long sequences (2048 / 4096 / 8192): time and memory
    python bench/train_step.py --curve FILE.txt.xz  # + loss curves with low-precision vs fp32 LayerNorm
    python bench/train_step.py --repo ../other-checkout  # + that checkout's model beside this one

Every model trains (forward, backward, fused AdamW) on the same token batches with 30% of the real tokens
masked. Reported: real (non-padding) tokens/s, peak memory, and MFU =
(6 * N_nonembedding + attention + masked-only head FLOPs per token) * tokens/s / PEAK, PEAK = 790 TFLOP/s, the
bf16 matmul rate measured on an H200. The same useful-work count is used for every model.
"""

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForMaskedLM

REPO = Path(__file__).resolve().parents[1]
PEAK = 790e12
VOCAB = 30528
MASK_ID = 103


DEVICE = "cuda"
SMOKE = False  # --smoke: a CPU dry run of every code path on tiny batches


def make_batch(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "fixed":
        lengths = torch.full((4 if SMOKE else 256,), 128)
    elif kind == "ragged":
        lengths = torch.randint(32, 513, (4 if SMOKE else 128,), generator=g)
    elif kind.startswith("long:") and len(kind.split(":")) == 3:  # "long:<L>:<batch>": batch sequences of L
        _, seqlen, batch = kind.split(":")
        lengths = torch.full((int(batch),), int(seqlen) // (32 if SMOKE else 1))
    else:
        raise ValueError(f"unknown batch {kind!r}: fixed, ragged or long:<length>:<batch size>")
    s = int(lengths.max())
    ids = torch.randint(1000, VOCAB, (len(lengths), s), generator=g)
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    ids = ids * mask
    chosen = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
    labels = torch.where(chosen, ids, -100)
    ids = torch.where(chosen, MASK_ID, ids)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(DEVICE) for k, v in batch.items()}, lengths


def useful_flops_per_token(n_nonembedding, hidden, layers, vocab, lengths, mask_frac=0.3):
    attended = float((lengths.double() ** 2).sum() / lengths.sum())
    attention = 3 * 4 * layers * hidden * attended
    head = 6 * (hidden * hidden + hidden * vocab) * mask_frac
    return 6 * n_nonembedding + attention + head


def ours(backend="triton", low_precision_layernorm=False, compile=False, fused=True, sparse=False, repo=REPO,
         **overrides):
    """MosaicBERT-base. `fused=False` runs the element-wise work as plain PyTorch ops instead of the fused Triton
    kernels; `sparse` returns compact MLM logits (what the pretraining script uses); `compile` compiles the whole
    model with fullgraph=True (unpadding's data-dependent sizes captured by dynamo); `repo` is the checkout whose
    model code runs."""
    base = json.loads((REPO / "train" / "configs" / "mosaic-bert-base.json").read_text())
    config = AutoConfig.from_pretrained(
        repo, trust_remote_code=True, attention_backend=backend, low_precision_layernorm=low_precision_layernorm,
        sparse_prediction=sparse, **{**base, **overrides},
    )
    model = AutoModelForMaskedLM.from_config(config, trust_remote_code=True)
    fused_ops = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".fused_ops"]
    fused_ops.DEFAULT_USE_TRITON = None if fused else False  # a module flag: set for every model built after
    if compile:
        import torch._dynamo

        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        torch._dynamo.config.capture_scalar_outputs = True
        model = torch.compile(model, fullgraph=True)
    return model


def compiled(build):
    def make():
        return torch.compile(build())

    return make


def hf_bert():
    config = transformers.BertConfig(vocab_size=VOCAB, attn_implementation="sdpa")
    return transformers.BertForMaskedLM(config)


def modernbert():
    config = transformers.ModernBertConfig(
        vocab_size=VOCAB, pad_token_id=0, cls_token_id=101, sep_token_id=102, bos_token_id=101, eos_token_id=102,
        attn_implementation="sdpa",
    )
    return transformers.ModernBertForMaskedLM(config)


def n_nonembedding(model):
    skip = ("word_embeddings", "token_type_embeddings", "position_embeddings", "tok_embeddings", "decoder")
    return sum(p.numel() for n, p in model.named_parameters() if not any(s in n for s in skip))


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def mlm_step(model, batch, opt, mark=None):
    """One training step as every training benchmark here times it: bf16 autocast forward, backward, fused AdamW.
    `mark(i)`, if given, is called at the step's start (0), after the forward (1), the backward (2) and the
    optimizer (3). Returns the loss, detached."""
    mark = mark or (lambda i: None)
    mark(0)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = model(**batch).loss
    mark(1)
    loss.backward()
    mark(2)
    opt.step()
    opt.zero_grad(set_to_none=True)
    mark(3)
    return loss.detach()


def train_steps(model, batch, steps, warmup):
    model.to(DEVICE).train()
    opt = optimizer(model)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            synchronize()
            t0 = time.perf_counter()
        losses.append(mlm_step(model, batch, opt))
    synchronize()
    seconds = (time.perf_counter() - t0) / steps
    assert all(torch.isfinite(x) for x in losses), "non-finite loss"
    return seconds, (torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0)


VARIANTS = {
    "mosaic plain": lambda: ours("torch"),
    "mosaic triton unfused": lambda: ours("triton", fused=False),
    "mosaic triton": lambda: ours("triton"),
    "mosaic triton+sparse": lambda: ours("triton", sparse=True),
    "mosaic triton+sparse+lpLN": lambda: ours("triton", True, sparse=True),
    "mosaic triton+sparse compile": lambda: ours("triton", sparse=True, compile=True),
    "HF BERT sdpa": hf_bert,
    "HF BERT sdpa compile": compiled(hf_bert),
    "ModernBERT sdpa": modernbert,
    "ModernBERT sdpa compile": compiled(modernbert),
}


def run_table(args, results):
    for kind in args.batches:
        batch, lengths = make_batch(kind)
        real = int(lengths.sum())
        for name, build in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            try:
                torch.manual_seed(0)
                model = build()
                cfg = model.config
                fpt = useful_flops_per_token(
                    n_nonembedding(model), cfg.hidden_size, cfg.num_hidden_layers, VOCAB, lengths
                )
                seconds, mem = train_steps(model, batch, args.steps, args.warmup)
                tps = real / seconds
                row = dict(batch=kind, model=name, tok_s=tps, mem_gib=mem, mfu=fpt * tps / PEAK, step_ms=seconds * 1e3)
            except Exception as e:  # one failing variant must not hide the others
                traceback.print_exc()
                row = dict(batch=kind, model=name, error=f"{type(e).__name__}: {e}"[:200])
            print(json.dumps(row), flush=True)
            results.append(row)
            model = None
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


def run_long(args, results):
    for seqlen, batch_size in ((2048, 8), (4096, 4), (8192, 2), (8192, 1)):
        batch, lengths = make_batch(f"long:{seqlen}:{batch_size}")
        try:
            torch.manual_seed(0)
            model = ours("triton" if DEVICE == "cuda" else "torch", True)
            seconds, mem = train_steps(model, batch, 1 if SMOKE else 3, 1)
            row = dict(batch=f"L={seqlen} x{batch_size}", model="mosaic triton+lpLN", step_ms=seconds * 1e3,
                       mem_gib=mem, tok_s=int(lengths.sum()) / seconds)
        except Exception as e:
            traceback.print_exc()
            row = dict(batch=f"L={seqlen} x{batch_size}", model="mosaic triton+lpLN", error=str(e)[:200])
        print(json.dumps(row), flush=True)
        results.append(row)
        model = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def run_curve(args, results):
    """Same init, data and order: the fused Triton element-wise kernels against plain PyTorch ops, and
    low-precision LayerNorm; mean loss per 25-step window."""
    import lzma

    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO, trust_remote_code=True)
    with lzma.open(args.curve, "rt", encoding="utf-8") as f:
        text = [line for line in f.read().splitlines() if line][: 2000 if SMOKE else 40000]
    ids = [t for row in tokenizer(text, add_special_tokens=False)["input_ids"] for t in row]
    seqs = torch.tensor(ids[: (len(ids) // 126) * 126]).view(-1, 126)
    seqs = torch.cat([torch.full((len(seqs), 1), 101), seqs, torch.full((len(seqs), 1), 102)], dim=1)
    g = torch.Generator().manual_seed(0)
    curves = {}
    for name, fused, low_precision in (("unfused", False, False), ("fused", True, False), ("fused+lpLN", True, True)):
        torch.manual_seed(0)
        model = ours("triton" if DEVICE == "cuda" else "torch", low_precision, fused=fused).to(DEVICE).train()
        opt = torch.optim.AdamW(
            model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5, fused=True
        )
        g.manual_seed(0)
        losses = []
        for step in range(args.curve_steps):
            rows = seqs[torch.randint(len(seqs), (4 if SMOKE else 128,), generator=g)]
            chosen = torch.rand(rows.shape, generator=g) < 0.3
            chosen[:, 0] = chosen[:, -1] = False
            batch = {"input_ids": torch.where(chosen, MASK_ID, rows).to(DEVICE),
                     "labels": torch.where(chosen, rows, -100).to(DEVICE)}
            for group in opt.param_groups:
                group["lr"] = 5e-4 * min(1.0, (step + 1) / 50)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[name] = [
            round(sum(losses[i : i + 25]) / len(losses[i : i + 25]), 4) for i in range(0, len(losses), 25)
        ]
    row = dict(batch="curve", **curves)
    print(json.dumps(row), flush=True)
    results.append(row)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--batches", nargs="*", default=["fixed", "ragged"],
                        help="fixed (256 x 128), ragged (128 x 32-512) or long:<length>:<batch size>")
    parser.add_argument("--long", action="store_true")
    parser.add_argument("--curve", help="a .txt.xz corpus file for the fused/unfused loss-curve comparison")
    parser.add_argument("--curve-steps", type=int, default=300)
    parser.add_argument("--json", help="write all rows here")
    parser.add_argument("--repo", nargs="*", default=[],
                        help="other MosaicBERT checkouts: adds a 'mosaic triton+sparse <checkout>' row for each")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run on tiny batches")
    args = parser.parse_args()
    global DEVICE, SMOKE
    for repo in args.repo:
        VARIANTS[f"mosaic triton+sparse {repo}"] = lambda repo=repo: ours("triton", sparse=True,
                                                                          repo=Path(repo).resolve())
    if args.smoke:
        DEVICE, SMOKE = "cpu", True
        args.steps, args.warmup, args.curve_steps = 1, 0, 2
        for name in [n for n in VARIANTS if "triton" in n or "compile" in n]:
            VARIANTS.pop(name)
    torch.backends.cuda.matmul.allow_tf32 = True
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"{device_name} torch {torch.__version__} transformers {transformers.__version__}")
    results = []
    run_table(args, results)
    if args.long:
        run_long(args, results)
    if args.curve:
        run_curve(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{'batch':14} {'model':28} {'real tok/s':>11} {'step ms':>8} {'peak GiB':>9} {'MFU':>6}")
    for r in results:
        if r["batch"] == "curve":
            print("loss curve (mean per 25 steps):", {k: v for k, v in r.items() if k != "batch"})
        elif "error" in r:
            print(f"{r['batch']:14} {r['model']:28} error: {r['error'][:60]}")
        else:
            mfu = f"{r['mfu'] * 100:5.1f}%" if "mfu" in r else ""
            row = f"{r['batch']:14} {r['model']:28} {r['tok_s']:11.0f} {r['step_ms']:8.1f} {r['mem_gib']:9.1f}"
            print(f"{row} {mfu:>6}")


if __name__ == "__main__":
    main()
