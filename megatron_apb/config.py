"""APB configuration: one validated, keyword-only dataclass.

`APBConfig` holds the settings a user chooses once (mode, anchor and passing sizes,
compressor, backend).  `APBConfig.layout(...)` turns them into a `CPLayout` for a
concrete prompt (block length, resolved anchor/passing lengths, where the query sits in
the anchor), which is what the attention modules consume on every forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

MODES = ("apb", "star", "exact", "ulysses")
COMPRESSORS = ("retaining_head", "query_attention", "random")
BACKENDS = ("auto", "sdpa", "cudnn", "flash", "efficient", "flex", "math", "reference")


class APBConfigError(ValueError):
    """A configuration or input that cannot run; the message says what to change."""


@dataclass(kw_only=True, frozen=True)
class APBConfig:
    """Settings of APB and of the modes it is compared with.

    Attributes:
        mode: ``"apb"`` (anchor + passing blocks, approximate), ``"star"`` (Star Attention:
            anchor as long as a block, no passing), ``"exact"`` (all-gather context
            parallelism, exact) or ``"ulysses"`` (all-to-all head parallelism, exact).
        anchor_len: anchor tokens prepended on ranks >= 1.  ``None``: ``anchor_ratio``
            of the block for ``apb`` (more if the query prefix and the query need more, up
            to a block minus one), a whole block for ``star``.
        passing_len: tokens each rank passes on, per KV head.  ``None``:
            ``passing_ratio`` of the block.  Values >= the block keep every token.
        anchor_ratio, passing_ratio: the defaults' fractions of the block length
            (the reference uses 1/4 and 1/8).
        query_in_anchor: embed the query tokens in the anchor (APB); ``star`` never does.
        query_prefix_len: document tokens placed before the query in the anchor
            (16 for Llama-3 chat, 24 for Qwen in the reference).
        compressor: how passing tokens are scored: ``"retaining_head"`` (trained scorer
            ``W2 SiLU(W1 [q;k;v])``), ``"query_attention"`` (training-free: attention the
            local keys get from the query rows embedded in the anchor) or ``"random"``.
        retaining_head_hidden: width of the retaining head's hidden layer (1024).
        smoothing_kernel: width of the max-pool applied to scores along the sequence
            (odd; 1 disables it).
        backend: attention kernel: ``"auto"`` or one of ``sdpa``, ``cudnn``, ``flash``,
            ``efficient``, ``flex``, ``math``, ``reference`` (see ``ops.attention``).
        seed: seed of the ``random`` compressor.
        fused_rope: apply the rotary embedding as one kernel on CUDA
            (:func:`megatron_apb.ops.fused.fused_rope`) instead of PyTorch's chain of five
            kernels (on by default; the same math runs eagerly on CPU); non-interleaved,
            whole-head rotary only (otherwise the chain runs).
    """

    mode: str = "apb"
    anchor_len: Optional[int] = None
    passing_len: Optional[int] = None
    anchor_ratio: float = 0.25
    passing_ratio: float = 0.125
    query_in_anchor: bool = True
    query_prefix_len: int = 16
    compressor: str = "query_attention"
    retaining_head_hidden: int = 1024
    smoothing_kernel: int = 5
    backend: str = "auto"
    seed: int = 0
    fused_rope: bool = True

    def __post_init__(self):
        _one_of("mode", self.mode, MODES)
        _one_of("compressor", self.compressor, COMPRESSORS)
        _one_of("backend", self.backend, BACKENDS)
        for name in ("anchor_len", "passing_len"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise APBConfigError(f"{name} must be a non-negative int or None, got {value!r}")
        for name in ("anchor_ratio", "passing_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise APBConfigError(f"{name} must lie in [0, 1], got {value!r}")
        if not isinstance(self.fused_rope, bool):
            raise APBConfigError(f"fused_rope must be True or False, got {self.fused_rope!r}")
        if self.query_prefix_len < 0:
            raise APBConfigError(f"query_prefix_len must be >= 0, got {self.query_prefix_len}")
        if self.smoothing_kernel < 1 or self.smoothing_kernel % 2 == 0:
            raise APBConfigError(
                f"smoothing_kernel must be an odd int >= 1 (1 disables smoothing), "
                f"got {self.smoothing_kernel}"
            )
        if self.retaining_head_hidden < 1:
            raise APBConfigError(
                f"retaining_head_hidden must be >= 1, got {self.retaining_head_hidden}"
            )
        if self.mode == "star" and self.passing_len not in (None, 0):
            raise APBConfigError(
                f"mode='star' passes no blocks, but passing_len={self.passing_len}; "
                "use mode='apb' for passing blocks or leave passing_len unset"
            )
        if self.mode in ("exact", "ulysses") and self.anchor_len not in (None, 0):
            raise APBConfigError(
                f"mode={self.mode!r} is exact and uses no anchor, but anchor_len="
                f"{self.anchor_len}; leave anchor_len unset or use mode='apb'/'star'"
            )

    @property
    def uses_anchor(self) -> bool:
        return self.mode in ("apb", "star")

    def replace(self, **changes) -> "APBConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def layout_for(self, num_tokens: int, cp_size: int, query_len: int = 0) -> "CPLayout":
        """The layout of a ``num_tokens``-token document split over ``cp_size`` ranks.

        Blocks are ``ceil(num_tokens / cp_size)`` tokens; the last one is padded.
        """
        if cp_size < 1:
            raise APBConfigError(f"context-parallel size must be >= 1, got {cp_size}")
        if num_tokens < cp_size:
            raise APBConfigError(
                f"the document has {num_tokens} tokens, fewer than the {cp_size} "
                "context-parallel ranks; use a longer document or fewer ranks"
            )
        return self.layout(-(-num_tokens // cp_size), cp_size=cp_size, query_len=query_len)

    def layout(self, block_len: int, *, cp_size: int, query_len: int = 0) -> "CPLayout":
        """Resolve lengths for blocks of ``block_len`` tokens on ``cp_size`` ranks.

        ``query_len`` is the number of query tokens to embed in the anchor (APB only).
        With one rank every mode is plain causal attention.
        """
        if block_len < 1:
            raise APBConfigError(f"block length must be >= 1, got {block_len}")
        if not self.uses_anchor or cp_size == 1:
            return CPLayout(mode=self.mode, block_len=block_len)
        if self.mode == "star":
            anchor = block_len if self.anchor_len is None else self.anchor_len
            if anchor > block_len:
                raise APBConfigError(
                    f"anchor_len={anchor} is longer than the block ({block_len} tokens); "
                    f"Star Attention's anchor is at most one block: set anchor_len <= {block_len}"
                )
            return CPLayout(mode="star", block_len=block_len, anchor_len=anchor)
        if self.anchor_len is None:
            anchor = min(int(block_len * self.anchor_ratio), block_len - 1)
            if self.query_in_anchor and query_len > 0 and anchor > 0:
                # a derived anchor grows to hold the query after its prefix (up to a block)
                anchor = min(max(anchor, self.query_prefix_len + query_len), block_len - 1)
        else:
            anchor = self.anchor_len
        if anchor >= block_len:
            raise APBConfigError(
                f"anchor_len={anchor} must be smaller than the block length ({block_len} tokens "
                f"= sequence / context-parallel size); leave anchor_len unset for "
                f"{self.anchor_ratio:g} of the block "
                f"({min(int(block_len * self.anchor_ratio), block_len - 1)} tokens). "
                "For an anchor as long as a block use mode='star'."
            )
        passing = (
            int(block_len * self.passing_ratio) if self.passing_len is None else self.passing_len
        )
        passing = min(passing, block_len)
        query_start = query_used = 0
        if self.query_in_anchor and query_len > 0 and anchor > 0:
            query_start = min(self.query_prefix_len, anchor)
            if query_start + query_len > anchor:
                raise APBConfigError(
                    f"the query ({query_len} tokens) does not fit in the anchor after its "
                    f"{query_start}-token prefix: anchor_len={anchor} must be >= "
                    f"{query_start + query_len}; raise anchor_len, lower query_prefix_len or "
                    "shorten the question"
                )
            query_used = query_len
        return CPLayout(
            mode="apb",
            block_len=block_len,
            anchor_len=anchor,
            passing_len=passing,
            query_start=query_start,
            query_len=query_used,
            # the query-attention scorer needs the query rows on rank 0 as well
            first_rank_anchor=self.compressor == "query_attention" and passing > 0 and anchor > 0,
        )


@dataclass(frozen=True)
class CPLayout:
    """Resolved per-prompt layout shared by all context-parallel ranks.

    Rank r holds the contiguous block ``[r*block_len, (r+1)*block_len)`` of the document.
    Ranks >= 1 prepend ``anchor_len`` anchor rows (positions 0..anchor_len-1); rank 0 has
    none, unless ``first_rank_anchor``: then it holds the anchor too, only so that the
    query-attention compressor can score its block (its local rows do not attend to it).
    The query tokens sit at anchor rows ``[query_start, query_start+query_len)``.
    """

    mode: str
    block_len: int
    anchor_len: int = 0
    passing_len: int = 0
    query_start: int = 0
    query_len: int = 0
    first_rank_anchor: bool = False

    def anchor_len_on(self, rank: int) -> int:
        """Anchor rows held by ``rank``."""
        return self.anchor_len if rank > 0 or self.first_rank_anchor else 0

    def anchor_visible_on(self, rank: int) -> bool:
        """Whether ``rank``'s local rows attend to its anchor (every rank but the first)."""
        return rank > 0

    def local_len(self, rank: int) -> int:
        """Rows held by ``rank``: its anchor, then its block."""
        return self.anchor_len_on(rank) + self.block_len

    def block_start(self, rank: int) -> int:
        return rank * self.block_len


def _one_of(name, value, allowed):
    if value not in allowed:
        raise APBConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
