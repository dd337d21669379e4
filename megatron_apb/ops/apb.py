"""The per-host APB attention op (no communication): anchor, passing block and local block.

This is the one implementation: :func:`megatron_apb.parallel.apb.apb_context_attention`
calls it with the passing block still in flight (``passing_fn``).

Queries are ``[A; B]`` (anchor rows, then local rows) and keys/values ``[A; P; B]``:

* anchor rows attend causally within the anchor only;
* local rows attend to all of A, all of P, and causally to B.

It is computed as three standard calls merged by log-sum-exp, so any kernel that returns
the LSE serves: anchor-vs-anchor (causal), local-vs-[A; P] (no mask), local-vs-B (causal).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..errors import InputError
from .attention import attention_with_lse
from .merge import concat_merged, merge_attention
from .validation import check_attention_inputs, check_passing

Tensor = torch.Tensor


def apb_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    anchor_len: int,
    passing_k: Optional[Tensor] = None,
    passing_v: Optional[Tensor] = None,
    passing_fn: Optional[Callable[[], Optional[Tuple[Tensor, Tensor]]]] = None,
    anchor_visible: bool = True,
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
        passing_fn: instead of ``passing_k``/``passing_v``: called once, after the local
            rows' attention to their own block, returning ``(passing_k, passing_v)`` or
            None, so that a gather of the passing block in flight overlaps that work.
        anchor_visible: whether the local rows attend to the anchor (every host but the
            first, which may hold the anchor only for scoring).
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

    It is computed as three standard calls merged by log-sum-exp, so any kernel that
    returns the LSE serves: anchor-vs-anchor (causal), local-vs-own block (causal),
    local-vs-[A; P] (no mask).  Without ``return_lse`` the merge is written straight into
    the output after the anchor rows (:func:`~megatron_apb.ops.merge.concat_merged`).

    Inputs are checked as in :func:`~megatron_apb.ops.attention.attention_with_lse`
    (:mod:`megatron_apb.ops.validation`); the passing block must have k's dtype and device
    (also when ``passing_fn`` delivers it).  NaN propagates to every row that sees it.
    """
    check_attention_inputs(q, k, v, where="apb_attention", passing_k=passing_k, passing_v=passing_v)
    if passing_fn is not None and passing_k is not None:
        raise InputError("apb_attention: pass passing_k/passing_v or passing_fn, not both")
    seq = q.shape[1]
    if not 0 <= anchor_len <= seq:
        raise InputError(f"apb_attention: anchor_len={anchor_len} must lie in [0, seq={seq}]")
    if k.shape[1] != seq or v.shape[1] != seq:
        raise InputError(
            f"apb_attention: q, k and v must have the same rows (anchor + local); got {seq}, "
            f"{k.shape[1]}, {v.shape[1]}"
        )
    la = anchor_len
    kw = dict(softmax_scale=softmax_scale, backend=backend)
    anchor = attention_with_lse(q[:, :la], k[:, :la], v[:, :la], causal=True, **kw)
    ql, kl, vl = q[:, la:], k[:, la:], v[:, la:]
    own = attention_with_lse(ql, kl, vl, causal=True, **kw)  # the largest part: overlaps a gather
    if passing_fn is not None:
        passing_k, passing_v = passing_fn() or (None, None)
        check_passing(k, passing_k, passing_v, where="apb_attention (the block from passing_fn)")
    context_k, context_v = [], []
    if la > 0 and anchor_visible:
        context_k.append(k[:, :la]), context_v.append(v[:, :la])
    if passing_k is not None and passing_k.shape[1] > 0:
        context_k.append(passing_k), context_v.append(passing_v)
    if not context_k:
        out, lse = own
    else:  # anchor and passing block in one unmasked call, merged with the own block
        ctx = attention_with_lse(ql, torch.cat(context_k, dim=1), torch.cat(context_v, dim=1), causal=False, **kw)
        if not return_lse:
            return concat_merged(anchor[0], [own[0], ctx[0]], [own[1], ctx[1]])
        out, lse = merge_attention([own[0], ctx[0]], [own[1], ctx[1]])
    if la > 0:
        out = torch.cat([anchor[0], out.to(anchor[0].dtype)], dim=1)
        lse = torch.cat([anchor[1], lse], dim=2)
    return (out, lse) if return_lse else out

