"""SnapKV: which prefill tokens the KV cache keeps, from the attention of the last queries.

After a long prefill most keys receive almost no attention from what comes next, and the
last few queries of the prompt (the *observation window*) already show which ones matter
(SnapKV, arXiv 2404.14469).  Per KV head::

    p[w, j]  = softmax_j(q_w · k_j * scale)        w: window query, j: key (causal)
    s[j]     = Σ_w Σ_{query heads h of the group} p_h[w, j]      for keys before the window
    s'       = pool1d(s)                           max or mean over ``kernel`` neighbours
    kept     = top-(budget - window) of s'  ∪  the window's own keys

The softmax is over *every* key of the sequence.  A block of keys (one context-parallel
rank's) is scored with the window's global LSE (:func:`window_lse` of each block, merged
with ``logsumexp``), so blocks scored apart sum to the scores of the whole sequence.

Pure tensor math, no process group.  :func:`window_mass_reference` is the obviously
correct dense float64 form; :func:`window_lse` / :func:`window_mass` are the same math
over chunks of keys (memory ``heads x window x chunk``, not ``x sequence``).

Shapes: q_win [batch, window, heads, d] (post-RoPE), k [batch, n, kv_heads, d]; query head
``h`` reads KV head ``h // (heads // kv_heads)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import KV_POOLS as POOLS

Tensor = torch.Tensor


def _grouped(q_win: Tensor, kv_heads: int) -> Tensor:
    """[b, W, H, d] -> float32 [b, kv, r, W, d] (r = query heads per KV head)."""
    b, w, h, d = q_win.shape
    if h % kv_heads:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({kv_heads})")
    return q_win.float().reshape(b, w, kv_heads, h // kv_heads, d).permute(0, 2, 3, 1, 4)


def _logits(qg: Tensor, k: Tensor, key_start: int, query_start: int, scale: float) -> Tensor:
    """Scaled float32 logits [b, kv, r, W, n] of grouped queries against keys k [b, n, kv, d],
    -inf where a key comes after the query (causal, by absolute position)."""
    logits = torch.einsum("bgrwd,bngd->bgrwn", qg, k.float()) * scale
    q_pos = query_start + torch.arange(qg.shape[3], device=k.device)
    k_pos = key_start + torch.arange(k.shape[1], device=k.device)
    return logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))


def _scale(q_win: Tensor, softmax_scale: Optional[float]) -> float:
    return softmax_scale if softmax_scale is not None else q_win.shape[-1] ** -0.5


def window_lse(q_win: Tensor, k: Tensor, *, key_start: int = 0, query_start: int,
               softmax_scale: Optional[float] = None, chunk: int = 16384) -> Tensor:
    """log Σ_j exp(logit) of every window query over the keys ``k`` (positions
    ``key_start...``): float32 [b, heads, W]; ``-inf`` where no key is visible."""
    kv = k.shape[2]
    qg, scale = _grouped(q_win, kv), _scale(q_win, softmax_scale)
    b, _, r, w, _ = qg.shape
    lse = torch.full((b, kv, r, w), float("-inf"), device=k.device)
    for c0 in range(0, k.shape[1], chunk):
        part = _logits(qg, k[:, c0 : c0 + chunk], key_start + c0, query_start, scale)
        lse = torch.logaddexp(lse, torch.logsumexp(part, dim=-1))
    return lse.reshape(b, kv * r, w)


def window_mass(q_win: Tensor, k: Tensor, lse: Tensor, *, key_start: int = 0, query_start: int,
                softmax_scale: Optional[float] = None, chunk: int = 16384) -> Tensor:
    """Attention probability each key of ``k`` receives, summed over the window's queries
    and the query heads of its KV head: float32 [b, kv_heads, n].  ``lse``: the window's
    LSE over the whole sequence [b, heads, W] (:func:`window_lse`, merged over blocks)."""
    kv = k.shape[2]
    qg, scale = _grouped(q_win, kv), _scale(q_win, softmax_scale)
    b, _, r, w, _ = qg.shape
    lse = lse.float().reshape(b, kv, r, w, 1)
    out = torch.empty((b, kv, k.shape[1]), dtype=torch.float32, device=k.device)
    for c0 in range(0, k.shape[1], chunk):
        part = _logits(qg, k[:, c0 : c0 + chunk], key_start + c0, query_start, scale)
        out[..., c0 : c0 + part.shape[-1]] = torch.exp(part - lse).sum(dim=(2, 3))
    return out


def window_mass_reference(q_win: Tensor, k: Tensor, *, query_start: int,
                          softmax_scale: Optional[float] = None) -> Tensor:
    """Dense float64 :func:`window_mass` of a whole sequence k [b, n, kv, d] (keys at
    positions 0..n-1): repeat the KV heads, softmax, sum.  The reference of the chunked
    form; memory ``heads x W x n``."""
    h, kv = q_win.shape[2], k.shape[2]
    scale = _scale(q_win, softmax_scale)
    kk = k.double().repeat_interleave(h // kv, dim=2)  # [b, n, H, d]
    logits = torch.einsum("bwhd,bnhd->bhwn", q_win.double(), kk) * scale
    q_pos = query_start + torch.arange(q_win.shape[1])
    causal = torch.arange(k.shape[1])[None, :] > q_pos[:, None]
    probs = torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1)
    return probs.sum(dim=2).reshape(k.shape[0], kv, h // kv, k.shape[1]).sum(dim=2)


def pool_scores(scores: Tensor, kernel: int, kind: str = "avg") -> Tensor:
    """Smooth scores [..., n] along the last axis: the max or mean over ``kernel`` (odd)
    neighbours, centred; the edges use the neighbours that exist."""
    if kind not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {kind!r}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pool kernel must be an odd int >= 1, got {kernel}")
    if kernel == 1 or scores.shape[-1] == 0:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    if kind == "max":
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return out.reshape(scores.shape)


def select_tokens(prefix_scores: Tensor, keep: int, window_rows: int) -> Tensor:
    """Rows kept per KV head: int64 [b, kv, keep], ascending.

    ``prefix_scores`` [b, kv, p]: the (pooled) scores of the rows before the window; the
    ``window_rows`` rows after them (the window's own keys) are always kept, and the
    top ``keep - window_rows`` of the prefix join them."""
    b, kv, p = prefix_scores.shape
    top = keep - window_rows
    if top < 0 or top > p:
        raise ValueError(f"keep={keep} must lie in [window rows {window_rows}, rows {p + window_rows}]")
    chosen = prefix_scores.topk(top, dim=-1).indices if top < p else \
        torch.arange(p, device=prefix_scores.device).expand(b, kv, p)
    window = torch.arange(p, p + window_rows, device=prefix_scores.device).expand(b, kv, window_rows)
    return torch.cat([chosen.sort(dim=-1).values, window], dim=-1)


def gather_tokens(x: Tensor, rows: Tensor) -> Tensor:
    """x [b, n, kv, d] at ``rows`` [b, kv, keep] (per head) -> [b, keep, kv, d]."""
    idx = rows.transpose(1, 2)[..., None].expand(-1, -1, -1, x.shape[-1])
    return x.gather(1, idx)


def split_budget(valid: Sequence[int], window: Sequence[int], budget: int) -> List[int]:
    """Tokens each block keeps: its ``window[i]`` window rows, plus a share of the rest of
    the budget proportional to its rows before the window (largest remainders, so the
    shares sum to ``budget`` exactly, capped by what the blocks hold)."""
    prefix = [v - w for v, w in zip(valid, window)]
    extra = max(0, min(budget - sum(window), sum(prefix)))
    total = sum(prefix)
    if total == 0:
        return list(window)
    exact = [extra * p / total for p in prefix]
    share = [int(e) for e in exact]
    order = sorted(range(len(prefix)), key=lambda i: (share[i] - exact[i], i))
    for i in order[: extra - sum(share)]:
        share[i] += 1
    return [w + s for w, s in zip(window, share)]


@dataclass(frozen=True)
class SnapKVPlan:
    """What the prefill of one prompt keeps: the whole of it known before the forward.

    ``doc_len`` document tokens, split in blocks of ``block_lens[r]`` tokens over the
    ranks (contiguous, in rank order); the window is the document's last ``window``
    positions; ``kept[r]`` tokens stay in block r's cache (the same count for every layer
    and KV head, so caches stay rectangular).
    """

    doc_len: int
    block_lens: tuple
    window: int
    budget: int
    kept: tuple
    pool: str = "avg"
    kernel: int = 7
    chunk: int = 16384

    @classmethod
    def make(cls, doc_len: int, block_len, blocks: int, *, window: int, budget: int, **kw) -> "SnapKVPlan":
        """The plan of a ``doc_len``-token document in ``blocks`` blocks of ``block_len``
        tokens each (an int), or of the per-rank lengths ``block_len`` (a sequence of
        ``blocks`` ints); the budget is capped at the document."""
        if not 0 < window <= doc_len:
            raise ValueError(f"window must lie in [1, {doc_len}], got {window}")
        if budget < window:
            raise ValueError(f"budget ({budget}) must be >= window ({window})")
        lens = (int(block_len),) * blocks if isinstance(block_len, int) else tuple(int(n) for n in block_len)
        if len(lens) != blocks:
            raise ValueError(f"{len(lens)} block lengths for {blocks} blocks")
        plan = cls(doc_len=doc_len, block_lens=lens, window=window, budget=min(budget, doc_len), kept=(), **kw)
        valid = [plan.valid(r) for r in range(blocks)]
        start = doc_len - window
        win = [max(0, min(plan.start(r) + v, doc_len) - max(plan.start(r), start)) for r, v in enumerate(valid)]
        return dataclasses.replace(plan, kept=tuple(split_budget(valid, win, plan.budget)))

    @property
    def window_start(self) -> int:
        return self.doc_len - self.window

    def start(self, rank: int) -> int:
        """Document position of block ``rank``'s first row."""
        return sum(self.block_lens[:rank])

    def valid(self, rank: int) -> int:
        """Real (non-padding) rows of block ``rank``."""
        return max(0, min(self.block_lens[rank], self.doc_len - self.start(rank)))


def snapkv_rows(q_win: Tensor, k: Tensor, *, budget: int, softmax_scale: Optional[float] = None,
                pool: str = "avg", kernel: int = 7, chunk: int = 16384) -> Tensor:
    """SnapKV on one whole sequence: the rows [b, kv, min(budget, n)] (ascending) of
    k [b, n, kv, d] to keep, the window being the last ``q_win.shape[1]`` positions."""
    n, w = k.shape[1], q_win.shape[1]
    plan = SnapKVPlan.make(n, n, 1, window=w, budget=budget, pool=pool, kernel=kernel, chunk=chunk)
    lse = window_lse(q_win, k, query_start=n - w, softmax_scale=softmax_scale, chunk=chunk)
    mass = window_mass(q_win, k, lse, query_start=n - w, softmax_scale=softmax_scale, chunk=chunk)
    return select_tokens(pool_scores(mass[..., : n - w], kernel, pool), plan.kept[0], w)
