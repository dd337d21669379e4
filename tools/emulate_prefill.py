"""Predict a context-parallel prefill on one GPU: every rank's work in turn, at its real shapes.

For each length, mode and partition, the model (``bench_prefill.py``'s, random bf16
weights; under ``--tp`` the shard one TP rank holds) runs the prefill of CP rank 0, 1, ...
of ``--world`` alone: the same tokens, layout, kernels and shapes as on that rank, with the
collectives replaced by tensors of their real shapes (:class:`megatron_apb.comm.EmulatedGroup`:
an all-gather repeats the local input in every slot).  Reported per rank: its compute
time, its work (rows through the matmuls, attended (query, key) pairs, their FLOPs), and
the communication the algorithm cannot hide, modelled from an all-gather's bus bandwidth
and latency (defaults: the committed NCCL figures of 4x H200, 240 GiB/s and 42 us):

    predicted prefill = max over ranks (compute + unhidden gathers + TP all-reduces)

A gather is hidden behind the attention the algorithm runs while it travels (APB: the
anchor's and the own block's; exact: the own block's); Ulysses' all-to-alls and the TP
all-reduces are not hidden.  The contention of NCCL kernels with compute on a real
multi-GPU run is not modelled.

Each equal partition's per-rank times also fit the cost model of
:mod:`megatron_apb.partition` (seconds per matmul row and per attended pair); the
balanced partition is then laid out from that fitted model and emulated in turn.
``--validate FILE...`` compares the predictions with measured multi-GPU rows of
``bench_prefill.py`` (same mode, length, CP and TP).

    python3 tools/emulate_prefill.py --world 4 --lengths 131072 --modes exact star apb \\
        --partition equal balanced --layers 8 --out emulator_cp4.json
    python3 tools/emulate_prefill.py --shape tiny --world 3 --lengths 96   # CPU, seconds

``--layers L`` runs L layers and scales the per-rank times to the shape's depth (every
layer of a rank does the same work); ``--layers-at LENGTH=L`` sets it per length.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))
sys.path.insert(0, TOOLS)

import bench_prefill  # noqa: E402  (SHAPES, build: the benchmark's model)

from megatron_apb import APBConfig, APBConfigError  # noqa: E402
from megatron_apb.comm import EmulatedGroup  # noqa: E402
from megatron_apb.forward import ForwardContext  # noqa: E402
from megatron_apb.inference.cache import CPKVCache  # noqa: E402
from megatron_apb.inference.engine import valid_rows  # noqa: E402
from megatron_apb.layout import shard_document, split_document  # noqa: E402
from megatron_apb.megatron import MegatronAdapter  # noqa: E402
from megatron_apb.partition import (  # noqa: E402
    NCCL_BUS_GIB_S, NCCL_LATENCY_S, CostModel, RankWork, all_reduce_seconds, balance_layout, gather_seconds,
    rank_work,
)
from megatron_apb.registry import ALGORITHMS  # noqa: E402

#: a shape small enough for a CPU run (tests)
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
            vocab=256, rotary_base=10000)


def shapes():
    return dict(bench_prefill.SHAPES, tiny=TINY)


def rank_shape(name: str, tp: int) -> dict:
    """The model one TP rank holds, as a TP=1 shape: heads, KV heads and FFN divided by tp
    (the head width kept)."""
    s = dict(shapes()[name])
    s.setdefault("kv_channels", s["hidden_size"] // s["num_attention_heads"])
    for key in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if s[key] % tp:
            sys.exit(f"--tp {tp} must divide {key}={s[key]} of shape {name}")
        s[key] //= tp
    return s


def shape_cost(name: str, tp: int) -> CostModel:
    """The FLOP-rate cost model of one TP rank of shape ``name`` (the engine's default)."""
    s = shapes()[name]
    return CostModel.from_shape(hidden=s["hidden_size"], heads=s["num_attention_heads"],
                                kv_heads=s["num_query_groups"], head_dim=s["hidden_size"] // s["num_attention_heads"],
                                ffn=s["ffn_hidden_size"], tp=tp)


def build_model(name: str, tp: int, rt, layers, fused: bool):
    """The model of one TP rank on this process (TP = CP = 1)."""
    from megatron_apb.megatron import build_gpt_model, tiny_transformer_config

    s = rank_shape(name, tp)
    if rt.device.type == "cuda":
        key = name if tp == 1 else f"{name}@tp{tp}"
        bench_prefill.SHAPES.setdefault(key, s)
        return bench_prefill.build(key, APBConfig(mode="exact"), rt, layers, fused=fused)
    vocab, base = s.pop("vocab"), s.pop("rotary_base")
    if layers:
        s["num_layers"] = layers
    torch.manual_seed(1234)
    cfg = tiny_transformer_config(**s, tensor_model_parallel_size=1, context_parallel_size=1)
    return build_gpt_model(cfg, APBConfig(mode="exact"), vocab_size=vocab, max_sequence_length=1 << 16,
                           pg_collection=rt.pg, rotary_base=base, parallel_output=True).eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_rank(adapter, tokens, layout, rank, world, config, n_doc, iters, warmup, count_flops=False):
    """Median seconds (and all times) of rank ``rank``'s prefill, run alone; with
    ``count_flops``, also the FLOPs PyTorch's counter saw in each projection of one run."""
    ids = tokens[rank]
    table = adapter.rotary_table(layout.padded_len(world) + layout.anchor_len + 1)

    def once():
        cache = CPKVCache(valid_len=valid_rows(layout, rank, n_doc), owner=rank == world - 1, reserve=0)
        ctx = ForwardContext.prefill(layout, kv_cache=cache, config=config, rotary_table=table,
                                     cp_group=EmulatedGroup(rank, world))
        adapter.run_layers(adapter.embed(ids[None]), ctx)

    times = []
    for i in range(warmup + iters):
        _sync(adapter.device)
        start = time.perf_counter()
        once()
        _sync(adapter.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    flops = None
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            once()
        flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                 if name.split(".")[-1] in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")}
    return statistics.median(times), times, flops


def comm_per_layer(layout, rank, world, cost, *, kv_heads, heads, head_dim, hidden, tp, elem, net):
    """Modelled communication of one layer of ``rank``: (unhidden gather/all-to-all seconds,
    TP all-reduce seconds, seconds of the gather itself)."""
    algorithm = ALGORITHMS.get(layout.mode)
    b = layout.block_len_on(rank)
    la = layout.anchor_len_on(rank) if algorithm.uses_anchor else 0
    gather = hidden_behind = unhidden = 0.0
    if algorithm.equal_blocks:  # ulysses: q, k, v to heads and the output back, not hidden
        kv = kv_heads if kv_heads % world == 0 else heads
        for per_row in (heads, kv, kv, heads):
            gather += gather_seconds(b * per_row * head_dim * elem / world, world, **net)
        unhidden = gather
    elif algorithm.uses_anchor and layout.passing_len > 0:  # APB: behind anchor and own attention
        gather = gather_seconds(layout.passing_len * kv_heads * 2 * head_dim * elem, world, **net)
        hidden_behind = cost.pair_s * (b * (b + 1) / 2 + la * (la + 1) / 2)
    elif not algorithm.uses_anchor:  # exact all-gather: behind the own block's attention
        gather = gather_seconds(layout.block_len * kv_heads * 2 * head_dim * elem, world, **net)
        hidden_behind = cost.pair_s * b * (b + 1) / 2
    if gather and not algorithm.equal_blocks:
        unhidden = max(0.0, gather - hidden_behind)
    tp_s = 2 * all_reduce_seconds((la + b) * hidden * elem, tp, **net)  # attention and MLP outputs
    return unhidden, tp_s, gather


def make_config(args, mode, partition):
    return APBConfig(mode=mode, compressor=args.compressor, backend=args.backend, anchor_ratio=args.anchor_ratio,
                     passing_ratio=args.passing_ratio, query_prefix_len=16, fused_rope=args.fused,
                     partition=partition)


def make_prompt(args, n):
    """bench_prefill.py's document and query of ``n`` tokens."""
    vocab = min(shapes()[args.shape]["vocab"], 100000)
    doc = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n))
    query = torch.randint(0, vocab, (args.query_len,), generator=torch.Generator().manual_seed(1))
    return doc, query


def emulate(adapter, args, rt, n, mode, partition, cost, layers_run, layers, blocks=None):
    """One (length, mode, partition): every rank's time, work and modelled communication.
    ``blocks``: these per-rank blocks instead of the partition's own."""
    full, world = shapes()[args.shape], args.world
    config = make_config(args, mode, partition)
    doc, query = make_prompt(args, n)
    if blocks is None:
        tokens, layout = shard_document(doc, query, config, world, cost=cost)
    else:
        layout = config.replace(partition="equal").layout_for(n, world, query_len=query.numel()).with_blocks(blocks)
        tokens = split_document(doc, query, layout, world)
    heads, kv_heads = full["num_attention_heads"] // args.tp, full["num_query_groups"] // args.tp
    head_dim, hidden = full["hidden_size"] // full["num_attention_heads"], full["hidden_size"]
    net = dict(bus_gib_s=args.bus_gib_s, latency_s=args.latency_us * 1e-6)
    elem = torch.finfo(rt.dtype).bits // 8
    row_flops = CostModel.flops_per_row(hidden=hidden, heads=full["num_attention_heads"],
                                        kv_heads=full["num_query_groups"], head_dim=head_dim,
                                        ffn=full["ffn_hidden_size"], tp=args.tp)
    pair_flops = CostModel.flops_per_pair(heads=full["num_attention_heads"], head_dim=head_dim, tp=args.tp)
    scale = layers / layers_run
    ranks = []
    for r in range(world):
        seconds, times, flops = run_rank(adapter, tokens, layout, r, world, config, n, args.iters, args.warmup,
                                         count_flops=args.count_flops)
        work = rank_work(layout, r, world)
        row = dict(rank=r, block=layout.block_len_on(r), start=layout.block_start(r), rows=work.rows,
                   pairs=work.pairs, matmul_tflop=layers * work.rows * row_flops / 1e12,
                   attention_tflop=layers * work.pairs * pair_flops / 1e12, compute_s=seconds * scale,
                   times_s=[t * scale for t in times])
        if flops is not None:
            row["counted_projection_flops"] = sum(flops.values())  # layers_run layers, one run
            row["projection_flops"] = layers_run * work.rows * row_flops
        ranks.append(row)
        if args.verbose:
            print(f"  {mode} {partition} {n} rank {r}: block {row['block']}, {row['compute_s']:.3f} s", flush=True)
    # what hides a gather: the attention it overlaps, timed by these ranks' own fitted model
    fitted = fit_cost(ranks, layers)
    for r, row in enumerate(ranks):
        unhidden, tp_s, gather = comm_per_layer(layout, r, world, fitted or shape_cost(args.shape, args.tp),
                                                kv_heads=kv_heads, heads=heads, head_dim=head_dim, hidden=hidden,
                                                tp=args.tp, elem=elem, net=net)
        row.update(gather_ms_per_layer=1e3 * gather, unhidden_comm_s=layers * unhidden, tp_comm_s=layers * tp_s)
        row["total_s"] = row["compute_s"] + row["unhidden_comm_s"] + row["tp_comm_s"]
    compute = [x["compute_s"] for x in ranks]
    slowest = max(range(world), key=lambda r: ranks[r]["total_s"])
    return dict(
        mode=mode, length=n, world=world, tp=args.tp, cp=world, shape=args.shape, layers=layers,
        layers_run=layers_run, partition=partition, fused=args.fused, backend=args.backend,
        blocks=[x["block"] for x in ranks], anchor_len=layout.anchor_len, passing_len=layout.passing_len,
        predicted_prefill_s=ranks[slowest]["total_s"], predicted_compute_s=max(compute),
        slowest_rank=slowest, slowest_over_fastest=max(compute) / min(compute),
        bus_gib_s=args.bus_gib_s, latency_us=args.latency_us, ranks=ranks,
    )


def refine(adapter, args, rt, n, mode, cost, row, layers_run, layers):
    """Up to ``--refine`` more rounds while the balanced ranks still differ by more than
    ``--refine-below``: each rank's measured time over the cost model's prediction scales
    its cost, the blocks are balanced again and emulated; the fastest round is kept (the
    others are listed in its ``rounds``)."""
    rounds = [row]
    equal = make_config(args, mode, "equal").layout_for(n, args.world, query_len=args.query_len)
    for _ in range(args.refine):
        last = rounds[-1]
        if last["slowest_over_fastest"] <= args.refine_below:
            break
        factors = [x["compute_s"] / (layers * cost.seconds(RankWork(x["rows"], x["pairs"]))) for x in last["ranks"]]

        def seconds(rank, block, start):
            return factors[rank] * cost.seconds(rank_work(equal, rank, args.world, block=block, start=start))

        blocks = balance_layout(equal, n, args.world, seconds)
        if list(blocks) == last["blocks"]:
            break
        nxt = emulate(adapter, args, rt, n, mode, "balanced", cost, layers_run, layers, blocks=blocks)
        nxt["cost_model"] = dict(last["cost_model"], per_rank_factors=factors)
        rounds.append(nxt)
    best = min(rounds, key=lambda r: r["predicted_prefill_s"])
    best["rounds"] = [dict(blocks=r["blocks"], predicted_prefill_s=r["predicted_prefill_s"],
                           slowest_over_fastest=r["slowest_over_fastest"]) for r in rounds]
    return best


def fit_cost(ranks, layers):
    """The cost model fitted to the ranks' seconds per layer (None when their row/pair mixes
    do not tell the two terms apart, e.g. equal ranks)."""
    works = [RankWork(rows=x["rows"], pairs=x["pairs"]) for x in ranks]
    try:
        return CostModel.fit(works, [x["compute_s"] / layers for x in ranks])
    except APBConfigError:
        return None


def validate(rows, files):
    """Predicted vs measured prefill seconds for every measured row of ``files`` that an
    emulated row matches (mode, length, CP, TP, shape; equal partition unless the file says)."""
    table = []
    for path in files:
        with open(path) as f:
            measured = json.load(f)["results"]
        for m in measured:
            if m.get("oom") or "prefill_s" not in m:
                continue
            for row in (r for r in rows if not r.get("oom")):
                if (row["mode"], row["length"], row["cp"], row["tp"], row["shape"], row["partition"]) == (
                        m["mode"], m["length"], m.get("cp", m.get("world")), m.get("tp", 1),
                        m.get("shape", "llama3-8b"), m.get("partition", "equal")):
                    entry = dict(file=os.path.basename(path), mode=m["mode"], length=m["length"],
                                 measured_s=m["prefill_s"], predicted_s=row["predicted_prefill_s"],
                                 error_pct=100 * (row["predicted_prefill_s"] / m["prefill_s"] - 1),
                                 measured_fused=m.get("fused", False), emulated_fused=row["fused"],
                                 measured_runs=len(m.get("times_s", [])))
                    if "prefill_without_comm_s" in m:
                        entry["measured_without_comm_s"] = m["prefill_without_comm_s"]
                        entry["predicted_compute_s"] = row["predicted_compute_s"]
                    table.append(entry)
    return table


def markdown(rows, table):
    lines = ["| mode | tokens | partition | blocks | slowest/fastest | predicted s |", "| --- | ---: | --- | --- | ---: | ---: |"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['mode']} | {r['length']} | out of memory | | | |")
            continue
        lines.append(f"| {r['mode']} | {r['length']} | {r['partition']} | {r['blocks']} | "
                     f"{r['slowest_over_fastest']:.3f} | {r['predicted_prefill_s']:.3f} |")
    if table:
        lines += ["", "| file | mode | tokens | measured s | predicted s | error |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for t in table:
            lines.append(f"| {t['file']} | {t['mode']} | {t['length']} | {t['measured_s']:.3f} | "
                         f"{t['predicted_s']:.3f} | {t['error_pct']:+.1f}% |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(shapes()))
    p.add_argument("--world", type=int, default=4, help="context-parallel ranks to emulate")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (each rank runs its TP shard)")
    p.add_argument("--lengths", type=int, nargs="+", default=[131072])
    p.add_argument("--modes", nargs="+", default=["exact", "star", "apb"], choices=sorted(ALGORITHMS.names()))
    p.add_argument("--partition", nargs="+", default=["equal", "balanced"], choices=["equal", "balanced"])
    p.add_argument("--cost", default="fitted", choices=["fitted", "shape"],
                   help="what the balanced partition equalises: the cost model fitted to the equal "
                        "partition's per-rank times (default) or the shape's FLOP-rate model (the engine's)")
    p.add_argument("--refine", type=int, default=1,
                   help="rounds that rebalance from the balanced ranks' measured times (each rank's "
                        "time over the model's prediction scales its cost)")
    p.add_argument("--refine-below", type=float, default=1.02,
                   help="no further round once slowest/fastest rank is at most this")
    p.add_argument("--layers", type=int, help="layers to run (times are scaled to the shape's depth)")
    p.add_argument("--layers-at", nargs="*", default=[], metavar="LENGTH=LAYERS", help="--layers per length")
    p.add_argument("--compressor", default="query_attention")
    p.add_argument("--backend", default="auto")
    p.add_argument("--anchor-ratio", type=float, default=0.25)
    p.add_argument("--passing-ratio", type=float, default=0.125)
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="fused RMSNorm/RoPE/SwiGLU (--no-fused: the code path of the committed 4x H200 figures)")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--bus-gib-s", type=float, default=NCCL_BUS_GIB_S, help="collective bus bandwidth, GiB/s")
    p.add_argument("--latency-us", type=float, default=NCCL_LATENCY_S * 1e6, help="latency of a 1 MiB gather, us")
    p.add_argument("--count-flops", action="store_true", help="count each projection's FLOPs in one run (CPU checks)")
    p.add_argument("--validate", nargs="*", default=[], help="measured bench_prefill.py JSON files to compare with")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--out", help="JSON file to write")
    return p.parse_args(argv)


def emulate_mode(adapter, args, rt, n, mode, layers_run, full_layers):
    """The rows of one (length, mode): the equal partition, then the balanced one."""
    rows = []
    equal = emulate(adapter, args, rt, n, mode, "equal", None, layers_run, full_layers)
    if "equal" in args.partition:
        rows.append(equal)
        print(json.dumps({k: v for k, v in equal.items() if k != "ranks"}), flush=True)
    if "balanced" not in args.partition or ALGORITHMS.get(mode).equal_blocks:
        return rows
    cost = fit_cost(equal["ranks"], full_layers) if args.cost == "fitted" else None
    if cost is None:
        if args.cost == "fitted":
            print(f"{mode} {n}: the equal ranks do not fit a cost model; using the shape's", flush=True)
        cost = shape_cost(args.shape, args.tp)
    row = emulate(adapter, args, rt, n, mode, "balanced", cost, layers_run, full_layers)
    row["cost_model"] = dict(source=args.cost, row_s=cost.row_s, pair_s=cost.pair_s)
    row = refine(adapter, args, rt, n, mode, cost, row, layers_run, full_layers)
    row["equal_predicted_prefill_s"] = equal["predicted_prefill_s"]
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
    return rows


def write_out(args, argv, device_name, rows, table):
    if not args.out:
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = dict(device=device_name, torch=torch.__version__, command=" ".join(sys.argv if argv is None else argv),
                note="one GPU runs each CP rank's prefill in turn; communication modelled")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=rows, validation=table), f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    from megatron_apb.inference.launch import init_runtime

    full_layers = shapes()[args.shape]["num_layers"]
    layers_at = {}
    for item in args.layers_at:
        length, _, value = item.partition("=")
        if not (length.isdigit() and value.isdigit()):
            sys.exit(f"--layers-at takes LENGTH=LAYERS, got {item!r}")
        layers_at[int(length)] = int(value)
    for n in args.lengths:
        if n < args.world:
            sys.exit(f"--lengths: {n} tokens cannot be split over --world {args.world} ranks")
    rt = init_runtime(1, None)
    device_name = torch.cuda.get_device_name() if rt.device.type == "cuda" else "cpu"
    rows, models = [], {}
    for n in args.lengths:
        layers_run = min(layers_at.get(n, args.layers or full_layers), full_layers)
        if layers_run not in models:
            models.clear()
            model = build_model(args.shape, args.tp, rt, layers_run, args.fused)
            models[layers_run] = MegatronAdapter(model, vocab_size=shapes()[args.shape]["vocab"])
        adapter = models[layers_run]
        for mode in args.modes:
            try:
                rows += emulate_mode(adapter, args, rt, n, mode, layers_run, full_layers)
            except torch.OutOfMemoryError:
                print(f"{mode} {n}: out of memory", flush=True)
                rows.append(dict(mode=mode, length=n, world=args.world, tp=args.tp, shape=args.shape, oom=True))
                torch.cuda.empty_cache()
            write_out(args, argv, device_name, rows, validate(rows, args.validate))  # partial results survive a timeout
    table = validate(rows, args.validate)
    print(markdown(rows, table), flush=True)
    write_out(args, argv, device_name, rows, table)
    return rows, table


if __name__ == "__main__":
    main()
