"""Dense attention under a sparse index's mask: the slow, obvious reference of the kernel.

It expands the index into its boolean mask (:func:`~megatron_apb.ops.sparse.index.index_mask`)
and runs float32 softmax attention, one query head at a time (GQA: head ``h`` reads KV head
``h // (heads // kv_heads)``), returning the same ``(out, lse)`` as
:func:`megatron_apb.ops.attention.attention_with_lse`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .index import SparseIndex, index_mask

Tensor = torch.Tensor


def masked_softmax(s: Tensor) -> Tuple[Tensor, Tensor]:
    """Softmax over the last dimension of scores ``s`` whose masked keys are ``-inf``, and its
    log-sum-exp: ``(weights, lse)``; a row with no key gets zero weights and ``-inf``."""
    row = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(row)
    weights = torch.exp(s - row.masked_fill(empty, 0.0)[..., None]).masked_fill(empty[..., None], 0.0)
    return weights, row


def sparse_reference_attention(
    q: Tensor, k: Tensor, v: Tensor, index: SparseIndex, softmax_scale: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """Float32 attention of q [b, sq, h, d] over k, v [b, sk, kv_heads, d] under ``index``.

    Returns out [b, sq, h, d] in q's dtype (zeros for a row with no key) and lse float32
    [b, h, sq] (natural log, ``-inf`` for such a row).
    """
    b, sq, h, d = q.shape
    group = h // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    mask = index_mask(index)  # [b, h, sq, sk]
    out = torch.empty(b, sq, h, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    for i in range(h):
        s = torch.einsum("bqd,bkd->bqk", q[:, :, i].float(), k[:, :, i // group].float()) * scale
        p, row = masked_softmax(s.masked_fill(~mask[:, i], float("-inf")))
        out[:, :, i] = torch.einsum("bqk,bkd->bqd", p, v[:, :, i // group].float())
        lse[:, i] = row
    return out.to(q.dtype), lse
