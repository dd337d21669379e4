"""Prefill benchmark: a Llama-3.1-8B-shaped Megatron model (random bf16 weights, batch 1).

Run on 1..N GPUs with torchrun; CP = processes / --tp.  For every length and mode it times
the prefill (embedding + layers, no logits: what the generation engine runs), and reports
tokens/s, peak memory, a kernel-time breakdown (attention / matmul / communication /
scoring / other, from the CUDA profiler) and, for APB, the communication time that is not
hidden (prefill with communication minus prefill with the gathers replaced by local copies).
Mode ``torch_cp`` is PyTorch's own context parallelism (``tools/torch_cp_peer.py``); mode
``minference`` is one GPU's prefill with dynamic sparse attention (``--sparse-*``), reporting
the density used and an estimate of the index-estimation time inside the prefill.

    torchrun --nproc-per-node 4 tools/bench_prefill.py --lengths 32768 131072 \
        --modes exact ulysses star apb torch_cp --out results/prefill_cp4.json
    python tools/bench_prefill.py --lengths 32768 131072 --modes exact --hf --out results/prefill_1gpu.json
    python tools/bench_prefill.py --lengths 131072 524288 --modes exact minference --out results/prefill_sparse.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from timing_stats import DEFAULT_RUNS, add_spread  # noqa: E402  (tools/, this script's folder)

SHAPES = {
    "llama3-8b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                      ffn_hidden_size=14336, vocab=128256, rotary_base=500000),
    "qwen2.5-14b": dict(num_layers=48, hidden_size=5120, num_attention_heads=40, num_query_groups=8,
                        ffn_hidden_size=13824, vocab=152064, rotary_base=1000000),
    "yi-34b": dict(num_layers=60, hidden_size=7168, num_attention_heads=56, num_query_groups=8,
                   ffn_hidden_size=20480, vocab=64000, rotary_base=5000000),
}

CATEGORIES = [  # (category, substrings of CUDA kernel names), first match wins
    ("communication", ("nccl",)),
    ("attention", ("fmha", "flash", "cudnn", "attention", "sdpa", "fprop")),
    ("scoring", ("sort", "topk", "radix", "max_pool", "gather")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "cublas")),
]


def _log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def build(shape, apb_config, rt, layers=None, fused=False):
    from megatron_apb.megatron import build_gpt_model, tiny_transformer_config

    s = dict(SHAPES[shape])
    vocab, base = s.pop("vocab"), s.pop("rotary_base")
    if layers:
        s["num_layers"] = layers
    cfg = tiny_transformer_config(
        **s, params_dtype=torch.bfloat16, bf16=True, use_cpu_initialization=False,
        perform_initialization=False, tensor_model_parallel_size=rt.tp, context_parallel_size=rt.cp,
        bias_activation_fusion=fused,  # Megatron's compiled SwiGLU
    )
    model = build_gpt_model(cfg, apb_config, vocab_size=vocab, max_sequence_length=1 << 21,
                            pg_collection=rt.pg, rotary_base=base, parallel_output=True, fused_norm=fused)
    gen = torch.Generator(device="cuda").manual_seed(1234 + rt.tp_rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or "norm" in name.split(".")[-2]:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.cuda().eval()


def _kernel_times(prof):
    """(event, microseconds) of every CUDA kernel in the profile."""
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if evt.device_type == torch.autograd.DeviceType.CUDA and t:
            yield evt, t


def categorize(prof, world_steps):
    totals = {c: 0.0 for c, _ in CATEGORIES}
    totals["other"] = 0.0
    for evt, t in _kernel_times(prof):
        name = evt.key.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        totals[cat] += t / 1e3 / world_steps  # ms per prefill
    return totals


def top_kernels(prof, n):
    """The ``n`` CUDA kernels with the most time: [name (shortened), ms, calls]."""
    rows = [[evt.key[:90], round(t / 1e3, 3), evt.count] for evt, t in _kernel_times(prof)]
    return sorted(rows, key=lambda r: -r[1])[:n]


def time_prefill(engine, doc, query, iters, warmup, *, local_only=False):
    """Median and all prefill times; ``local_only``: collectives replaced by local copies
    (wrong results), to measure the communication that is not hidden."""
    times = []
    for i in range(warmup + iters):
        _, _, _, seconds = engine.prefill(doc, query, local_only=local_only)
        if i >= warmup:
            times.append(seconds)
    return statistics.median(times), times


def decode_latency(engine, doc, query, steps):
    """Median milliseconds per generated token after a prefill of ``doc`` (phase 2)."""
    cache, _, n, _ = engine.prefill(doc, query)
    engine.step(cache, query, n)
    pos, times = n + query.numel(), []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step(cache, [1], pos)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        pos += 1
    return 1e3 * statistics.median(times[2:] or times)


def sparse_settings(args):
    """APBConfig fields of mode ``minference`` (dynamic sparse prefill on one GPU)."""
    return dict(sparse="minference", sparse_pattern=args.sparse_pattern, sparse_budget=args.sparse_budget,
                sparse_dense_below=args.sparse_dense_below)


def sparse_index_stats(cfg, model, n):
    """Density and index-estimation time of one layer's sparse attention at ``n`` tokens,
    measured on random q/k of the model's shape (times the layer count: the estimate of the
    prefill's index time, already inside its prefill_s)."""
    from megatron_apb.ops.sparse import build_index, density

    c = model.config
    heads, kvh, d = c.num_attention_heads, c.num_query_groups, c.kv_channels
    q = torch.randn(1, n, heads, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, kvh, d, device="cuda", dtype=torch.bfloat16)
    backend = cfg.local_backend(1, heads, c.num_layers)
    patterns = backend.patterns if isinstance(backend.patterns, tuple) else (backend.patterns,) * heads
    index = build_index(q, k, patterns, d ** -0.5)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    build_index(q, k, patterns, d ** -0.5)
    torch.cuda.synchronize()
    index_s = (time.perf_counter() - t0) * c.num_layers
    return dict(sparse_pattern=cfg.sparse_pattern, sparse_budget=cfg.sparse_budget, density=density(index),
                index_s_estimate=index_s, sparse_dense_below=cfg.sparse_dense_below)


def run_ours(args, rt):
    from megatron_apb import APBConfig
    from megatron_apb.inference import APBEngine

    results = []
    model = build(args.shape, APBConfig(mode="exact"), rt, args.layers, fused=args.fused)
    layers = model.config.num_layers
    for n in args.lengths:
        doc = torch.randint(0, 100000, (n,), generator=torch.Generator().manual_seed(n))
        query = torch.randint(0, 100000, (args.query_len,), generator=torch.Generator().manual_seed(1))
        for mode in args.modes:
            # "minference": exact attention with the sparse local backend; "<mode>+minference":
            # that mode (e.g. apb, star) with every rank's local attention sparse
            base, _, local = mode.partition("+")
            sparse = sparse_settings(args) if "minference" in (base, local) else {}
            base = "exact" if base == "minference" else base
            cfg = APBConfig(mode=base, compressor=args.compressor, backend=args.backend,
                            anchor_ratio=args.anchor_ratio, passing_ratio=args.passing_ratio,
                            query_prefix_len=16, fused_rope=args.fused, partition=args.partition, **sparse)
            engine = APBEngine(model, cfg, cp_group=rt.pg.cp, tp_group=rt.pg.tp, vocab_size=128000)
            torch.cuda.reset_peak_memory_stats()
            try:
                median, times = time_prefill(engine, doc, query, args.iters, args.warmup)
            except torch.OutOfMemoryError:
                _log(f"{mode} {n}: out of memory")
                results.append(dict(mode=mode, length=n, oom=True))
                torch.cuda.empty_cache()
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30
            peak_all = torch.tensor([peak], device="cuda")
            dist.all_reduce(peak_all, op=dist.ReduceOp.MAX)
            row = dict(mode=mode, length=n, world=rt.world, tp=rt.tp, cp=rt.cp, shape=args.shape,
                       layers=layers, prefill_s=median, times_s=times, tokens_per_s=n / median,
                       peak_mem_gib=peak_all.item(), backend=args.backend, fused=args.fused,
                       partition=args.partition)
            if sparse:
                row.update(sparse_index_stats(cfg, model, n + args.query_len))
            if mode in ("apb", "exact") and rt.cp > 1:  # communication not hidden
                no_comm, _ = time_prefill(engine, doc, query, args.iters, 1, local_only=True)
                row["prefill_without_comm_s"] = no_comm
                row["unhidden_comm_s"] = max(0.0, median - no_comm)
            if args.decode and mode == args.decode_mode:
                row["decode_ms_per_token"] = decode_latency(engine, doc, query, args.decode)
            if args.breakdown:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    engine.prefill(doc, query)
                ms = categorize(prof, 1)
                per_rank = [None] * rt.world
                dist.all_gather_object(per_rank, ms)
                top = [None] * rt.world
                dist.all_gather_object(top, top_kernels(prof, args.top_kernels))
                row["top_kernels_by_rank"] = top
                if args.trace:
                    os.makedirs(args.trace, exist_ok=True)
                    prof.export_chrome_trace(os.path.join(args.trace, f"{mode}_{n}_rank{rt.rank}.json.gz"))
                # rank 0's (as before) and every rank's: the last CP rank is the critical path
                row["kernel_ms"] = ms
                row["kernel_ms_per_layer"] = {k: v / layers for k, v in ms.items()}
                row["kernel_ms_by_rank"] = per_rank
            results.append(row)
            _log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                             if k not in ("times_s",)}))
    return results


def run_torch_cp(args, rt):
    """PyTorch's own context parallelism (ring attention) on a plain-PyTorch model of the same
    shape; checked against the one-GPU forward before it is timed."""
    from torch.distributed.device_mesh import init_device_mesh

    from torch_cp_peer import build_peer, check_peer, time_peer

    if rt.tp != 1:
        _log("torch_cp: skipped (PyTorch's context_parallel peer runs without TP)")
        return []
    mesh = init_device_mesh("cuda", (rt.world,))
    model = build_peer(SHAPES[args.shape], args.layers)
    results = []
    for backend in args.torch_cp_backends:
        try:
            err = check_peer(model, mesh, args.torch_cp_check_len, args.torch_cp_rotate, backend)
        except Exception as exc:  # e.g. a backend that does not support the shape
            _log(f"torch_cp {backend}: check failed ({type(exc).__name__}: {exc})")
            continue
        _log(f"torch_cp {backend}: context-parallel vs one-GPU output, max rel. error {err:.2e}")
        for n in args.lengths:
            torch.cuda.reset_peak_memory_stats()
            median, times = time_peer(model, mesh, n, args.iters, args.warmup, args.torch_cp_rotate, backend)
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            row = dict(mode="torch_cp", length=n, world=rt.world, tp=1, cp=rt.world, shape=args.shape,
                       layers=len(model.layers), prefill_s=median, times_s=times, tokens_per_s=n / median,
                       peak_mem_gib=peak.item(), sdpa_backend=backend, rotate=args.torch_cp_rotate,
                       check_len=args.torch_cp_check_len, check_max_rel_err=err)
            results.append(row)
            _log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "times_s"}))
    del model
    torch.cuda.empty_cache()
    return results


def run_hf(args):
    """Single-GPU Hugging Face transformers (sdpa) prefill; logits of the last token only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[args.shape]
    cfg = LlamaConfig(hidden_size=s["hidden_size"], intermediate_size=s["ffn_hidden_size"],
                      num_hidden_layers=args.layers or s["num_layers"],
                      num_attention_heads=s["num_attention_heads"],
                      num_key_value_heads=s["num_query_groups"], vocab_size=s["vocab"],
                      rope_theta=s["rotary_base"], max_position_embeddings=1 << 20,
                      attn_implementation="sdpa")
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    results = []
    for n in args.lengths:
        ids = torch.randint(0, 100000, (1, n), device="cuda")
        times = []
        torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                h = model.model(input_ids=ids).last_hidden_state
                model.lm_head(h[:, -1:])
            torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        row = dict(mode="hf_sdpa_1gpu", length=n, world=1, shape=args.shape, prefill_s=median, times_s=times,
                   tokens_per_s=n / median, peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
        if args.decode:
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                past, tok, steps = out.past_key_values, torch.ones(1, 1, dtype=torch.long, device="cuda"), []
                for _ in range(args.decode):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = model(input_ids=tok, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    torch.cuda.synchronize()
                    steps.append(time.perf_counter() - t0)
            row["decode_ms_per_token"] = 1e3 * statistics.median(steps[2:] or steps)
            del past, out
        print(json.dumps(row), flush=True)
        results.append(row)
    del model
    torch.cuda.empty_cache()
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, help="fewer layers than the shape has (quick runs)")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--modes", nargs="*", default=["exact", "ulysses", "star", "apb"],
                   help="ours: exact ulysses star apb, minference (exact with sparse local attention), "
                   "MODE+minference (e.g. apb+minference); torch_cp: PyTorch's context_parallel peer; none: only --hf")
    p.add_argument("--hf", action="store_true", help="also time HF transformers on one GPU")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--compressor", default="query_attention")
    p.add_argument("--backend", default="auto")
    p.add_argument("--sparse-pattern", default="block_sparse", help="mode minference: the pattern of every head")
    p.add_argument("--sparse-budget", type=int, default=4096, help="mode minference: keys per query row")
    p.add_argument("--sparse-dense-below", type=int, default=32768, help="mode minference: shorter calls stay dense")
    p.add_argument("--anchor-ratio", type=float, default=0.25)
    p.add_argument("--passing-ratio", type=float, default=0.125)
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="RMSNorm, RoPE and SwiGLU as one kernel each in our model (default); "
                        "--no-fused: PyTorch's and Megatron's unfused chains")
    p.add_argument("--partition", default="equal", choices=["equal", "balanced"],
                   help="split of the document over the CP ranks (APBConfig.partition)")
    p.add_argument("--iters", type=int, default=DEFAULT_RUNS, help="timed prefills per case (median, min, max)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--breakdown", action="store_true", help="profile one prefill per case")
    p.add_argument("--decode", type=int, default=0, help="also time this many decode steps")
    p.add_argument("--decode-mode", default="apb", help="mode whose decoding is timed")
    p.add_argument("--torch-cp-backends", nargs="+", default=["cudnn", "flash"],
                   help="SDPA kernels for mode torch_cp (PyTorch's context_parallel peer)")
    p.add_argument("--torch-cp-rotate", default="allgather", choices=["allgather", "alltoall"])
    p.add_argument("--torch-cp-check-len", type=int, default=16384,
                   help="tokens of the torch_cp check against one GPU")
    p.add_argument("--top-kernels", type=int, default=12, help="with --breakdown: kernels listed per rank")
    p.add_argument("--trace", help="with --breakdown: write each rank's profiler trace (.json.gz) here")
    p.add_argument("--out", help="JSON file to write (rank 0)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_prefill.py needs CUDA GPUs")
    from megatron_apb.inference.launch import init_runtime

    rt = init_runtime(args.tp, "bf16")
    results = []
    if args.hf and rt.world == 1:
        results += run_hf(args)
    ours = [m for m in args.modes if m != "torch_cp"]
    if "torch_cp" in args.modes and rt.world > 1:
        results += run_torch_cp(args, rt)
    if ours:
        args.modes = ours
        results += run_ours(args, rt)
    if rt.rank == 0 and args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name(), gpus=rt.world, torch=torch.__version__,
                    command=" ".join(sys.argv))
        for row in results:  # the median is prefill_s; its spread over the timed runs beside it
            add_spread(row, "prefill_s", "times_s")
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
