"""Exact merging of partial attention results by their log-sum-exp.

Attention over a key set K = K1 ∪ K2 splits into attention over K1 and over K2:
``lse = log(exp(lse1) + exp(lse2))`` and ``out = exp(lse1-lse)·out1 + exp(lse2-lse)·out2``.
Computed in float32; parts with ``lse = -inf`` (no keys) contribute nothing.
"""

from __future__ import annotations

import functools
from typing import Sequence, Tuple

import torch

from . import triton_kernels
from .validation import check_merge_inputs


def merge_attention(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention outputs.

    Args:
        outs: each [batch, seq, heads, dim].
        lses: each float [batch, heads, seq], natural log, -inf where the part had no key.
    Returns:
        (out in outs[0]'s dtype, lse float32), with out = 0 and lse = -inf for rows
        that no part covers, and NaN for rows where a part has a NaN LSE or output.

    The parts must share dtype, shape and device (:mod:`megatron_apb.ops.validation`).
    """
    check_merge_inputs(outs, lses, where="merge_attention")
    if len(outs) == 1:
        return outs[0], lses[0].float()
    if len(outs) == 2 and outs[0].is_cuda:
        return _merge_two_compiled()(outs[0], lses[0], outs[1], lses[1])
    lse_stack = torch.stack([l.float() for l in lses])  # [n, b, h, s]
    lse = torch.logsumexp(lse_stack, dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(lse_stack - safe)  # exp(-inf) = 0 for empty parts
    weights = weights.permute(0, 1, 3, 2).unsqueeze(-1)  # [n, b, s, h, 1]
    out = sum(w * o.float() for w, o in zip(weights, outs))
    return out.to(outs[0].dtype), lse


def _merge_two(o1, l1, o2, l2):
    """Two-part merge; the same math as :func:`merge_attention`, written for fusion."""
    lse = torch.logaddexp(l1.float(), l2.float())
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(l1.float() - safe).transpose(1, 2).unsqueeze(-1)
    w2 = torch.exp(l2.float() - safe).transpose(1, 2).unsqueeze(-1)
    return (w1 * o1.float() + w2 * o2.float()).to(o1.dtype), lse


def concat_merged(
    prefix: torch.Tensor, outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``cat([prefix, merge_attention(outs, lses)[0]], dim=1)``: rows computed whole
    (``prefix``) followed by rows merged from parts, as one [batch, rows, heads, dim] tensor.

    On GPU with two parts the merge is one Triton kernel writing straight into the result
    after the prefix rows (no separate merge output, no concatenation pass).
    """
    if len(outs) == 2 and triton_kernels.usable(outs[0], outs[1]):
        b, p, h, d = prefix.shape
        out = outs[0].new_empty((b, p + outs[0].shape[1], h, d))
        out[:, :p].copy_(prefix)
        triton_kernels.merge_two_into(out[:, p:], outs[0], lses[0], outs[1], lses[1])
        return out
    merged = merge_attention(outs, lses)[0]
    return merged if prefix.shape[1] == 0 else torch.cat([prefix, merged], dim=1)


@functools.lru_cache(maxsize=None)
def _merge_two_compiled():
    """:func:`_merge_two` compiled into one kernel on GPU (eager if compilation fails)."""
    try:
        return torch.compile(_merge_two, dynamic=True)
    except Exception:  # no compiler toolchain: the eager version is still exact
        return _merge_two
