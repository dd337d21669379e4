"""The sparse kernel's work in PyTorch, for devices without the Triton kernel (CPU).

Each query block gathers the keys its index names (its key blocks, then its columns outside
those blocks) and attends to them alone, so the work follows the index's density, as the
kernel's does; :func:`~megatron_apb.ops.sparse.reference.sparse_reference_attention` (the
test's ground truth) attends to every key under the expanded mask instead, and costs dense
attention and more.  Float32 math, one query head at a time, query blocks in chunks so that
the gathered scores stay bounded; returns the same ``(out, lse)``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .index import SparseIndex
from .reference import masked_softmax

Tensor = torch.Tensor
_CHUNK_ELEMS = 1 << 24  # gathered score elements per chunk of query blocks (64 MiB in float32)


def _keys_of_head(index: SparseIndex, i: int) -> Tuple[Tensor, Tensor]:
    """Key positions [b, nqb, L] query head ``i``'s blocks read, and which are real."""
    B, sk = index.block, index.k_len
    bi, bc = index.block_idx[:, i].long(), index.block_cnt[:, i]  # [b, nqb, w], [b, nqb]
    b, nqb, w = bi.shape
    nkb = -(-sk // B)
    in_block = torch.arange(B, device=bi.device)
    block_pos = (bi[..., None] * B + in_block).reshape(b, nqb, w * B)
    block_ok = (torch.arange(w, device=bi.device) < bc[..., None])[..., None].expand(b, nqb, w, B).reshape(b, nqb, w * B)
    ci, cc = index.col_idx[:, i].long(), index.col_cnt[:, i]  # [b, ncol], [b, nqb]
    if ci.shape[-1] == 0:
        return block_pos, block_ok & (block_pos < sk)
    # a column inside one of the query block's own blocks is read there already
    chosen = torch.zeros(b, nqb, nkb + 1, dtype=torch.bool, device=bi.device)
    chosen.scatter_(2, torch.where(block_ok[..., ::B], bi, torch.full_like(bi, nkb)), block_ok[..., ::B])
    col_pos = ci[:, None, :].expand(b, nqb, ci.shape[-1])
    col_ok = torch.arange(ci.shape[-1], device=bi.device) < cc[..., None]
    col_ok = col_ok & (col_pos >= 0) & ~chosen.gather(2, (col_pos.clamp(min=0) // B).clamp(max=nkb))
    return torch.cat([block_pos, col_pos], -1), torch.cat([block_ok & (block_pos < sk), col_ok & (col_pos < sk)], -1)


def gathered_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, index: SparseIndex, softmax_scale: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention of q [b, sq, h, d] over k, v [b, sk, kv_heads, d] under ``index``, reading
    only the keys it names; returns ``(out [b, sq, h, d] in q's dtype, lse float32 [b, h, sq])``
    (zeros and ``-inf`` for a row with no key)."""
    b, sq, h, d = q.shape
    sk, B = k.shape[1], index.block
    group = h // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    nqb = -(-sq // B)
    qp = torch.nn.functional.pad(q.float(), (0, 0, 0, 0, 0, nqb * B - sq)).view(b, nqb, B, h, d)
    rows = (torch.arange(nqb * B, device=q.device) + (sk - sq)).view(nqb, B)  # each query's position
    out = torch.zeros(b, nqb, B, h, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, nqb, B), float("-inf"), dtype=torch.float32, device=q.device)
    for i in range(h):
        pos, ok = _keys_of_head(index, i)  # [b, nqb, L]
        kh, vh = k[:, :, i // group].float(), v[:, :, i // group].float()  # [b, sk, d]
        step = max(1, _CHUNK_ELEMS // max(1, B * pos.shape[-1]))
        for m0 in range(0, nqb, step):
            p, o = pos[:, m0 : m0 + step], ok[:, m0 : m0 + step]
            flat = p.clamp(0, sk - 1).reshape(b, -1, 1).expand(-1, -1, d)
            ks = kh.gather(1, flat).view(*p.shape, d)  # [b, m, L, d]
            vs = vh.gather(1, flat).view(*p.shape, d)
            s = torch.einsum("bmqd,bmld->bmql", qp[:, m0 : m0 + step, :, i], ks) * scale
            visible = o[:, :, None, :] & (p[:, :, None, :] <= rows[m0 : m0 + step, :, None])
            w, row = masked_softmax(s.masked_fill(~visible, float("-inf")))  # row: [b, m, B]
            out[:, m0 : m0 + step, :, i] = torch.einsum("bmql,bmld->bmqd", w, vs)
            lse[:, i, m0 : m0 + step] = row
    return out.view(b, nqb * B, h, d)[:, :sq].to(q.dtype), lse.view(b, h, nqb * B)[..., :sq].contiguous()
