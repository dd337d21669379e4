"""Unequal (balanced) blocks: the cost model's arithmetic, the balancer against brute force,
the layout's validation, and (gloo, 3 ranks) exact/APB/Star forwards and decoding with
balanced blocks against single-process references built from the same weights.

Tolerances: logits 1e-5 as in test_megatron_cp.py (fp32 blocked attention + LSE merge vs
one dense softmax: ~2e-7 measured; a wrong position, mask or block moves them by > 1e-3).
The arithmetic is exact (integers) or compared to 1e-9 relative.
"""

from __future__ import annotations

import itertools

import pytest

from megatron_apb import APBConfig, APBConfigError, CPLayout
from megatron_apb.partition import (
    CostModel, RankWork, balance, balanced_blocks, gather_seconds, predicted_seconds, rank_work,
)

TOL = 1e-5


# ----------------------------------------------------------------- arithmetic
def _mask_pairs(layout, rank, world):
    """(query row, key row) pairs attended by ``rank``, counted on an explicit mask built
    from the algorithm's description (anchor rows causal in the anchor; block rows: the
    visible anchor, every passing row of earlier ranks, earlier blocks for exact, their own
    block causally)."""
    b, s = layout.block_len_on(rank), layout.block_start(rank)
    if layout.mode == "exact":
        return sum(1 for i in range(b) for j in range(s + b) if j <= s + i)
    la = layout.anchor_len_on(rank)
    keys = la + rank * layout.passing_len + b
    count = 0
    for i in range(la + b):
        for j in range(keys):
            if i < la:
                count += j <= i and j < la
            elif j < la:
                count += layout.anchor_visible_on(rank)
            elif j < la + rank * layout.passing_len:
                count += 1
            else:
                count += j - la - rank * layout.passing_len <= i - la
    return count


@pytest.mark.parametrize("mode,kwargs", [("exact", {}), ("star", {}),
                                         ("apb", dict(anchor_len=5, passing_len=3, compressor="random"))])
def test_rank_work_counts_the_masks_pairs(mode, kwargs):
    layout = APBConfig(mode=mode, **kwargs).layout(9, cp_size=3).with_blocks((12, 9, 6))
    for rank in range(3):
        work = rank_work(layout, rank, 3)
        assert work.pairs == _mask_pairs(layout, rank, 3), (mode, rank)
        assert work.rows == layout.local_len(rank) if mode != "exact" else layout.block_len_on(rank)
    if mode == "apb":  # the query-attention compressor adds its scoring: half a pair per (query row, key)
        scored = APBConfig(mode=mode, **dict(kwargs, compressor="query_attention", query_prefix_len=1))
        layout = scored.layout(9, cp_size=3, query_len=2).with_blocks((12, 9, 6))
        assert layout.first_rank_anchor
        for rank in range(3):
            scoring = 2 * layout.block_len_on(rank) / 2 if rank < 2 else 0
            assert rank_work(layout, rank, 3).pairs == _mask_pairs(layout, rank, 3) + scoring


def test_cost_model_flops_and_fit():
    row = CostModel.flops_per_row(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336)
    assert row == 2 * 4096 * 6144 + 2 * 4096 * 4096 + 6 * 4096 * 14336
    assert CostModel.flops_per_row(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, tp=2) == row / 2
    assert CostModel.flops_per_pair(heads=32, head_dim=128) == 4 * 32 * 128
    truth = CostModel(row_s=3e-7, pair_s=2e-11)
    works = [RankWork(rows=r, pairs=p) for r, p in ((40960, 5.7e8), (40960, 9.1e8), (32768, 1.2e9), (8192, 4e7))]
    fitted = CostModel.fit(works, [truth.seconds(w) for w in works])
    assert fitted.row_s == pytest.approx(truth.row_s, rel=1e-9)
    assert fitted.pair_s == pytest.approx(truth.pair_s, rel=1e-9)
    with pytest.raises(APBConfigError, match="do not differ"):
        CostModel.fit([RankWork(1, 2), RankWork(2, 4)], [1.0, 2.0])
    with pytest.raises(APBConfigError, match="pair_s"):
        CostModel(row_s=1.0, pair_s=-1.0)


def test_gather_seconds_follow_the_nccl_figures():
    assert gather_seconds(2**20, 4) == pytest.approx(42e-6)
    # 16 MiB per rank on 4 ranks: 48 MiB of bus traffic at 240 GiB/s, on top of the latency
    want = 42e-6 + (48 - 3) * 2**20 / (240 * 2**30)
    assert gather_seconds(16 * 2**20, 4) == pytest.approx(want)
    assert gather_seconds(16 * 2**20, 1) == 0.0


@pytest.mark.parametrize("n,world,align", [(12, 3, 1), (13, 3, 1), (10, 4, 1), (24, 3, 4)])
def test_balance_finds_the_brute_force_optimum(n, world, align):
    # exact-style times: rows + attention to every earlier token (grows with the start)
    def seconds(rank, block, start):
        return 1.0 * block + 0.3 * (block * (block + 1) / 2 + block * start) + 0.5 * rank

    mins = [2] + [1] * (world - 1)
    got = balance(seconds, n, world, min_blocks=mins, align=align)
    assert sum(got) == n and all(b >= m for b, m in zip(got, mins))
    assert all(b % align == 0 for b in got[:-1])

    def worst(blocks):
        starts = [sum(blocks[:r]) for r in range(world)]
        return max(seconds(r, b, s) for r, (b, s) in enumerate(zip(blocks, starts)))

    best = min(worst(c) for c in itertools.product(range(1, n + 1), repeat=world)
               if sum(c) == n and all(b >= m for b, m in zip(c, mins))
               and all(b % align == 0 for b in c[:-1]))
    assert worst(got) == pytest.approx(best, rel=1e-9)


def test_balanced_128k_cp4_apb_equalises_the_predicted_ranks():
    config = APBConfig(partition="balanced")
    layout = config.layout_for(131072, 4, query_len=32)
    equal = APBConfig().layout_for(131072, 4, query_len=32)
    assert sum(layout.block_lens) == 131072 and layout.block_lens[0] > layout.block_lens[-1]
    assert (layout.anchor_len, layout.passing_len) == (equal.anchor_len, equal.passing_len)
    cost = CostModel.default()
    before, after = predicted_seconds(equal, 4, cost), predicted_seconds(layout, 4, cost)
    assert max(before) / min(before) > 1.3
    assert max(after) / min(after) <= 1.01  # up to the 64-token alignment
    assert max(after) < max(before)
    assert balanced_blocks(layout, 131072, 4, cost) == layout.block_lens  # cached, from any layout


# ------------------------------------------------------------------ layouts
def test_equal_partition_is_todays_layout():
    for mode in ("apb", "star", "exact", "ulysses"):
        lay = APBConfig(mode=mode).layout_for(1001, 4, query_len=3 if mode == "apb" else 0)
        assert lay.block_lens == () and lay.equal
        assert [lay.block_start(r) for r in range(4)] == [0, 251, 502, 753]
        assert [lay.block_len_on(r) for r in range(4)] == [251] * 4 and lay.padded_len(4) == 1004
    # ulysses needs equal blocks: balanced falls back to them
    assert APBConfig(mode="ulysses", partition="balanced").layout_for(4096, 4).equal


def test_unequal_layout_helpers():
    lay = CPLayout(mode="apb", block_len=7, anchor_len=2, passing_len=3).with_blocks((7, 5, 4))
    assert [lay.block_start(r) for r in range(3)] == [0, 7, 12]
    assert [lay.local_len(r) for r in range(3)] == [7, 7, 6]
    assert lay.padded_len(3) == 16 and lay.block_len == 7


def test_bad_partitions_are_refused_with_the_fix():
    with pytest.raises(APBConfigError, match=r"rank 1's block \(2 tokens\) is shorter than passing_len=3"):
        CPLayout(mode="apb", block_len=7, passing_len=3).with_blocks((7, 2, 4))
    with pytest.raises(APBConfigError, match="rank 2 is empty"):
        CPLayout(mode="exact", block_len=7).with_blocks((7, 3, 0))
    with pytest.raises(APBConfigError, match="must be the longest"):
        CPLayout(mode="exact", block_len=3, block_lens=(7, 3))
    with pytest.raises(APBConfigError, match="has 3 blocks .* 4 ranks"):
        CPLayout(mode="exact", block_len=7).with_blocks((7, 3, 2)).check_ranks(4)
    with pytest.raises(APBConfigError, match="fewer than the 4 context-parallel ranks"):
        APBConfig(partition="balanced").layout_for(3, 4)
    with pytest.raises(APBConfigError, match="partition must be one of"):
        APBConfig(partition="zigzag")
    with pytest.raises(APBConfigError, match="cannot be split over 4 ranks"):
        balance(lambda r, b, s: b, 3, 4)


# ------------------------------------------------------------- distributed
def test_balanced_blocks_on_three_ranks_match_single_process_references():
    from tests.distributed import run_distributed
    from tests.partition_workers import unequal_blocks

    results = run_distributed(unequal_blocks, 3, 40, 6)
    blocks = results[0]["blocks"]
    for name, lens in blocks.items():
        if name != "exact/equal":
            assert len(set(lens)) > 1 and sum(lens) == 40, (name, lens)  # really unequal
    assert blocks["exact/equal"] == ()
    for rank, res in enumerate(results):
        for name in ("exact", "apb", "star"):
            assert res[name] <= TOL, (rank, name, res[name])
        assert res["step"] <= TOL, (rank, res["step"])
        tokens = res["tokens"]
        assert tokens["exact/balanced"] == tokens["exact/equal"] == tokens["exact/balanced/local"], tokens
        assert tokens["apb/balanced"] == tokens["apb/balanced/local"] == results[0]["tokens"]["apb/balanced"]
    # SnapKV after a balanced prefill: the plan follows the unequal blocks
    n_doc = 40
    for rank, res in enumerate(results):
        for (name, budget), snap in res["snapkv"].items():
            assert len(set(snap["blocks"])) > 1, (name, snap["blocks"])  # really unequal
            assert snap["rows"] == [snap["share"]] * len(snap["rows"]), (name, budget, snap)
            assert snap["total"] == min(budget, n_doc)
            assert snap["local"] == snap["tokens"] == results[0]["snapkv"][(name, budget)]["tokens"]
        # a budget covering the document keeps it all: exact SnapKV answers as no compression
        assert res["snapkv"][("exact", n_doc + 50)]["tokens"] == res["tokens"]["exact/equal"]
        assert res["snapkv"][("apb", n_doc + 50)]["tokens"] == res["tokens"]["apb/balanced"]
        assert sum(r["snapkv"][("exact", 12)]["share"] for r in results) == 12
    # APB and Star must differ from exact attention somewhere, or agreeing shows nothing
    for name in ("apb", "star"):
        assert max(res[name + ":vs_full"] for res in results) > 1e-3, name
