"""Sparse prefill kernels on one GPU: one layer's causal attention, sparse vs dense.

For every length: dense causal attention through ``attention_with_lse`` (cuDNN on Hopper,
GQA read natively) and PyTorch's own SDPA (cuDNN, K/V expanded); then for every sparse
setting the index estimation and the sparse kernel, timed separately, with the density the
index actually has (keys read / keys of dense causal attention) and the ideal speed-up
1 / density.  Llama-3.1-8B's attention shape by default (32 heads, 8 KV heads, d 128, bf16).

    python tools/bench_sparse.py --lengths 131072 524288 --block-topk 64 256 \
        --vertical-slash 1024:3072 --out results/sparse_kernels.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import bench  # noqa: E402  (tools/: median of timed runs, CUDA events)


def settings(a):
    from megatron_apb.ops.sparse import AShape, BlockSparse, VerticalSlash

    out = [BlockSparse(block=a.block, topk=t) for t in a.block_topk]
    for spec in a.vertical_slash:
        vt, st = (int(x) for x in spec.split(":"))
        out.append(VerticalSlash(block=a.block, vertical_topk=vt, slash_topk=st, last_q=a.last_q))
    for spec in a.a_shape:
        sink, window = (int(x) for x in spec.split(":"))
        out.append(AShape(block=a.block, sink=sink, window=window))
    return out


def main():
    from megatron_apb.ops.attention import attention_with_lse
    from megatron_apb.ops.sparse import build_index, density, sparse_attention

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--block-topk", type=int, nargs="*", default=[64])
    p.add_argument("--vertical-slash", nargs="*", default=["1024:3072"], help="VERTICAL:SLASH budgets")
    p.add_argument("--a-shape", nargs="*", default=[], help="SINK:WINDOW")
    p.add_argument("--last-q", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--num-warps", type=int, nargs="+", default=[4], help="kernel launch settings swept")
    p.add_argument("--num-stages", type=int, nargs="+", default=[2], help="kernel launch settings swept")
    p.add_argument("--no-torch-sdpa", action="store_true", help="skip the expanded-K/V SDPA yardstick")
    p.add_argument("--out")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sparse.py needs a CUDA GPU")
    h, kvh, d = a.heads, a.kv_heads, a.head_dim
    scale = 1 / math.sqrt(d)
    rows = []
    for n in a.lengths:
        g = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, n, kvh, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, n, kvh, d, device="cuda", dtype=torch.bfloat16, generator=g)
        dense_s = bench(lambda: attention_with_lse(q, k, v, causal=True), a.iters)
        row = dict(length=n, kind="dense", backend="attention_with_lse(auto)", attention_s=dense_s, density=1.0)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if not a.no_torch_sdpa:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            qt = q.transpose(1, 2)
            kt, vt = (t.repeat_interleave(h // kvh, 2).transpose(1, 2) for t in (k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                t = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True), a.iters)
            del qt, kt, vt
            row = dict(length=n, kind="dense", backend="torch_sdpa_cudnn(expanded kv)", attention_s=t, density=1.0)
            print(json.dumps(row), flush=True)
            rows.append(row)
        for pat in settings(a):
            index = build_index(q, k, (pat,) * h, scale)
            dens = density(index)
            index_s = bench(lambda: build_index(q, k, (pat,) * h, scale), a.iters)
            sweep = {}
            for w, st in ((x, y) for x in a.num_warps for y in a.num_stages):
                sweep[f"w{w}s{st}"] = bench(lambda: sparse_attention(q, k, v, index, scale, num_warps=w,
                                                                     num_stages=st), a.iters)
            best = min(sweep, key=sweep.get)
            kernel_s = sweep[best]
            row = dict(length=n, kind=pat.kind, pattern=pat.to_dict(), density=dens, index_s=index_s,
                       kernel_s=kernel_s, attention_s=index_s + kernel_s,
                       kernel_speedup=dense_s / kernel_s, speedup=dense_s / (index_s + kernel_s),
                       ideal_speedup=1 / dens if dens else None,
                       index_fraction=index_s / (index_s + kernel_s), launch=best, launch_sweep_s=sweep)
            print(json.dumps(row), flush=True)
            rows.append(row)
            del index
        del q, k, v
        torch.cuda.empty_cache()
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, args=vars(a),
                           command=" ".join(sys.argv), results=rows), f, indent=1)


if __name__ == "__main__":
    main()
