"""Plot prefill benchmark JSONs (tools/bench_prefill.py) as seconds per length and mode.

    python tools/plot_bench.py results/h200x4/*.json --out results/h200x4/prefill.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main():
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(dict)
    for path in a.files:
        with open(path) as f:
            data = json.load(f)
        for row in data.get("results", []):
            if "prefill_s" not in row or row.get("oom"):
                continue
            label = row["mode"] if row["mode"].startswith("hf") else f"{row['mode']} ({row.get('world', 1)} GPU)"
            series[label][row["length"]] = row["prefill_s"]  # later files win (after optimisation)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill seconds")
    ax.set_title("Prefill, Llama-3.1-8B shape, bf16, batch 1 (H200)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
