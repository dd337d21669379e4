"""The spread of repeated timings, as every benchmark in tools/ reports it: the median
under the metric's own name (what the plots and docs quote), its minimum and maximum as
``<name>_min`` / ``<name>_max``, and the number of timed runs."""

from __future__ import annotations

import statistics
from typing import Dict, Iterable

#: timed runs a benchmark takes unless told otherwise
DEFAULT_RUNS = 3


def spread(name: str, values: Iterable[float]) -> Dict[str, float]:
    """``{name: median, name_min: min, name_max: max}`` of ``values`` (at least one)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{name}: no timed runs to summarise")
    return {name: statistics.median(values), f"{name}_min": min(values), f"{name}_max": max(values)}


def add_spread(row: dict, name: str, values_key: str, scale: float = 1.0) -> dict:
    """Add ``name``'s min / max and ``runs`` to ``row`` from its list ``row[values_key]``
    (times scaled by ``scale`` into ``name``'s unit); the median already under ``name``
    is kept.  Rows without the list are returned untouched."""
    values = row.get(values_key)
    if values:
        stats = spread(name, [scale * v for v in values])
        row.setdefault(name, stats[name])
        row[f"{name}_min"], row[f"{name}_max"] = stats[f"{name}_min"], stats[f"{name}_max"]
        row.setdefault("runs", len(values))
    return row
