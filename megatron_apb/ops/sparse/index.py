"""Sparse indices: which key blocks and key columns each query block reads.

Queries sit at positions ``[offset, offset + q_len)`` over keys ``[0, k_len)``
(``offset = k_len - q_len``: the bottom-right causal alignment of
:func:`megatron_apb.ops.attention.attention_with_lse`).  Query block ``m`` holds rows
``[m * block, (m + 1) * block)``; key block ``n`` holds keys ``[n * block, (n + 1) * block)``.

A :class:`SparseIndex` is, per (batch, query head):

* ``block_idx[.., m, :block_cnt[.., m]]``: the key blocks query block ``m`` reads, ascending;
* ``col_idx[.., :col_cnt[.., m]]``: the key columns it reads besides (ascending, shared by
  all query blocks; ``col_cnt`` stops at the last column the block's rows can see);
* ``diag_cover[.., t]``: whether key block ``n`` is already among query block ``m``'s blocks
  for ``t = m + offset // block - n + 1``, so a column in such a block is not counted twice.
  (Only vertical-slash and A-shape heads have columns; their blocks are whole diagonals.)

Every key read is also causal (key <= query position).  :func:`index_mask` expands an
index into the dense boolean mask the reference attends under; the builders here make the
index of each pattern, estimating the dynamic ones from q and k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .patterns import AShape, BlockSparse, Pattern, VerticalSlash

Tensor = torch.Tensor
_BIG = 1 << 30  # sentinel for padding: sorts after every real block or column
_SCORE_ELEMS = 1 << 28  # fp32 score elements per estimation chunk (1 GiB)


@dataclass
class SparseIndex:
    """Key blocks and columns per query block; see the module docstring."""

    block_idx: Tensor  # int32 [b, h, nqb, width]
    block_cnt: Tensor  # int32 [b, h, nqb]
    col_idx: Tensor  # int32 [b, h, ncols]
    col_cnt: Tensor  # int32 [b, h, nqb]
    diag_cover: Tensor  # bool [b, h, nkb + 2]
    block: int
    q_len: int
    k_len: int

    @property
    def offset(self) -> int:
        return self.k_len - self.q_len


def _positions(q_len, k_len, block, device):
    """Per query block: its first and last query position (bottom-right alignment)."""
    nqb = -(-q_len // block)
    first = torch.arange(nqb, device=device) * block + (k_len - q_len)
    last = torch.clamp(first + block - 1, max=k_len - 1)
    return first, last


def _pack(blocks: Tensor, valid: Tensor, *, unique: bool = False):
    """Sort the valid entries of ``blocks`` [..., w] ascending, duplicates dropped (``unique``:
    the caller knows there are none)."""
    x = torch.where(valid, blocks, torch.full_like(blocks, _BIG)).sort(-1).values
    if not unique:
        dup = torch.zeros_like(x, dtype=torch.bool)
        dup[..., 1:] = x[..., 1:] == x[..., :-1]
        x = torch.where(dup, torch.full_like(x, _BIG), x).sort(-1).values
    cnt = (x < _BIG).sum(-1)
    width = max(1, int(cnt.max()) if cnt.numel() else 1)
    x = x[..., :width]
    return torch.where(x < _BIG, x, torch.full_like(x, -1)).to(torch.int32), cnt.to(torch.int32)


def _diag_blocks(dd: Tensor, q_len, k_len, block):
    """Blocks ``m + offset // block - dd`` per query block from diagonal offsets dd [b, h, w]."""
    first, last = _positions(q_len, k_len, block, dd.device)
    base = first.div(block, rounding_mode="floor")  # = m + offset // block
    kb = base[None, None, :, None] - dd[:, :, None, :].long()  # [b, h, nqb, w]
    valid = (dd[:, :, None, :] < _BIG) & (kb >= 0) & (kb * block <= last[None, None, :, None])
    return _pack(kb, valid)


def _diag_cover(dd: Tensor, k_len, block):
    nkb = -(-k_len // block)
    cover = torch.zeros(dd.shape[0], dd.shape[1], nkb + 2, dtype=torch.bool, device=dd.device)
    t = dd.long() + 1
    ok = (dd < _BIG) & (t >= 0) & (t < nkb + 2)
    cover.scatter_(2, torch.where(ok, t, torch.zeros_like(t)), ok)
    return cover


def _columns(cols: Tensor, valid: Tensor, q_len, k_len, block):
    """Sorted columns [b, h, c] and, per query block, how many its rows can see."""
    col_idx, _ = _pack(cols, valid)
    _, last = _positions(q_len, k_len, block, cols.device)
    c = torch.where(col_idx >= 0, col_idx.long(), torch.full_like(col_idx, _BIG, dtype=torch.long))
    cnt = torch.searchsorted(c.contiguous(), last.expand(*c.shape[:2], -1).contiguous(), right=True)
    return col_idx, cnt.to(torch.int32)


def _static_offsets(offset: int, block: int, slashes: Tensor) -> Tensor:
    """Diagonal block offsets covering slashes ``s`` (key = query - s) for every query block,
    plus the diagonal blocks themselves (0 and, when queries straddle key blocks, -1)."""
    r = offset % block
    d1 = -torch.div(r - slashes, block, rounding_mode="floor")
    d2 = -torch.div(r + block - 1 - slashes, block, rounding_mode="floor")
    own = torch.tensor([0, -1], device=slashes.device).expand(*slashes.shape[:-1], 2)
    valid_s = slashes < _BIG
    big = torch.full_like(d1, _BIG)
    return torch.cat([torch.where(valid_s, d1, big), torch.where(valid_s, d2, big), own], -1)


def _assemble(q_len, k_len, block, b, device, parts, heads):
    """Combine per-pattern indices of head subsets into one :class:`SparseIndex`."""
    nqb, nkb = -(-q_len // block), -(-k_len // block)
    width = max(p.block_idx.shape[-1] for _, p in parts)
    ncols = max(p.col_idx.shape[-1] for _, p in parts)
    bi = torch.full((b, heads, nqb, width), -1, dtype=torch.int32, device=device)
    bc = torch.zeros((b, heads, nqb), dtype=torch.int32, device=device)
    ci = torch.full((b, heads, ncols), -1, dtype=torch.int32, device=device)
    cc = torch.zeros((b, heads, nqb), dtype=torch.int32, device=device)
    cover = torch.zeros((b, heads, nkb + 2), dtype=torch.bool, device=device)
    for sel, p in parts:
        bi[:, sel, :, : p.block_idx.shape[-1]] = p.block_idx
        bc[:, sel] = p.block_cnt
        ci[:, sel, : p.col_idx.shape[-1]] = p.col_idx
        cc[:, sel] = p.col_cnt
        cover[:, sel] = p.diag_cover
    return SparseIndex(bi, bc, ci, cc, cover, block, q_len, k_len)


def build_index(q: Tensor, k: Tensor, patterns: Sequence[Pattern], softmax_scale: float) -> SparseIndex:
    """The index of one pattern per query head (``len(patterns) == heads``) for q over k.

    q: [b, q_len, heads, d], k: [b, k_len, kv_heads, d] (GQA read per group, never
    expanded), ``q_len <= k_len``.  All patterns must share one ``block``.
    """
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    block = patterns[0].block
    groups = {}
    for i, p in enumerate(patterns):
        groups.setdefault(p, []).append(i)
    parts = []
    for p, heads in groups.items():
        sel = torch.tensor(heads, device=q.device)
        if isinstance(p, BlockSparse):
            part = block_sparse_index(q, k, p, sel)
        elif isinstance(p, VerticalSlash):
            part = vertical_slash_index(q, k, p, sel, softmax_scale)
        else:
            part = a_shape_index(b, len(heads), sq, sk, p, q.device)
        parts.append((sel, part))
    if len(parts) == 1 and len(groups[patterns[0]]) == h:
        return parts[0][1]
    return _assemble(sq, sk, block, b, q.device, parts, h)


def _no_columns(b, h, q_len, k_len, block, device):
    nqb, nkb = -(-q_len // block), -(-k_len // block)
    return (torch.full((b, h, 0), -1, dtype=torch.int32, device=device),
            torch.zeros((b, h, nqb), dtype=torch.int32, device=device),
            torch.zeros((b, h, nkb + 2), dtype=torch.bool, device=device))


def a_shape_index(b: int, heads: int, q_len: int, k_len: int, p: AShape, device) -> SparseIndex:
    """Sinks as columns, the window as the diagonal blocks it touches (static)."""
    p.check_length(k_len)
    block = p.block
    # query at position i sees i - s for s in [0, window): blocks of slashes 0 .. window-1
    s = torch.tensor([0, p.window - 1], device=device)
    dd = _static_offsets(k_len - q_len, block, s)
    lo, hi = int(dd[dd < _BIG].min()), int(dd[dd < _BIG].max())
    dd = torch.arange(lo, hi + 1, device=device).expand(b, heads, -1)
    bi, bc = _diag_blocks(dd, q_len, k_len, block)
    cols = torch.arange(min(p.sink, k_len), device=device).expand(b, heads, -1)
    if cols.shape[-1]:
        ci, cc = _columns(cols, torch.ones_like(cols, dtype=torch.bool), q_len, k_len, block)
        cover = _diag_cover(dd, k_len, block)
    else:
        ci, cc, cover = _no_columns(b, heads, q_len, k_len, block, device)
    return SparseIndex(bi, bc, ci, cc, cover, block, q_len, k_len)


def _kv_chunks(q_heads: Tensor, group: int, rows: int, k_len: int):
    """Subsets of ``q_heads`` of one KV head each, sized to bound the fp32 scores."""
    kv = q_heads // group
    per = max(1, _SCORE_ELEMS // max(1, rows * k_len))
    for j in torch.unique(kv).tolist():
        idx = (kv == j).nonzero().flatten()
        for s in range(0, idx.numel(), per):
            yield j, idx[s: s + per]


def vertical_slash_index(q: Tensor, k: Tensor, p: VerticalSlash, heads: Tensor, softmax_scale: float) -> SparseIndex:
    """Estimate verticals and slashes from the last ``last_q`` queries against all keys."""
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    group, block, offset = h // hk, p.block, sk - sq
    last = min(p.last_q, sq)
    n = heads.numel()
    vert = torch.zeros(b, n, sk, device=q.device, dtype=torch.float32)
    slash = torch.zeros(b, n, sk, device=q.device, dtype=torch.float32)
    pos = torch.arange(sq - last, sq, device=q.device) + offset  # [last]
    keys = torch.arange(sk, device=q.device)
    hidden = keys[None, :] > pos[:, None]  # future keys of the last rows
    for j, idx in _kv_chunks(heads, group, last, sk):
        qq = q[:, sq - last:, heads[idx]].transpose(1, 2)  # [b, c, last, d]
        s = torch.matmul(qq, k[:, :, j].transpose(1, 2)[:, None]).float().mul_(softmax_scale)
        probs = torch.softmax(s.masked_fill_(hidden, float("-inf")), dim=-1)
        vert[:, idx] = probs.sum(2)
        slash[:, idx] = _slash_sums(probs)
    nv = min(p.vertical_topk, sk)
    cols = vert.topk(nv, dim=-1).indices
    dd = _top_diagonals(slash, offset, block, -(-p.slash_topk // block))
    bi, bc = _diag_blocks(dd, sq, sk, block)
    ci, cc = _columns(cols, torch.ones_like(cols, dtype=torch.bool), sq, sk, block)
    return SparseIndex(bi, bc, ci, cc, _diag_cover(dd, sk, block), block, sq, sk)


def _slash_sums(probs: Tensor) -> Tensor:
    """Sums along slashes of the last rows' probabilities [b, c, last, k_len], whose row r
    sits at position ``k_len - last + r``: out[..., s] = sum_r probs[r, k_len - last + r - s].

    Row r is written ``last - r`` columns right of a buffer row one longer than the keys, so
    that a view with row stride ``width + 1`` lines each slash up in one column (no atomics).
    """
    b, c, last, sk = probs.shape
    width = sk + last + 1
    buf = probs.new_zeros(b, c, last, width)
    buf[..., last: last + sk] = probs
    st = buf.stride()
    diag = buf.as_strided((b, c, last, sk + 1), (st[0], st[1], width + 1, 1))
    # column c' holds key c' + r - last of row r: slash (k_len - last + r) - key = k_len - c'
    return diag.sum(2).flip(-1)[..., :sk]


def diagonal_scores(slash: Tensor, offset: int, block: int) -> Tensor:
    """Per diagonal block offset ``dd`` (index ``dd + 1``), the summed scores of the slashes
    it covers: slash ``s`` of [b, n, k_len] lies in offsets ceil((s - r) / block) and
    -floor((r + block - 1 - s) / block), ``r = offset % block``."""
    b, n, sk = slash.shape
    nkb = -(-sk // block)
    t = torch.arange(sk, device=slash.device)
    d1, d2 = _static_offsets(offset, block, t)[: 2 * sk].view(2, sk)
    out = torch.zeros(b, n, nkb + 3, device=slash.device, dtype=torch.float32)
    out.scatter_add_(2, (d1 + 1).clamp(0, nkb + 2).expand(b, n, -1), slash)
    out.scatter_add_(2, (d2 + 1).clamp(0, nkb + 2).expand(b, n, -1), slash * (d2 != d1))
    return out


def _top_diagonals(slash: Tensor, offset: int, block: int, count: int) -> Tensor:
    """The ``count`` diagonal block offsets of highest :func:`diagonal_scores`, plus the
    diagonal blocks 0 and -1, as [b, n, count + 2] (``_BIG`` where padding)."""
    scores = diagonal_scores(slash, offset, block)
    top = scores.topk(min(count, scores.shape[-1]), dim=-1).indices - 1
    own = torch.tensor([0, -1], device=slash.device).expand(*top.shape[:2], 2)
    t, _ = _pack(torch.cat([top, own], -1) + 1, torch.ones_like(torch.cat([top, own], -1), dtype=torch.bool))
    return torch.where(t >= 0, t.long() - 1, torch.full_like(t, _BIG, dtype=torch.long))


def _pool(x: Tensor, block: int) -> Tensor:
    """Mean over ``block``-row blocks of x [b, s, heads, d] -> float32 [b, heads, nblocks, d]
    (the last partial block averages its own rows; accumulated in fp32 without a copy)."""
    b, s, h, d = x.shape
    full = s // block
    parts = [x[:, : full * block].reshape(b, full, block, h, d).sum(2, dtype=torch.float32) / block]
    if s > full * block:
        parts.append(x[:, full * block:].sum(1, keepdim=True, dtype=torch.float32) / (s - full * block))
    return torch.cat(parts, 1).transpose(1, 2)


def block_sparse_index(q: Tensor, k: Tensor, p: BlockSparse, heads: Tensor) -> SparseIndex:
    """Top-``topk`` key blocks per query block from mean-pooled Q.K.  Taken first, in this
    order: the key block of the query block's first position (so no row is empty), the
    first key block, the other diagonal block (queries not aligned to key blocks)."""
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    group, block = h // hk, p.block
    nqb, nkb = -(-sq // block), -(-sk // block)
    first, last = _positions(sq, sk, block, q.device)
    kb = torch.arange(nkb, device=q.device)
    visible = kb[None, :] * block <= last[:, None]  # [nqb, nkb]
    hidden = ~visible
    big = torch.finfo(torch.float32).max
    own = first.div(block, rounding_mode="floor")[:, None]  # [nqb, 1]
    nxt = (own + 1).clamp(max=nkb - 1)  # queries not aligned to key blocks reach into it
    nxt_val = torch.where(nxt * block <= last[:, None], big / 2, float("-inf"))
    nxt_val = torch.where(nxt == own, float("inf"), nxt_val)
    pq = _pool(q, block)[:, heads]  # [b, n, nqb, d]
    pk = _pool(k, block)  # [b, hk, nkb, d]
    top = min(p.topk, nkb)
    out = torch.empty(b, heads.numel(), nqb, top, dtype=torch.long, device=q.device)
    ok = torch.empty(b, heads.numel(), nqb, top, dtype=torch.bool, device=q.device)
    for j, idx in _kv_chunks(heads, group, nqb, nkb):
        s = torch.matmul(pq[:, idx], pk[:, j, None].transpose(-1, -2))  # [b, c, nqb, nkb]
        # the block of each query block's first position (every row sees it) first, then
        # the first block, then the next diagonal block, then the best scores
        s.masked_fill_(hidden, float("-inf"))
        s.scatter_(-1, nxt.expand(*s.shape[:2], -1, -1), nxt_val.expand(*s.shape[:2], -1, -1))
        s[..., 0] = big
        s.scatter_(-1, own.expand(*s.shape[:2], -1, -1), float("inf"))
        vals, ind = s.topk(top, dim=-1)
        out[:, idx], ok[:, idx] = ind, vals > float("-inf")
    bi, bc = _pack(out, ok, unique=True)  # top-k indices are distinct
    ci, cc, cover = _no_columns(b, heads.numel(), sq, sk, block, q.device)
    return SparseIndex(bi, bc, ci, cc, cover, block, sq, sk)


def index_mask(index: SparseIndex) -> Tensor:
    """The dense boolean mask [b, h, q_len, k_len] an index attends under (True = read)."""
    bi, bc = index.block_idx, index.block_cnt
    b, h, nqb, w = bi.shape
    B, sq, sk = index.block, index.q_len, index.k_len
    nkb = -(-sk // B)
    valid = torch.arange(w, device=bi.device) < bc[..., None]
    blocks = torch.zeros(b, h, nqb, nkb + 1, dtype=torch.bool, device=bi.device)
    blocks.scatter_(3, torch.where(valid, bi.long(), torch.full_like(bi, nkb, dtype=torch.long)), valid)
    blocks = blocks[..., :nkb]
    mask = blocks.repeat_interleave(B, 2).repeat_interleave(B, 3)[:, :, :sq, :sk]
    ci, cc = index.col_idx, index.col_cnt
    if ci.shape[-1]:
        ncol = ci.shape[-1]
        cmask = torch.zeros(b, h, nqb, sk + 1, dtype=torch.bool, device=bi.device)
        cvalid = torch.arange(ncol, device=bi.device) < cc[..., None]  # [b, h, nqb, ncol]
        cidx = torch.where(ci >= 0, ci.long(), torch.full_like(ci, sk, dtype=torch.long))
        cmask.scatter_(3, torch.where(cvalid, cidx[:, :, None, :].expand_as(cvalid),
                                      torch.full_like(cvalid, sk, dtype=torch.long)), cvalid)
        mask = mask | cmask[..., :sk].repeat_interleave(B, 2)[:, :, :sq]
    rows = torch.arange(sq, device=bi.device)[:, None] + (sk - sq)
    return mask & (torch.arange(sk, device=bi.device)[None, :] <= rows)


def density(index: SparseIndex) -> float:
    """Keys read / keys a dense causal attention reads (exact, from block and column counts)."""
    B, sq, sk = index.block, index.q_len, index.k_len
    if sq == 0 or sk == 0:
        return 0.0
    m = index_mask(index) if sq * sk <= (1 << 22) else None
    if m is not None:
        return float(m.float().sum() / (m.shape[0] * m.shape[1] * causal_pairs(sq, sk)))
    # long sequences: blocks x block (the causal clipping of diagonal blocks ignored)
    keys = index.block_cnt.double().sum() * B * B + index.col_cnt.double().sum() * B
    return float(keys / (index.block_cnt.shape[0] * index.block_cnt.shape[1] * causal_pairs(sq, sk)))


def causal_pairs(sq: int, sk: int) -> int:
    """Query-key pairs of causal attention of the last ``sq`` of ``sk`` positions."""
    off = sk - sq
    return sq * off + sq * (sq + 1) // 2


def block_sparse_density(q_len: int, topk: int, block: int = 64) -> float:
    """Density of :class:`BlockSparse` at ``q_len == k_len``: every query block reads
    ``min(topk, visible blocks)`` blocks (independent of the data); diagonal clipping ignored."""
    nqb = -(-q_len // block)
    blocks = sum(min(topk, m + 1) for m in range(nqb))
    return min(1.0, blocks * block * block / causal_pairs(q_len, q_len))


