"""SnapKV over context-parallel ranks: each rank compresses its own block's K/V.

The observation window (the document's last ``window`` positions) lives on the last rank
(or the last few, when blocks are shorter than the window).  Per layer:

1. every rank puts the window queries it holds into a zero buffer and the buffers are
   summed (``all_reduce``): every rank then has the whole window's post-RoPE queries;
2. each rank computes the window's LSE over its own keys; the LSEs are all-gathered and
   merged (``logsumexp``): the softmax of the window is over the whole document, as on
   one GPU;
3. each rank scores its own keys (:func:`~megatron_apb.ops.snapkv.window_mass`), pools
   the scores within its block, and keeps its share ``plan.kept[rank]`` of the budget
   (proportional to its rows before the window), plus the window rows it holds.

With one rank this is exactly SnapKV on the whole sequence (``ops.snapkv.snapkv_rows``).
Across ranks the scores are the same, but each block keeps its own top share (a global
top-k would give the ranks, and the heads, different counts), and the pooling does not
look across block edges.  The kept K are the post-RoPE keys: they keep their rotation
(their original positions), and decoding continues at the true positions.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..comm import all_gather_async, all_reduce, group_rank
from ..ops.snapkv import SnapKVPlan, gather_tokens, pool_scores, select_tokens, window_lse, window_mass

Tensor = torch.Tensor


def window_queries(q: Tensor, plan: SnapKVPlan, rank: int, group) -> Tensor:
    """The whole window's queries [b, window, heads, d] on every rank, from the rows each
    rank holds of it (q: this rank's block rows [b, block, heads, d])."""
    start = plan.start(rank)
    lo, hi = max(plan.window_start, start), min(plan.doc_len, start + plan.valid(rank))
    buf = q.new_zeros((q.shape[0], plan.window) + tuple(q.shape[2:]), dtype=torch.float32)
    if hi > lo:
        buf[:, lo - plan.window_start : hi - plan.window_start] = q[:, lo - start : hi - start]
    return all_reduce(buf, group)


def compress_block_kv(q: Tensor, k: Tensor, v: Tensor, plan: SnapKVPlan, *, group,
                      softmax_scale: float) -> Tuple[Tensor, Tensor]:
    """This rank's block K/V reduced to the ``plan.kept[rank]`` rows SnapKV keeps.

    q, k, v: the block rows [b, block, heads | kv_heads, d] (post-RoPE, padding included).
    Returns K, V [b, kept, kv_heads, d], each head its own rows in position order.
    Collective over ``group`` (every rank calls it, at every layer)."""
    rank = group_rank(group)
    valid, start = plan.valid(rank), plan.start(rank)
    k, v = k[:, :valid], v[:, :valid]
    q_win = window_queries(q, plan, rank, group)
    kw = dict(key_start=start, query_start=plan.window_start, softmax_scale=softmax_scale, chunk=plan.chunk)
    lse = window_lse(q_win, k, **kw)  # [b, heads, W] over this block
    lse = torch.logsumexp(all_gather_async(lse, group).wait(), dim=0)  # over the document
    prefix = max(0, min(valid, plan.window_start - start))  # rows before the window
    scores = window_mass(q_win, k[:, :prefix], lse, **kw)
    rows = select_tokens(pool_scores(scores, plan.kernel, plan.pool), plan.kept[rank], valid - prefix)
    return gather_tokens(k, rows), gather_tokens(v, rows)
