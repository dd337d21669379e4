"""Per-rank work of a context-parallel prefill, a cost model of it, and a balanced partition.

Pure arithmetic: no tensors, no process groups.  With equal blocks the ranks of an APB
prefill do unequal work: rank r >= 1 runs its anchor's rows through every matmul and its
block's rows attend to the anchor and to ``r`` passing blocks, so the last rank is the
critical path while rank 0 waits in the per-layer gather.  Exact all-gather CP is worse:
rank r attends to all ``r`` earlier blocks.

* :func:`rank_work` counts what one rank computes per layer: rows through the matmuls and
  (query row, key row) pairs attended (scoring included);
* :class:`CostModel` turns that into seconds per layer, ``row_s * rows + pair_s * pairs +
  fixed_s``; its coefficients come from a model shape and kernel throughputs
  (:meth:`CostModel.from_shape`) or are fitted to measured per-rank times
  (:meth:`CostModel.fit`, as ``tools/emulate_prefill.py`` does);
* :func:`balance` chooses per-rank block lengths that equalise the predicted per-rank
  times (the smallest possible maximum, by bisection on it); :func:`balanced_blocks`
  applies it to a layout, cached per (layout, tokens, ranks, cost model);
* :func:`gather_seconds` and :func:`all_reduce_seconds` model collectives from a bus
  bandwidth and a latency.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Tuple

from .errors import APBConfigError
from .registry import ALGORITHMS

if TYPE_CHECKING:  # pragma: no cover
    from .config import CPLayout

#: dense bf16 matmul rate of one H200 (ENVIRONMENT.md: 791 TFLOP/s peak measured; the
#: model's GEMMs ran at ~750 TFLOP/s in the committed 4x H200 profile)
MATMUL_FLOPS = 750e12
#: cuDNN causal attention rate of one H200 in the APB op (docs/benchmarks.md: 585 TFLOP/s)
ATTENTION_FLOPS = 585e12
#: elementwise work (norms, RoPE, SwiGLU, residuals) per row, as a fraction of the matmuls
#: (fused kernels: ~3 of ~25 ms per layer on the critical rank)
ROW_OVERHEAD = 0.12
#: NCCL all-gather on 4x H200 (ENVIRONMENT.md): bus bandwidth at 16-128 MiB per rank and
#: the time of a 1 MiB gather
NCCL_BUS_GIB_S = 240.0
NCCL_LATENCY_S = 42e-6

LLAMA3_8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336)


@dataclass(frozen=True)
class RankWork:
    """What one rank computes in one layer of a prefill.

    Attributes:
        rows: rows through every matmul and elementwise kernel (anchor + block).
        pairs: (query row, key row) pairs attended, over all of the layer's attention
            calls; the query-attention compressor's scoring counts half a pair per
            (query row, key).
    """

    rows: int
    pairs: float


@dataclass(frozen=True)
class CostModel:
    """Seconds of one layer of one rank: ``row_s * rows + pair_s * pairs + fixed_s``."""

    row_s: float
    pair_s: float
    fixed_s: float = 0.0

    def __post_init__(self):
        for name in ("row_s", "pair_s", "fixed_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise APBConfigError(f"CostModel.{name} must be a finite number >= 0, got {value!r}", field=name)
        if self.row_s == 0 and self.pair_s == 0:
            raise APBConfigError("a CostModel needs row_s > 0 or pair_s > 0", field="row_s")

    @staticmethod
    def flops_per_row(*, hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, tp: int = 1) -> float:
        """Matmul FLOPs per row of one layer on one TP rank: QKV, output projection, SwiGLU MLP."""
        qkv = 2 * hidden * (heads + 2 * kv_heads) * head_dim
        proj = 2 * heads * head_dim * hidden
        mlp = 2 * hidden * 2 * ffn + 2 * ffn * hidden
        return (qkv + proj + mlp) / tp

    @staticmethod
    def flops_per_pair(*, heads: int, head_dim: int, tp: int = 1) -> float:
        """Attention FLOPs per (query row, key row) pair on one TP rank (QK^T and PV)."""
        return 4 * heads * head_dim / tp

    @classmethod
    def from_shape(cls, *, hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, tp: int = 1,
                   matmul_flops: float = MATMUL_FLOPS, attention_flops: float = ATTENTION_FLOPS,
                   row_overhead: float = ROW_OVERHEAD) -> "CostModel":
        """Coefficients from FLOP counts and kernel rates (FLOP/s)."""
        row = cls.flops_per_row(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, ffn=ffn, tp=tp)
        pair = cls.flops_per_pair(heads=heads, head_dim=head_dim, tp=tp)
        return cls(row_s=row / matmul_flops * (1 + row_overhead), pair_s=pair / attention_flops)

    @classmethod
    def default(cls) -> "CostModel":
        """The Llama-3.1-8B shape on one H200 (used when no model's shape is known)."""
        return cls.from_shape(**LLAMA3_8B)

    @classmethod
    def fit(cls, works: Sequence[RankWork], seconds: Sequence[float]) -> "CostModel":
        """Least-squares ``row_s``, ``pair_s`` (through the origin) from measured per-layer
        seconds of ranks doing ``works``; needs two ranks whose row/pair mixes differ."""
        if len(works) != len(seconds) or len(works) < 2:
            raise APBConfigError(f"CostModel.fit needs >= 2 (work, seconds) pairs, got {len(works)} and {len(seconds)}")
        # normal equations of [rows pairs] x = seconds, columns scaled for conditioning
        sr = max(w.rows for w in works) or 1
        sp = max(w.pairs for w in works) or 1
        a11 = sum((w.rows / sr) ** 2 for w in works)
        a12 = sum((w.rows / sr) * (w.pairs / sp) for w in works)
        a22 = sum((w.pairs / sp) ** 2 for w in works)
        b1 = sum(w.rows / sr * t for w, t in zip(works, seconds))
        b2 = sum(w.pairs / sp * t for w, t in zip(works, seconds))
        det = a11 * a22 - a12 * a12
        if det <= 1e-12 * max(a11 * a22, 1e-300):
            raise APBConfigError("CostModel.fit: the ranks' row/pair mixes do not differ; add other cases")
        x1, x2 = (b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det
        if x1 < 0 or x2 < 0:  # one term explains nothing: fit the other alone
            x1, x2 = (max(b1 / a11, 0.0), 0.0) if b1 * b1 / a11 >= b2 * b2 / a22 else (0.0, max(b2 / a22, 0.0))
        return cls(row_s=x1 / sr, pair_s=x2 / sp)

    def seconds(self, work: RankWork) -> float:
        """Predicted seconds of one layer doing ``work``."""
        return self.row_s * work.rows + self.pair_s * work.pairs + self.fixed_s


def rank_work(layout: "CPLayout", rank: int, world: int, *, block: Optional[int] = None,
              start: Optional[int] = None) -> RankWork:
    """Per-layer work of ``rank`` of ``world`` under ``layout`` (its block, or ``block``
    tokens starting at ``start``: what a partition being chosen would give it)."""
    b = layout.block_len_on(rank) if block is None else block
    s = layout.block_start(rank) if start is None else start
    algorithm = ALGORITHMS.get(layout.mode)
    pairs = b * (b + 1) / 2  # own block, causally
    la = layout.anchor_len_on(rank) if algorithm.uses_anchor and world > 1 else 0
    if not algorithm.uses_anchor:
        if world > 1:
            pairs += b * s  # exact: every earlier token (ulysses: the same pairs over heads)
        return RankWork(rows=b, pairs=pairs)
    pairs += la * (la + 1) / 2  # anchor rows, causally within the anchor
    if layout.anchor_visible_on(rank):
        pairs += b * la
    passing = layout.passing_len if world > 1 else 0
    pairs += b * rank * passing
    if passing and rank < world - 1 and layout.first_rank_anchor:
        # the query-attention compressor (the layouts that give rank 0 the anchor): the
        # query rows against the block, QK only (half a pair)
        pairs += (layout.query_len or la) * b / 2
    return RankWork(rows=la + b, pairs=pairs)


def gather_seconds(bytes_per_rank: float, world: int, *, bus_gib_s: float = NCCL_BUS_GIB_S,
                   latency_s: float = NCCL_LATENCY_S) -> float:
    """Seconds of an all-gather of ``bytes_per_rank`` over ``world`` ranks: the latency plus
    the bus traffic ``(world - 1) / world * world * bytes`` at ``bus_gib_s`` (NCCL's bus
    bandwidth convention; the latency is that of a 1 MiB gather, so it is taken off once)."""
    if world <= 1 or bytes_per_rank <= 0:
        return 0.0
    bus = bus_gib_s * 2**30
    traffic = (world - 1) * bytes_per_rank
    return max(latency_s, latency_s - (world - 1) * 2**20 / bus + traffic / bus)


def all_reduce_seconds(bytes_per_rank: float, world: int, *, bus_gib_s: float = NCCL_BUS_GIB_S,
                       latency_s: float = NCCL_LATENCY_S) -> float:
    """Seconds of an all-reduce of ``bytes_per_rank`` over ``world`` ranks: the latency plus
    ``2 (world - 1) / world * bytes`` at ``bus_gib_s`` (NCCL's bus bandwidth convention)."""
    if world <= 1 or bytes_per_rank <= 0:
        return 0.0
    return latency_s + 2 * (world - 1) / world * bytes_per_rank / (bus_gib_s * 2**30)


def balance(seconds: Callable[[int, int, int], float], num_tokens: int, world: int, *,
            min_blocks: Optional[Sequence[int]] = None, align: int = 1, iters: int = 60) -> Tuple[int, ...]:
    """Block lengths (summing to ``num_tokens``) that minimise the largest predicted time.

    ``seconds(rank, block, start)`` is rank ``rank``'s predicted time with ``block`` tokens
    from ``start``; it must grow with ``block`` and not shrink with ``start``.  Bisection on
    the largest time T: for a given T, rank 0, 1, ... each take the longest block (a multiple
    of ``align``, at least ``min_blocks[r]``) that keeps it within T, and the last rank takes
    the rest; taking the longest block never hurts the later ranks (the end of each prefix
    is then the latest possible), so T is feasible exactly when that works.
    """
    if world < 1 or num_tokens < world:
        raise APBConfigError(f"a {num_tokens}-token document cannot be split over {world} ranks; "
                             "every rank needs at least one token")
    mins = [max(1, int(m)) for m in (min_blocks or [1] * world)]
    if len(mins) != world:
        raise APBConfigError(f"min_blocks names {len(mins)} ranks, not {world}")
    if sum(mins) > num_tokens:
        raise APBConfigError(f"the ranks' smallest blocks {mins} need {sum(mins)} tokens, more than the "
                             f"document's {num_tokens}")
    align = max(1, int(align))

    def assign(limit):
        blocks, start = [], 0
        for r in range(world - 1):
            cap = num_tokens - start - sum(mins[r + 1:])
            lo_j, hi_j = -(-mins[r] // align), cap // align
            best = None
            while lo_j <= hi_j:  # the longest aligned block within the limit
                j = (lo_j + hi_j) // 2
                if seconds(r, j * align, start) <= limit:
                    best, lo_j = j * align, j + 1
                else:
                    hi_j = j - 1
            if best is None:
                if mins[r] > cap or seconds(r, mins[r], start) > limit:
                    return None
                best = mins[r]
            blocks.append(best)
            start += best
        rest = num_tokens - start
        if rest < mins[-1] or seconds(world - 1, rest, start) > limit:
            return None
        return tuple(blocks + [rest])

    # every time a partition can give is at most a rank's time with the whole document
    hi = max(seconds(r, num_tokens, num_tokens) for r in range(world))
    best = assign(hi)
    if best is None:
        raise APBConfigError(f"no partition of {num_tokens} tokens gives the ranks their smallest blocks {mins}")
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        found = assign(mid)
        if found is None:
            lo = mid
        else:
            hi, best = mid, found
    return best


def balanced_blocks(layout: "CPLayout", num_tokens: int, world: int,
                    cost: Optional[CostModel] = None) -> Tuple[int, ...]:
    """Per-rank block lengths of ``num_tokens`` tokens over ``world`` ranks that equalise
    the times ``cost`` predicts for ``layout``'s anchor and passing lengths (cached;
    constraints of :func:`balance_layout`)."""
    equal = replace(layout, block_lens=()) if layout.block_lens else layout
    return _balanced(equal, int(num_tokens), int(world), cost or CostModel.default())


@functools.lru_cache(maxsize=256)
def _balanced(layout: "CPLayout", num_tokens: int, world: int, cost: CostModel) -> Tuple[int, ...]:
    def seconds(rank, block, start):
        return cost.seconds(rank_work(layout, rank, world, block=block, start=start))

    return balance_layout(layout, num_tokens, world, seconds)


def balance_layout(layout: "CPLayout", num_tokens: int, world: int,
                   seconds: Callable[[int, int, int], float]) -> Tuple[int, ...]:
    """:func:`balance` under ``layout``'s constraints: every rank but the last keeps at
    least ``passing_len`` tokens, and blocks are multiples of 64 tokens for documents of at
    least 2048 tokens per rank (the last block takes the rest)."""
    mins = [max(1, layout.passing_len) for _ in range(world - 1)] + [1]
    align = 64 if num_tokens >= 2048 * world else 1
    return balance(seconds, num_tokens, world, min_blocks=mins, align=align)


def predicted_seconds(layout: "CPLayout", world: int, cost: CostModel, layers: int = 1) -> Tuple[float, ...]:
    """Each rank's predicted prefill seconds (``layers`` layers) under ``layout``."""
    return tuple(layers * cost.seconds(rank_work(layout, r, world)) for r in range(world))
