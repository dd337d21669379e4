"""APB (and Star Attention) prefill attention across a context-parallel group.

Host ``r`` holds ``[A; B_r]`` (no anchor on host 0).  Per layer:

1. score its local rows and keep the top ``passing_len`` per KV head (post-RoPE K, V);
2. start the all-gather of that compressed block over the group;
3. while it travels, attend anchor-vs-anchor (causal), local-vs-anchor and local-vs-own
   block (causal);
4. wait, attend local rows to the passing block ``P_r = C_0 .. C_{r-1}``, merge by LSE.

Star Attention is the same with ``passing_len = 0`` (no communication at all).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..comm import all_gather_async, group_rank, group_size
from ..compress import select_passing
from ..config import CPLayout
from ..ops.attention import attention_with_lse
from ..ops.merge import concat_merged

Tensor = torch.Tensor
Scorer = Callable[[], Tensor]  # () -> float32 [batch, block_len, kv_heads]


def apb_context_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    layout: CPLayout,
    group,
    scorer: Optional[Scorer] = None,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """APB attention for this host.

    Args:
        q, k, v: post-RoPE [batch, anchor + block, heads | kv_heads, head_dim] with
            ``anchor = layout.anchor_len_on(rank)``.
        layout: the resolved prompt layout (same on every rank).
        group: the context-parallel process group (None: a single host).
        scorer: returns the scores of this host's block rows; needed when passing_len > 0.
    Returns:
        [batch, anchor + block, heads, head_dim].
    """
    rank, world = group_rank(group), group_size(group)
    la = layout.anchor_len_on(rank)
    if q.shape[1] != la + layout.block_len:
        raise ValueError(
            f"rank {rank} holds {q.shape[1]} rows but the layout says anchor {la} + block "
            f"{layout.block_len}; shard the prompt with the same layout on every rank"
        )
    passing = layout.passing_len if world > 1 else 0
    pending = None
    if passing > 0:
        if scorer is None:
            raise ValueError("passing_len > 0 needs a scorer for the local rows")
        pending = all_gather_async(_compressed_block(q, k, v, la, passing, rank, world, scorer), group)

    kw = dict(softmax_scale=softmax_scale, backend=backend)
    anchor = attention_with_lse(q[:, :la], k[:, :la], v[:, :la], causal=True, **kw)
    ql, kl, vl = q[:, la:], k[:, la:], v[:, la:]
    own = attention_with_lse(ql, kl, vl, causal=True, **kw)  # the largest part: overlaps the gather
    context_k, context_v = [], []
    if la > 0 and layout.anchor_visible_on(rank):
        context_k.append(k[:, :la]), context_v.append(v[:, :la])
    if pending is not None:
        gathered = pending.wait()  # [world, batch, passing, kv_heads, 2*head_dim]
        if rank > 0:
            blocks = gathered[:rank].permute(1, 0, 2, 3, 4).flatten(1, 2)
            pk, pv = blocks.chunk(2, dim=-1)
            context_k.append(pk), context_v.append(pv)
    if not context_k:
        return own[0] if la == 0 else torch.cat([anchor[0], own[0]], dim=1)
    # anchor and passing block in one unmasked call, then one merge with the own block,
    # written straight after the anchor rows
    ctx = attention_with_lse(
        ql, torch.cat(context_k, dim=1), torch.cat(context_v, dim=1), causal=False, **kw
    )
    return concat_merged(anchor[0], [own[0], ctx[0]], [own[1], ctx[1]])


def _compressed_block(q, k, v, la, passing, rank, world, scorer):
    """This host's compressed block [batch, passing, kv_heads, 2*head_dim] (K ‖ V)."""
    b, _, kvh, d = k.shape
    if rank == world - 1:  # nobody reads the last host's block: send zeros, skip scoring
        return k.new_zeros(b, passing, kvh, 2 * d)
    scores = scorer()
    k_sel, v_sel, _ = select_passing(scores, k[:, la:], v[:, la:], passing)
    return torch.cat([k_sel, v_sel], dim=-1)
