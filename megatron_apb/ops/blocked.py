"""Causal self-attention of a very long sequence, one block of query rows at a time.

Fused attention kernels may compute element offsets in 32-bit integers: a million-token
q [1, 2^20, 32 heads, 128] has 2^32 elements, past what such an offset reaches.
:func:`causal_attention_by_rows` runs the same causal attention as
:func:`~megatron_apb.ops.attention.attention_with_lse` on q, k, v of one length in blocks
of query rows: rows [a, e) attend to keys [0, e), bottom-right aligned (which
``attention_with_lse`` itself splits into an unmasked prefix and a square causal part,
merged by LSE), so no kernel call sees more than ``rows`` query rows or the keys up to
them.  The output and the LSE are written block by block into one buffer each.

Reference: ``attention_with_lse(q, k, v, causal=True)`` (tests pin the two together).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .attention import attention_with_lse

Tensor = torch.Tensor

#: the most elements a tensor may have for every offset to fit a signed 32-bit integer
INT32_ELEMENTS = 2**31


def needs_row_blocks(q: Tensor) -> bool:
    """Whether q [b, s, heads, d] (and so the output) has elements past a 32-bit offset."""
    return q.numel() > INT32_ELEMENTS


def rows_per_block(q: Tensor) -> int:
    """Query rows per block: 2^28 query elements (64K rows of 32 heads x 128), so each
    block's float32 merge of prefix and diagonal parts stays near 1 GiB."""
    return max(1, (INT32_ELEMENTS // 8) // (q.shape[0] * q.shape[2] * q.shape[3]))


def causal_attention_by_rows(q: Tensor, k: Tensor, v: Tensor, *, rows: int, softmax_scale: Optional[float] = None,
                             backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Causal attention of q [b, s, heads, d] on k, v [b, s, kv_heads, d] in blocks of
    ``rows`` query rows: (out [b, s, heads, d], float32 lse [b, heads, s])."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"causal self-attention needs as many keys as queries, got {k.shape[1]} and {q.shape[1]}")
    b, s, h, _ = q.shape
    out = q.new_empty(q.shape)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
    for start in range(0, s, rows):
        end = min(s, start + rows)
        o, l = attention_with_lse(q[:, start:end], k[:, :end], v[:, :end], causal=True,
                                  softmax_scale=softmax_scale, backend=backend)
        out[:, start:end], lse[:, :, start:end] = o, l
    return out, lse
