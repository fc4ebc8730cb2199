"""Encoder inference speed on one GPU in bf16: MosaicBERT-base against transformers' BERT-base and ModernBERT-base.

    python bench/infer.py                          # the table and bench/results/infer_<gpu>_<date>.json
    python bench/infer.py --only "mosaic eager" "BERT sdpa eager" --rows fixed latency
    python bench/infer.py --smoke                  # CPU dry run of every code path (tests/test_bench_smoke.py)

Every model is the encoder (`AutoModel`, no head) at random init, cast to bf16, and runs under `inference_mode` on
the same padded batches (ids uniform in [1000, vocab), right padding): fixed 128 x 256 sequences, ragged 32-512 x
128, ragged 8-128 x 512 (throughput), and batch 1 x 128, batch 8 of 16-256 (latency). Models: ours eager and
`torch.compile`d (default mode; also mode="reduce-overhead", CUDA graphs, on the latency rows and the fixed-length
row), the same with `static_shapes=True` ("mosaic static ...": padding computed, no device read before the
forward is queued, CUDA graphs for any mask), transformers' BertModel with sdpa attention, eager and compiled the
same ways, ModernBERT-base with sdpa, eager and compiled. A model whose build or forward
fails is reported with the error and the rest still run.

Timing: per row, warm-up calls first (for a compiled model they include compiling, reported as `warmup_s` and not
counted), then `--repeats` repeats of N forwards, each timed with CUDA events around the N calls; the median repeat
gives ms per forward. Real tokens/s counts non-padding tokens only. A compiled model is compiled once and reused
for every row, so from its second row on dynamo recompiles with dynamic shapes (PyTorch's default).

Host syncs: for each eager model and row, one forward runs under `torch.cuda.set_sync_debug_mode("warn")` and the
warnings it raises are counted (`count_host_syncs`); the JSON lists where in the code they come from. The debug
mode sees blocking copies to the host (`.item()`, `.tolist()`, `.cpu()`, `nonzero`, boolean indexing) and stream
synchronizes; it does not see `torch.cuda.synchronize()` or a host wait on an event.
"""

import argparse
import datetime
import json
import statistics
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch._dynamo
import transformers
from transformers import AutoConfig, AutoModel

REPO = Path(__file__).resolve().parents[1]
MODEL_REPO = REPO  # --repo: the checkout MosaicBERT is loaded from (e.g. an older commit, to compare)
VOCAB = 30528

DEVICE = "cuda"
DTYPE = torch.bfloat16
SMOKE = False  # --smoke: CPU, fp32, 2-layer 64-wide models, tiny batches, compile with backend="eager"

# name -> (kind, batch size, lengths low, lengths high); "latency" rows also run the reduce-overhead variants.
ROWS = {
    "fixed 128 x 256": ("throughput", 256, 128, 128),
    "ragged 32-512 x 128": ("throughput", 128, 32, 512),
    "ragged 8-128 x 512": ("throughput", 512, 8, 128),
    "latency 1 x 128": ("latency", 1, 128, 128),
    "latency 8 x 16-256": ("latency", 8, 16, 256),
}
# forwards per timed repeat
ITERS = {"throughput": 10, "latency": 50}
SYNC_WARNING = "synchronizing CUDA operation"


def make_batch(row, seed=0):
    """The row's padded batch on DEVICE: input_ids (b, s) with zeros at padding, attention_mask (b, s)."""
    _, batch_size, low, high = ROWS[row]
    g = torch.Generator().manual_seed(seed)
    if SMOKE:
        batch_size, low, high = min(batch_size, 3), max(1, low // 4), max(1, high // 4)
    lengths = torch.randint(low, high + 1, (batch_size,), generator=g)
    s = int(lengths.max())
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, VOCAB, (batch_size, s), generator=g) * mask
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE)}, int(lengths.sum())


def smoke_overrides():
    # --smoke checks code paths, not speed: small models build and trace in seconds
    return dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128) if SMOKE else {}


def ours(**overrides):
    base = json.loads((REPO / "train" / "configs" / "mosaic-bert-base.json").read_text())
    config = AutoConfig.from_pretrained(MODEL_REPO, trust_remote_code=True,
                                        **{**base, **smoke_overrides(), **overrides})
    return AutoModel.from_config(config, trust_remote_code=True)


def ours_static():
    """MosaicBERT with `static_shapes=True`: padding computed, no read before the forward is queued."""
    return ours(static_shapes=True)


def hf_bert():
    config = transformers.BertConfig(vocab_size=VOCAB, attn_implementation="sdpa", **smoke_overrides())
    return transformers.BertModel(config)


def modernbert():
    config = transformers.ModernBertConfig(
        vocab_size=VOCAB, pad_token_id=0, cls_token_id=101, sep_token_id=102, bos_token_id=101, eos_token_id=102,
        attn_implementation="sdpa", **smoke_overrides(),
    )
    return transformers.ModernBertModel(config)


def compiled(build, mode=None, fullgraph=False):
    def build_compiled():
        model = build()
        if SMOKE:  # the compile path without inductor: dynamo traces, the graph runs eagerly
            return model, torch.compile(model, backend="eager", dynamic=True, fullgraph=fullgraph)
        return model, torch.compile(model, mode=mode, fullgraph=fullgraph)

    return build_compiled


def eager(build):
    def build_eager():
        model = build()
        return model, model

    return build_eager


# name -> (builder returning (module, callable), rows it runs on: "all", or "graphs": the latency rows and the
# fixed-length row, whose shapes repeat from call to call as CUDA graphs need)
VARIANTS = {
    "mosaic eager": (eager(ours), "all"),
    "mosaic compile": (compiled(ours, fullgraph=True), "all"),
    "mosaic compile reduce-overhead": (compiled(ours, "reduce-overhead", fullgraph=True), "graphs"),
    "mosaic static eager": (eager(ours_static), "all"),
    "mosaic static compile": (compiled(ours_static, fullgraph=True), "all"),
    "mosaic static compile reduce-overhead": (compiled(ours_static, "reduce-overhead", fullgraph=True), "graphs"),
    "BERT sdpa eager": (eager(hf_bert), "all"),
    "BERT sdpa compile": (compiled(hf_bert), "all"),
    "BERT sdpa compile reduce-overhead": (compiled(hf_bert, "reduce-overhead"), "graphs"),
    "ModernBERT sdpa eager": (eager(modernbert), "all"),
    "ModernBERT sdpa compile": (compiled(modernbert), "all"),
}
BASELINE_EAGER, BASELINE_COMPILED = "BERT sdpa eager", "BERT sdpa compile"


def count_sync_warnings(fn):
    """Run fn() and count the sync-debug warnings it raises: (count, Counter of 'file:line' where they came from)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    hits = [w for w in caught if SYNC_WARNING in str(w.message)]
    return len(hits), Counter(f"{Path(w.filename).name}:{w.lineno}" for w in hits)


def count_host_syncs(fn):
    """Host-device syncs torch's CUDA sync debug mode reports during one call of fn(); (None, {}) without CUDA.

    Run fn once before this, so that one-time work (kernel autotuning, lazy buffers) is not counted.
    """
    if DEVICE != "cuda":
        return None, Counter()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        return count_sync_warnings(fn)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def mark_step(mode):
    # cudagraph trees: each call is a new step, so the previous call's outputs may be overwritten
    if mode == "reduce-overhead" and DEVICE == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


class Timer:
    """Seconds between start() and stop(): CUDA events on the GPU, perf_counter on the CPU."""

    def start(self):
        if DEVICE == "cuda":
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self):
        if DEVICE == "cuda":
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1e3
        return time.perf_counter() - self.t0


@torch.inference_mode()
def time_forward(forward, batch, iters, repeats, warmup, mode=None):
    """(median seconds per forward over `repeats`, seconds spent in the warm-up calls)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        mark_step(mode)
        forward(**batch)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    timer, per_forward = Timer(), []
    for _ in range(repeats):
        timer.start()
        for _ in range(iters):
            mark_step(mode)
            forward(**batch)
        per_forward.append(timer.stop() / iters)
    return statistics.median(per_forward), warmup_s


def run_variant(name, build, row_names, args, results):
    mode = "reduce-overhead" if name.endswith("reduce-overhead") else None
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        module, forward = build()
        module.to(DEVICE, DTYPE).eval()
    except Exception as e:  # a model that does not build is reported, and the others still run
        traceback.print_exc()
        for row in row_names:
            results.append(dict(row=row, model=name, error=f"build: {type(e).__name__}: {e}"[:300]))
        return
    for row in row_names:
        kind = ROWS[row][0]
        batch, real_tokens = make_batch(row)
        entry = dict(row=row, model=name, real_tokens=real_tokens, padded_tokens=batch["input_ids"].numel())
        try:
            seconds, warmup_s = time_forward(
                forward, batch, 1 if SMOKE else ITERS[kind], args.repeats, args.warmup, mode
            )
            entry.update(ms=seconds * 1e3, tok_s=real_tokens / seconds, warmup_s=warmup_s)
            if forward is module:  # eager: count the syncs of one (already warm) forward
                with torch.inference_mode():
                    syncs, where = count_host_syncs(lambda batch=batch: forward(**batch))
                entry.update(host_syncs=syncs, sync_sites=dict(where))
        except Exception as e:
            traceback.print_exc()
            entry["error"] = f"{type(e).__name__}: {e}"[:300]
        print(json.dumps(entry), flush=True)
        results.append(entry)
    module = forward = None  # free the GPU memory before the next model
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    torch._dynamo.reset()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def add_ratios(results):
    """Speed (real tok/s) of each entry over BERT eager's and BERT compiled's on the same row."""
    speed = {(r["row"], r["model"]): r.get("tok_s") for r in results}
    for r in results:
        for key, baseline in (("vs_bert_eager", BASELINE_EAGER), ("vs_bert_compiled", BASELINE_COMPILED)):
            base = speed.get((r["row"], baseline))
            if "tok_s" in r and base:
                r[key] = r["tok_s"] / base


def markdown_table(results):
    lines = ["| batch | model | real tok/s | ms / forward | × BERT eager | × BERT compiled | host syncs |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['model']} | skipped: {r['error'][:90]} | | | | |")
            continue
        ratios = [f"{r[k]:.2f}" if k in r else "—" for k in ("vs_bert_eager", "vs_bert_compiled")]
        syncs = r.get("host_syncs")
        lines.append(f"| {r['row']} | {r['model']} | {r['tok_s']:,.0f} | {r['ms']:.2f} | {ratios[0]} | {ratios[1]} | "
                     f"{'—' if syncs is None else syncs} |")
    return "\n".join(lines)


def sync_summary(results):
    counts = [f"{r['row']}: {r['host_syncs']}" for r in results
              if r["model"] == "mosaic eager" and r.get("host_syncs") is not None]
    if not counts:
        return "host syncs per forward (mosaic eager): not counted (needs CUDA)"
    return "host syncs per forward (mosaic eager, torch.cuda sync debug mode): " + "; ".join(counts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--rows", nargs="*", help="run the rows whose names contain one of these")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="JSON file (default: bench/results/infer_<device>_<date>.json)")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run on tiny batches and models")
    parser.add_argument("--repo", help="checkout to load MosaicBERT from (default: this one)")
    args = parser.parse_args()
    global DEVICE, DTYPE, SMOKE, MODEL_REPO
    if args.repo:
        MODEL_REPO = Path(args.repo).resolve()
    # MosaicBERT unpads: nonzero's data-dependent size is captured in the graph (no effect on the padded peers)
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.capture_scalar_outputs = True
    if args.smoke:
        DEVICE, DTYPE, SMOKE = "cpu", torch.float32, True
        args.repeats, args.warmup = 1, 1
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke for a CPU dry run)")
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    header = (f"{device_name}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"{str(DTYPE).removeprefix('torch.')}, inference_mode, encoder forward, MosaicBERT from {MODEL_REPO}")
    print(header, flush=True)

    start = time.perf_counter()
    rows = [r for r in ROWS if not args.rows or any(s in r for s in args.rows)]
    results = []
    for name, (build, which) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        row_names = [r for r in rows if which == "all" or ROWS[r][0] == "latency" or r.startswith("fixed")]
        if row_names:
            run_variant(name, build, row_names, args, results)
    add_ratios(results)
    order = {r: i for i, r in enumerate(ROWS)}
    results.sort(key=lambda r: order[r["row"]])  # stable: variants keep their order inside a row

    print(f"\n{header}\n{sync_summary(results)}\n")
    print(markdown_table(results))
    elapsed = time.perf_counter() - start
    print(f"\nwhole run: {elapsed:.0f} s")
    out = Path(args.out) if args.out else (
        REPO / "bench" / "results"
        / f"infer_{device_name.split()[-1].lower()}_{datetime.date.today().isoformat()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=device_name, torch=torch.__version__,
                                   transformers=transformers.__version__, dtype=str(DTYPE), seconds=elapsed,
                                   rows=results), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
