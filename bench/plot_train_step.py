"""Bar chart (SVG, no plotting library needed) of real tokens/s from `bench/train_step.py --json` results.

    python bench/plot_train_step.py bench/results/train_step_h200_2026-12-01.json docs/train_step.svg
"""

import json
import sys
from html import escape

COLORS = {"mosaic": "#2b6cb0", "HF BERT": "#9b9b9b", "ModernBERT": "#d69e2e"}


def color(name):
    return next((c for key, c in COLORS.items() if name.startswith(key)), "#555")


def main(src, dst):
    rows = [r for r in json.load(open(src)) if r.get("batch") in ("fixed", "ragged") and "tok_s" in r]
    groups = [g for g in ("fixed", "ragged") if any(r["batch"] == g for r in rows)]
    top = max(r["tok_s"] for r in rows)
    bar_h, gap, label_w, chart_w = 18, 6, 230, 420
    y, parts = 40, []
    titles = {"fixed": "fixed 128 x 256 sequences", "ragged": "ragged 32-512 x 128 sequences"}
    for g in groups:
        parts.append(f'<text x="10" y="{y}" font-weight="bold">{escape(titles[g])}</text>')
        y += 10
        for r in (r for r in rows if r["batch"] == g):
            w = chart_w * r["tok_s"] / top
            parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{escape(r["model"])}</text>')
            parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color(r["model"])}"/>')
            parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 13}">{r["tok_s"] / 1e3:.0f}k</text>')
            y += bar_h + gap
        y += 20
    width, height = label_w + chart_w + 60, y
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>'
           f'<text x="10" y="18" font-size="14">MLM training, real tokens/s, one H200, bf16 (higher is better)</text>'
           + "".join(parts) + "</svg>\n")
    open(dst, "w").write(svg)


if __name__ == "__main__":
    main(*sys.argv[1:3])
