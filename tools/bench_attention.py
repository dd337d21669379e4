"""Attention-kernel benchmark on one GPU: each backend's TFLOP/s for the APB per-host op and
for plain causal attention, on the useful FLOPs (masked-out blocks not counted).

    python tools/bench_attention.py --block 32768 --anchor 8192 --passing 12288 --out a.json

Useful FLOPs of attention = 4 * head_dim * heads * (number of visible query-key pairs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from timing_stats import DEFAULT_RUNS, spread  # noqa: E402  (tools/, this script's folder)


def bench_runs(fn, iters=10, runs=DEFAULT_RUNS):
    """Seconds per call of ``fn`` in each of ``runs`` timed runs of ``iters`` calls (CUDA
    events), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters / 1e3)
    return times


def bench(fn, iters=10, runs=DEFAULT_RUNS):
    """Median seconds per call of ``fn`` over ``runs`` timed runs (see :func:`bench_runs`)."""
    return spread("s", bench_runs(fn, iters, runs))["s"]


def timed(name: str, fn, flops: float, runs: int) -> dict:
    """``{name}_s`` (median, min, max over ``runs``) and ``{name}_tflops`` at the median."""
    row = spread(f"{name}_s", bench_runs(fn, runs=runs))
    row[f"{name}_tflops"] = flops / row[f"{name}_s"] / 1e12
    return row


def main():
    from megatron_apb import apb_attention, attention_with_lse

    p = argparse.ArgumentParser()
    p.add_argument("--block", type=int, default=32768)
    p.add_argument("--anchor", type=int, default=8192)
    p.add_argument("--passing", type=int, default=12288, help="passing rows seen (e.g. 3 ranks x 4096)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backends", nargs="+", default=["cudnn", "flash", "efficient", "flex"])
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed runs of 10 calls each (median, min, max)")
    p.add_argument("--out")
    a = p.parse_args()
    h, kvh, d, la, b, P = a.heads, a.kv_heads, a.head_dim, a.anchor, a.block, a.passing
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, la + b, h, d, device=dev, dtype=dt)
    k = torch.randn(1, la + b, kvh, d, device=dev, dtype=dt)
    v = torch.randn(1, la + b, kvh, d, device=dev, dtype=dt)
    pk = torch.randn(1, P, kvh, d, device=dev, dtype=dt)
    pv = torch.randn(1, P, kvh, d, device=dev, dtype=dt)
    pairs_apb = la * (la + 1) / 2 + b * (la + P) + b * (b + 1) / 2
    pairs_causal = b * (b + 1) / 2
    rows = []
    for be in a.backends:
        row = dict(backend=be, runs=a.runs)
        try:
            row.update(timed("apb", lambda: apb_attention(q, k, v, anchor_len=la, passing_k=pk, passing_v=pv, backend=be),
                             4 * d * h * pairs_apb, a.runs))
            qc, kc, vc = q[:, la:], k[:, la:], v[:, la:]
            row.update(timed("causal", lambda: attention_with_lse(qc, kc, vc, causal=True, backend=be),
                             4 * d * h * pairs_causal, a.runs))
        except Exception as exc:  # a backend may not support the shape: record why
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(json.dumps(row), flush=True)
        rows.append(row)
    # the yardstick: PyTorch's own causal SDPA (cuDNN) on the local block, GQA expanded
    qt = q[:, la:].transpose(1, 2)
    kt = k[:, la:].repeat_interleave(h // kvh, 2).transpose(1, 2)
    vt = v[:, la:].repeat_interleave(h // kvh, 2).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        yard = dict(backend="torch_sdpa_cudnn_causal", runs=a.runs, **timed(
            "causal", lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
            4 * d * h * pairs_causal, a.runs))
    print(json.dumps(yard), flush=True)
    rows.append(yard)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), args=vars(a), results=rows), f, indent=1)


if __name__ == "__main__":
    main()
