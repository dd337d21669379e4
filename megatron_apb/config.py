"""APB configuration: one validated, keyword-only dataclass.

`APBConfig` holds the settings a user chooses once (mode, anchor and passing sizes,
compressor, backend).  `APBConfig.layout(...)` turns them into a `CPLayout` for a
concrete prompt (block length, resolved anchor/passing lengths, where the query sits in
the anchor), which is what the attention modules consume on every forward.

Every field carries its help text in ``dataclasses.field(metadata=...)``: the command-line
flags, the DeepSpeed ``"apb"`` keys and the Megatron-LM ``--apb-*`` flags and ``APB_*``
variables are all generated from :func:`dataclasses.fields` (see
:mod:`megatron_apb.configargs`), so a new field appears in every front-end at once.
``mode`` and ``compressor`` are checked against the registries
(:data:`megatron_apb.registry.ALGORITHMS`, :data:`~megatron_apb.registry.COMPRESSORS`).

The module is above 400 lines because every field's validation stays next to the field
(one place to read what a setting accepts), and the settings, the rules that resolve them
into a layout (with the advice given when a document cannot be laid out) and the layout
with its per-rank helpers are read together; the partition arithmetic lives in
:mod:`megatron_apb.partition`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .errors import APBConfigError
from .partition import balanced_blocks
from .registry import ALGORITHMS, COMPRESSORS, SPARSE_METHODS

#: attention kernels of :func:`megatron_apb.ops.attention.attention_with_lse`
BACKENDS = ("auto", "sdpa", "cudnn", "flash", "efficient", "flex", "math", "reference")
#: patterns of :mod:`megatron_apb.ops.sparse` (``APBConfig.sparse_pattern``)
SPARSE_PATTERNS = ("block_sparse", "vertical_slash", "a_shape")
#: how a document is split over the context-parallel ranks (``APBConfig.partition``)
PARTITIONS = ("equal", "balanced")
#: KV-cache compression after the prefill (``kv_compress``) and its score pooling
KV_COMPRESSORS = ("none", "snapkv")
KV_POOLS = ("avg", "max")
#: tokens SnapKV keeps when neither kv_budget nor kv_budget_ratio is given
DEFAULT_KV_BUDGET = 4096
#: the dtype names every command accepts
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: Optional[str], *, default: Optional[torch.dtype] = None) -> Optional[torch.dtype]:
    """``"fp32" | "bf16" | "fp16"`` -> the torch dtype (``None`` -> ``default``)."""
    if name is None:
        return default
    if name not in DTYPES:
        raise APBConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _option(default, help: str, **extra):
    """A config field with its help text (and, for names, where its choices come from)."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


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
        sparse: local sparse attention for the causal attention calls (one GPU's prefill,
            and the anchor and own block of every APB/Star rank): ``"none"`` or
            ``"minference"`` (dynamic sparse attention, :mod:`megatron_apb.ops.sparse`;
            approximate).  Decoding stays dense.  ``None`` (default): ``"minference"``
            when a ``sparse_config`` is given, else ``"none"`` (:attr:`sparse_method`).
        sparse_pattern: the pattern of every head when no ``sparse_config`` is given:
            ``block_sparse``, ``vertical_slash`` or ``a_shape``.
        sparse_budget: about how many keys each query row reads with that pattern.
        sparse_dense_below: attention calls with fewer keys than this stay dense.
        sparse_config: a per-layer, per-head pattern file (JSON, written by
            ``megatron-apb sparse-search``; ``"embedded"``: the shipped one of the embedded
            model); overrides ``sparse_pattern``/``sparse_budget``.
        partition: how the document is split over the ranks: ``"equal"`` (the
            reference's ``ceil(tokens / ranks)`` blocks, the last one padded) or
            ``"balanced"`` (per-rank blocks chosen so that every rank's predicted prefill
            time is the same, :mod:`megatron_apb.partition`; the anchor and passing lengths
            stay those of the equal blocks).  Modes whose algorithm needs equal blocks
            (``ulysses``) always split equally.
        kv_compress: ``"snapkv"``: at the end of the prefill every layer's cache keeps, per
            KV head, the tokens the document's last ``kv_window`` queries attend to most,
            plus the window itself (:mod:`megatron_apb.ops.snapkv`); ``"none"``: all.
            ``None`` (default): snapkv when a budget is given, else none.
        kv_budget, kv_budget_ratio: tokens kept per sequence (the window included), or the
            document's fraction kept (at least the window); at most one (neither:
            ``DEFAULT_KV_BUDGET`` tokens).
        kv_window: the observation window (positions at the document's end).
        kv_pool, kv_pool_kernel: the 1-D pooling of the scores (``avg`` or ``max``, odd
            width; 1 disables it).
        prefill_chunk: rows per chunk of the projections and the MLP in a prefill longer
            than it, so their activations stay bounded (0: never chunk).
    """

    mode: str = _option(
        "apb", "context-parallel attention: apb, star, exact or ulysses", choices=ALGORITHMS)
    anchor_len: Optional[int] = _option(None, "anchor tokens (default: anchor_ratio of the block)")
    passing_len: Optional[int] = _option(
        None, "passing tokens per rank and KV head (default: passing_ratio of the block)")
    anchor_ratio: float = _option(0.25, "the default anchor's fraction of the block")
    passing_ratio: float = _option(0.125, "the default passing length's fraction of the block")
    query_in_anchor: bool = _option(True, "embed the query tokens in the anchor (apb)")
    query_prefix_len: int = _option(16, "document tokens placed before the query in the anchor")
    compressor: str = _option(
        "query_attention", "how passing tokens are scored", choices=COMPRESSORS)
    retaining_head_hidden: int = _option(1024, "width of the retaining head's hidden layer")
    smoothing_kernel: int = _option(5, "max-pool width over the scores (odd; 1 disables it)")
    backend: str = _option("auto", "attention kernel", choices=BACKENDS)
    seed: int = _option(0, "seed of the random compressor and of fresh retaining heads")
    fused_rope: bool = _option(True, "rotary embedding as one kernel on CUDA")
    sparse: Optional[str] = _option(
        None, "local sparse attention of the prefill: none or minference (default: minference when a "
        "sparse_config is given, else none)", choices=SPARSE_METHODS)
    sparse_pattern: str = _option(
        "block_sparse", "sparse pattern without a pattern file: block_sparse, vertical_slash or a_shape",
        choices=SPARSE_PATTERNS)
    sparse_budget: int = _option(4096, "keys each query row reads, about (sparse_pattern)")
    sparse_dense_below: int = _option(32768, "attention calls with fewer keys stay dense")
    sparse_config: Optional[str] = _option(None, "per-layer, per-head sparse pattern file (JSON path, or 'embedded')")
    partition: str = _option(
        "equal", "split of the document over the ranks: equal blocks or balanced per-rank work",
        choices=PARTITIONS)
    kv_compress: Optional[str] = _option(
        None, "KV-cache compression after the prefill: snapkv or none (default: snapkv when a kv budget is set)",
        choices=KV_COMPRESSORS)
    kv_budget: Optional[int] = _option(None, "tokens the compressed cache keeps per sequence")
    kv_budget_ratio: Optional[float] = _option(None, "the document's fraction the compressed cache keeps")
    kv_window: int = _option(32, "SnapKV observation window (last document positions)")
    kv_pool: str = _option("avg", "pooling of the SnapKV scores: avg or max", choices=KV_POOLS)
    kv_pool_kernel: int = _option(7, "width of the SnapKV score pooling (odd; 1 disables it)")
    prefill_chunk: int = _option(32768, "rows per chunk of the projections and MLP in long prefills (0: off)")

    def __post_init__(self):
        ALGORITHMS.get(self.mode)
        COMPRESSORS.get(self.compressor)
        _one_of("backend", self.backend, BACKENDS)
        _one_of("partition", self.partition, PARTITIONS)
        for name in ("query_in_anchor", "fused_rope"):
            if not isinstance(getattr(self, name), bool):
                raise APBConfigError(f"{name} must be True or False, got {getattr(self, name)!r}", field=name)
        for name in ("query_prefix_len", "smoothing_kernel", "retaining_head_hidden", "seed",
                     "sparse_budget", "sparse_dense_below"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise APBConfigError(f"{name} must be an int, got {value!r}", field=name)
        for name in ("anchor_len", "passing_len"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise APBConfigError(f"{name} must be a non-negative int or None, got {value!r}", field=name)
        for name in ("anchor_ratio", "passing_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise APBConfigError(f"{name} must lie in [0, 1], got {value!r}", field=name)
        _one_of("sparse_pattern", self.sparse_pattern, SPARSE_PATTERNS)
        for name, low in (("sparse_budget", 1), ("sparse_dense_below", 0)):
            if getattr(self, name) < low:
                raise APBConfigError(f"{name} must be >= {low}, got {getattr(self, name)}", field=name)
        SPARSE_METHODS.get(self.sparse_method).check(self)
        if self.query_prefix_len < 0:
            raise APBConfigError(f"query_prefix_len must be >= 0, got {self.query_prefix_len}", field="query_prefix_len")
        if self.smoothing_kernel < 1 or self.smoothing_kernel % 2 == 0:
            raise APBConfigError(
                f"smoothing_kernel must be an odd int >= 1 (1 disables smoothing), "
                f"got {self.smoothing_kernel}", field="smoothing_kernel"
            )
        if self.retaining_head_hidden < 1:
            raise APBConfigError(
                f"retaining_head_hidden must be >= 1, got {self.retaining_head_hidden}",
                field="retaining_head_hidden",
            )
        self._check_kv_compression()
        algorithm = self.algorithm
        if algorithm.uses_anchor and not algorithm.passes_blocks and self.passing_len not in (None, 0):
            raise APBConfigError(
                f"mode={self.mode!r} passes no blocks, but passing_len={self.passing_len}; "
                "use mode='apb' for passing blocks or leave passing_len unset",
                field="passing_len",
            )
        if not algorithm.uses_anchor and self.anchor_len not in (None, 0):
            raise APBConfigError(
                f"mode={self.mode!r} is exact and uses no anchor, but anchor_len="
                f"{self.anchor_len}; leave anchor_len unset or use mode='apb'/'star'",
                field="anchor_len",
            )

    def _check_kv_compression(self):
        if self.kv_compress is not None:
            _one_of("kv_compress", self.kv_compress, KV_COMPRESSORS)
        _one_of("kv_pool", self.kv_pool, KV_POOLS)
        for name in ("kv_window", "kv_pool_kernel", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise APBConfigError(f"{name} must be a non-negative int, got {value!r}", field=name)
        if self.kv_pool_kernel < 1 or self.kv_pool_kernel % 2 == 0:
            raise APBConfigError(f"kv_pool_kernel must be an odd int >= 1 (1 disables pooling), "
                                 f"got {self.kv_pool_kernel}", field="kv_pool_kernel")
        budget, ratio = self.kv_budget, self.kv_budget_ratio
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
            raise APBConfigError(f"kv_budget must be a positive int (tokens kept), got {budget!r}", field="kv_budget")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0.0 < ratio <= 1.0):
            raise APBConfigError(f"kv_budget_ratio must lie in (0, 1], got {ratio!r}", field="kv_budget_ratio")
        if self.kv_compress == "none":
            if budget is not None or ratio is not None:
                name = "kv_budget" if budget is not None else "kv_budget_ratio"
                raise APBConfigError(f"{name} is set but kv_compress='none': set kv_compress='snapkv' "
                                     f"or leave {name} unset", field="kv_compress")
            return
        if budget is not None and ratio is not None:
            raise APBConfigError("give one of kv_budget (tokens) and kv_budget_ratio (fraction of the "
                                 "document), not both", field="kv_budget")
        if not self.compresses_kv:
            return
        if self.kv_window < 1:
            raise APBConfigError(f"kv_window must be >= 1, got {self.kv_window}", field="kv_window")
        budget = DEFAULT_KV_BUDGET if budget is None and ratio is None else budget
        if budget is not None and budget < self.kv_window:
            raise APBConfigError(f"kv_budget ({budget}) must be >= kv_window ({self.kv_window}): the "
                                 "window is always kept; raise kv_budget or lower kv_window", field="kv_budget")

    @property
    def sparse_method(self) -> str:
        """The local sparse attention method in effect (``sparse``, resolved)."""
        if self.sparse is None:
            return "minference" if self.sparse_config is not None else "none"
        return self.sparse

    @property
    def compresses_kv(self) -> bool:
        """Whether the prefill compresses the KV cache (SnapKV)."""
        if self.kv_compress is None:
            return self.kv_budget is not None or self.kv_budget_ratio is not None
        return self.kv_compress == "snapkv"

    def kv_budget_for(self, doc_len: int) -> int:
        """Tokens the compressed cache keeps of a ``doc_len``-token document (at most all)."""
        if self.kv_budget is not None or self.kv_budget_ratio is None:
            return min(self.kv_budget or DEFAULT_KV_BUDGET, doc_len)
        return min(doc_len, max(self.kv_window, math.ceil(self.kv_budget_ratio * doc_len)))

    @property
    def algorithm(self):
        """The registered distributed algorithm of ``mode`` (its traits and attention)."""
        return ALGORITHMS.get(self.mode)

    def local_backend(self, layer_number: int, heads: int, num_layers: Optional[int] = None,
                      stats: Optional[list] = None):
        """The ``backend`` argument of layer ``layer_number``'s prefill attention calls
        (``heads`` query heads on this rank): ``backend`` itself, or with ``sparse`` the
        sparse method's callable (see :mod:`megatron_apb.ops.sparse.backend`), recording
        what each call computed into ``stats`` when given."""
        return SPARSE_METHODS.get(self.sparse_method).backend(self, layer_number, heads, num_layers, stats=stats)

    @property
    def compressor_entry(self):
        """The registered compressor of ``compressor``."""
        return COMPRESSORS.get(self.compressor)

    @property
    def uses_anchor(self) -> bool:
        """Whether ranks >= 1 prepend an anchor (apb, star)."""
        return self.algorithm.uses_anchor

    @property
    def passes_blocks(self) -> bool:
        """Whether ranks score their block and pass the top tokens on (apb)."""
        return self.algorithm.passes_blocks

    @property
    def needs_retaining_heads(self) -> bool:
        """Whether a forward needs trained retaining heads in the model: the one place
        that says "APB with the retaining-head compressor"."""
        return self.passes_blocks and self.compressor_entry.needs_retaining_heads

    def replace(self, **changes) -> "APBConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def layout_for(self, num_tokens: int, cp_size: int, query_len: int = 0, *, cost=None) -> "CPLayout":
        """The layout of a ``num_tokens``-token document split over ``cp_size`` ranks.

        Equal partition: blocks are ``ceil(num_tokens / cp_size)`` tokens; the last one is
        padded.  Balanced partition: the anchor and passing lengths of the equal layout,
        and per-rank blocks (summing to ``num_tokens``, no padding) that equalise the
        per-rank times predicted by ``cost`` (a :class:`megatron_apb.partition.CostModel`;
        None: :meth:`~megatron_apb.partition.CostModel.default`).  A document
        that these settings cannot lay out is refused with what works instead, each found by
        the rules that refused it (:meth:`layout`): the shortest document for ``cp_size``
        ranks, and where they help, fewer ranks or another ``anchor_len``.
        """
        if cp_size < 1:
            raise APBConfigError(f"context-parallel size must be >= 1, got {cp_size}")
        block = -(-num_tokens // cp_size)
        field = None
        if num_tokens <= 0:
            reason = "the document is empty (0 tokens)"
        elif num_tokens < cp_size:
            reason = f"the document has {num_tokens} tokens, fewer than the {cp_size} context-parallel ranks"
        else:
            try:
                equal = self.layout(block, cp_size=cp_size, query_len=query_len)
            except APBConfigError:
                pass
            else:
                return self._partitioned(equal, num_tokens, cp_size, cost)
            reason = f"a {num_tokens}-token document on {cp_size} context-parallel ranks makes blocks of {block} tokens"
            need = self.query_prefix_len + query_len
            if not self.passes_blocks:
                reason, field = f"{reason}, shorter than Star Attention's anchor_len={self.anchor_len}", "anchor_len"
            elif self.anchor_len is not None and self.anchor_len >= block:
                reason, field = f"{reason}; anchor_len={self.anchor_len} must be shorter than a block", "anchor_len"
            else:
                anchor = (f"anchor_len={self.anchor_len}" if self.anchor_len is not None
                          else f"the anchor (at most a block minus one token: {block - 1})")
                reason = (f"{reason}, and {anchor} cannot hold the {self.query_prefix_len}-token query prefix "
                          f"and the {query_len}-token query ({need} tokens)")

        def accepts(config, block_len, ranks):
            try:
                config.layout(block_len, cp_size=ranks, query_len=query_len)
            except APBConfigError:
                return False
            return True

        def shortest_block(config, start):
            # past a block these rules refuse, they accept every block from some length on
            if accepts(config, start, cp_size):
                return start
            lo, hi = start, 2 * start
            while not accepts(config, hi, cp_size):
                if hi > 1 << 40:
                    return None
                lo, hi = hi, 2 * hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if accepts(config, mid, cp_size) else (mid, hi)
            return hi

        def tokens_for(block_len):  # the fewest document tokens that make such blocks
            return max(cp_size, cp_size * (block_len - 1) + 1)

        start = block + 1 if num_tokens >= cp_size else 1
        advice, shortest = [], None
        best = shortest_block(self, start)
        if best is not None:
            shortest = tokens_for(best)
            lay = self.layout(best, cp_size=cp_size, query_len=query_len)
            holds = (f", with the anchor holding the {lay.query_start}-token prefix and the {lay.query_len}-token "
                     f"query: {lay.query_start + lay.query_len} tokens" if lay.query_len else "")
            advice.append(f"use a document of at least {shortest} tokens for {cp_size} ranks "
                          f"(blocks of {best} token{'s' if best > 1 else ''}{holds})")
        if num_tokens >= cp_size and self.uses_anchor:
            others = []
            if self.anchor_len is not None:
                others.append(("leave anchor_len unset", dict(anchor_len=None)))
            if not self.passes_blocks:
                others.append((f"anchor_len={block}", dict(anchor_len=block)))
            elif self.query_in_anchor and query_len > 0 and self.anchor_len != need:
                others.append((f"anchor_len={need}", dict(anchor_len=need)))
            for text, change in others:
                try:
                    other = self.replace(**change)
                except APBConfigError:
                    continue
                if accepts(other, block, cp_size):
                    advice.append(text)
                else:
                    b = shortest_block(other, start)
                    if b is not None and (shortest is None or tokens_for(b) < shortest):
                        advice.append(f"{text} with a document of at least {tokens_for(b)} tokens")
        for ranks in range(min(cp_size - 1, num_tokens), 0, -1):
            if accepts(self, -(-num_tokens // ranks), ranks):
                advice.append(f"{ranks} rank{'s' if ranks > 1 else ''}")
                break
        raise APBConfigError(f"{reason}: {'; or '.join(advice)}", field=field)

    def _partitioned(self, equal: "CPLayout", num_tokens: int, cp_size: int, cost) -> "CPLayout":
        """``equal``, or under ``partition="balanced"`` its balanced counterpart."""
        if self.partition == "equal" or cp_size == 1 or self.algorithm.equal_blocks:
            return equal
        return equal.with_blocks(balanced_blocks(equal, num_tokens, cp_size, cost))

    def layout(self, block_len: int, *, cp_size: int, query_len: int = 0) -> "CPLayout":
        """Resolve lengths for blocks of ``block_len`` tokens on ``cp_size`` ranks.

        ``query_len`` is the number of query tokens to embed in the anchor (APB only).
        With one rank every mode is plain causal attention.
        """
        if block_len < 1:
            raise APBConfigError(f"block length must be >= 1, got {block_len}")
        if not self.uses_anchor or cp_size == 1:
            return CPLayout(mode=self.mode, block_len=block_len)
        if not self.passes_blocks:  # star: an anchor of up to a block, nothing passed
            anchor = block_len if self.anchor_len is None else self.anchor_len
            if anchor > block_len:
                raise APBConfigError(
                    f"anchor_len={anchor} is longer than the block ({block_len} tokens); "
                    f"Star Attention's anchor is at most one block: set anchor_len <= {block_len}"
                )
            return CPLayout(mode=self.mode, block_len=block_len, anchor_len=anchor)
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
            mode=self.mode,
            block_len=block_len,
            anchor_len=anchor,
            passing_len=passing,
            query_start=query_start,
            query_len=query_used,
            # a scorer that reads the query rows needs them on rank 0 as well
            first_rank_anchor=self.compressor_entry.needs_query_rows and passing > 0 and anchor > 0,
        )


@dataclass(frozen=True)
class CPLayout:
    """Resolved per-prompt layout shared by all context-parallel ranks.

    Rank r holds the contiguous block ``[block_start(r), block_start(r) + block_len_on(r))``
    of the document: every block ``block_len`` tokens (equal partition, ``block_lens``
    empty), or ``block_lens[r]`` tokens (a balanced partition; ``block_len`` is then the
    longest).  Ranks >= 1 prepend ``anchor_len`` anchor rows (positions 0..anchor_len-1);
    rank 0 has none, unless ``first_rank_anchor``: then it holds the anchor too, only so
    that the query-attention compressor can score its block (its local rows do not attend
    to it).  The query tokens sit at anchor rows ``[query_start, query_start+query_len)``.
    Use :meth:`block_len_on` and :meth:`block_start`, never ``block_len`` alone, for a
    rank's block.
    """

    mode: str
    block_len: int
    anchor_len: int = 0
    passing_len: int = 0
    query_start: int = 0
    query_len: int = 0
    first_rank_anchor: bool = False
    block_lens: Tuple[int, ...] = ()

    def __post_init__(self):
        if not self.block_lens:
            return
        lens = self.block_lens
        if not isinstance(lens, tuple) or any(isinstance(n, bool) or not isinstance(n, int) for n in lens):
            raise APBConfigError(f"block_lens must be a tuple of ints, got {lens!r}", field="block_lens")
        short = [r for r, n in enumerate(lens) if n < 1]
        if short:
            raise APBConfigError(
                f"block_lens={lens}: the block of rank {short[0]} is empty; every rank needs at least one "
                "document token: give fewer ranks or a longer document", field="block_lens")
        if self.block_len != max(lens):
            raise APBConfigError(
                f"block_len={self.block_len} must be the longest of block_lens={lens} ({max(lens)}); "
                "build the layout with CPLayout.with_blocks", field="block_len")
        if self.passing_len > 0:
            # every rank but the last passes exactly passing_len rows of its block
            short = [r for r, n in enumerate(lens[:-1]) if n < self.passing_len]
            if short:
                r = short[0]
                raise APBConfigError(
                    f"block_lens={lens}: rank {r}'s block ({lens[r]} tokens) is shorter than "
                    f"passing_len={self.passing_len}, which every rank but the last passes on; "
                    f"give rank {r} at least {self.passing_len} tokens or lower passing_len",
                    field="block_lens")

    @property
    def equal(self) -> bool:
        """Whether every rank holds ``block_len`` tokens (the reference's partition)."""
        return not self.block_lens

    def with_blocks(self, block_lens) -> "CPLayout":
        """This layout with per-rank blocks ``block_lens`` (validated)."""
        lens = tuple(int(n) for n in block_lens)
        if not lens:
            raise APBConfigError("block_lens must name one block per rank, got none", field="block_lens")
        return dataclasses.replace(self, block_len=max(lens), block_lens=lens)

    def check_ranks(self, cp_size: int) -> None:
        """Refuse a layout of per-rank blocks made for another number of ranks."""
        if self.block_lens and len(self.block_lens) != cp_size:
            raise APBConfigError(
                f"the layout has {len(self.block_lens)} blocks (block_lens={self.block_lens}) but the "
                f"context-parallel group has {cp_size} ranks; lay the document out for {cp_size} ranks",
                field="block_lens")

    def block_len_on(self, rank: int) -> int:
        """Document rows (padding included) of ``rank``'s block."""
        return self.block_lens[rank] if self.block_lens else self.block_len

    def block_start(self, rank: int) -> int:
        """Position of the first token of ``rank``'s block in the document."""
        return sum(self.block_lens[:rank]) if self.block_lens else rank * self.block_len

    def padded_len(self, cp_size: int) -> int:
        """Document rows over ``cp_size`` ranks, padding included."""
        return self.block_start(cp_size)

    def anchor_len_on(self, rank: int) -> int:
        """Anchor rows held by ``rank``."""
        return self.anchor_len if rank > 0 or self.first_rank_anchor else 0

    def anchor_visible_on(self, rank: int) -> bool:
        """Whether ``rank``'s local rows attend to its anchor (every rank but the first)."""
        return rank > 0

    def local_len(self, rank: int) -> int:
        """Rows held by ``rank``: its anchor, then its block."""
        return self.anchor_len_on(rank) + self.block_len_on(rank)


def _one_of(name, value, allowed):
    if value not in allowed:
        raise APBConfigError(
            f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}", field=name
        )
