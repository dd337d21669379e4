"""Offline per-head pattern search: which pattern keeps the most attention mass per head.

For one layer's post-RoPE q and k of a calibration prompt, every candidate pattern's index
is estimated as the prefill would (:func:`~megatron_apb.ops.sparse.index.build_index`),
and scored per head by

* ``recall``: the share of the attention mass (softmax of the full causal attention) that
  falls inside the pattern's mask, averaged over the query rows;
* ``density``: the keys it reads over the keys of dense causal attention (the FLOP cost).

:func:`choose_patterns` keeps, per head, the candidate of highest recall among those whose
density is at most ``max_density`` (the cheapest candidate if none is), so the plan meets a
FLOP budget while losing the least attention mass.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch

from .index import build_index, index_mask
from .patterns import AShape, BlockSparse, Pattern, VerticalSlash

Tensor = torch.Tensor


def default_candidates(budgets: Sequence[int], *, block: int = 64) -> List[Pattern]:
    """Every pattern kind at every budget (keys per query row)."""
    out: List[Pattern] = []
    for budget in budgets:
        out.append(BlockSparse(block=block, topk=max(1, -(-budget // block))))
        out.append(VerticalSlash(block=block, vertical_topk=max(1, budget // 4), slash_topk=max(1, budget - budget // 4)))
        sink = min(block, max(0, budget - 1))
        out.append(AShape(block=block, sink=sink, window=max(1, budget - sink)))
    return out


def score_patterns(q: Tensor, k: Tensor, candidates: Sequence[Pattern], softmax_scale: float = None,
                   ) -> Tuple[Tensor, Tensor]:
    """Recall and density of every candidate for every head: two float tensors [C, heads].

    q: [1, s, heads, d], k: [1, s, kv_heads, d] (one sequence).  Candidates whose window
    exceeds the sequence are scored as dense (recall 1, density 1)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    group = h // k.shape[2]
    causal = torch.arange(sk, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    pairs = causal.sum().item()
    recall = torch.ones(len(candidates), h)
    density = torch.ones(len(candidates), h)
    masks = []
    for p in candidates:
        try:
            p.check_length(sk)
        except ValueError:
            masks.append(None)
            continue
        masks.append(index_mask(build_index(q, k, (p,) * h, scale))[0])  # [h, sq, sk]
    for i in range(h):
        s = (q[0, :, i].float() @ k[0, :, i // group].float().T) * scale
        probs = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        for c, m in enumerate(masks):
            if m is not None:
                recall[c, i] = (probs * m[i]).sum(-1).mean()
                density[c, i] = m[i].sum() / pairs
    return recall, density


def choose_patterns(candidates: Sequence[Pattern], recall: Tensor, density: Tensor, max_density: float,
                    ) -> Tuple[Tuple[Pattern, ...], List[Dict]]:
    """Per head, the highest-recall candidate within ``max_density`` (else the cheapest);
    returns the patterns and one report row per head."""
    chosen, rows = [], []
    for i in range(recall.shape[1]):
        fits = [c for c in range(len(candidates)) if density[c, i] <= max_density]
        c = max(fits, key=lambda c: (recall[c, i], -density[c, i])) if fits else int(density[:, i].argmin())
        chosen.append(candidates[c])
        rows.append(dict(head=i, kind=candidates[c].kind, recall=float(recall[c, i]), density=float(density[c, i])))
    return tuple(chosen), rows
