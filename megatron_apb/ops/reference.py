"""Dense, obviously-correct attention references (slow; for tests and as a last resort).

Everything is computed in float64 on a materialized boolean mask, so these functions are
the ground truth the fast paths are pinned to.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .validation import check_attention_inputs, check_mask


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Bottom-right aligned causal mask, True where a query may attend.

    Query i (of ``q_len``) sees keys ``j <= i + k_len - q_len``.  For q_len=2, k_len=5::

        1 1 1 1 0
        1 1 1 1 1
    """
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i + (k_len - q_len)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
):
    """Masked softmax attention in float64.

    Args:
        q: [batch, q_len, heads, dim]; k, v: [batch, k_len, kv_heads, dim] (GQA: kv_heads
            divides heads; query head h reads KV head h // (heads // kv_heads)).
        mask: bool [q_len, k_len], True = attend; None = no mask.
    Returns:
        out [batch, q_len, heads, dim] in q's dtype (zeros for rows with no key) and
        lse float32 [batch, heads, q_len] (natural log; -inf for rows with no key).
        NaN in q, k or v reaches every row that reads it (NaN out; NaN lse for q and k).
    """
    check_attention_inputs(q, k, v, where="reference_attention")
    check_mask(mask, q, k, where="reference_attention")
    b, sq, h, d = q.shape
    kvh = k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    kk = k.double().repeat_interleave(h // kvh, dim=2)
    vv = v.double().repeat_interleave(h // kvh, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, h, sq]
    empty = torch.isneginf(lse)[..., None]  # rows with no key; NaN rows stay NaN
    probs = torch.exp(scores - lse[..., None].masked_fill(empty, 0.0))
    probs = probs.masked_fill(empty, 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vv)
    return out.to(q.dtype), lse.float()


def apb_reference_mask(anchor_len: int, passing_len: int, local_len: int) -> torch.Tensor:
    """The APB mask over queries [A; B] and keys [A; P; B], True = attend.

    ``a`` = anchor, ``p`` = passing, ``l`` = local; anchor_len=2, passing_len=2, local_len=3::

                 a a p p l l l
        a        1 0 0 0 0 0 0
        a        1 1 0 0 0 0 0
        l        1 1 1 1 1 0 0
        l        1 1 1 1 1 1 0
        l        1 1 1 1 1 1 1
    """
    la, lp, lb = anchor_len, passing_len, local_len
    mask = torch.zeros(la + lb, la + lp + lb, dtype=torch.bool)
    mask[:la, :la] = causal_mask(la, la)
    mask[la:, : la + lp] = True
    mask[la:, la + lp :] = causal_mask(lb, lb)
    return mask


def apb_reference_attention(
    q, k, v, *, anchor_len, passing_k=None, passing_v=None, softmax_scale=None
):
    """Reference for :func:`megatron_apb.apb_attention`: one dense masked call over [A; P; B]."""
    check_attention_inputs(q, k, v, where="apb_reference_attention", passing_k=passing_k, passing_v=passing_v)
    la = anchor_len
    if passing_k is None:
        passing_k = k[:, :0]
        passing_v = v[:, :0]
    keys = torch.cat([k[:, :la], passing_k, k[:, la:]], dim=1)
    values = torch.cat([v[:, :la], passing_v, v[:, la:]], dim=1)
    mask = apb_reference_mask(la, passing_k.shape[1], q.shape[1] - la)
    return reference_attention(q, keys, values, mask, softmax_scale)
