"""The per-host APB attention op (no communication): anchor, passing block and local block.

Queries are ``[A; B]`` (anchor rows, then local rows) and keys/values ``[A; P; B]``:

* anchor rows attend causally within the anchor only;
* local rows attend to all of A, all of P, and causally to B.

It is computed as three standard calls merged by log-sum-exp, so any kernel that returns
the LSE serves: anchor-vs-anchor (causal), local-vs-[A; P] (no mask), local-vs-B (causal).
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention import attention_with_lse, check_shapes
from .merge import merge_attention

Tensor = torch.Tensor


def apb_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    anchor_len: int,
    passing_k: Optional[Tensor] = None,
    passing_v: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """APB attention on one host.

    Args:
        q: [batch, anchor_len + local_len, heads, head_dim], anchor rows first.
        k, v: [batch, anchor_len + local_len, kv_heads, head_dim] (post-RoPE k).
        anchor_len: rows of the anchor (0 for the first host).
        passing_k, passing_v: [batch, P, kv_heads, head_dim], the passing block (P may be
            0; None means no passing block).
        softmax_scale: defaults to 1/sqrt(head_dim).
        return_lse: also return the natural-log LSE, float32 [batch, heads, seq].
        backend: see :func:`megatron_apb.ops.attention.attention_with_lse`.

    With anchor_len = 2, P = 2 and 3 local rows the mask over keys [A; P; B] is::

                 a a p p l l l
        a        1 0 0 0 0 0 0
        a        1 1 0 0 0 0 0
        l        1 1 1 1 1 0 0
        l        1 1 1 1 1 1 0
        l        1 1 1 1 1 1 1
    """
    check_shapes(q, k, v)
    if (passing_k is None) != (passing_v is None):
        raise ValueError("pass both passing_k and passing_v, or neither")
    if passing_k is not None and passing_k.shape != passing_v.shape:
        raise ValueError(
            f"passing_k {tuple(passing_k.shape)} and passing_v {tuple(passing_v.shape)} must "
            "have the same shape"
        )
    seq = q.shape[1]
    if not 0 <= anchor_len <= seq:
        raise ValueError(f"anchor_len={anchor_len} must lie in [0, seq={seq}]")
    if k.shape[1] != seq or v.shape[1] != seq:
        raise ValueError(
            f"q, k and v must have the same rows (anchor + local); got {seq}, {k.shape[1]}, {v.shape[1]}"
        )
    if passing_k is not None and (
        passing_k.shape[0] != k.shape[0] or passing_k.shape[2:] != k.shape[2:]
    ):
        raise ValueError(
            f"passing_k {tuple(passing_k.shape)} must be [batch, P, kv_heads, head_dim] matching "
            f"k {tuple(k.shape)}"
        )
    la = anchor_len
    anchor = attention_with_lse(
        q[:, :la], k[:, :la], v[:, :la], causal=True, softmax_scale=softmax_scale, backend=backend
    )
    local = local_attention_parts(
        q[:, la:],
        k[:, la:],
        v[:, la:],
        context_k=_cat(k[:, :la], passing_k),
        context_v=_cat(v[:, :la], passing_v),
        softmax_scale=softmax_scale,
        backend=backend,
    )
    out = torch.cat([anchor[0], local[0]], dim=1)
    if not return_lse:
        return out
    return out, torch.cat([anchor[1], local[1]], dim=2)


def local_attention_parts(
    q_local, k_local, v_local, *, context_k, context_v, softmax_scale=None, backend="auto"
):
    """Local rows over an unmasked context (anchor, passing) plus their own block, causally."""
    own = attention_with_lse(
        q_local, k_local, v_local, causal=True, softmax_scale=softmax_scale, backend=backend
    )
    if context_k is None or context_k.shape[1] == 0:
        return own
    ctx = attention_with_lse(
        q_local, context_k, context_v, causal=False, softmax_scale=softmax_scale, backend=backend
    )
    return merge_attention([own[0], ctx[0]], [own[1], ctx[1]])


def _cat(anchor_part, passing_part):
    if passing_part is None or passing_part.shape[1] == 0:
        return anchor_part
    return torch.cat([anchor_part, passing_part.to(anchor_part.dtype)], dim=1)
