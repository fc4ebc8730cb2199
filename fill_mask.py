"""Fill the [MASK] in a sentence with the model in this folder (or another one) and print the top predictions.

    python fill_mask.py "She poured a cup of [MASK] and read the newspaper."
    python fill_mask.py --model path/to/checkpoint --top-k 10 "The [MASK] sat on the mat."
"""

import argparse
from pathlib import Path

from transformers import pipeline


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="+", help="sentences containing [MASK]")
    parser.add_argument("--model", default=str(Path(__file__).resolve().parent), help="model folder or Hub id")
    parser.add_argument("--top-k", type=int, default=5, help="candidates per mask, 1 to the vocabulary size")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cpu)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")

    fill = pipeline("fill-mask", model=args.model, trust_remote_code=True, device=args.device)
    vocab = len(fill.tokenizer)  # the model may have padding rows beyond it, which are never real tokens
    if args.top_k > vocab:
        parser.error(f"--top-k must be between 1 and the vocabulary size {vocab} of {args.model}, got {args.top_k}")
    for text in args.text:
        if fill.tokenizer.mask_token not in text:
            parser.error(f"no {fill.tokenizer.mask_token} in {text!r}")
        results = fill(text, top_k=args.top_k)
        if results and isinstance(results[0], dict):  # one mask: a flat list
            results = [results]
        print(text)
        for mask_no, candidates in enumerate(results, 1):
            if len(results) > 1:
                print(f"  mask {mask_no}:")
            for r in candidates:
                print(f"  {r['score']:.3f}  {r['token_str']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
