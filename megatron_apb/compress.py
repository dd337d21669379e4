"""Choosing which local tokens a host passes on: scoring, smoothing, top-k, gathering.

Scorers give one score per local token and KV head, float32 [batch, local_len, kv_heads]:

* :class:`RetainingHead` (Locret): ``W2 · SiLU(W1 · [q ‖ k ‖ v])`` on **pre-RoPE** q, k, v.
  Under tensor parallelism W1 is row-parallel (each rank holds the columns of its own heads,
  partial products are summed over the TP group) and W2 is split by KV head.
* :func:`query_attention_scores`: training-free; the attention each local key receives
  from the query rows embedded in the anchor (post-RoPE, softmax over local keys), summed
  over those rows and over the query heads of the key's group.
* :func:`random_scores`: ablation baseline.

Then :func:`smooth_scores` (max-pool along the sequence) and :func:`select_passing` keep
the top ``passing_len`` tokens per KV head and gather their post-RoPE K and V.

Each scorer is registered as a :class:`Compressor` in
:data:`megatron_apb.registry.COMPRESSORS` under the name ``APBConfig.compressor`` takes;
:func:`score_block` is the one place that scores a rank's block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.nn.functional import all_reduce as _differentiable_all_reduce

from .config import APBConfig, CPLayout
from .registry import COMPRESSORS

Tensor = torch.Tensor

# Rows of the block's end used as the observation window when no query rows are known.
FALLBACK_WINDOW = 16


class RetainingHead(nn.Module):
    """Per-layer retaining head scoring each token for each local KV head.

    Args:
        num_heads: query heads on this rank; num_kv_heads: KV heads on this rank.
        head_dim: per-head channels; hidden: W1's output width (1024 in the reference).
        tp_group: tensor-parallel group over which W1's partial products are summed
            (None or size 1: no reduction).
    Parameters ``fc1.weight`` [hidden, (num_heads + 2 num_kv_heads) head_dim] and
    ``fc2.weight`` [num_kv_heads, hidden], no biases (the reference's names).
    """

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden=1024, tp_group=None, dtype=None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.tp_group = tp_group
        in_features = (num_heads + 2 * num_kv_heads) * head_dim
        # skip_init: weights are set by the caller (a checkpoint or init_retaining_head_),
        # and drawing from the global RNG here would shift the host model's own init
        self.fc1 = nn.utils.skip_init(nn.Linear, in_features, hidden, bias=False, dtype=dtype)
        self.fc2 = nn.utils.skip_init(nn.Linear, hidden, num_kv_heads, bias=False, dtype=dtype)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [b, s, heads, d], k, v [b, s, kv_heads, d] (pre-RoPE) -> float32 [b, s, kv_heads]."""
        b, s = q.shape[:2]
        x = torch.cat([q.reshape(b, s, -1), k.reshape(b, s, -1), v.reshape(b, s, -1)], dim=-1)
        hidden = self.fc1(x.to(self.fc1.weight.dtype))
        if self.tp_group is not None and torch.distributed.get_world_size(self.tp_group) > 1:
            hidden = _tp_sum(hidden, self.tp_group)
        return self.fc2(F.silu(hidden)).float()


def shard_retaining_head(fc1, fc2, *, num_heads, num_kv_heads, head_dim, tp_rank, tp_size):
    """The TP shard of full retaining-head weights (the reference layout).

    Args:
        fc1: [hidden, (num_heads + 2 num_kv_heads) head_dim], columns ordered [q ‖ k ‖ v],
            each head-major; fc2: [num_kv_heads, hidden].  Counts are for the whole model.
    Returns:
        (fc1 columns of this rank's q, k and v heads, fc2 rows of this rank's KV heads).
    """
    if num_heads % tp_size or num_kv_heads % tp_size:
        raise ValueError(
            f"tensor parallel size {tp_size} must divide heads ({num_heads}) and kv heads "
            f"({num_kv_heads})"
        )
    expected = (num_heads + 2 * num_kv_heads) * head_dim
    if fc1.shape[1] != expected or fc2.shape[0] != num_kv_heads:
        raise ValueError(
            f"retaining head shapes fc1 {tuple(fc1.shape)} / fc2 {tuple(fc2.shape)} do not fit "
            f"{num_heads} heads, {num_kv_heads} kv heads of dim {head_dim} (fc1 needs {expected} "
            "columns)"
        )
    hq, hk = num_heads // tp_size * head_dim, num_kv_heads // tp_size * head_dim
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    cols = torch.cat(
        [
            torch.arange(tp_rank * hq, (tp_rank + 1) * hq),
            q_end + torch.arange(tp_rank * hk, (tp_rank + 1) * hk),
            k_end + torch.arange(tp_rank * hk, (tp_rank + 1) * hk),
        ]
    )
    kv = num_kv_heads // tp_size
    return fc1[:, cols], fc2[tp_rank * kv : (tp_rank + 1) * kv]


def init_retaining_head_(head: "RetainingHead", *, seed, num_heads, num_kv_heads, tp_rank, tp_size):
    """Initialise ``head`` as the TP shard of a full head drawn from ``seed``.

    The full weights follow ``nn.Linear``'s default (uniform ±1/sqrt(fan_in)), so a model
    gets the same retaining heads at any tensor-parallel size.
    """
    gen = torch.Generator().manual_seed(seed)
    d, hidden = head.head_dim, head.fc1.out_features
    fan_in = (num_heads + 2 * num_kv_heads) * d
    fc1 = (torch.rand(hidden, fan_in, generator=gen) * 2 - 1) / math.sqrt(fan_in)
    fc2 = (torch.rand(num_kv_heads, hidden, generator=gen) * 2 - 1) / math.sqrt(hidden)
    fc1, fc2 = shard_retaining_head(
        fc1, fc2, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=d,
        tp_rank=tp_rank, tp_size=tp_size,
    )
    with torch.no_grad():
        head.fc1.weight.copy_(fc1)
        head.fc2.weight.copy_(fc2)
    return head


def _tp_sum(x, group):
    if x.requires_grad:
        return _differentiable_all_reduce(x, group=group)
    x = x.clone()
    torch.distributed.all_reduce(x, group=group)
    return x


def query_attention_scores(
    q_query: Tensor, k_local: Tensor, softmax_scale: Optional[float] = None
) -> Tensor:
    """Attention the local keys receive from the query rows.

    Args:
        q_query: [b, m, heads, d] post-RoPE query rows (the query embedded in the anchor).
        k_local: [b, L, kv_heads, d] post-RoPE local keys.
    Returns:
        float32 [b, L, kv_heads]: softmax over the L local keys per query row and head,
        summed over the m rows and the query heads of each KV group.
    """
    b, m, h, d = q_query.shape
    kvh = k_local.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qg = q_query.float().reshape(b, m, kvh, h // kvh, d)
    logits = torch.einsum("bmgrd,blgd->bgrml", qg, k_local.float()) * scale
    probs = torch.softmax(logits, dim=-1)
    return probs.sum(dim=(2, 3)).transpose(1, 2).contiguous()  # [b, L, kv_heads]


def random_scores(batch, local_len, kv_heads, *, seed: int, device=None) -> Tensor:
    """Uniform random scores from a generator seeded by ``seed`` (ablation baseline)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(batch, local_len, kv_heads, generator=gen).to(device)


def smooth_scores(scores: Tensor, kernel: int) -> Tensor:
    """Max-pool of odd width ``kernel`` along the sequence (dim 1), same length out."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"smoothing kernel must be an odd int >= 1, got {kernel}")
    if kernel == 1 or scores.shape[1] == 0:
        return scores
    x = scores.transpose(1, 2)  # [b, kv, L]
    x = F.max_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2)
    return x.transpose(1, 2)


def select_passing(scores: Tensor, k: Tensor, v: Tensor, passing_len: int):
    """Top-``passing_len`` tokens per KV head, kept in sequence order.

    Ties (frequent after max-pool smoothing) go to the earlier token, so the selection is
    deterministic on every device.

    Args:
        scores: [b, L, kv_heads]; k, v: [b, L, kv_heads, d] (post-RoPE k).
    Returns:
        (k_sel, v_sel) [b, passing_len, kv_heads, d] and the indices [b, passing_len, kv_heads].
    """
    if passing_len < 0:
        raise ValueError(f"passing_len must be >= 0, got {passing_len}")
    b, L, kvh = scores.shape
    n = min(passing_len, L)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    idx = order[:, :n].sort(dim=1).values
    gather = idx[..., None].expand(b, n, kvh, k.shape[-1])
    return torch.gather(k, 1, gather), torch.gather(v, 1, gather), idx


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ScoreInputs:
    """What a scorer may read about one rank's block in one layer.

    ``q_pre``/``k_pre``/``v``: pre-RoPE rows of the block only, [b, block, heads | kv, d];
    ``q``/``k``: post-RoPE rows of the whole local input (anchor first), so
    ``k[:, anchor_len:]`` are the block's keys; ``retaining_head``: the layer's
    :class:`RetainingHead` (None unless the model was built with one).
    """

    q_pre: Tensor
    k_pre: Tensor
    v: Tensor
    q: Tensor
    k: Tensor
    layout: CPLayout
    rank: int
    anchor_len: int
    layer_number: int
    num_kv_heads: int
    softmax_scale: float
    config: APBConfig
    retaining_head: Optional[nn.Module] = None


@dataclass(frozen=True)
class Compressor:
    """A registered scorer of passing tokens.

    Attributes:
        name: the ``APBConfig.compressor`` that selects it.
        score: ``ScoreInputs -> float32 [b, block, kv_heads]`` (higher: more worth passing).
        needs_retaining_heads: the model must be built with (trained) retaining heads.
        needs_query_rows: it reads the query rows embedded in the anchor, so rank 0 holds
            the anchor too (only for scoring).
    """

    name: str
    score: Callable[[ScoreInputs], Tensor]
    needs_retaining_heads: bool = False
    needs_query_rows: bool = False
    description: str = ""


def register_compressor(compressor: Compressor, *, replace: bool = False) -> Compressor:
    """Make ``compressor`` selectable as ``APBConfig(compressor=compressor.name)``."""
    return COMPRESSORS.register(compressor, replace=replace)


def score_block(inputs: ScoreInputs) -> Tensor:
    """Smoothed float32 scores [b, block, kv_heads] of a rank's block rows, by the
    compressor the config names."""
    scores = inputs.config.compressor_entry.score(inputs)
    return smooth_scores(scores, inputs.config.smoothing_kernel)


def _retaining_head_score(x: ScoreInputs) -> Tensor:
    if x.retaining_head is None:
        raise ValueError(
            "compressor='retaining_head' needs a model built with retaining heads: build it "
            "with that compressor (and load trained heads)"
        )
    return x.retaining_head(x.q_pre, x.k_pre, x.v)


def _query_attention_score(x: ScoreInputs) -> Tensor:
    layout, la = x.layout, x.anchor_len
    if layout.query_len > 0:
        rows = x.q[:, layout.query_start : layout.query_start + layout.query_len]
    elif la > 0:
        rows = x.q[:, :la]
    else:  # no anchor: the end of the block observes the rest (SnapKV's window)
        rows = x.q[:, -min(FALLBACK_WINDOW, layout.block_len_on(x.rank)) :]
    return query_attention_scores(rows, x.k[:, la:], x.softmax_scale)


def _random_score(x: ScoreInputs) -> Tensor:
    seed = x.config.seed + 7919 * x.layer_number + 104729 * x.rank
    return random_scores(x.q.shape[0], x.layout.block_len_on(x.rank), x.num_kv_heads, seed=seed, device=x.q.device)


register_compressor(Compressor(
    "retaining_head", _retaining_head_score, needs_retaining_heads=True,
    description="trained scorer W2 SiLU(W1 [q;k;v]) (Locret's retaining heads)",
))
register_compressor(Compressor(
    "query_attention", _query_attention_score, needs_query_rows=True,
    description="training-free: attention the block's keys get from the query rows",
))
register_compressor(Compressor("random", _random_score, description="uniform random scores (ablation)"))
