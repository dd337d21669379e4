"""A million-token prompt on one GPU: chunked prefill, SnapKV-compressed cache, decoding.

A Llama-3.1-8B-shaped Megatron model (random bf16 weights, ``bench_prefill.build``) prefills
one ``--length``-token document on one GPU with the projections and MLP chunked
(``--prefill-chunk``) and the KV cache compressed by SnapKV at the end of every layer
(``--kv-budget`` tokens kept, ``--kv-window`` observation window), then answers a
``--query-len``-token query and decodes ``--decode`` tokens (static steps, CUDA graph).
The memory plan (:mod:`megatron_apb.inference.memory`) is checked before anything is
built, and refuses a run that would not fit, naming the flag to change.

Dense causal attention over 1M tokens takes tens of seconds per layer; ``--layers N`` runs
only the first N layers of the shape, and the JSON gives the measured figures for those
and full-model figures scaled by ``layers / N``, marked as estimates.  Local attention is
dense (``--backend``); ``--sparse NAME`` passes ``sparse=NAME`` to the configuration for a
sparse local attention backend where the build has one.

    python tools/bench_long_prefill.py --length 1048576 --layers 4 --kv-budget 4096 \\
        --out results/long_prefill_1m.json
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GIB = 2**30


def _config(args):
    from megatron_apb import APBConfig

    kv = {} if args.kv_compress == "none" else dict(kv_budget=args.kv_budget, kv_window=args.kv_window,
                                                    kv_pool=args.kv_pool, kv_pool_kernel=args.kv_pool_kernel)
    extra = {} if args.sparse == "none" else {"sparse": args.sparse}
    try:
        return APBConfig(mode="exact", backend=args.backend, kv_compress=args.kv_compress,
                         prefill_chunk=args.prefill_chunk, **kv, **extra)
    except TypeError:
        sys.exit(f"--sparse {args.sparse}: this build has no sparse local attention backend (no 'sparse' setting)")


def _plan(shape, layers, args):
    from megatron_apb.inference.memory import ModelShape, memory_plan

    s = ModelShape(layers=layers, hidden=shape["hidden_size"], heads=shape["num_attention_heads"],
                   kv_heads=shape["num_query_groups"], ffn=shape["ffn_hidden_size"], vocab=shape["vocab"])
    budget = args.kv_budget if args.kv_compress != "none" else None
    return memory_plan(s, args.length, kv_budget=budget, prefill_chunk=args.prefill_chunk,
                       reserve=args.query_len + args.decode + 1, window=args.kv_window)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--layers", type=int, help="run the shape's first N layers (figures scaled to all, as estimates)")
    p.add_argument("--length", type=int, default=1 << 20, help="document tokens")
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--decode", type=int, default=8, help="tokens decoded after the query")
    p.add_argument("--kv-compress", default="snapkv", choices=["snapkv", "none"])
    p.add_argument("--kv-budget", type=int, default=4096, help="tokens the cache keeps per layer and KV head")
    p.add_argument("--kv-window", type=int, default=64)
    p.add_argument("--kv-pool", default="avg", choices=["avg", "max"])
    p.add_argument("--kv-pool-kernel", type=int, default=7)
    p.add_argument("--prefill-chunk", type=int, default=32768, help="rows per chunk of the projections and MLP")
    p.add_argument("--backend", default="auto", help="dense local attention kernel")
    p.add_argument("--sparse", default="none", help="sparse local attention backend (e.g. minference), where built")
    p.add_argument("--warmup-length", type=int, default=8192, help="tokens of the warm-up prefill")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_long_prefill.py needs a CUDA GPU")

    from bench_prefill import SHAPES, build

    from megatron_apb.inference import APBEngine
    from megatron_apb.inference.decode import DecodeStep
    from megatron_apb.inference.launch import init_runtime
    from megatron_apb.inference.memory import check_memory_plan

    shape = SHAPES[args.shape]
    full_layers = shape["num_layers"]
    layers = args.layers or full_layers
    cfg = _config(args)
    plan, plan_full = _plan(shape, layers, args), _plan(shape, full_layers, args)
    free, total = torch.cuda.mem_get_info()
    check_memory_plan(plan, free)  # before any work: names the flag to change
    print(f"memory plan ({layers} layers): " + ", ".join(f"{k} {v / GIB:.1f}" for k, v in plan.items()) + " GiB",
          flush=True)

    rt = init_runtime(1, "bf16")
    model = build(args.shape, cfg, rt, layers, fused=True)
    engine = APBEngine(model, cfg, cp_group=rt.pg.cp, tp_group=rt.pg.tp, vocab_size=shape["vocab"])
    gen = torch.Generator().manual_seed(0)
    query = torch.randint(0, 100000, (args.query_len,), generator=gen)
    reserve = args.query_len + args.decode + 1

    warm = torch.randint(0, 100000, (args.warmup_length,), generator=gen)
    cache, _, n, _ = engine.prefill(warm, query, reserve=reserve)  # compiles and tunes the kernels
    engine.step(cache, query, n)
    del cache

    doc = torch.randint(0, 100000, (args.length,), generator=gen)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache, _, n, prefill_s = engine.prefill(doc, query, reserve=reserve)
    prefill_peak = torch.cuda.max_memory_allocated()
    kept = cache.tokens()
    cache_bytes = sum(k.numel() * k.element_size() * 2 for k in (cache.buffers(l)[0] for l in cache.layers()))
    print(f"prefill of {n} tokens, {layers} layers: {prefill_s:.1f} s; cache keeps {kept} tokens", flush=True)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits = engine.step(cache, query, n)
    token = int(logits.argmax())
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    position, times, tokens = n + args.query_len, [], [token]
    runner = DecodeStep(engine, cache, last_position=position + args.decode, graph=True)
    for _ in range(args.decode):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits, finite = runner.step(token, position)
        token = int(logits.argmax())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert bool(finite), "non-finite logits"
        tokens.append(token)
        position += 1
    decode_ms = 1e3 * statistics.median(times[1:] or times)  # the first step captures the graph
    peak = torch.cuda.max_memory_allocated()

    scale = full_layers / layers
    weights_run, weights_full = plan["weights"], plan_full["weights"]
    row = dict(
        mode="exact", world=1, shape=args.shape, length=n, query_len=args.query_len, attention="dense",
        sparse=args.sparse, backend=args.backend, kv_compress=args.kv_compress, kv_budget=args.kv_budget,
        kv_window=args.kv_window, prefill_chunk=args.prefill_chunk,
        layers_run=layers, full_layers=full_layers, layers_note=(
            "a subset of the layers ran; *_full_model_estimate fields scale the measured ones by "
            "full_layers / layers_run (attention, projections and MLP cost the same in every layer)")
        if layers < full_layers else "every layer ran",
        prefill_s=prefill_s, prefill_s_per_layer=prefill_s / layers,
        prefill_s_full_model_estimate=prefill_s * scale,
        query_step_s=first_s, decode_ms_per_token=decode_ms, decode_steps_ms=[1e3 * t for t in times],
        decode_ms_per_token_full_model_estimate=decode_ms * scale,
        kv_kept_tokens=kept, kv_cache_gib=cache_bytes / GIB,
        kv_cache_uncompressed_gib_full_model=full_layers * 2 * shape["num_query_groups"]
        * (shape["hidden_size"] // shape["num_attention_heads"]) * n * 2 / GIB,
        prefill_peak_mem_gib=prefill_peak / GIB, peak_mem_gib=peak / GIB,
        peak_mem_gib_full_model_estimate=(peak + weights_full - weights_run
                                          + (plan_full["kv_cache"] - plan["kv_cache"])) / GIB,
        memory_plan_gib={k: v / GIB for k, v in plan.items()},
        memory_plan_full_model_gib={k: v / GIB for k, v in plan_full.items()},
        output_ids=tokens, device=torch.cuda.get_device_name(), gpu_total_gib=total / GIB,
        torch=torch.__version__, command=" ".join(sys.argv),
    )
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                      if k not in ("decode_steps_ms", "memory_plan_gib", "memory_plan_full_model_gib")}), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
