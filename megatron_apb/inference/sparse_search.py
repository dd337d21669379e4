"""``megatron-apb sparse-search``: pick each layer's and head's sparse pattern offline.

One dense prefill of a calibration prompt (a pass-key prompt of ``--length`` tokens) runs on
one process; each layer's causal attention call hands its post-RoPE q and k to
:func:`megatron_apb.ops.sparse.search.score_patterns` (recall and density of every candidate
pattern per head) and, with ``--cost time`` (the default on a GPU with Triton), the measured
time of each candidate's index estimation and kernel relative to dense attention
(:func:`~megatron_apb.ops.sparse.search.time_patterns`) before computing the dense result;
:func:`~megatron_apb.ops.sparse.search.choose_patterns` keeps per head the candidate with the
most attention mass within ``--max-time`` (or, with ``--cost density``, ``--max-density``).  The plan is written as the JSON that
``--sparse minference --sparse-config PATH`` reads
(:class:`megatron_apb.ops.sparse.SparsePlan`).

The calls reach the search through a temporary entry of the sparse-method registry
(removed when the command ends), so the model runs exactly as a prefill does.
"""

from __future__ import annotations

import json
import os
import time

import torch

from ..config import APBConfig
from ..data import passkey_prompt, tokenize_prompt
from ..errors import APBConfigError
from ..ops.attention import attention_with_lse
from ..ops.sparse.backend import SparseMethod
from ..ops.sparse.patterns import SparsePlan, budget_pattern
from ..ops.sparse.kernel import HAVE_TRITON
from ..ops.sparse.search import choose_patterns, default_candidates, score_patterns, time_patterns
from ..registry import SPARSE_METHODS
from .launch import add_runtime_args, check_model_path, check_output_path, finish_runtime, init_runtime, load_model, load_tokenizer

_METHOD = "sparse-search-recorder"


class _Recorder:
    """Scores the candidates on a layer's whole-sequence causal call; returns dense attention."""

    def __init__(self, args, dense_backend, results, layer_number):
        self.args, self.dense_backend, self.results, self.layer = args, dense_backend, results, layer_number

    def __call__(self, q, k, v, *, causal, softmax_scale=None):
        if causal and q.shape[1] == k.shape[1] and q.shape[1] > 0:
            cands = default_candidates(self.args.budgets, block=self.args.block)
            recall, density = score_patterns(q[:1], k[:1], cands, softmax_scale)
            budget = {}  # --cost density: density within --max-density
            if self.args.cost == "time":
                cost, _ = time_patterns(q[:1], k[:1], v[:1], cands, softmax_scale, dense_backend=self.dense_backend)
                budget = dict(cost=cost, max_cost=self.args.max_time)
            self.results[self.layer] = choose_patterns(cands, recall, density, self.args.max_density, **budget)
            kinds = [p.kind for p in self.results[self.layer][0]]
            print(f"layer {self.layer}: " + ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds))),
                  flush=True)
        return attention_with_lse(q, k, v, causal=causal, softmax_scale=softmax_scale, backend=self.dense_backend)


def run_search(args) -> int:
    """The command: calibration prefill, per-head choice, the JSON plan."""
    from . import APBEngine  # local: the engine imports Megatron-Core (lazy package)

    rt = init_runtime(1, args.dtype)
    if rt.world != 1:
        raise APBConfigError("sparse-search runs on one process (it sees every head of every layer)")
    results = {}
    SPARSE_METHODS.register(SparseMethod(
        name=_METHOD, check=lambda config: None,
        backend=lambda config, layer, heads, num_layers=None: _Recorder(args, config.backend, results, layer)))
    try:
        tokenizer = load_tokenizer(args.model)
        document, question, _ = passkey_prompt(tokenizer, args.length, seed=args.seed)
        prompt = tokenize_prompt(tokenizer, document, question)
        config = APBConfig(mode="exact", sparse=_METHOD)
        model, spec, _, config = load_model(args.model, config, rt)
        engine = APBEngine(model, config, cp_group=rt.pg.cp, tp_group=rt.pg.tp, vocab_size=spec.vocab_size)
        start = time.perf_counter()
        engine.prefill(prompt.document_ids, prompt.query_ids)
    finally:
        SPARSE_METHODS.unregister(_METHOD)
    layers = {n: pats for n, (pats, _) in sorted(results.items())}
    name = args.model or "SmolLM2-135M-Instruct"
    plan = SparsePlan(default=budget_pattern("block_sparse", max(args.budgets), block=args.block), layers=layers,
                      num_layers=spec.num_layers, num_heads=spec.num_attention_heads, model=os.path.basename(name))
    plan.save(args.output)
    rows = [dict(layer=n, **r) for n, (_, rs) in sorted(results.items()) for r in rs]
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("block_sparse", "vertical_slash", "a_shape")}
    summary = dict(tokens=len(prompt.document_ids) + len(prompt.query_ids), heads_by_kind=kinds,
                   mean_recall=sum(r["recall"] for r in rows) / max(1, len(rows)),
                   mean_density=sum(r["density"] for r in rows) / max(1, len(rows)),
                   cost=args.cost, **({"mean_time": sum(r["time"] for r in rows) / max(1, len(rows))}
                                      if args.cost == "time" else {}),
                   seconds=time.perf_counter() - start)
    print(json.dumps(summary), flush=True)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(dict(summary=summary, heads=rows), f, indent=1)
    print(f"wrote {args.output}", flush=True)
    finish_runtime()
    return 0


def _validate(args) -> None:
    check_model_path(args.model)
    if args.tp != 1:
        raise APBConfigError(f"sparse-search runs on one process: --tp must be 1, got {args.tp}", field="tp")
    check_output_path(args.output, "--output")
    if args.report:
        check_output_path(args.report, "--report")
    if args.length < 64:
        raise APBConfigError(f"--length must be >= 64 tokens, got {args.length}", field="length")
    if not args.budgets or min(args.budgets) < 1:
        raise APBConfigError(f"--budgets must be >= 1 key per row, got {args.budgets}", field="budgets")
    if not 0 < args.max_density <= 1:
        raise APBConfigError(f"--max-density must lie in (0, 1], got {args.max_density}", field="max_density")
    if not 0 < args.max_time:
        raise APBConfigError(f"--max-time must be > 0 (a fraction of dense attention's time), got {args.max_time}",
                             field="max_time")
    gpu_kernel = torch.cuda.is_available() and HAVE_TRITON
    if args.cost == "auto":
        args.cost = "time" if gpu_kernel else "density"
    elif args.cost == "time" and not gpu_kernel:
        raise APBConfigError("--cost time measures the Triton kernel and needs a GPU with Triton; "
                             "use --cost density here", field="cost")
    budget_pattern("block_sparse", 1, block=args.block)  # the block size


def add_sparse_search_parser(sub) -> None:
    """Add ``sparse-search`` to the ``megatron-apb`` subcommands."""
    p = sub.add_parser("sparse-search", help="choose each layer's and head's sparse pattern (JSON for --sparse-config)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--model", help="HF directory, .gguf file or converted checkpoint (default: embedded SmolLM2)")
    p.add_argument("--length", type=int, default=4096, help="calibration prompt tokens")
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024], help="keys per query row tried")
    p.add_argument("--cost", choices=("auto", "time", "density"), default="auto",
                   help="what the budget limits: time (each candidate's index estimation + kernel, measured, over "
                        "dense attention's; needs a GPU with Triton), density (keys read); auto: time where it "
                        "can be measured")
    p.add_argument("--max-time", type=float, default=0.25,
                   help="time budget (--cost time): sparse seconds / dense attention seconds of the same call")
    p.add_argument("--max-density", type=float, default=0.25,
                   help="FLOP budget (--cost density): keys read / dense causal keys")
    p.add_argument("--block", type=int, default=64, help="block size of the patterns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="the pattern file (JSON) to write")
    p.add_argument("--report", help="also write every head's recall and density here (JSON)")
    add_runtime_args(p)
    p.set_defaults(func=run_search, validate=_validate)
