"""The ``minference`` local attention backend: dynamic sparse attention for causal calls.

:class:`SparseAttention` is a callable with the contract of
:func:`megatron_apb.ops.attention.attention_with_lse` (which hands its calls over when
given one as ``backend``): a causal call of at least ``dense_below`` keys estimates the
index of each head's pattern (:mod:`~megatron_apb.ops.sparse.index`) and runs the sparse
kernel (:mod:`~megatron_apb.ops.sparse.kernel`); every other call (non-causal, short, or
more query rows than keys) runs dense attention with ``dense_backend``.  Either way it
returns ``(out, lse)``, so the LSE merges of APB, Star Attention and context parallelism
keep working around it: inside an APB rank the anchor and the rank's own block (the
causal calls) go sparse, the unmasked call against anchor + passing blocks stays dense.

:data:`SPARSE_METHODS` entries (``"none"``, ``"minference"``) are what
``APBConfig.sparse`` names; :meth:`SparseMethod.backend` turns a config and a layer into
the ``backend`` argument of the attention calls.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from ...errors import APBConfigError
from ...registry import SPARSE_METHODS
from ..attention import attention_with_lse
from .index import build_index, causal_pairs, density
from .kernel import sparse_attention
from .patterns import KINDS, Pattern, SparsePlan, budget_pattern, load_plan, patterns_per_head

Tensor = torch.Tensor


class SparseAttention:
    """Sparse attention with the ``attention_with_lse`` call contract.

    Args:
        patterns: one pattern for every head, or one per query head.
        dense_below: calls with fewer keys run dense (default: the patterns' own
            ``dense_below``, the largest of them).
        dense_backend: the ``attention_with_lse`` backend of the dense calls.
        stats: if given, a list that receives one dict per call: ``pairs`` (the query-key
            pairs dense attention computes: the causal ones of a causal call), ``read``
            (those the call computed), ``sparse`` (whether it ran sparse) and, for sparse
            calls, ``density`` (``read / pairs``); reading the index's counts synchronizes
            the device once per sparse call.
        timed: also record ``index_s`` and ``attention_s`` of sparse calls (synchronizes
            around each: benchmarks only).
    """

    def __init__(self, patterns: Union[Pattern, Sequence[Pattern]], *, dense_below: Optional[int] = None,
                 dense_backend: str = "auto", stats: Optional[list] = None, timed: bool = False):
        self.patterns = patterns
        blocks = {p.block for p in ((patterns,) if not isinstance(patterns, (tuple, list)) else patterns)}
        if len(blocks) != 1:
            raise APBConfigError(f"sparse patterns of one layer must share one block size, got {sorted(blocks)}",
                                 field="block")
        if dense_below is None:
            ps = (patterns,) if not isinstance(patterns, (tuple, list)) else patterns
            dense_below = max(p.dense_below for p in ps)
        self.dense_below, self.dense_backend, self.stats, self.timed = dense_below, dense_backend, stats, timed

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
                 softmax_scale: Optional[float] = None, backend: Optional[str] = None):
        sq, sk = q.shape[1], k.shape[1]
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        if not causal or sk < self.dense_below or sq > sk or sq == 0 or q.shape[0] == 0:
            if self.stats is not None:
                pairs = causal_pairs(sq, sk) if causal else sq * sk
                self.stats.append(dict(q_len=sq, k_len=sk, pairs=pairs, read=pairs, sparse=False))
            return attention_with_lse(q, k, v, causal=causal, softmax_scale=scale,
                                      backend=backend or self.dense_backend)
        patterns = patterns_per_head(self.patterns, q.shape[2])
        for p in set(patterns):
            p.check_length(sk)
        if self.stats is None:
            return sparse_attention(q, k, v, build_index(q, k, patterns, scale), scale)
        sync = torch.cuda.synchronize if (self.timed and q.is_cuda) else (lambda: None)
        sync()
        t0 = time.perf_counter()
        index = build_index(q, k, patterns, scale)
        sync()
        t1 = time.perf_counter()
        out = sparse_attention(q, k, v, index, scale)
        sync()
        t2 = time.perf_counter()
        pairs, share = causal_pairs(sq, sk), density(index)
        record = dict(q_len=sq, k_len=sk, pairs=pairs, read=share * pairs, sparse=True, density=share)
        if self.timed:
            record.update(index_s=t1 - t0, attention_s=t2 - t1)
        self.stats.append(record)
        return out


def stats_sums(stats: Sequence[dict]) -> Tuple[float, ...]:
    """The sums :func:`summarize_stats` needs (pairs and pairs read, of all calls and of the
    sparse ones; the sparse and dense call counts): add them over ranks, then
    :func:`summary_from_sums`."""
    sparse = [r for r in stats if r["sparse"]]
    return (sum(r["pairs"] for r in stats), sum(r["read"] for r in stats), sum(r["pairs"] for r in sparse),
            sum(r["read"] for r in sparse), len(sparse), len(stats) - len(sparse))


def summary_from_sums(sums: Sequence[float]) -> dict:
    """:func:`summarize_stats` from :func:`stats_sums` (of one rank, or added over ranks)."""
    pairs, read, sparse_pairs, sparse_read, n_sparse, n_dense = sums
    return dict(attention_density=read / pairs if pairs else None,
                sparse_density=sparse_read / sparse_pairs if sparse_pairs else None,
                sparse_calls=int(n_sparse), dense_calls=int(n_dense))


def summarize_stats(stats: Sequence[dict]) -> dict:
    """The attention one forward computed, from :class:`SparseAttention`'s ``stats``:
    ``attention_density`` (pairs computed / pairs dense attention computes, over every call),
    ``sparse_density`` (the same over the calls that ran sparse; None without one) and the
    call counts."""
    return summary_from_sums(stats_sums(stats))


@dataclass(frozen=True)
class SparseMethod:
    """A registered choice of ``APBConfig.sparse``.

    ``check(config)`` validates the sparse settings (before any heavy work);
    ``backend(config, layer_number, heads, num_layers, stats=None)`` gives the ``backend`` argument of
    the attention calls of that layer: ``config.backend`` itself, or a :class:`SparseAttention`
    (recording its calls into ``stats`` when given).
    """

    name: str
    check: Callable
    backend: Callable
    description: str = ""


def _check_none(config):
    if config.sparse_config is not None:
        raise APBConfigError("sparse_config is set but sparse='none'; pass sparse='minference' or drop "
                             "sparse_config", field="sparse_config")


#: ``sparse_config="embedded"``: the shipped plan of the embedded model (SmolLM2-135M-Instruct),
#: from ``megatron-apb sparse-search --length 2048 --budgets 128 256 512 --output ...`` on CPU
EMBEDDED_PLAN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plans", "smollm2-135m-instruct.json")


def _plan(config) -> SparsePlan:
    if config.sparse_config is not None:
        return load_plan(EMBEDDED_PLAN if config.sparse_config == "embedded" else config.sparse_config)
    return SparsePlan(default=budget_pattern(config.sparse_pattern, config.sparse_budget,
                                             dense_below=config.sparse_dense_below))


def _check_minference(config):
    if config.sparse_pattern not in KINDS:
        raise APBConfigError(f"sparse_pattern must be one of {sorted(KINDS)}, got {config.sparse_pattern!r}",
                             field="sparse_pattern")
    _plan(config)


def _minference_backend(config, layer_number: int, heads: int, num_layers=None, stats=None):
    plan = _plan(config)
    plan.check_model(num_layers=num_layers, num_heads=heads)
    patterns = plan.for_layer(layer_number, heads)
    return SparseAttention(patterns, dense_below=config.sparse_dense_below, dense_backend=config.backend,
                           stats=stats)


SPARSE_METHODS.register(SparseMethod(
    name="none", check=_check_none, backend=lambda config, layer_number, heads, num_layers=None, stats=None: config.backend,
    description="dense attention"))
SPARSE_METHODS.register(SparseMethod(
    name="minference", check=_check_minference, backend=_minference_backend,
    description="dynamic sparse prefill (A-shape, vertical-slash, block-sparse) for causal calls"))
