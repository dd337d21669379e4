"""What a distributed attention algorithm is, for the registry.

Each algorithm module (``apb.py``, ``exact.py``, ``ulysses.py``) registers a
:class:`CPAlgorithm` in :data:`megatron_apb.registry.ALGORITHMS` under the name users
give as ``APBConfig.mode``; the core attention looks it up by that name and calls
``algorithm.attention(...)`` with one signature for all.  Its traits (``uses_anchor``,
``passes_blocks``, ``exact``, ``equal_blocks``) are what the rest of the package asks,
instead of comparing mode names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from ..config import CPLayout
from ..registry import ALGORITHMS

Tensor = torch.Tensor
Scorer = Callable[[], Tensor]  # () -> float32 [batch, block_len, kv_heads]


class ContextAttention(Protocol):
    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        layout: CPLayout,
        group,
        scorer: Optional[Scorer] = None,
        softmax_scale: Optional[float] = None,
        backend: str = "auto",
        local_only: bool = False,
    ) -> Tensor:
        """Post-RoPE q, k, v [batch, rows, heads | kv_heads, head_dim] of this rank (rows:
        its anchor, if any, then its block) -> [batch, rows, heads, head_dim].

        ``local_only`` (benchmarks): replace the collectives by local copies, to measure
        the communication that is not hidden; the result is then wrong.
        """


@dataclass(frozen=True)
class CPAlgorithm:
    """A registered context-parallel attention algorithm.

    Attributes:
        name: the ``APBConfig.mode`` that selects it.
        attention: the prefill attention of one rank (:class:`ContextAttention`).
        uses_anchor: ranks >= 1 hold an anchor before their block (APB, Star).
        passes_blocks: ranks score their block and pass the top tokens to later ranks.
        exact: the result equals full causal attention.
        equal_blocks: every rank must hold the same number of rows (all-to-all
            re-sharding); ``APBConfig.partition="balanced"`` then splits equally.
        description: one line for ``--help`` and docs.
    """

    name: str
    attention: ContextAttention
    uses_anchor: bool = False
    passes_blocks: bool = False
    exact: bool = True
    equal_blocks: bool = False
    description: str = ""


def register_algorithm(algorithm: CPAlgorithm, *, replace: bool = False) -> CPAlgorithm:
    """Make ``algorithm`` selectable as ``APBConfig(mode=algorithm.name)``."""
    return ALGORITHMS.register(algorithm, replace=replace)
