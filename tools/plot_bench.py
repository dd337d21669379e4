"""Plot prefill benchmark JSONs (tools/bench_prefill.py) as seconds per length and mode,
one panel per model shape.  When files repeat a (mode, GPUs, length), the later file wins,
so list older runs first.  Our model's runs without the fused kernels are labelled
"unfused" (also files written before ``--fused`` existed).  Every line has its own
marker; the peers (PyTorch's ``context_parallel``, Hugging Face transformers) are dashed
and named as peers; rows with ``prefill_s_min``/``_max`` get bars from min to max.

    python tools/plot_bench.py results/h200x4/prefill_cp4_before.json results/h200x4/prefill_*.json \
        --out results/h200x4/prefill.png
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8"]


def _shape(row, meta):
    if row.get("shape"):
        return row["shape"]
    m = re.search(r"--shape[ =](\S+)", meta.get("command", ""))
    return m.group(1) if m else "llama3-8b"


def _gpus(row) -> str:
    tp, world = row.get("tp", 1), row.get("world", 1)
    return f"TP{tp}×CP{world // tp}" if tp > 1 else f"{world} GPU"


def is_peer(row) -> bool:
    """A system we compare against, not our model."""
    return row["mode"].startswith("hf") or row["mode"] == "torch_cp"


def label(row) -> str:
    """The legend entry of a result row."""
    if row["mode"].startswith("hf"):
        return f"peer: HF transformers sdpa ({_gpus(row)})"
    if row["mode"] == "torch_cp":
        return f"peer: PyTorch context_parallel ring, {row.get('sdpa_backend', 'sdpa')} ({_gpus(row)})"
    mode = row["mode"]
    if "backend" in row and not row.get("fused"):  # our model before the fused kernels
        mode += " unfused"
    return f"ours: {mode} ({_gpus(row)})"


def collect(files):
    """{shape: {label: {length: (median, min, max)}}}, the shapes in order, the devices seen."""
    panels = defaultdict(lambda: defaultdict(dict))
    shapes, devices = [], []
    for path in dict.fromkeys(files):
        with open(path) as f:
            data = json.load(f)
        device = data.get("meta", {}).get("device")
        if device and device not in devices:
            devices.append(device)
        for row in data.get("results", []):
            if "prefill_s" not in row or row.get("oom"):
                continue
            shape = _shape(row, data.get("meta", {}))
            if shape not in shapes:
                shapes.append(shape)
            s = row["prefill_s"]
            panels[shape][label(row)][row["length"]] = (s, row.get("prefill_s_min", s), row.get("prefill_s_max", s))
    return panels, shapes, devices


def main():
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels, shapes, devices = collect(a.files)
    fig, axes = plt.subplots(1, len(shapes), figsize=(7.5 * len(shapes), 5.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for i, (name, points) in enumerate(sorted(panels[shape].items())):
            xs = sorted(points)
            med = [points[x][0] for x in xs]
            err = [[m - points[x][1] for x, m in zip(xs, med)], [points[x][2] - m for x, m in zip(xs, med)]]
            ax.errorbar(xs, med, yerr=err if any(map(any, err)) else None, marker=MARKERS[i % len(MARKERS)],
                        markersize=7, capsize=3, linestyle="--" if name.startswith("peer") else "-",
                        fillstyle="none" if name.startswith("peer") else "full", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("prefill seconds (median; bars: min to max where recorded)")
        ax.set_title(f"Prefill, {shape} shape, bf16, batch 1 ({', '.join(devices) or 'GPU'})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
