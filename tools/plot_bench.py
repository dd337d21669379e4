"""Plot prefill benchmark JSONs (tools/bench_prefill.py) as seconds per length and mode,
one panel per model shape.  When files repeat a (mode, GPUs, length), the later file wins,
so list older runs first.  Our model's runs without the fused kernels are labelled
"unfused" (also files written before ``--fused`` existed).

    python tools/plot_bench.py results/h200x4/prefill_cp4_before.json results/h200x4/prefill_*.json \
        --out results/h200x4/prefill.png
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict


def _shape(row, meta):
    if row.get("shape"):
        return row["shape"]
    m = re.search(r"--shape[ =](\S+)", meta.get("command", ""))
    return m.group(1) if m else "llama3-8b"


def _label(row):
    if row["mode"].startswith("hf"):
        return row["mode"]
    tp, world = row.get("tp", 1), row.get("world", 1)
    gpus = f"TP{tp}×CP{world // tp}" if tp > 1 else f"{world} GPU"
    mode = row["mode"] + (f" {row['sdpa_backend']}" if row.get("sdpa_backend") else "")
    if "backend" in row and not row.get("fused"):  # our model before the fused kernels
        mode += " unfused"
    return f"{mode} ({gpus})"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = defaultdict(lambda: defaultdict(dict))  # shape -> label -> length -> seconds
    seen = []
    for path in dict.fromkeys(a.files):
        with open(path) as f:
            data = json.load(f)
        for row in data.get("results", []):
            if "prefill_s" not in row or row.get("oom"):
                continue
            shape = _shape(row, data.get("meta", {}))
            if shape not in seen:
                seen.append(shape)
            panels[shape][_label(row)][row["length"]] = row["prefill_s"]
    fig, axes = plt.subplots(1, len(seen), figsize=(7 * len(seen), 4.8), squeeze=False)
    for ax, shape in zip(axes[0], seen):
        for label, points in sorted(panels[shape].items()):
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("prefill seconds")
        ax.set_title(f"Prefill, {shape} shape, bf16, batch 1 (H200)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
