"""Split-KV decoding attention (flash-decoding): a few query rows against a long KV cache.

    out, lse = split_kv_attention(q, k, v, lengths=None, causal=True, softmax_scale=None)

* q: [batch, m, heads, d] (m: the new tokens, 1 for a decoding step, a few for a query);
  k, v: [batch, L, kv_heads, d], the cache buffers (any strides with a unit last one);
  GQA is read natively: the query heads of one KV head are processed together and K/V are
  never expanded.
* lengths: int [batch] valid keys of each sequence (ragged batches; default: all L);
  keys at or beyond a sequence's length are ignored.
* causal: bottom-right aligned per sequence, query i sees key j iff
  ``j <= i + lengths[b] - m`` (the cache ends with the new tokens themselves).
* Returns out [batch, m, heads, d] in q's dtype and the natural-log LSE, float32
  [batch, heads, m] (``-inf`` and zeros for a row that sees no key), so results of several
  context-parallel ranks merge exactly (:mod:`megatron_apb.ops.merge`).

The sequence is split across thread blocks (``num_splits`` per KV head and sequence), each
block keeps an online softmax over its keys and writes a partial output and LSE; the
partials are combined by log-sum-exp.  :func:`split_kv_attention_reference` is the plain
PyTorch reference (float32, dense) the kernel is pinned to, and what runs where Triton
cannot (CPU without ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from .triton_kernels import HAVE_TRITON, tl, triton  # the optional Triton

Tensor = torch.Tensor

BLOCK_N = 64  # keys per inner iteration
_MIN_ROWS = 16  # tl.dot needs at least 16 rows


def split_kv_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, lengths: Optional[Tensor] = None, causal: bool = True,
    softmax_scale: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """The contract of :func:`split_kv_attention` in float32 with dense masks (slow, obvious)."""
    b, m, h, d = q.shape
    L, kvh = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    lengths = _lengths(lengths, b, L, q.device)
    key = torch.arange(L, device=q.device)
    valid = key[None, :] < lengths[:, None]  # [b, L]: rows past a length are never read
    kf = k.float().masked_fill(~valid[..., None, None], 0.0).repeat_interleave(h // kvh, dim=2)
    vf = v.float().masked_fill(~valid[..., None, None], 0.0).repeat_interleave(h // kvh, dim=2)
    scores = torch.einsum("bmhd,blhd->bhml", q.float(), kf) * scale
    visible = valid[:, None, :]  # [b, 1, L]
    if causal:
        row = torch.arange(m, device=q.device)
        limit = row[None, :, None] + (lengths[:, None, None] - m)  # [b, m, 1]
        visible = visible & (key[None, None, :] <= limit)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, h, m]
    probs = torch.exp(scores - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    probs = probs.masked_fill(~visible[:, None], 0.0)
    out = torch.einsum("bhml,blhd->bmhd", probs, vf)
    return out.to(q.dtype), lse


def _lengths(lengths, b, L, device):
    if lengths is None:
        return torch.full((b,), L, dtype=torch.int64, device=device)
    lengths = torch.as_tensor(lengths, device=device).to(torch.int64).reshape(-1)
    if lengths.numel() != b:
        raise ValueError(f"lengths has {lengths.numel()} entries for a batch of {b}")
    return lengths


def kernel_available(q: Tensor) -> bool:
    """Whether :func:`split_kv_attention` runs the Triton kernel for ``q`` (CUDA with
    Triton, or Triton's CPU interpreter), rather than the reference."""
    if not HAVE_TRITON:
        return False
    if q.is_cuda:
        return True
    return q.device.type == "cpu" and _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def split_kv_attention(
    q: Tensor, k: Tensor, v: Tensor, *, lengths: Optional[Tensor] = None, causal: bool = True,
    softmax_scale: Optional[float] = None, num_splits: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Decoding attention returning ``(out, lse)``; see the module docstring.

    ``num_splits``: thread blocks per (sequence, KV head) along the keys (default: enough
    to fill the GPU).  Runs the reference where the kernel is not available.
    """
    b, m, h, d = q.shape
    L, kvh = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} must be [batch, L, kv_heads, {d}]")
    if kvh == 0 or h % kvh:
        raise ValueError(f"kv_heads ({kvh}) must divide heads ({h})")
    if not kernel_available(q) or d not in (16, 32, 64, 128, 256):
        return split_kv_attention_reference(q, k, v, lengths=lengths, causal=causal, softmax_scale=softmax_scale)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    lengths = _lengths(lengths, b, L, q.device).to(torch.int32)
    group = h // kvh
    rows = m * group
    block_r = max(_MIN_ROWS, triton.next_power_of_2(rows))
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = max(1, min(triton.cdiv(L, BLOCK_N), triton.cdiv(4 * sms, b * kvh)))
    split_len = triton.cdiv(triton.cdiv(max(L, 1), num_splits), BLOCK_N) * BLOCK_N
    num_splits = max(1, triton.cdiv(L, split_len))
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    o_part = torch.empty((b, kvh, num_splits, block_r, d), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((b, kvh, num_splits, block_r), dtype=torch.float32, device=q.device)
    _split_kv_kernel[(b * kvh, num_splits)](
        q, k, v, lengths, o_part, lse_part,
        *q.stride(), *k.stride(), *v.stride(),
        *o_part.stride(), *lse_part.stride(),
        kvh, m, scale, split_len,
        GROUP=group, ROWS=rows, BLOCK_R=block_r, BLOCK_N=BLOCK_N, D=d, CAUSAL=causal,
    )
    # combine the splits by log-sum-exp, writing rows (query i, head j of the group) straight
    # into out [b, m, heads, d] and lse [b, heads, m]
    out = torch.empty((b, m, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, m), dtype=torch.float32, device=q.device)
    _combine_kernel[(b * kvh, rows)](
        o_part, lse_part, out, lse,
        *o_part.stride(), *lse_part.stride(), *out.stride(), *lse.stride(),
        kvh, num_splits,
        GROUP=group, BLOCK_S=triton.next_power_of_2(num_splits), D=d,
    )
    return out, lse


if HAVE_TRITON:

    @triton.jit
    def _split_kv_kernel(
        Q, K, V, LENGTHS, O_PART, LSE_PART,
        sq_b, sq_m, sq_h, sq_d,
        sk_b, sk_l, sk_h, sk_d,
        sv_b, sv_l, sv_h, sv_d,
        so_b, so_h, so_s, so_r, so_d,
        sl_b, sl_h, sl_s, sl_r,
        KV_HEADS, M, scale, SPLIT_LEN,
        GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        D: tl.constexpr, CAUSAL: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // KV_HEADS
        kvh = pid_bh % KV_HEADS
        length = tl.load(LENGTHS + b)
        r = tl.arange(0, BLOCK_R)
        d = tl.arange(0, D)
        qi = r // GROUP  # the query row of each tile row
        head = kvh * GROUP + r % GROUP
        row_ok = r < ROWS
        q_ptr = Q + b * sq_b + qi[:, None] * sq_m + head[:, None] * sq_h + d[None, :] * sq_d
        q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
        # causal limit of each row: key j is visible iff j <= qi + length - M
        limit = qi + length - M
        start = split * SPLIT_LEN
        end = tl.minimum(start + SPLIT_LEN, length)
        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, D], dtype=tl.float32)
        n = tl.arange(0, BLOCK_N)
        for lo in range(start, end, BLOCK_N):
            keys = lo + n
            key_ok = keys < end
            k_ptr = K + b * sk_b + keys[:, None] * sk_l + kvh * sk_h + d[None, :] * sk_d
            v_ptr = V + b * sv_b + keys[:, None] * sv_l + kvh * sv_h + d[None, :] * sv_d
            k = tl.load(k_ptr, mask=key_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [BLOCK_R, BLOCK_N]
            visible = key_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                visible = visible & (keys[None, :] <= limit[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr, mask=key_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        o_ptr = O_PART + b * so_b + kvh * so_h + split * so_s + r[:, None] * so_r + d[None, :] * so_d
        tl.store(o_ptr, out)
        tl.store(LSE_PART + b * sl_b + kvh * sl_h + split * sl_s + r * sl_r, lse)

    @triton.jit
    def _combine_kernel(
        O_PART, LSE_PART, OUT, LSE,
        so_b, so_h, so_s, so_r, so_d,
        sl_b, sl_h, sl_s, sl_r,
        out_b, out_m, out_h, out_d,
        lse_b, lse_h, lse_m,
        KV_HEADS, SPLITS,
        GROUP: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        r = tl.program_id(1)
        b = pid_bh // KV_HEADS
        kvh = pid_bh % KV_HEADS
        sp = tl.arange(0, BLOCK_S)
        d = tl.arange(0, D)
        ok = sp < SPLITS
        part = tl.load(LSE_PART + b * sl_b + kvh * sl_h + sp * sl_s + r * sl_r, mask=ok, other=float("-inf"))
        top = tl.max(part, axis=0)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        w = tl.where(part == float("-inf"), 0.0, tl.exp(part - top_safe))
        total = tl.sum(w, axis=0)
        o = tl.load(O_PART + b * so_b + kvh * so_h + sp[:, None] * so_s + r * so_r + d[None, :] * so_d,
                    mask=ok[:, None], other=0.0)
        acc = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
        lse = tl.where(total > 0, top_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
        qi = r // GROUP
        head = kvh * GROUP + r % GROUP
        tl.store(OUT + b * out_b + qi * out_m + head * out_h + d * out_d, acc.to(OUT.dtype.element_ty))
        tl.store(LSE + b * lse_b + head * lse_h + qi * lse_m, lse)
