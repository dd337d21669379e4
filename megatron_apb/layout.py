"""Turning a tokenized prompt into per-rank inputs: blocks, anchor, positions.

A request is ``document ‖ query``.  The document is split into ``cp_size`` contiguous
blocks (equal ones, the last padded; or per-rank lengths under a balanced partition,
``APBConfig.partition``); rank r >= 1 gets ``[anchor; block_r]`` where, for APB, the
anchor is ``doc[:s] ‖ query ‖ doc[s : anchor_len - |query|]`` (the query embedded after an
``s``-token prefix) and, for Star Attention, the first ``anchor_len`` document tokens.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from .config import APBConfig, APBConfigError, CPLayout


def build_anchor(doc: torch.Tensor, query: torch.Tensor, layout: CPLayout) -> torch.Tensor:
    """The anchor tokens of ``layout`` for document ``doc`` and query ``query`` (1-D ids)."""
    la = layout.anchor_len
    if layout.query_len == 0:
        return _take(doc, la)
    qs, ql = layout.query_start, layout.query_len
    if query.numel() != ql:
        raise APBConfigError(f"the layout expects a {ql}-token query, got {query.numel()} tokens")
    return torch.cat([doc[:qs], query, _take(doc[qs:], la - qs - ql)])


def _take(tokens, n):
    """The first n tokens, repeated cyclically if the document is shorter than n."""
    if tokens.numel() >= n:
        return tokens[:n]
    if tokens.numel() == 0:
        raise APBConfigError("the document is empty")
    return tokens.repeat(-(-n // tokens.numel()))[:n]


def plan_layout(doc_len: int, query_len: int, config: APBConfig, cp_size: int, *, cost=None) -> CPLayout:
    """The layout :func:`shard_document` gives a ``doc_len``-token document and a
    ``query_len``-token query, from their lengths alone: a command checks its prompts with
    it before the model loads.  A document too short (or empty) is refused with the length
    that works (:meth:`APBConfig.layout_for`; ``cost``: the
    :class:`~megatron_apb.partition.CostModel` a balanced partition follows)."""
    return config.layout_for(doc_len, cp_size, query_len=query_len, cost=cost)


def shard_document(
    doc: Sequence[int] | torch.Tensor,
    query: Sequence[int] | torch.Tensor,
    config: APBConfig,
    cp_size: int,
    *,
    pad_id: int = 0,
    cost=None,
):
    """Per-rank token ids and the shared layout.

    Args:
        doc, query: 1-D token ids of the document and of the query.
        config: the APB settings; cp_size: number of context-parallel ranks.
        pad_id: id used to pad the last block.
        cost: the :class:`~megatron_apb.partition.CostModel` a balanced partition follows
            (None: its default).
    Returns:
        (tokens, layout): ``tokens[r]`` is rank r's 1-D ids ``[anchor; block_r]``, and
        ``layout.padded_len(cp_size) - len(doc)`` pad tokens end the last block.
    """
    doc = torch.as_tensor(doc, dtype=torch.long).flatten()
    query = torch.as_tensor(query, dtype=torch.long).flatten()
    layout = plan_layout(doc.numel(), query.numel(), config, cp_size, cost=cost)
    return split_document(doc, query, layout, cp_size, pad_id=pad_id), layout


def split_document(doc, query, layout: CPLayout, cp_size: int, *, pad_id: int = 0) -> List[torch.Tensor]:
    """Per-rank 1-D token ids ``[anchor; block_r]`` of ``doc`` and ``query`` under a given
    ``layout`` (:func:`shard_document` plans the layout first)."""
    doc = torch.as_tensor(doc, dtype=torch.long).flatten()
    query = torch.as_tensor(query, dtype=torch.long).flatten()
    layout.check_ranks(cp_size)
    if layout.padded_len(cp_size) < doc.numel():
        raise APBConfigError(f"the layout's blocks hold {layout.padded_len(cp_size)} tokens, fewer than the "
                             f"document's {doc.numel()}; lay the document out with shard_document")
    padded = torch.full((layout.padded_len(cp_size),), pad_id, dtype=torch.long)
    padded[: doc.numel()] = doc
    anchor = build_anchor(doc, query, layout) if layout.anchor_len else doc[:0]
    tokens: List[torch.Tensor] = []
    for r in range(cp_size):
        start = layout.block_start(r)
        block = padded[start : start + layout.block_len_on(r)]
        tokens.append(torch.cat([anchor[: layout.anchor_len_on(r)], block]))
    return tokens
