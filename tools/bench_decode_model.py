"""End-to-end decoding benchmark on one GPU: milliseconds per generated token after a long
prefill, for our engine and for Hugging Face transformers, against the bandwidth bound.

Both models have the shape of ``--shape`` (random bf16 weights, batch 1).  For every context
length it prefills the document once, runs the query, then times ``--steps`` single-token
steps, each one the step plus the host read of the greedy token (the one host
synchronisation per token that generation has), wall clock:

* ``apb_engine_1gpu``: ``APBEngine`` (exact mode, one rank), the steps by ``DecodeStep``
  replayed from a CUDA graph; the same cache is then decoded eagerly (``graph=False``) for
  ``decode_ms_per_token_eager``.  The first step captures the graph: it is reported alone
  as ``first_step_ms`` and is one of the ``--warmup`` steps left out of the median.
* ``hf_sdpa_1gpu``: ``LlamaForCausalLM`` (sdpa attention), prefill with ``use_cache=True``,
  then one forward per token on its cache (``--hf-cache``, recorded as ``hf_cache``).

The bound is the time to read, once, what a step must read: every weight (the embedding
only one row) and the whole KV cache, at the HBM bandwidth a device copy measures in the
same run (``copy_bandwidth_gbs``: bytes read + written / time).  A length whose estimated
memory does not fit the GPU, or that runs out of memory, gives a row with ``skipped``.
One JSON line is printed per row; the JSON file is rewritten after every row, so a run cut
short keeps what it measured.

    python tools/bench_decode_model.py --out results/decode_model_1gpu.json
    python tools/bench_decode_model.py --lengths 8192 32768 131072 --steps 32 --out results/decode_1gpu.json
    python tools/bench_decode_model.py --layers 2 --lengths 8192 --steps 8 --out /tmp/decode_quick.json
    python tools/plot_decode.py results/decode_model_1gpu.json --out results/decode_model_1gpu.png
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/: bench_prefill
from bench_prefill import SHAPES, build  # noqa: E402  (also puts the repository root on sys.path)
from timing_stats import add_spread  # noqa: E402

GIB = 2**30
MODE_NAMES = {"ours": "apb_engine_1gpu", "hf": "hf_sdpa_1gpu"}


# ----------------------------------------------------------------------- bytes and memory
def _input_embedding_weight(model):
    """The token-embedding matrix of a Megatron GPTModel or a Hugging Face model."""
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings().weight
    return model.embedding.word_embeddings.weight


def _output_weight(model):
    """The output layer's matrix (the embedding's where the two are shared)."""
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return model.get_output_embeddings().weight
    layer = getattr(model, "output_layer", None)
    if layer is None or getattr(layer, "weight", None) is None:  # shared with the embedding
        return model.shared_embedding_or_output_weight()
    return layer.weight


def step_weight_bytes(model) -> int:
    """Bytes of the weights one decoding step reads: every parameter in full (transformer
    layers, final norm, output layer), except the token embedding, of which a step reads one
    row (unless it is also the output layer's matrix)."""
    embedding, output = _input_embedding_weight(model), _output_weight(model)
    total = 0
    for p in model.parameters():  # shared parameters once
        if p is embedding and p is not output:
            total += p[0].numel() * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def resident_weight_bytes(model) -> int:
    """Bytes of all the model's parameters (what it holds in memory)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_geometry(model):
    """(layers, KV heads, head dim, bytes per element) of a Megatron or Hugging Face model."""
    elem = next(model.parameters()).element_size()
    cfg = model.config
    if hasattr(cfg, "num_hidden_layers"):  # Hugging Face
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cfg.num_hidden_layers, kv, head_dim, elem
    head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_query_groups or cfg.num_attention_heads
    return cfg.num_layers, kv, head_dim, elem


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, elem: int = 2) -> int:
    """Bytes of K and V for ``tokens`` tokens in every layer."""
    return 2 * layers * kv_heads * head_dim * tokens * elem


def prefill_activation_bytes(shape: dict, tokens: int, elem: int = 2) -> int:
    """Rough peak of a prefill's live activations (no autograd): the MLP's gate and up
    projections and their product (3 x ffn) and about three hidden-size tensors per token."""
    return tokens * (3 * shape["ffn_hidden_size"] + 3 * shape["hidden_size"]) * elem


def estimate_memory(model, shape: dict, length: int, room: int, margin: float) -> int:
    """Bytes a length needs: (weights + KV cache) x (1 + margin) + prefill activations."""
    layers, kv, d, elem = kv_geometry(model)
    resident = resident_weight_bytes(model) + kv_cache_bytes(layers, kv, d, length + room, elem)
    return int(resident * (1 + margin)) + prefill_activation_bytes(shape, length, elem)


def usable_memory() -> int:
    """Bytes this process can use: free on the device plus what PyTorch's allocator holds."""
    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved()


def bound_fields(model, context: int, bandwidth_gbs: float) -> dict:
    """``bytes_per_step`` (weights + KV cache of ``context`` tokens) and ``decode_bound_ms``."""
    layers, kv, d, elem = kv_geometry(model)
    weights = step_weight_bytes(model)
    kv_bytes = kv_cache_bytes(layers, kv, d, context, elem)
    total = weights + kv_bytes
    return dict(context_tokens=context, weight_bytes_per_step=weights, kv_bytes_per_step=kv_bytes,
                bytes_per_step=total, decode_bound_ms=1e3 * total / (bandwidth_gbs * 1e9))


def add_ratios(row: dict) -> dict:
    for key, ratio in (("decode_ms_per_token", "ratio_to_bound"),
                       ("decode_ms_per_token_eager", "ratio_to_bound_eager")):
        if row.get(key) is not None and row.get("decode_bound_ms"):
            row[ratio] = row[key] / row["decode_bound_ms"]
    return row


# --------------------------------------------------------------------------------- timing
def copy_bandwidth_gbs(gib: float, iters: int) -> dict:
    """HBM bandwidth of a device copy of a ``gib`` GiB bf16 tensor: 2 x bytes / median time."""
    n = int(gib * GIB) // 2
    src = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    seconds = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    nbytes = src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    median = statistics.median(seconds)
    return dict(copy_bandwidth_gbs=2 * nbytes / median / 1e9, copy_bytes=nbytes, copy_ms=1e3 * median)


def time_steps(step, token: int, position: int, warmup: int, steps: int):
    """Run ``warmup + steps`` decoding steps, feeding back the greedy token; each timed as
    ``step(token, position)`` (returns logits) plus the host read of its argmax.

    Returns (first step's ms, the timed steps' ms, last token, next position)."""
    _sync()
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        logits = step(token, position)
        token = int(logits.argmax())  # the one host synchronisation of a generated token
        times.append(1e3 * (time.perf_counter() - t0))
        position += 1
    return times[0], times[warmup:], token, position


def _doc_and_query(length: int, query_len: int, vocab: int):
    """Random document and query ids (the same for every mode), below ``vocab``."""
    high = min(100000, vocab)
    doc = torch.randint(0, high, (length,), generator=torch.Generator().manual_seed(length))
    query = torch.randint(0, high, (query_len,), generator=torch.Generator().manual_seed(1))
    return doc, query


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------- the modes
def measure_ours(engine, length: int, args) -> dict:
    """Prefill, the query step, then timed graph steps and timed eager steps on one cache."""
    from megatron_apb.inference.decode import DecodeStep

    doc, query = _doc_and_query(length, args.query_len, engine.vocab_size)
    per_path = args.warmup + args.steps + 4
    cache, _, n_doc, prefill_s = engine.prefill(doc, query, reserve=query.numel() + 2 * per_path + 8)
    token = int(engine.step(cache, query, n_doc).argmax())
    position = n_doc + query.numel()
    row = dict(prefill_s=prefill_s)

    graph = engine.device.type == "cuda"  # (False only where the helpers are tried on CPU)
    runner = DecodeStep(engine, cache, last_position=position + per_path, graph=graph)
    first, times, token, position = time_steps(
        lambda t, p: runner.step(t, p)[0], token, position, args.warmup, args.steps)
    row.update(first_step_ms=first, decode_ms_per_token=statistics.median(times), step_ms=times,
               graph=runner.graph_enabled, all_finite=bool(runner.step(token, position)[1]))
    add_spread(row, "decode_ms_per_token", "step_ms")
    position += 1
    del runner

    if args.eager:
        runner = DecodeStep(engine, cache, last_position=position + per_path, graph=False)
        first, times, token, position = time_steps(
            lambda t, p: runner.step(t, p)[0], token, position, args.warmup, args.steps)
        row.update(first_step_ms_eager=first, decode_ms_per_token_eager=statistics.median(times),
                   step_ms_eager=times)
        add_spread(row, "decode_ms_per_token_eager", "step_ms_eager")
        del runner
    del cache
    return row


def measure_batches(engine, model, args, results: "Results", base: dict):
    """Tokens/s of ``generate_batch`` for each batch size at ``--batch-length`` (greedy, no
    stop token): every prompt prefilled on its own, then decoded together.

    A batch's ``decode_s`` includes fixed costs (assembling the batched cache from the
    sequences' caches, capturing the batch's CUDA graph), so each size decodes twice, for
    ``--steps`` and for ``2 x --steps`` new tokens: the difference of the two times is the
    steady rate (``decode_tokens_per_s_steady``, ``decode_ms_per_step_steady``) and the
    rest the fixed cost (``decode_fixed_s``); ``decode_tokens_per_s`` is the short run's
    rate with its fixed costs, as a user of 16-token answers sees it."""
    from megatron_apb.inference import SamplingConfig

    short, long_ = (SamplingConfig(max_new_tokens=n + 1) for n in (args.steps, 2 * args.steps))
    shape, length = SHAPES[args.shape], args.batch_length
    for size in args.batch_sizes:
        row = dict(mode=MODE_NAMES["ours"] + "_batch", length=length, **dict(base, batch=size))
        kv = kv_cache_bytes(*kv_geometry(model), length + args.query_len + long_.max_new_tokens)
        need = resident_weight_bytes(model) + size * kv * (1 + args.mem_margin) + prefill_activation_bytes(shape, length)
        row["estimated_mem_gib"], have = need / GIB, usable_memory()
        if need > have:
            row["skipped"] = f"needs {need / GIB:.1f} GiB, the GPU has {have / GIB:.1f} GiB usable"
            results.add(row)
            continue
        _release()
        torch.cuda.reset_peak_memory_stats()
        try:
            prompts = [_doc_and_query(length + i, args.query_len, engine.vocab_size) for i in range(size)]
            engine.generate_batch(prompts[:1], SamplingConfig(max_new_tokens=4))  # warm-up (compilation)
            out = engine.generate_batch(prompts, short)
            tokens = sum(r.decode_tokens for r in out)
            out2 = engine.generate_batch(prompts, long_)
            extra = sum(r.decode_tokens for r in out2) - tokens
            steady_s = out2[0].decode_s - out[0].decode_s
            row.update(decode_s=out[0].decode_s, decode_tokens=tokens,
                       decode_tokens_per_s=tokens / out[0].decode_s,
                       decode_ms_per_step=1e3 * out[0].decode_s / max(1, short.max_new_tokens - 1),
                       decode_tokens_per_s_steady=extra / steady_s if steady_s > 0 else None,
                       decode_ms_per_step_steady=1e3 * steady_s / args.steps,
                       decode_fixed_s=out[0].decode_s - steady_s,
                       peak_mem_gib=torch.cuda.max_memory_allocated() / GIB)
        except torch.cuda.OutOfMemoryError:
            row["skipped"] = "out of memory"
        _release()
        results.add(row)


def build_hf(shape: str, layers):
    """A random-weight bf16 ``LlamaForCausalLM`` (sdpa attention) of ``shape``, on the GPU."""
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        sys.exit("--modes hf needs Hugging Face transformers: pip install transformers "
                 "(or bash tools/install.sh hf), or run with --modes ours")
    s = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=s["hidden_size"], intermediate_size=s["ffn_hidden_size"],
                      num_hidden_layers=layers or s["num_layers"],
                      num_attention_heads=s["num_attention_heads"],
                      num_key_value_heads=s["num_query_groups"], vocab_size=s["vocab"],
                      rope_theta=s["rotary_base"], max_position_embeddings=1 << 21,
                      attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: no fp32 copy of the weights
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(torch.bfloat16).eval(), transformers.__version__


class HFCalls:
    """The keyword names this transformers version's ``forward`` takes."""

    def __init__(self, model):
        params = inspect.signature(model.forward).parameters
        self.cache = "past_key_values" if "past_key_values" in params else "cache"
        if self.cache not in params:
            raise SystemExit("this transformers version's forward takes neither past_key_values nor cache")
        self.keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.cache_position = "cache_position" in params


def make_hf_cache(kind: str, model, max_len: int):
    """An empty HF cache: ``dynamic`` (HF's default) or ``static`` (preallocated)."""
    import transformers

    if kind == "dynamic":
        try:
            return transformers.DynamicCache(config=model.config)
        except TypeError:  # versions before the config argument
            return transformers.DynamicCache()
    if not hasattr(transformers, "StaticCache"):
        raise SystemExit(f"--hf-cache static: transformers {transformers.__version__} has no StaticCache")
    try:
        return transformers.StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # versions that allocate at construction
        return transformers.StaticCache(config=model.config, max_batch_size=1, max_cache_len=max_len,
                                        device=model.device, dtype=torch.bfloat16)


def measure_hf(model, calls: HFCalls, length: int, args) -> dict:
    """Prefill with ``use_cache=True`` (last logits only), then timed single-token forwards."""
    doc, query = _doc_and_query(length, args.query_len, model.config.vocab_size)
    device = model.device
    ids = torch.cat([doc, query])[None].to(device)
    room = args.warmup + args.steps + 8
    cache = make_hf_cache(args.hf_cache, model, ids.shape[1] + room)
    prefill_kwargs = {calls.cache: cache, "use_cache": True}
    if calls.keep:
        prefill_kwargs[calls.keep] = 1
    _sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids, **prefill_kwargs)
    token = int(out.logits[0, -1].argmax())
    prefill_s = time.perf_counter() - t0
    del out
    position = ids.shape[1]
    del ids

    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, 1, dtype=torch.long, device=device)
    cache_pos = torch.zeros(1, dtype=torch.long, device=device)

    def step(t, p):
        tok.fill_(t)
        pos.fill_(p)
        kwargs = {calls.cache: cache, "use_cache": True, "position_ids": pos}
        if calls.cache_position:
            cache_pos.fill_(p)
            kwargs["cache_position"] = cache_pos
        return model(input_ids=tok, **kwargs).logits[0, -1]

    first, times, _, _ = time_steps(step, token, position, args.warmup, args.steps)
    row = dict(prefill_s=prefill_s, first_step_ms=first, decode_ms_per_token=statistics.median(times),
               step_ms=times, hf_cache=type(cache).__name__)
    add_spread(row, "decode_ms_per_token", "step_ms")
    del cache
    return row


# ---------------------------------------------------------------------------------- driver
class Results:
    """Rows printed as they come and the JSON file rewritten after each."""

    def __init__(self, path: str, meta: dict):
        self.path, self.meta, self.rows = path, meta, []

    def add(self, row: dict):
        self.rows.append(row)
        short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if not k.startswith("step_ms")}
        print(json.dumps(short), flush=True)
        self.write()

    def write(self, finished: bool = False):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(meta=dict(self.meta, finished=finished), results=self.rows), f, indent=1)
        os.replace(tmp, self.path)


def run_lengths(mode: str, model, measure, args, results: Results, base: dict):
    """``measure(length)`` for every length that fits; a row per length either way."""
    shape = SHAPES[args.shape]
    room = args.query_len + 2 * (args.warmup + args.steps + 4) + 8
    for length in args.lengths:
        row = dict(mode=mode, length=length, **base)
        row.update(bound_fields(model, length + args.query_len, results.meta["copy_bandwidth_gbs"]))
        _release()
        need, have = estimate_memory(model, shape, length, room, args.mem_margin), usable_memory()
        row["estimated_mem_gib"] = need / GIB
        if need > have:
            row["skipped"] = f"needs {need / GIB:.1f} GiB, the GPU has {have / GIB:.1f} GiB usable"
            results.add(row)
            continue
        torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                row.update(measure(length))
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / GIB
        except torch.cuda.OutOfMemoryError:
            row["skipped"] = "out of memory"
        _release()  # after the except block: the traceback no longer holds the tensors
        results.add(add_ratios(row))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES), help="model shape (default: llama3-8b)")
    p.add_argument("--layers", type=int, help="build this many layers instead of the shape's (quick checks; "
                   "the bound then counts these layers)")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072, 524288],
                   help="document tokens before the query (default: 8192 32768 131072 524288)")
    p.add_argument("--modes", nargs="+", choices=sorted(MODE_NAMES), default=["ours", "hf"],
                   help="ours: APBEngine + DecodeStep (%s); hf: transformers sdpa (%s) (default: both)"
                   % (MODE_NAMES["ours"], MODE_NAMES["hf"]))
    p.add_argument("--steps", type=int, default=32, help="timed decoding steps per length and path (default: 32)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps before them; the first captures the CUDA graph (default: 3)")
    p.add_argument("--query-len", type=int, default=32, help="query tokens after the document (default: 32)")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="also time our step without the CUDA graph on the same cache (default: on)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="our model's fused RMSNorm/RoPE/SwiGLU kernels, as tools/bench_prefill.py (default: on)")
    p.add_argument("--hf-cache", choices=["dynamic", "static"], default="dynamic",
                   help="HF cache: dynamic (HF's default; a decoding step's sdpa call has no mask, so "
                   "GQA runs without repeating K/V) or static (StaticCache over prompt + steps; its "
                   "mask makes sdpa repeat K/V per query head, and older transformers build a "
                   "context x cache mask at the prefill) (default: dynamic)")
    p.add_argument("--copy-gib", type=float, default=2.0,
                   help="GiB of the bf16 tensor copied to measure HBM bandwidth (default: 2)")
    p.add_argument("--copy-iters", type=int, default=10, help="timed copies; the median counts (default: 10)")
    p.add_argument("--mem-margin", type=float, default=0.10,
                   help="fraction added to weights + KV cache when deciding whether a length fits "
                   "(default: 0.10); out-of-memory errors are caught either way")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8, 32],
                   help="ours: also decode this many prompts together at --batch-length, as tokens/s "
                   "(default: 1 8 32; none: skip)")
    p.add_argument("--batch-length", type=int, default=32768, help="document tokens of each batched prompt")
    p.add_argument("--out", required=True, help="JSON file to write (rewritten after every row)")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 1 or args.query_len < 1:
        p.error("--steps, --warmup and --query-len must be >= 1")
    if any(n < 1 for n in args.lengths):
        p.error("--lengths must be >= 1")
    if args.layers is not None and args.layers < 1:
        p.error("--layers must be >= 1")
    if os.path.isdir(args.out):
        p.error(f"--out {args.out} is a directory; give a file name")
    if not torch.cuda.is_available():
        sys.exit("bench_decode_model.py needs a CUDA GPU (none is visible to PyTorch)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    torch.cuda.set_device(0)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, gpus=1,
                gpus_visible=torch.cuda.device_count(), command=" ".join(sys.argv),
                shape=args.shape, layers=args.layers or SHAPES[args.shape]["num_layers"], batch=1,
                dtype="bf16", query_len=args.query_len, steps=args.steps, warmup=args.warmup)
    meta.update(copy_bandwidth_gbs(args.copy_gib, args.copy_iters))
    print(json.dumps({k: meta[k] for k in ("device", "copy_bandwidth_gbs", "copy_ms")}), flush=True)
    results = Results(args.out, meta)
    base = dict(shape=args.shape, layers=meta["layers"], batch=1, query_len=args.query_len, steps=args.steps)

    if "ours" in args.modes:
        from megatron_apb import APBConfig
        from megatron_apb.inference import APBEngine
        from megatron_apb.inference.launch import init_runtime

        rt = init_runtime(1, "bf16")
        model = build(args.shape, APBConfig(mode="exact"), rt, args.layers, fused=args.fused)
        engine = APBEngine(model, APBConfig(mode="exact"), cp_group=rt.pg.cp, tp_group=rt.pg.tp,
                           vocab_size=SHAPES[args.shape]["vocab"])
        run_lengths(MODE_NAMES["ours"], model, lambda n: measure_ours(engine, n, args), args, results,
                    dict(base, fused=args.fused))
        if args.batch_sizes:
            measure_batches(engine, model, args, results, dict(base, fused=args.fused))
        del engine, model
        _release()

    if "hf" in args.modes:
        model, version = build_hf(args.shape, args.layers)
        results.meta["transformers"] = version
        calls = HFCalls(model)
        run_lengths(MODE_NAMES["hf"], model, lambda n: measure_hf(model, calls, n, args), args, results,
                    dict(base, hf_cache_requested=args.hf_cache))
        del model
        _release()

    results.write(finished=True)
    print(f"wrote {args.out}", flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
