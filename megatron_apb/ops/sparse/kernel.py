"""Block-sparse + column FlashAttention in Triton, returning the output and the LSE.

    out, lse = sparse_attention(q, k, v, index, softmax_scale=None)

One program per (query block, batch x query head).  It walks the key blocks of its query
block (``index.block_idx``), then the extra key columns (``index.col_idx``, gathered one block at
a time, skipping those already inside one of its blocks), with an online softmax in float32;
every key is also masked causally (bottom-right, as in
:func:`megatron_apb.ops.attention.attention_with_lse`) and past the end of the keys, so the
last partial block and any query offset are exact.  K and V are read at KV head
``h // (heads // kv_heads)`` (GQA without expansion).  fp32 inputs use IEEE fp32 dot
products, fp16/bf16 inputs tensor-core dots with fp32 accumulation.

:func:`~megatron_apb.ops.sparse.reference.sparse_reference_attention` is the reference it is
pinned to; where the kernel is not available :func:`sparse_attention` runs the PyTorch
:func:`~megatron_apb.ops.sparse.gathered.gathered_sparse_attention` (also pinned to it).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from ..triton_kernels import HAVE_TRITON, tl, triton  # the optional Triton
from .index import SparseIndex
from .gathered import gathered_sparse_attention

Tensor = torch.Tensor
_HEAD_DIMS = (16, 32, 64, 128, 256)
_LOG2E = 1.4426950408889634


def kernel_available(q: Tensor) -> bool:
    """Whether :func:`sparse_attention` runs the Triton kernel for ``q`` (CUDA with Triton,
    or Triton's CPU interpreter under ``TRITON_INTERPRET=1``) rather than the reference."""
    if not HAVE_TRITON or q.shape[-1] not in _HEAD_DIMS:
        return False
    if q.is_cuda:
        return True
    return q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, index: SparseIndex, softmax_scale: Optional[float] = None,
    *, num_warps: int = 4, num_stages: int = 2,
) -> Tuple[Tensor, Tensor]:
    """Attention of q [b, sq, h, d] over k, v [b, sk, kv_heads, d] under ``index``; returns
    ``(out [b, sq, h, d], lse float32 [b, h, sq])``.  Without the kernel (CPU) it runs
    :func:`~megatron_apb.ops.sparse.gathered.gathered_sparse_attention`.
    ``num_warps``/``num_stages``: the launch settings (benchmarks sweep them)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if (index.q_len, index.k_len) != (sq, sk) or index.block_cnt.shape[:2] != (b, h):
        raise ValueError(
            f"sparse_attention: the index was built for q_len={index.q_len}, k_len={index.k_len}, "
            f"{tuple(index.block_cnt.shape[:2])} (batch, heads); got {sq}, {sk}, ({b}, {h})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if not kernel_available(q):  # PyTorch, reading only the keys the index names
        return gathered_sparse_attention(q, k, v, index, scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    bi, bc, ci, cc = index.block_idx, index.block_cnt, index.col_idx, index.col_cnt
    cover = index.diag_cover.to(torch.int8)
    block = index.block
    grid = (triton.cdiv(sq, block), b * h)
    _sparse_fwd[grid](
        q, k, v, out, lse, bi, bc, ci, cc, cover,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride(),
        *bi.stride(), *bc.stride(), *ci.stride(), *cc.stride(), *cover.stride(),
        h, sq, sk, sk - sq, cover.shape[-1], scale * _LOG2E,
        GROUP=h // k.shape[2], BLOCK=block, D=d, HAS_COLS=ci.shape[-1] > 0,
        IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


if HAVE_TRITON:

    @triton.jit
    def _tile(q, k_ptr, v_ptr, kmask, visible, m_i, l_i, acc, scale_log2, IEEE: tl.constexpr):
        """One online-softmax step over a tile of keys (scores in the log2 domain)."""
        k = tl.load(k_ptr, mask=kmask[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr, mask=kmask[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _sparse_fwd(
        Q, K, V, O, LSE, BIDX, BCNT, CIDX, CCNT, COVER,
        sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_s, so_h,
        sl_b, sl_h, sl_s,
        sbi_b, sbi_h, sbi_m, sbi_w, sbc_b, sbc_h, sbc_m,
        sci_b, sci_h, sci_w, scc_b, scc_h, scc_m, scv_b, scv_h, scv_t,
        H, SQ, SK, OFFSET, NCOVER, scale_log2,
        GROUP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, HAS_COLS: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        m = tl.num_programs(0) - 1 - tl.program_id(0)  # the busiest (last) query blocks first
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        hk = h // GROUP
        rows = m * BLOCK + tl.arange(0, BLOCK)
        row_ok = rows < SQ
        pos = rows + OFFSET
        d = tl.arange(0, D)
        n = tl.arange(0, BLOCK)
        q = tl.load(Q + b * sq_b + rows.to(tl.int64)[:, None] * sq_s + h * sq_h + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, D], dtype=tl.float32)
        kbase = K + b * sk_b + hk * sk_h + d[None, :]
        vbase = V + b * sv_b + hk * sv_h + d[None, :]
        nblk = tl.load(BCNT + b * sbc_b + h * sbc_h + m * sbc_m)
        bptr = BIDX + b * sbi_b + h * sbi_h + m * sbi_m
        for i in range(0, nblk):
            kb = tl.load(bptr + i * sbi_w)
            keys = kb * BLOCK + n
            visible = (keys[None, :] <= pos[:, None]) & (keys[None, :] < SK) & row_ok[:, None]
            k64 = keys.to(tl.int64)[:, None]
            m_i, l_i, acc = _tile(q, kbase + k64 * sk_s, vbase + k64 * sv_s, keys < SK, visible,
                                  m_i, l_i, acc, scale_log2, IEEE)
        if HAS_COLS:
            ncol = tl.load(CCNT + b * scc_b + h * scc_h + m * scc_m)
            base = m + OFFSET // BLOCK + 1
            cptr = CIDX + b * sci_b + h * sci_h
            for c0 in range(0, ncol, BLOCK):
                ci = c0 + n
                c_ok = ci < ncol
                keys = tl.load(cptr + ci * sci_w, mask=c_ok, other=0)
                t = base - keys // BLOCK
                t_ok = c_ok & (t >= 0) & (t < NCOVER)
                covered = tl.load(COVER + b * scv_b + h * scv_h + t * scv_t, mask=t_ok, other=0)
                c_ok = c_ok & (covered == 0)
                visible = (keys[None, :] <= pos[:, None]) & c_ok[None, :] & row_ok[:, None]
                k64 = keys.to(tl.int64)[:, None]
                m_i, l_i, acc = _tile(q, kbase + k64 * sk_s, vbase + k64 * sv_s, c_ok, visible,
                                      m_i, l_i, acc, scale_log2, IEEE)
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(O + b * so_b + rows.to(tl.int64)[:, None] * so_s + h * so_h + d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + b * sl_b + h * sl_h + rows * sl_s, lse, mask=row_ok)
