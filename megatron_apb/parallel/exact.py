"""Exact causal attention over a context-parallel group by all-gathering K and V.

Rank r holds the contiguous block r of the sequence.  It gathers every block's K and V,
attends its queries to blocks 0..r-1 without a mask and to its own block causally, and
merges the two by LSE.  The gather runs while the own-block part computes.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..comm import all_gather_async, group_rank
from ..ops.attention import attention_with_lse
from ..ops.merge import merge_attention

Tensor = torch.Tensor


def exact_context_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Exact attention for contiguous blocks; q, k, v [batch, block, heads, head_dim]."""
    rank = group_rank(group)
    kw = dict(softmax_scale=softmax_scale, backend=backend)
    pending = all_gather_async(torch.cat([k, v], dim=-1), group)
    own = attention_with_lse(q, k, v, causal=True, **kw)
    gathered = pending.wait()  # [world, batch, block, kv_heads, 2*head_dim]
    if rank == 0:
        return own[0]
    earlier = gathered[:rank].permute(1, 0, 2, 3, 4).flatten(1, 2)
    pk, pv = earlier.chunk(2, dim=-1)
    ctx = attention_with_lse(q, pk, pv, causal=False, **kw)
    return merge_attention([own[0], ctx[0]], [own[1], ctx[1]])[0]
