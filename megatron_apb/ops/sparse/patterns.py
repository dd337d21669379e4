"""The three sparse attention patterns and the per-layer, per-head plan that holds them.

A pattern says which keys a query row attends to; every pattern is causal and every row
always sees the key block(s) holding its own position, so no row is empty.

* :class:`AShape`: the first ``sink`` keys (attention sinks) and a local ``window`` (static).
* :class:`VerticalSlash`: ``vertical_topk`` key columns every row sees and ``slash_topk``
  diagonals (key = query - s), both chosen per prompt from the last ``last_q`` queries.
* :class:`BlockSparse`: per ``block``-row query block, the ``topk`` key blocks of highest
  mean-pooled Q.K score (always with the first block and the diagonal block).

Each has ``dense_below``: sequences shorter than this (in keys) run dense attention.
Patterns are plain frozen dataclasses, validated on construction (a clear error naming the
field) and read from/written to JSON with :func:`pattern_from_dict` / :meth:`to_dict`.

A :class:`SparsePlan` is one pattern per layer and head (or one pattern for all), the JSON
that ``megatron-apb sparse-search`` writes and the prefill reads::

    {"format": "megatron_apb.sparse/1", "model": "...", "num_layers": 2, "num_heads": 4,
     "default": {"kind": "block_sparse", "topk": 64},
     "layers": {"1": [{"kind": "vertical_slash", ...}, ... one per head]}}
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

from ...errors import APBConfigError

FORMAT = "megatron_apb.sparse/1"
BLOCKS = (16, 32, 64, 128)


def _int(name: str, value, minimum: int, where: str):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise APBConfigError(f"{where}: {name} must be an int >= {minimum}, got {value!r}", field=name)


@dataclass(frozen=True)
class _Pattern:
    block: int = 64
    dense_below: int = 0

    def _check_common(self):
        where = f"{self.kind} pattern"
        if self.block not in BLOCKS:
            raise APBConfigError(f"{where}: block must be one of {BLOCKS}, got {self.block!r}", field="block")
        _int("dense_below", self.dense_below, 0, where)

    def to_dict(self) -> dict:
        """The JSON form (``kind`` plus every field)."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def check_length(self, seq: int) -> None:
        """Refuse settings that cannot apply to a ``seq``-key sequence (default: none)."""


@dataclass(frozen=True)
class AShape(_Pattern):
    """Attention sinks + a local window: key j is seen by query i iff ``j < sink`` or
    ``i - window < j <= i`` (the window is covered by the whole ``block``-key blocks it
    touches; the sinks column by column)."""

    sink: int = 64
    window: int = 4096
    kind = "a_shape"

    def __post_init__(self):
        self._check_common()
        _int("sink", self.sink, 0, "a_shape pattern")
        _int("window", self.window, 1, "a_shape pattern")

    def check_length(self, seq: int) -> None:
        if self.window > seq:
            raise APBConfigError(
                f"a_shape pattern: window={self.window} is longer than the sequence ({seq} keys); "
                f"use a window <= {seq} or raise dense_below above {seq}", field="window")


@dataclass(frozen=True)
class VerticalSlash(_Pattern):
    """Key columns and diagonals from the last ``last_q`` queries' attention.

    ``vertical_topk`` columns of highest attention mass are gathered column by column.
    Slashes (key = query - s) are covered by whole diagonal blocks: ``slash_topk`` keys per
    row buy ``ceil(slash_topk / block)`` diagonal block offsets, those whose slashes carry
    the most attention mass, besides the diagonal block itself, so the cost per row is
    bounded by the budget however scattered the top slashes are."""

    vertical_topk: int = 1024
    slash_topk: int = 2048
    last_q: int = 64
    kind = "vertical_slash"

    def __post_init__(self):
        self._check_common()
        _int("vertical_topk", self.vertical_topk, 1, "vertical_slash pattern")
        _int("slash_topk", self.slash_topk, 1, "vertical_slash pattern")
        _int("last_q", self.last_q, 1, "vertical_slash pattern")


@dataclass(frozen=True)
class BlockSparse(_Pattern):
    """The ``topk`` key blocks of highest mean-pooled Q.K per query block."""

    topk: int = 64
    kind = "block_sparse"

    def __post_init__(self):
        self._check_common()
        _int("topk", self.topk, 1, "block_sparse pattern")


Pattern = Union[AShape, VerticalSlash, BlockSparse]
KINDS = {cls.kind: cls for cls in (AShape, VerticalSlash, BlockSparse)}


def pattern_from_dict(d: dict, *, where: str = "pattern") -> Pattern:
    """A pattern from its JSON form; unknown kinds or fields are refused by name."""
    if not isinstance(d, dict) or d.get("kind") not in KINDS:
        kind = d.get("kind") if isinstance(d, dict) else d
        raise APBConfigError(f"{where}: kind must be one of {sorted(KINDS)}, got {kind!r}", field="kind")
    cls = KINDS[d["kind"]]
    names = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(d) - names - {"kind"})
    if extra:
        raise APBConfigError(f"{where}: unknown field(s) {extra} for {d['kind']}; valid: {sorted(names)}", field=extra[0])
    return cls(**{k: v for k, v in d.items() if k != "kind"})


def budget_pattern(kind: str, budget: int, *, block: int = 64, dense_below: int = 0) -> Pattern:
    """The default pattern of ``kind`` for a budget of about ``budget`` keys per query row."""
    _int("sparse_budget", budget, 1, "sparse settings")
    if kind == "block_sparse":
        return BlockSparse(block=block, dense_below=dense_below, topk=max(1, -(-budget // block)))
    if kind == "vertical_slash":
        return VerticalSlash(block=block, dense_below=dense_below, vertical_topk=max(1, budget // 4),
                             slash_topk=max(1, budget - budget // 4))
    if kind == "a_shape":
        sink = min(block, max(0, budget - 1))
        return AShape(block=block, dense_below=dense_below, sink=sink, window=max(1, budget - sink))
    raise APBConfigError(f"sparse_pattern must be one of {sorted(KINDS)}, got {kind!r}", field="sparse_pattern")


@dataclass(frozen=True)
class SparsePlan:
    """Patterns per layer (1-based, as Megatron numbers them) and query head.

    ``layers[n]`` is a tuple of one pattern per head; layers not listed use ``default``.
    ``num_layers`` / ``num_heads`` / ``model`` say what the plan was made for and are
    checked against the model that reads it (:meth:`check_model`, :meth:`for_layer`).
    """

    default: Pattern
    layers: Dict[int, Tuple[Pattern, ...]] = dataclasses.field(default_factory=dict)
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    model: Optional[str] = None

    def check_model(self, *, num_layers: Optional[int] = None, num_heads: Optional[int] = None,
                    model: Optional[str] = None) -> None:
        """Refuse a plan made for another model (layer or head count, model name)."""
        for name, mine, theirs in (("num_layers", self.num_layers, num_layers),
                                   ("num_heads", self.num_heads, num_heads), ("model", self.model, model)):
            if mine is not None and theirs is not None and mine != theirs:
                raise APBConfigError(
                    f"sparse_config: the pattern file was made for {name}={mine!r}, but the model "
                    f"has {name}={theirs!r}; run `megatron-apb sparse-search` for this model",
                    field="sparse_config")

    def for_layer(self, layer_number: int, heads: int) -> Union[Pattern, Tuple[Pattern, ...]]:
        """The pattern(s) of ``layer_number`` for a call with ``heads`` query heads."""
        if self.num_layers is not None and not 1 <= layer_number <= self.num_layers:
            raise APBConfigError(
                f"sparse_config: layer {layer_number} is outside the pattern file's "
                f"num_layers={self.num_layers}; run `megatron-apb sparse-search` for this model",
                field="sparse_config")
        per_head = self.layers.get(layer_number)
        if per_head is None:
            return self.default
        if len(per_head) != heads:
            raise APBConfigError(
                f"sparse_config: layer {layer_number} lists {len(per_head)} head patterns but the "
                f"attention has {heads} query heads here (tensor or head parallelism splits heads: "
                "per-head files need the whole head set on each rank)", field="sparse_config")
        return per_head

    def to_dict(self) -> dict:
        return {"format": FORMAT, "model": self.model, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "default": self.default.to_dict(),
                "layers": {str(n): [p.to_dict() for p in ps] for n, ps in sorted(self.layers.items())}}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)


def plan_from_dict(d: dict, *, where: str = "sparse_config") -> SparsePlan:
    """A :class:`SparsePlan` from its JSON form, every entry validated."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise APBConfigError(f"{where}: not a sparse pattern file (format {got!r}, expected {FORMAT!r})",
                             field="sparse_config")
    default = pattern_from_dict(d.get("default"), where=f"{where}: default")
    nl, nh = d.get("num_layers"), d.get("num_heads")
    for name, value in (("num_layers", nl), ("num_heads", nh)):
        if value is not None:
            _int(name, value, 1, where)
    layers = {}
    for key, entries in (d.get("layers") or {}).items():
        if not str(key).isdigit() or (nl is not None and not 1 <= int(key) <= nl):
            raise APBConfigError(f"{where}: layer key {key!r} must be a layer number in [1, {nl}]",
                                 field="sparse_config")
        if not isinstance(entries, list) or (nh is not None and len(entries) != nh):
            n = len(entries) if isinstance(entries, list) else entries
            raise APBConfigError(f"{where}: layer {key} must list num_heads={nh} head patterns, got {n}",
                                 field="sparse_config")
        layers[int(key)] = tuple(pattern_from_dict(p, where=f"{where}: layer {key} head {i}")
                                 for i, p in enumerate(entries))
    return SparsePlan(default=default, layers=layers, num_layers=nl, num_heads=nh, model=d.get("model"))


_PLANS: Dict[Tuple[str, float], SparsePlan] = {}


def load_plan(path: str) -> SparsePlan:
    """Read and validate a pattern file (cached per path and modification time)."""
    if not isinstance(path, (str, os.PathLike)):
        raise APBConfigError(f"sparse_config must be a path to a JSON file, got {path!r}", field="sparse_config")
    try:
        key = (os.path.abspath(path), os.path.getmtime(path))
    except OSError as e:
        raise APBConfigError(f"sparse_config: cannot read {path!r} ({e.strerror})", field="sparse_config") from None
    if key not in _PLANS:
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise APBConfigError(f"sparse_config: {path!r} is not valid JSON ({e})", field="sparse_config") from None
        _PLANS[key] = plan_from_dict(data, where=f"sparse_config {path!r}")
    return _PLANS[key]


def patterns_per_head(patterns: Union[Pattern, Sequence[Pattern]], heads: int) -> Tuple[Pattern, ...]:
    """One pattern per head from a single pattern or a per-head sequence."""
    if isinstance(patterns, _Pattern):
        return (patterns,) * heads
    patterns = tuple(patterns)
    if len(patterns) != heads or not all(isinstance(p, _Pattern) for p in patterns):
        raise APBConfigError(f"sparse patterns: need one pattern per head ({heads}), got {len(patterns)}",
                             field="sparse_config")
    return patterns
