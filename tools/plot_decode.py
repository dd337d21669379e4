"""Plot a decoding benchmark JSON (tools/bench_decode_model.py): milliseconds per token against
context length (log2 axis), one line and marker per mode (our eager steps dotted, where
measured; bars from min to max where the JSON records them), the bandwidth bound dashed in
black and named in the legend; skipped lengths are left out and listed under the plot.

    python tools/plot_decode.py results/decode_model_1gpu.json --out results/decode_model_1gpu.png

Without ``--out`` the picture goes next to the JSON, with the extension .png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

LABELS = {"apb_engine_1gpu": "ours (APBEngine, CUDA graph)", "hf_sdpa_1gpu": "HF transformers (sdpa)"}
EAGER_LABELS = {"apb_engine_1gpu": "ours (APBEngine, eager)"}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _tokens(n: int) -> str:
    """8192 -> '8K', 1048576 -> '1M'."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


def series(rows):
    """{label: {length: (median, min, max) ms}} of the measured rows, the bound's
    {length: ms}, and the skipped rows as text."""
    lines, bound, skipped = {}, {}, []
    for row in rows:
        mode, n = row.get("mode", "?"), row.get("length")
        if n is None:
            continue
        if row.get("decode_bound_ms") is not None:
            bound.setdefault(n, row["decode_bound_ms"])
        if row.get("skipped"):
            skipped.append(f"{mode} {_tokens(n)}: {row['skipped']}")
            continue
        label = LABELS.get(mode, mode)
        if row.get("hf_cache"):
            label += f", {row['hf_cache']}"
        for key, name in (("decode_ms_per_token", label),
                          ("decode_ms_per_token_eager", EAGER_LABELS.get(mode, f"{mode} (eager)"))):
            ms = row.get(key)
            if ms is not None:  # the spread: recorded, else from the timed steps' list
                steps = row.get("step_ms" + key[len("decode_ms_per_token"):]) or [ms]
                lines.setdefault(name, {})[n] = (ms, row.get(f"{key}_min", min(steps)), row.get(f"{key}_max", max(steps)))
    return lines, bound, skipped


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="a JSON file written by tools/bench_decode_model.py")
    p.add_argument("--out", help="PNG to write (default: the JSON's name with .png)")
    p.add_argument("--title", help="title of the plot (default: model shape and device from the JSON)")
    args = p.parse_args()
    try:
        with open(args.json) as f:
            data = json.load(f)
    except OSError as exc:
        sys.exit(f"{args.json}: cannot read it ({exc.strerror or exc})")
    except json.JSONDecodeError as exc:
        sys.exit(f"{args.json} is not JSON ({exc})")
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        sys.exit(f"{args.json} has no 'results' list: is it from tools/bench_decode_model.py?")
    meta = data.get("meta", {})
    lines, bound, skipped = series(data["results"])
    if not lines:
        sys.exit(f"{args.json}: no measured rows to plot" + (f" ({len(skipped)} skipped)" if skipped else ""))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_decode.py needs matplotlib: pip install matplotlib")

    fig, ax = plt.subplots(figsize=(7.5, 5))
    lengths = sorted(set(bound) | {n for pts in lines.values() for n in pts})
    for i, (label, points) in enumerate(lines.items()):
        xs = sorted(points)
        med = [points[x][0] for x in xs]
        err = [[m - points[x][1] for x, m in zip(xs, med)], [points[x][2] - m for x, m in zip(xs, med)]]
        ax.errorbar(xs, med, yerr=err if any(map(any, err)) else None, linestyle=":" if "eager" in label else "-",
                    marker=MARKERS[i % len(MARKERS)], markersize=7, capsize=3, label=label)
    if bound:
        xs = sorted(bound)
        bw = meta.get("copy_bandwidth_gbs")
        label = "bound: weights + KV cache" + (f" at {bw:.0f} GB/s" if bw else "")
        ax.plot(xs, [bound[x] for x in xs], "--", color="black", marker="_", markersize=12, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([_tokens(n) for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms per generated token (median; bars: min to max)")
    shape = meta.get("shape", "")
    layers = f", {meta['layers']} layers" if meta.get("layers") else ""
    device = meta.get("device", "unknown device")
    ax.set_title(args.title or f"Decoding, {shape}{layers}, batch 1, on {device}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    if skipped:
        fig.text(0.01, 0.01, "skipped: " + "; ".join(skipped), fontsize="x-small", wrap=True)
        fig.subplots_adjust(bottom=0.12 + 0.03 * min(len(skipped), 4))
    out = args.out or os.path.splitext(args.json)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
