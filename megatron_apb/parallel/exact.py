"""Exact context parallelism by all-gathering every rank's K/V ("all-gather CP").

Rank r attends causally to its own block and, unmasked, to the blocks of ranks < r,
gathered while it computes its own part; the two are merged by log-sum-exp.  The blocks
may differ in length (a balanced partition gives the earlier ranks more).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..comm import all_gather_async, group_rank, group_size
from ..config import CPLayout
from ..ops.attention import attention_with_lse
from ..ops.blocked import causal_attention_by_rows, needs_row_blocks, rows_per_block
from ..ops.merge import merge_attention
from .algorithm import CPAlgorithm, register_algorithm

Tensor = torch.Tensor


def exact_context_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group,
    layout: Optional[CPLayout] = None,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
    local_only: bool = False,
    **unused,
) -> Tensor:
    """Exact attention for contiguous blocks; q, k, v [batch, block, heads, head_dim].

    Blocks of unequal lengths (``layout.block_lens``, a balanced partition) travel padded
    to the longest and are cut back to each rank's length after the gather."""
    rank = group_rank(group)
    kw = dict(softmax_scale=softmax_scale, backend=backend)

    def own_block():
        if needs_row_blocks(q):  # e.g. a million-token block: kernels see blocks of rows
            return causal_attention_by_rows(q, k, v, rows=rows_per_block(q), **kw)
        return attention_with_lse(q, k, v, causal=True, **kw)

    if group_size(group) == 1:  # nothing to gather (and no K|V copy for it)
        return own_block()[0]
    kv = torch.cat([k, v], dim=-1)
    unequal = layout is not None and not layout.equal
    if unequal and kv.shape[1] < layout.block_len:
        kv = torch.cat([kv, kv.new_zeros((kv.shape[0], layout.block_len - kv.shape[1]) + tuple(kv.shape[2:]))], dim=1)
    pending = all_gather_async(kv, group, local_only=local_only)
    own = own_block()
    gathered = pending.wait()  # [world, batch, block, kv_heads, 2*head_dim]
    if rank == 0:
        return own[0]
    if unequal:
        earlier = torch.cat([gathered[r, :, : layout.block_len_on(r)] for r in range(rank)], dim=1)
    else:
        earlier = gathered[:rank].permute(1, 0, 2, 3, 4).flatten(1, 2)
    pk, pv = earlier.chunk(2, dim=-1)
    ctx = attention_with_lse(q, pk, pv, causal=False, **kw)
    return merge_attention([own[0], ctx[0]], [own[1], ctx[1]])[0]


register_algorithm(CPAlgorithm(
    name="exact", attention=exact_context_attention, exact=True,
    description="all-gather context parallelism (exact)",
))
