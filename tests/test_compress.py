"""Scoring, smoothing and selecting the passing tokens (megatron_apb.compress).

Each scorer is compared with a hand-written per-token / per-group loop in float64.
Tolerance 1e-5 for float32 results: the values are O(1) (scores of a small random MLP,
sums of a few softmax probabilities) and float32 matmul round-off over <= 128 terms is
~1e-6; any wrong concatenation order, head grouping or softmax axis changes them by O(0.1).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_apb.compress import (
    RetainingHead,
    query_attention_scores,
    random_scores,
    select_passing,
    smooth_scores,
)

ATOL = 1e-5  # see the module docstring


# --------------------------------------------------------------------------------------
# RetainingHead
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,kv_heads,dim,hidden", [(4, 2, 8, 32), (3, 1, 16, 24), (2, 2, 4, 8)])
def test_retaining_head_parameters(heads, kv_heads, dim, hidden):
    head = RetainingHead(heads, kv_heads, dim, hidden=hidden)
    params = {name: tuple(p.shape) for name, p in head.named_parameters()}
    assert params == {
        "fc1.weight": (hidden, (heads + 2 * kv_heads) * dim),
        "fc2.weight": (kv_heads, hidden),
    }
    # the reference checkpoints' keys load strictly (no biases, no extra buffers)
    state = {"fc1.weight": torch.randn(hidden, (heads + 2 * kv_heads) * dim),
             "fc2.weight": torch.randn(kv_heads, hidden)}
    head.load_state_dict(state, strict=True)
    assert torch.equal(head.fc1.weight, state["fc1.weight"])


def test_retaining_head_default_hidden_is_1024():
    head = RetainingHead(2, 1, 4)
    assert head.fc1.weight.shape == (1024, 16) and head.fc2.weight.shape == (1, 1024)


@pytest.mark.parametrize("batch,seq,heads,kv_heads,dim", [(1, 5, 4, 2, 8), (2, 7, 6, 3, 4), (2, 1, 2, 2, 16)])
def test_retaining_head_forward_matches_hand_written(batch, seq, heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(batch * 100 + seq)
    head = RetainingHead(heads, kv_heads, dim, hidden=32)
    # the head leaves its weights uninitialised (set by a checkpoint): set them here
    fan_in = (heads + 2 * kv_heads) * dim
    with torch.no_grad():
        head.fc1.weight.copy_(torch.randn(32, fan_in, generator=gen) / math.sqrt(fan_in))
        head.fc2.weight.copy_(torch.randn(kv_heads, 32, generator=gen) / math.sqrt(32))
    q = torch.randn(batch, seq, heads, dim, generator=gen)
    k = torch.randn(batch, seq, kv_heads, dim, generator=gen)
    v = torch.randn(batch, seq, kv_heads, dim, generator=gen)
    scores = head(q, k, v)
    assert scores.shape == (batch, seq, kv_heads) and scores.dtype == torch.float32

    w1 = head.fc1.weight.detach().double()
    w2 = head.fc2.weight.detach().double()
    expected = torch.empty(batch, seq, kv_heads, dtype=torch.float64)
    for b in range(batch):
        for t in range(seq):
            x = torch.cat([q[b, t].flatten(), k[b, t].flatten(), v[b, t].flatten()]).double()
            expected[b, t] = w2 @ F.silu(w1 @ x)
    assert (scores.double() - expected).abs().max().item() <= ATOL


def test_retaining_head_does_not_consume_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    RetainingHead(4, 2, 8, hidden=16)
    assert torch.equal(torch.rand(4), expected)


def test_retaining_head_low_precision_weights_give_float32_scores():
    head = RetainingHead(2, 1, 4, hidden=8, dtype=torch.bfloat16)
    with torch.no_grad():
        head.fc1.weight.fill_(0.01)
        head.fc2.weight.fill_(0.01)
    q, k, v = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4)
    assert head(q, k, v).dtype == torch.float32


# --------------------------------------------------------------------------------------
# query_attention_scores
# --------------------------------------------------------------------------------------


def _query_scores_loop(q, k, scale):
    """For each KV head g: sum over query rows and the query heads of group g of the
    softmax over the local keys of (q . k) * scale."""
    b, m, h, d = q.shape
    L, kvh = k.shape[1], k.shape[2]
    group = h // kvh
    out = torch.zeros(b, L, kvh, dtype=torch.float64)
    for bi in range(b):
        for g in range(kvh):
            for head in range(g * group, (g + 1) * group):
                for row in range(m):
                    logits = torch.stack(
                        [(q[bi, row, head].double() @ k[bi, j, g].double()) * scale for j in range(L)]
                    )
                    out[bi, :, g] += torch.softmax(logits, dim=0)
    return out


@pytest.mark.parametrize(
    "batch,m,L,heads,kv_heads,dim,scale",
    [(1, 3, 6, 4, 2, 8, None), (2, 1, 9, 6, 2, 4, None), (2, 4, 5, 3, 3, 8, 0.7), (1, 2, 7, 4, 1, 16, None)],
)
def test_query_attention_scores_matches_loop(batch, m, L, heads, kv_heads, dim, scale):
    gen = torch.Generator().manual_seed(m * 10 + L)
    q = torch.randn(batch, m, heads, dim, generator=gen)
    k = torch.randn(batch, L, kv_heads, dim, generator=gen)
    scores = query_attention_scores(q, k, softmax_scale=scale)
    assert scores.shape == (batch, L, kv_heads) and scores.dtype == torch.float32
    expected = _query_scores_loop(q, k, scale if scale is not None else 1 / math.sqrt(dim))
    assert (scores.double() - expected).abs().max().item() <= ATOL
    # each softmax row sums to 1: every KV head's scores total m * (heads per group)
    totals = scores.sum(dim=1)
    assert torch.allclose(totals, torch.full_like(totals, m * heads // kv_heads), atol=ATOL)


# --------------------------------------------------------------------------------------
# smooth_scores
# --------------------------------------------------------------------------------------


def _sliding_max(scores, kernel):
    """out[t] = max(scores[t - r : t + r + 1]) with the window clipped at the edges."""
    r = kernel // 2
    L = scores.shape[1]
    out = torch.empty_like(scores)
    for t in range(L):
        out[:, t] = scores[:, max(0, t - r) : min(L, t + r + 1)].amax(dim=1)
    return out


@pytest.mark.parametrize("L", [1, 2, 3, 7, 20])
def test_smooth_kernel_1_is_identity(L):
    scores = torch.randn(2, L, 3)
    assert torch.equal(smooth_scores(scores, 1), scores)


@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("L", [1, 2, 3, 6, 20])
def test_smooth_is_clipped_sliding_max(L, kernel):
    gen = torch.Generator().manual_seed(L * 10 + kernel)
    # all-negative scores: a zero-padded max-pool would leak 0 into the edge windows
    scores = -torch.rand(2, L, 3, generator=gen) - 0.5
    out = smooth_scores(scores, kernel)
    assert out.shape == scores.shape
    assert torch.equal(out, _sliding_max(scores, kernel))  # max selects, so exact


def test_smooth_empty_sequence():
    scores = torch.zeros(2, 0, 3)
    assert smooth_scores(scores, 5).shape == (2, 0, 3)


# --------------------------------------------------------------------------------------
# select_passing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("passing_len", [1, 5, 19])
def test_select_passing_is_sorted_top_n(passing_len):
    gen = torch.Generator().manual_seed(passing_len)
    b, L, kvh, d = 2, 20, 3, 4
    scores = torch.rand(b, L, kvh, generator=gen)  # continuous: ties have probability 0
    k = torch.randn(b, L, kvh, d, generator=gen)
    v = torch.randn(b, L, kvh, d, generator=gen)
    k_sel, v_sel, idx = select_passing(scores, k, v, passing_len)
    assert idx.shape == (b, passing_len, kvh)
    assert k_sel.shape == v_sel.shape == (b, passing_len, kvh, d)
    for bi in range(b):
        for g in range(kvh):
            chosen = idx[bi, :, g]
            top = torch.topk(scores[bi, :, g], passing_len).indices
            assert set(chosen.tolist()) == set(top.tolist())
            assert torch.all(chosen[1:] > chosen[:-1])  # strictly ascending (sequence order)
            assert torch.equal(k_sel[bi, :, g], k[bi, chosen, g])
            assert torch.equal(v_sel[bi, :, g], v[bi, chosen, g])


@pytest.mark.parametrize("passing_len", [20, 21, 1000])
def test_select_passing_keeps_everything_when_long_enough(passing_len):
    b, L, kvh, d = 2, 20, 3, 4
    scores = torch.rand(b, L, kvh)
    k, v = torch.randn(b, L, kvh, d), torch.randn(b, L, kvh, d)
    k_sel, v_sel, idx = select_passing(scores, k, v, passing_len)
    assert torch.equal(idx, torch.arange(L)[None, :, None].expand(b, L, kvh))
    assert torch.equal(k_sel, k) and torch.equal(v_sel, v)


def test_select_passing_ties_go_to_the_earlier_token():
    # plateaus like these are what max-pool smoothing produces
    scores = torch.tensor([0.5, 0.9, 0.9, 0.9, 0.1, 0.9, 0.2])[None, :, None]
    k = torch.arange(7.0)[None, :, None, None]
    k_sel, _, idx = select_passing(scores, k, k, 2)
    assert idx.flatten().tolist() == [1, 2]
    _, _, idx = select_passing(scores, k, k, 5)
    assert idx.flatten().tolist() == [0, 1, 2, 3, 5]
    smoothed = smooth_scores(torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])[None, :, None], 3)
    _, _, idx = select_passing(smoothed, k, k, 2)
    assert idx.flatten().tolist() == [1, 2]


def test_select_passing_zero():
    k = torch.randn(1, 5, 2, 4)
    k_sel, v_sel, idx = select_passing(torch.rand(1, 5, 2), k, k, 0)
    assert idx.shape == (1, 0, 2) and k_sel.shape == v_sel.shape == (1, 0, 2, 4)


# --------------------------------------------------------------------------------------
# random_scores
# --------------------------------------------------------------------------------------


def test_random_scores_deterministic_per_seed():
    a = random_scores(2, 10, 3, seed=7)
    b = random_scores(2, 10, 3, seed=7)
    c = random_scores(2, 10, 3, seed=8)
    assert a.shape == (2, 10, 3) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.all((a >= 0) & (a < 1))
    # independent of the global RNG state
    torch.manual_seed(123)
    assert torch.equal(random_scores(2, 10, 3, seed=7), a)


def test_select_passing_rejects_negative_length():
    scores, k = torch.rand(1, 6, 2), torch.randn(1, 6, 2, 4)
    with pytest.raises(ValueError, match="passing_len must be >= 0"):
        select_passing(scores, k, k, -1)


def test_smooth_scores_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        smooth_scores(torch.rand(1, 6, 2), 4)
