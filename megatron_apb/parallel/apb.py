"""APB (and Star Attention) prefill attention across a context-parallel group.

Host ``r`` holds ``[A; B_r]`` (no anchor on host 0).  Per layer:

1. score its local rows and keep the top ``passing_len`` per KV head (post-RoPE K, V);
2. start the all-gather of that compressed block over the group;
3. while it travels, attend anchor-vs-anchor (causal) and local-vs-own block (causal);
4. wait, attend local rows to ``[A; P_r]`` with ``P_r = C_0 .. C_{r-1}``, merge by LSE.

Steps 3-4 are the per-host op :func:`megatron_apb.ops.apb.apb_attention`; this module
adds the scoring and the gather.  Star Attention is the same with ``passing_len = 0``
(no communication at all).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..comm import all_gather_async, group_rank, group_size
from ..compress import select_passing
from ..config import CPLayout
from ..ops.apb import apb_attention
from .algorithm import CPAlgorithm, Scorer, register_algorithm

Tensor = torch.Tensor


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
    local_only: bool = False,
) -> Tensor:
    """APB attention for this host.

    Args:
        q, k, v: post-RoPE [batch, anchor + block, heads | kv_heads, head_dim] with
            ``anchor = layout.anchor_len_on(rank)``.
        layout: the resolved prompt layout (same on every rank).
        group: the context-parallel process group (None: a single host).
        scorer: returns the scores of this host's block rows; needed when passing_len > 0.
        local_only: benchmarks only: no collective (the result is then wrong).
    Returns:
        [batch, anchor + block, heads, head_dim].
    """
    rank, world = group_rank(group), group_size(group)
    la = layout.anchor_len_on(rank)
    if q.shape[1] != la + layout.block_len_on(rank):
        raise ValueError(
            f"rank {rank} holds {q.shape[1]} rows but the layout says anchor {la} + block "
            f"{layout.block_len_on(rank)}; shard the prompt with the same layout on every rank"
        )
    passing = layout.passing_len if world > 1 else 0
    passing_fn = None
    if passing > 0:
        if scorer is None:
            raise ValueError("passing_len > 0 needs a scorer for the local rows")
        block = _compressed_block(q, k, v, la, passing, rank, world, scorer)
        pending = all_gather_async(block, group, local_only=local_only)

        def passing_fn():
            gathered = pending.wait()  # [world, batch, passing, kv_heads, 2*head_dim]
            if rank == 0:
                return None
            blocks = gathered[:rank].permute(1, 0, 2, 3, 4).flatten(1, 2)
            return blocks.chunk(2, dim=-1)

    return apb_attention(
        q, k, v, anchor_len=la, passing_fn=passing_fn, anchor_visible=layout.anchor_visible_on(rank),
        softmax_scale=softmax_scale, backend=backend,
    )


def _compressed_block(q, k, v, la, passing, rank, world, scorer):
    """This host's compressed block [batch, passing, kv_heads, 2*head_dim] (K ‖ V)."""
    b, _, kvh, d = k.shape
    if rank == world - 1:  # nobody reads the last host's block: send zeros, skip scoring
        return k.new_zeros(b, passing, kvh, 2 * d)
    scores = scorer()
    k_sel, v_sel, _ = select_passing(scores, k[:, la:], v[:, la:], passing)
    return torch.cat([k_sel, v_sel], dim=-1)


register_algorithm(CPAlgorithm(
    name="apb", attention=apb_context_attention, uses_anchor=True, passes_blocks=True, exact=False,
    description="anchor + compressed passing blocks (approximate prefill)",
))
register_algorithm(CPAlgorithm(
    name="star", attention=apb_context_attention, uses_anchor=True, passes_blocks=False, exact=False,
    description="Star Attention: an anchor of up to a block, nothing passed (approximate)",
))
