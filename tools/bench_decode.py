"""Decoding-attention benchmark on one GPU: one new token (or a few) against a long cache.

For each cache length it times the split-KV Triton kernel, the path ``attention_with_lse
(backend="auto")`` takes, and ``F.scaled_dot_product_attention`` (no LSE: the floor), and
reports each as a fraction of the bandwidth bound (K and V bytes / the HBM bandwidth a
device copy measures in the same run).

    python tools/bench_decode.py --lengths 8192 32768 131072 --out results/decode_attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.bench_attention import bench  # noqa: E402


def time_ms(fn, iters=50):
    """Mean milliseconds of ``fn`` on the GPU (CUDA events, after warm-up)."""
    return 1e3 * bench(fn, iters)


def copy_bandwidth_gbs(nbytes=1 << 29):
    """HBM bandwidth (GB/s) of a device-to-device copy: bytes read + written / time."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), iters=20)
    return 2 * nbytes / ms / 1e6


def main():
    from megatron_apb.ops.attention import attention_with_lse
    from megatron_apb.ops.decode_kernel import split_kv_attention

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new", type=int, default=1, help="new query rows")
    p.add_argument("--out")
    args = p.parse_args()
    bw = copy_bandwidth_gbs()
    rows = []
    for L in args.lengths:
        b, m, h, kvh, d = args.batch, args.new, args.heads, args.kv_heads, args.head_dim
        q = torch.randn(b, m, h, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, L, kvh, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        bound_ms = 2 * k.numel() * k.element_size() / bw / 1e6
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        row = dict(length=L, batch=b, new_rows=m, bound_ms=round(bound_ms, 4), hbm_gbs=round(bw, 1),
                   split_kv_ms=time_ms(lambda: split_kv_attention(q, k, v, causal=True)),
                   auto_ms=time_ms(lambda: attention_with_lse(q, k, v, causal=True, backend="auto")),
                   sdpa_no_lse_ms=time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)))
        for key in ("split_kv_ms", "auto_ms", "sdpa_no_lse_ms"):
            row[key] = round(row[key], 4)
        row["split_kv_vs_bound"] = round(row["split_kv_ms"] / bound_ms, 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
