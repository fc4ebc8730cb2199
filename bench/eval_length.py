"""How far ALiBi extrapolates: masked-LM loss and accuracy of a pretrained model at several sequence lengths.

    python bench/eval_length.py --model . --data shared/data/corpus/valid.txt.xz \
        --lengths 128 256 512 1024 2048 --tokens 65536

Every length sees the same text and the same masks; only the context around each token changes. Documents with at
least max(lengths) - 2 tokens are cut into spans of that many tokens (round-robin over the documents, in file order,
until --tokens is reached). For each length L, a span is split into consecutive windows of L - 2 tokens, each
wrapped as `[CLS] window [SEP]`. Masking is decided once per span position (seed --seed, 15%, BERT 80/10/10:
[MASK] / random token / unchanged), so a masked token gets the same replacement at every length. Only positions
that every length covers are scored (a span is not always a multiple of L - 2), so each row scores the same tokens.

Printed: a markdown table of MLM loss (mean cross-entropy over the masked tokens), masked-token accuracy, and the
loss over masked tokens whose position inside their window is at least 128 (the pretraining length).
"""

import argparse
import lzma
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]


def read_documents(path):
    """Documents of a blank-line separated corpus file (.txt or .txt.xz), each as one newline-joined string."""
    opener = lzma.open if str(path).endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        blocks = f.read().split("\n\n")
    return [block.strip("\n") for block in blocks if block.strip()]


def token_spans(tokenizer, documents, span_len, budget):
    """(n_spans, span_len) token ids: spans of `span_len` tokens from documents long enough, round-robin."""
    # No truncation: documents are far longer than the tokenizer's model_max_length (512), which only limits what
    # `truncation=True` cuts to (and warns otherwise). Raising it silences the warning; the model has no limit.
    tokenizer.model_max_length = 1 << 30
    ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    pools = [doc for doc in ids if len(doc) >= span_len]
    if not pools:
        raise ValueError(f"No document has {span_len} tokens; lower the largest length.")
    spans, offsets = [], [0] * len(pools)
    while len(spans) * span_len < budget:
        progressed = False
        for i, doc in enumerate(pools):
            if offsets[i] + span_len <= len(doc) and len(spans) * span_len < budget:
                spans.append(doc[offsets[i] : offsets[i] + span_len])
                offsets[i] += span_len
                progressed = True
        if not progressed:
            break
    used_docs = sum(1 for o in offsets if o)
    return torch.tensor(spans), used_docs, len(pools)


def mask_spans(spans, vocab_size, mask_id, probability, seed):
    """BERT masking per span position: (corrupted ids, chosen bool mask). 80% [MASK], 10% random id, 10% kept."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(spans.shape, generator=g) < probability
    roll = torch.rand(spans.shape, generator=g)
    random_ids = torch.randint(1000, vocab_size, spans.shape, generator=g)  # ids >= 1000 skip [unused]/specials
    corrupted = torch.where(chosen & (roll < 0.8), mask_id, spans)
    corrupted = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, corrupted)
    return corrupted, chosen


@torch.inference_mode()
def evaluate(model, spans, corrupted, scored, length, cls_id, sep_id, batch_tokens, position_split=128):
    """Loss sum, correct count, scored count, and loss sum / count at window positions >= position_split."""
    n, span_len = spans.shape
    w = length - 2
    windows = span_len // w
    # (n, windows, w) -> (n * windows, w): consecutive windows of each span; the tail that no window covers is dropped
    cut = windows * w
    ids, targets, keep = (x[:, :cut].reshape(n * windows, w) for x in (corrupted, spans, scored))
    cls = torch.full((len(ids), 1), cls_id)
    sep = torch.full((len(ids), 1), sep_id)
    ids = torch.cat([cls, ids, sep], dim=1)
    labels = torch.cat([torch.full_like(cls, -100), torch.where(keep, targets, -100), torch.full_like(sep, -100)], 1)
    position = torch.arange(length).expand_as(labels)
    loss_sum, correct, count, far_sum, far_count = 0.0, 0, 0, 0.0, 0
    rows_per_batch = max(1, batch_tokens // length)
    for start in range(0, len(ids), rows_per_batch):
        batch_ids, batch_labels = ids[start : start + rows_per_batch], labels[start : start + rows_per_batch]
        logits = model(input_ids=batch_ids, attention_mask=torch.ones_like(batch_ids), labels=batch_labels).logits
        chosen = batch_labels != -100
        losses = F.cross_entropy(logits[chosen].float(), batch_labels[chosen], reduction="none")
        far = position[start : start + rows_per_batch][chosen] >= position_split
        loss_sum += float(losses.sum())
        correct += int((logits[chosen].argmax(-1) == batch_labels[chosen]).sum())
        count += int(chosen.sum())
        far_sum += float(losses[far].sum())
        far_count += int(far.sum())
    return loss_sum, correct, count, far_sum, far_count


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO), help="model folder or Hub id (default: this folder)")
    parser.add_argument("--data", required=True,
                        help="held-out text: .txt or .txt.xz, documents separated by blank lines")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--tokens", type=int, default=65536, help="text tokens evaluated at every length")
    parser.add_argument("--mlm-probability", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward pass")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.lengths) < 3:
        raise ValueError("Every length needs room for [CLS], one token and [SEP].")

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForMaskedLM.from_pretrained(args.model, trust_remote_code=True).eval()
    span_len = max(args.lengths) - 2
    spans, used_docs, long_docs = token_spans(tokenizer, read_documents(args.data), span_len, args.tokens)
    corrupted, chosen = mask_spans(spans, len(tokenizer), tokenizer.mask_token_id, args.mlm_probability, args.seed)
    common = min((span_len // (length - 2)) * (length - 2) for length in args.lengths)
    scored = chosen & (torch.arange(span_len) < common)

    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{next(model.parameters()).dtype}, attention backend {model.config.attention_backend}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{len(spans)} spans of {span_len} tokens from {used_docs} documents (of {long_docs} with >= {span_len} "
          f"tokens); {int(scored.sum())} masked tokens scored at every length "
          f"({args.mlm_probability:.0%}, BERT 80/10/10, seed {args.seed})\n")
    rows = []
    for length in args.lengths:
        t0 = time.perf_counter()
        loss_sum, correct, count, far_sum, far_count = evaluate(
            model, spans, corrupted, scored, length, tokenizer.cls_token_id, tokenizer.sep_token_id, args.batch_tokens
        )
        far = f"{far_sum / far_count:.3f}" if far_count else "—"
        rows.append(f"| {length} | {len(spans) * (span_len // (length - 2))} | {loss_sum / count:.3f} | "
                    f"{100 * correct / count:.1f}% | {far} | {time.perf_counter() - t0:.0f} |")
        print(f"length {length}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n| length | sequences | MLM loss | masked-token accuracy | loss at positions >= 128 | seconds |")
    print("|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
