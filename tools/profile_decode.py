"""Where a decoding step's time goes, on one GPU (Llama-3.1-8B shape, random bf16 weights).

Prefills ``--length`` tokens (exact mode), then profiles ``--steps`` decoding steps with the
PyTorch profiler and reports per step: wall time, GPU kernel time by category (attention,
matmul, norms/RoPE, copies/cache writes, sampling and other elementwise work), the time the
GPU is idle while the host runs Python and launches kernels, and the host synchronisations.

    python tools/profile_decode.py --lengths 8192 131072 --steps 10 --path step graph --out results/decode_profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.bench_prefill import build  # noqa: E402

CATEGORIES = [  # (category, substrings of CUDA kernel names), first match wins
    ("attention", ("split_kv", "fmha", "flash", "attention", "sdpa", "gemmsn", "magma", "softmax")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "cublas")),
    ("norm_rope", ("rms", "norm", "rope")),
    ("copies", ("copy", "memcpy", "cat", "index", "scatter", "fill")),
    ("sampling", ("argmax", "topk", "sort", "multinomial", "max")),
]
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile_steps(engine, doc, query, steps, path="graph"):
    """Profile ``steps`` decoding steps after a prefill of ``doc`` and the query step.

    ``path``: ``"step"`` (:meth:`APBEngine.step`: growing cache, host positions, Python per
    layer), ``"eager"`` (:class:`DecodeStep` run eagerly: static cache, device lengths) or
    ``"graph"`` (:class:`DecodeStep` replayed from a CUDA graph: what ``generate`` runs)."""
    from megatron_apb.inference.decode import DecodeStep

    cache, _, n, _ = engine.prefill(doc, query, reserve=query.numel() + steps + 8)
    engine.step(cache, query, n)
    pos = n + query.numel()
    if path == "step":
        def run(position):
            return engine.step(cache, [1], position)
    else:
        runner = DecodeStep(engine, cache, last_position=pos + steps + 4, graph=path == "graph")

        def run(position):
            return runner.step(1, position)[0]
    for _ in range(3):  # warm-up (and the graph's capture)
        int(run(pos).argmax())
        pos += 1
    torch.cuda.synchronize()
    walls = []
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            int(run(pos).argmax())  # the host reads the token, as generate does
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            pos += 1
    return prof, walls


# aten ops that only re-describe memory (no kernel)
_VIEWS = frozenset("view as_strided transpose unsqueeze squeeze slice t _unsafe_view select expand reshape "
                   "detach alias split chunk narrow permute unbind split_with_sizes view_as empty "
                   "empty_like empty_strided".split())


def ops_by_source(engine, cache, position, frames=2):
    """One eager static step (:class:`DecodeStep` without the graph) with every aten op
    that may launch a kernel counted by the source lines that issued it (the innermost
    ``frames`` frames in this project or Megatron-Core): where a step's small kernels come
    from.  Returns [[count, op, "file:line:function < ..."], ...], most frequent first."""
    import collections
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_apb.inference.decode import DecodeStep

    counts = collections.Counter()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in _VIEWS:
                stack = [f for f in traceback.extract_stack()[:-1]
                         if ("megatron" in f.filename) and "_python_dispatch" not in f.filename]
                where = " < ".join(f"{f.filename.split('site-packages/')[-1].split('megatron_apb/')[-1]}:"
                                   f"{f.lineno}:{f.name}" for f in reversed(stack[-frames:]))
                counts[(name, where)] += 1
            return func(*args, **(kwargs or {}))

    runner = DecodeStep(engine, cache, last_position=position + 2, graph=False)
    runner.step(1, position)  # warm-up (compilation) outside the record
    try:
        with torch.no_grad(), Record():
            runner.step(1, position + 1)
    except Exception as exc:  # e.g. a compiled kernel that refuses to run under the mode
        return [[0, "error", f"{type(exc).__name__}: {exc}"[:300]]]
    return [[n, op, where] for (op, where), n in counts.most_common()]


def breakdown(prof, steps, walls):
    ms = {c: 0.0 for c, _ in CATEGORIES}
    ms["other"] = 0.0
    kernels, syncs = {}, {s: 0 for s in SYNCS}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", 0) or 0
        if evt.device_type == torch.autograd.DeviceType.CUDA and t:
            name = evt.key.lower()
            cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
            ms[cat] += t / 1e3 / steps
            kernels[evt.key[:80]] = (round(t / 1e3 / steps, 4), evt.count // steps)
        elif evt.key in syncs:
            syncs[evt.key] += evt.count
    gpu_ms = sum(ms.values())
    wall_ms = 1e3 * statistics.median(walls)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    return dict(
        wall_ms_per_token=round(wall_ms, 3),
        gpu_kernel_ms_per_token={k: round(v, 3) for k, v in ms.items()},
        gpu_busy_ms=round(gpu_ms, 3),
        host_overhead_ms=round(max(0.0, wall_ms - gpu_ms), 3),  # GPU idle: Python, launches, syncs
        host_syncs_per_token={k: v / steps for k, v in syncs.items()},
        kernel_launches_per_token=sum(c for _, (_, c) in kernels.items()),
        top_kernels=[[k, t, c] for k, (t, c) in top],
    )


def main():
    from megatron_apb import APBConfig
    from megatron_apb.inference import APBEngine
    from megatron_apb.inference.launch import init_runtime

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--lengths", type=int, nargs="+", default=[131072])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--path", choices=["step", "eager", "graph"], nargs="+", default=["graph"],
                   help="decoding path(s) to profile (see profile_steps)")
    p.add_argument("--by-source", action="store_true",
                   help="also count one eager step's aten ops by the source lines that issue them")
    p.add_argument("--out")
    args = p.parse_args()
    rt = init_runtime(1, "bf16")
    model = build(args.shape, APBConfig(mode="exact"), rt, fused=True)
    cfg = APBConfig(mode="exact")
    engine = APBEngine(model, cfg, cp_group=rt.pg.cp, tp_group=rt.pg.tp, vocab_size=128000)
    rows = []
    for n in args.lengths:
        doc = torch.randint(0, 100000, (n,), generator=torch.Generator().manual_seed(n))
        query = torch.randint(0, 100000, (32,), generator=torch.Generator().manual_seed(1))
        for path in args.path:
            prof, walls = profile_steps(engine, doc, query, args.steps, path)
            row = dict(length=n, path=path, **breakdown(prof, args.steps, walls))
            print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
            if args.by_source:
                cache, _, n_doc, _ = engine.prefill(doc[:1024], query, reserve=query.numel() + 8)
                row["ops_by_source"] = ops_by_source(engine, cache, n_doc + query.numel())
                print("\n".join(f"{c:4d} {op:24s} {where}" for c, op, where in row["ops_by_source"]), flush=True)
                del cache
            rows.append(row)
            del prof
            torch.cuda.empty_cache()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), command=" ".join(sys.argv), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
