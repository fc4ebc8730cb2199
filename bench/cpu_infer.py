"""CPU inference speed, fp32: MosaicBERT-base against transformers' BertModel (sdpa) of the same width and depth.

    python bench/cpu_infer.py [--threads 2] [--repeats 3] [--repo ../other-checkout ...]

Real tokens/s (padding excluded) on ragged batches (lengths uniform in 8..256, batch 32) and on fixed-length
batches (128, batch 16), plus achieved GFLOP/s from each model's own matmul FLOPs per token. Both models see the
same token ids and attention masks in one run; `--repo` adds MosaicBERT from other checkouts (same weights), timed
in the same rotation, for an A/B of two versions on a host whose speed drifts between runs.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

REPO = Path(__file__).resolve().parents[1]


def batches(kind, n_batches, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        if kind == "ragged":
            lengths = torch.randint(8, 257, (32,), generator=g)
        else:
            lengths = torch.full((16,), 128)
        s = int(lengths.max())
        ids = torch.randint(1000, vocab, (len(lengths), s), generator=g)
        mask = (torch.arange(s)[None] < lengths[:, None]).long()
        out.append((ids * mask, mask))
    return out


def flops_per_token(hidden, layers, inter, glu, avg_attended):
    """Forward matmul FLOPs per token: projections + MLP + attention (scores and values over attended keys)."""
    proj = 2 * hidden * 3 * hidden + 2 * hidden * hidden
    mlp = 2 * hidden * (2 * inter if glu else inter) + 2 * inter * hidden
    attn = 4 * avg_attended * hidden
    return layers * (proj + mlp + attn)


@torch.no_grad()
def time_models(models, data, repeats):
    """Best-of-`repeats` seconds per model over all batches; the models alternate so drift hits both alike."""
    for model in models:
        model(input_ids=data[0][0], attention_mask=data[0][1])  # warm-up
    best = [float("inf")] * len(models)
    for _ in range(repeats):
        for i, model in enumerate(models):
            t0 = time.perf_counter()
            for ids, mask in data:
                model(input_ids=ids, attention_mask=mask)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repo", nargs="*", default=[], help="other MosaicBERT checkouts to time beside this one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = json.loads((REPO / "train" / "configs" / "mosaic-bert-base.json").read_text())
    ours = []
    for repo in (REPO, *args.repo):
        config = AutoConfig.from_pretrained(Path(repo).resolve(), trust_remote_code=True, **base)
        torch.manual_seed(0)
        model = AutoModel.from_config(config, trust_remote_code=True).eval()
        ours.append(("MosaicBERT" if repo == REPO else f"MosaicBERT {repo}", model))
    hf = BertModel(BertConfig(vocab_size=30528, attn_implementation="sdpa"))
    hf.config._attn_implementation = "sdpa"
    hf.eval()

    rows = []
    for kind in ("ragged", "fixed"):
        data = batches(kind, args.batches, 30528)
        real = sum(int(m.sum()) for _, m in data)
        attended = sum(int((m.sum(1) ** 2).sum()) for _, m in data) / real  # mean keys per real query
        padded_attended = sum(m.shape[1] * int(m.sum()) for _, m in data) / real
        seconds = time_models([model for _, model in ours] + [hf], data, args.repeats)
        specs = [(name, True, attended) for name, _ in ours] + [("HF BERT sdpa", False, padded_attended)]
        kind_rows = []
        for (name, glu, keys), sec in zip(specs, seconds):
            fpt = flops_per_token(768, 12, 3072, glu, keys)
            # HF BERT also computes every padded token.
            tokens_computed = real if glu else sum(m.numel() for _, m in data)
            kind_rows.append((kind, name, real / sec, fpt * tokens_computed / sec / 1e9))
        rows += [(*row, row[2] / kind_rows[-1][2]) for row in kind_rows]  # ratio: real tok/s over BERT's
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'batches':8} {'model':14} {'real tok/s':>10} {'GFLOP/s':>8} {'ratio':>6}")
    for kind, name, tps, gflops, ratio in rows:
        print(f"{kind:8} {name:14} {tps:10.0f} {gflops:8.1f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
