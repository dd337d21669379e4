"""Ulysses: exact attention by re-sharding from sequence to heads with all-to-all.

Each rank trades its sequence block of every head for the whole sequence of ``heads/W``
heads, runs full causal attention, and trades back.  Needs ``heads % W == 0``; KV heads
are repeated up to the query heads when ``kv_heads % W != 0``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..comm import all_to_all_heads, group_size
from ..config import APBConfigError
from ..ops.attention import attention_with_lse
from .algorithm import CPAlgorithm, register_algorithm

Tensor = torch.Tensor


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
    **unused,
) -> Tensor:
    """Exact causal attention; q, k, v [batch, block, heads | kv_heads, head_dim], equal blocks."""
    world = group_size(group)
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % world != 0:
        raise APBConfigError(
            f"mode='ulysses' splits the {heads} attention heads of a tensor-parallel rank "
            f"over {world} context-parallel ranks; choose a context-parallel size dividing "
            f"{heads} or use mode='exact'"
        )
    if kv_heads % world != 0:
        k = k.repeat_interleave(heads // kv_heads, dim=2)
        v = v.repeat_interleave(heads // kv_heads, dim=2)
    qh = all_to_all_heads(q, group, scatter_heads=True)
    kh = all_to_all_heads(k, group, scatter_heads=True)
    vh = all_to_all_heads(v, group, scatter_heads=True)
    out, _ = attention_with_lse(qh, kh, vh, causal=True, softmax_scale=softmax_scale, backend=backend)
    return all_to_all_heads(out, group, scatter_heads=False)


register_algorithm(CPAlgorithm(
    name="ulysses", attention=ulysses_attention, exact=True, equal_blocks=True,
    description="all-to-all head parallelism (exact)",
))
