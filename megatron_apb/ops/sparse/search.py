"""Offline per-head pattern search: which pattern keeps the most attention mass per head.

For one layer's post-RoPE q and k of a calibration prompt, every candidate pattern's index
is estimated as the prefill would (:func:`~megatron_apb.ops.sparse.index.build_index`),
and scored per head by

* ``recall``: the share of the attention mass (softmax of the full causal attention) that
  falls inside the pattern's mask, averaged over the query rows;
* ``density``: the keys it reads over the keys of dense causal attention (the FLOP cost);
* ``time`` (:func:`time_patterns`): the measured seconds of the candidate's index estimation
  and sparse kernel over those of dense attention on the same call (the cost as the kernels
  pay it: a vertical-slash index costs more to estimate and its gathered columns run slower
  per key than the blocks of a block-sparse one of the same density).

:func:`choose_patterns` keeps, per head, the candidate of highest recall among those whose
cost (density or time) is at most the budget (the cheapest candidate if none is), so the
plan meets a FLOP or time budget while losing the least attention mass.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..attention import attention_with_lse
from .index import build_index, index_mask
from .kernel import sparse_attention
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


def _seconds(fn: Callable[[], object], device: torch.device, runs: int) -> float:
    """Median seconds of ``fn`` over ``runs`` calls after one warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def time_patterns(q: Tensor, k: Tensor, v: Tensor, candidates: Sequence[Pattern],
                  softmax_scale: Optional[float] = None, *, runs: int = 3, dense_backend: str = "auto",
                  ) -> Tuple[Tensor, float]:
    """Measured cost of every candidate on one causal call: a float tensor [C] of (index
    estimation + sparse kernel) seconds with the candidate on every head, over the seconds of
    dense attention (``dense_backend``) on the same q, k, v; and those dense seconds.

    Candidates whose window exceeds the sequence run dense: cost 1.  Meant for a GPU with
    the Triton kernel (elsewhere the kernel's float32 reference is what gets timed)."""
    h, sk = q.shape[2], k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dense_s = _seconds(lambda: attention_with_lse(q, k, v, causal=True, softmax_scale=scale, backend=dense_backend),
                       q.device, runs)
    cost = torch.ones(len(candidates))
    for c, p in enumerate(candidates):
        try:
            p.check_length(sk)
        except ValueError:
            continue
        pats = (p,) * h
        cost[c] = _seconds(lambda: sparse_attention(q, k, v, build_index(q, k, pats, scale), scale),
                           q.device, runs) / dense_s
    return cost, dense_s


def choose_patterns(candidates: Sequence[Pattern], recall: Tensor, density: Tensor, max_density: float,
                    *, cost: Optional[Tensor] = None, max_cost: Optional[float] = None,
                    ) -> Tuple[Tuple[Pattern, ...], List[Dict]]:
    """Per head, the highest-recall candidate within the budget (else the cheapest);
    returns the patterns and one report row per head.

    The budget is ``density <= max_density``, or with ``cost`` (one measured cost per
    candidate, :func:`time_patterns`) ``cost <= max_cost``; ties in recall go to the cheaper."""
    if (cost is None) != (max_cost is None):
        raise ValueError("give cost and max_cost together")
    chosen, rows = [], []
    for i in range(recall.shape[1]):
        price = density[:, i] if cost is None else cost
        budget = max_density if cost is None else max_cost
        fits = [c for c in range(len(candidates)) if price[c] <= budget]
        c = max(fits, key=lambda c: (recall[c, i], -price[c])) if fits else int(price.argmin())
        chosen.append(candidates[c])
        row = dict(head=i, kind=candidates[c].kind, recall=float(recall[c, i]), density=float(density[c, i]))
        if cost is not None:
            row["time"] = float(cost[c])
        rows.append(row)
    return tuple(chosen), rows
