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


def bench(fn, iters=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


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
        row = dict(backend=be)
        try:
            t = bench(lambda: apb_attention(q, k, v, anchor_len=la, passing_k=pk, passing_v=pv, backend=be))
            row.update(apb_s=t, apb_tflops=4 * d * h * pairs_apb / t / 1e12)
            qc, kc, vc = q[:, la:], k[:, la:], v[:, la:]
            t = bench(lambda: attention_with_lse(qc, kc, vc, causal=True, backend=be))
            row.update(causal_s=t, causal_tflops=4 * d * h * pairs_causal / t / 1e12)
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
        t = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    yard = dict(backend="torch_sdpa_cudnn_causal", causal_s=t, causal_tflops=4 * d * h * pairs_causal / t / 1e12)
    print(json.dumps(yard), flush=True)
    rows.append(yard)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), args=vars(a), results=rows), f, indent=1)


if __name__ == "__main__":
    main()
