"""SnapKV KV compression (ops reference vs brute force, the engine at CP 1 and 2) and the
chunked prefill (projections and MLP over chunks of rows: the same output)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_apb import APBConfig
from megatron_apb.errors import APBConfigError
from megatron_apb.ops.snapkv import (SnapKVPlan, pool_scores, select_tokens, snapkv_rows, split_budget,
                                     window_lse, window_mass, window_mass_reference)
from tests.distributed import run_distributed


def _brute_mass(q, k, query_start):
    """Python loops: Σ over window queries and the group's heads of softmax probabilities."""
    b, w, h, d = q.shape
    n, kv = k.shape[1], k.shape[2]
    out = torch.zeros(b, kv, n, dtype=torch.float64)
    for bi, hi, wi in itertools.product(range(b), range(h), range(w)):
        g = hi // (h // kv)
        visible = range(min(n, query_start + wi + 1))
        logits = [float(q[bi, wi, hi].double() @ k[bi, j, g].double()) / math.sqrt(d) for j in visible]
        top = max(logits)
        total = sum(math.exp(x - top) for x in logits)
        for j, x in zip(visible, logits):
            out[bi, g, j] += math.exp(x - top) / total
    return out


def _brute_pool(x, kernel, kind):
    n, r = x.shape[-1], kernel // 2
    cols = [x[..., max(0, j - r) : j + r + 1] for j in range(n)]
    return torch.stack([c.amax(-1) if kind == "max" else c.mean(-1) for c in cols], dim=-1)


def test_window_mass_chunked_and_reference_match_brute_force():
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 6, 8), torch.randn(2, 23, 2, 8)  # GQA: 3 query heads per KV head
    brute = _brute_mass(q, k, query_start=18)
    ref = window_mass_reference(q, k, query_start=18)
    torch.testing.assert_close(ref, brute, rtol=1e-12, atol=1e-12)  # both float64
    lse = window_lse(q, k, query_start=18, chunk=4)  # chunks that do not divide 23
    # float32 chunks vs float64: the error of float32 softmax sums, ~1e-7 relative
    torch.testing.assert_close(window_mass(q, k, lse, query_start=18, chunk=4).double(), ref, rtol=1e-5, atol=1e-6)
    # blocks scored apart with the merged LSE add up to the whole sequence (what CP ranks do)
    parts = [(0, 9), (9, 17), (17, 23)]
    lses = torch.stack([window_lse(q, k[:, a:b], key_start=a, query_start=18) for a, b in parts])
    merged = torch.logsumexp(lses, dim=0)
    torch.testing.assert_close(merged, lse, rtol=1e-6, atol=1e-6)
    blocks = torch.cat([window_mass(q, k[:, a:b], merged, key_start=a, query_start=18) for a, b in parts], -1)
    torch.testing.assert_close(blocks.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_pool_matches_brute_force(kind):
    x = torch.randn(2, 3, 11)
    for kernel in (1, 3, 7):
        torch.testing.assert_close(pool_scores(x, kernel, kind), _brute_pool(x, kernel, kind))


def test_selection_matches_brute_force():
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 4, 16), torch.randn(1, 40, 2, 16)
    rows = snapkv_rows(q, k, budget=13, kernel=5, pool="max", chunk=7)
    assert rows.shape == (1, 2, 13)
    brute = _brute_pool(_brute_mass(q, k, query_start=36)[..., :36], 5, "max")
    for h in range(2):
        kept = rows[0, h].tolist()
        assert kept == sorted(kept) and kept[-4:] == [36, 37, 38, 39]  # the window itself
        want = brute[0, h].argsort(descending=True)[:9].sort().values.tolist()
        if kept[:9] != want:  # only a near-tie may differ (float32 vs float64 scores)
            lost = [j for j in want if j not in kept[:9]]
            won = [j for j in kept[:9] if j not in want]
            assert (brute[0, h, lost].min() - brute[0, h, won].max()).abs() < 1e-5
    # a budget covering everything keeps every row
    assert snapkv_rows(q, k, budget=100)[0, 0].tolist() == list(range(40))


def test_budget_split_and_plan():
    assert split_budget([10, 10, 4], [0, 0, 4], 10) == [3, 3, 4]
    assert sum(split_budget([7, 7, 6], [0, 3, 6], 13)) == 13
    assert split_budget([5, 5], [0, 2], 100) == [5, 5]  # capped by what the blocks hold
    plan = SnapKVPlan.make(37, 19, 2, window=20, budget=26)  # the window spans both blocks
    assert plan.kept == (2 + 6, 18) and sum(plan.kept) == 26  # window rows 2 + 18, the rest to rank 0
    with pytest.raises(ValueError, match="budget"):
        SnapKVPlan.make(37, 19, 2, window=20, budget=10)
    with pytest.raises(ValueError, match="keep"):
        select_tokens(torch.zeros(1, 1, 5), 2, 3)


@pytest.mark.parametrize("kwargs, field", [
    (dict(kv_compress="snapkv", kv_budget=0), "kv_budget"),
    (dict(kv_compress="snapkv", kv_budget=16, kv_window=32), "kv_budget"),
    (dict(kv_budget=16), "kv_budget"),  # with kv_window's default 32
    (dict(kv_compress="snapkv", kv_budget=64, kv_budget_ratio=0.1), "kv_budget"),
    (dict(kv_compress="snapkv", kv_budget_ratio=0.0), "kv_budget_ratio"),
    (dict(kv_compress="snapkv", kv_budget=64, kv_pool_kernel=4), "kv_pool_kernel"),
    (dict(kv_compress="snapkv", kv_budget=64, kv_pool="median"), "kv_pool"),
    (dict(kv_compress="h2o"), "kv_compress"),
    (dict(kv_compress="none", kv_budget=64), "kv_compress"),
    (dict(prefill_chunk=-1), "prefill_chunk"),
])
def test_bad_compression_settings_name_the_field(kwargs, field):
    with pytest.raises(APBConfigError) as err:
        APBConfig(**kwargs)
    assert err.value.field == field and field in str(err.value)


def test_budget_settings():
    cfg = APBConfig(kv_compress="snapkv", kv_budget_ratio=0.1, kv_window=8)
    assert cfg.kv_budget_for(1000) == 100 and cfg.kv_budget_for(20) == 8 and cfg.kv_budget_for(5) == 5
    assert APBConfig(kv_budget=64).compresses_kv and APBConfig(kv_budget_ratio=0.5).compresses_kv
    assert APBConfig(kv_compress="snapkv").kv_budget_for(10**6) == 4096  # the default budget
    assert not APBConfig().compresses_kv and not APBConfig(kv_compress="none").compresses_kv


@pytest.mark.parametrize("world", [1, 2])
def test_snapkv_generation(world):
    """Engine generation with SnapKV at CP 1 and 2 (gloo); with one rank also the chunked prefill."""
    from tests.snapkv_workers import snapkv_generation

    n_doc, n_new = 37, 5
    results = run_distributed(snapkv_generation, world, n_doc, n_new)
    if world == 1:
        check_chunked_prefill(results[0]["chunked"])
        assert results[0]["vs_reference"] == 2  # both layers kept what the ops reference selects
    for r, res in enumerate(results):
        # a budget covering the document keeps every token: the same answer
        assert res["all"] == res["plain"] and res["all/local"] == res["plain"]
        for key in [k for k in res if isinstance(k, tuple)]:
            small = res[key]
            window, budget = key
            assert small["total"] == budget  # the ranks' shares make the budget
            # every layer holds exactly this rank's share, rows of the prefill's cache
            assert small["sizes"] == [small["share"]] * len(small["sizes"])
            for heads in small["kept"].values():
                for rows in heads:
                    assert rows == sorted(set(rows))  # distinct rows, position order
                    w = small["window_rows"]
                    assert rows[len(rows) - w :] == list(range(small["valid"] - w, small["valid"]))
            assert len(small["tokens"]) == n_new and small["local"] == small["tokens"]
            assert small["batch"] == small["alone"]  # decoded together: each as alone
        name, field, message = res["long_window"]
        assert name == "APBConfigError" and field == "kv_window" and "kv_window" in message
    assert all(res["plain"] == results[0]["plain"] for res in results)


def check_chunked_prefill(result):
    """The chunked prefill (23 rows in chunks of 5) against the unchunked one (run by
    :func:`tests.snapkv_workers.snapkv_generation` with one rank)."""
    err, scale, chunked, whole = result
    # 2 layers, 5 chunks of <= 5 rows each: the norm, the projections and the MLP ran per chunk
    assert chunked == dict(mlp=10, qkv=10, norm=10, proj=10) and whole == dict(mlp=2, qkv=2, norm=2, proj=2)
    # each row's math is unchanged; only the matmul's blocking over rows may round differently
    assert err <= 1e-6 * scale


def test_memory_plan_for_a_million_tokens():
    from megatron_apb.inference.memory import GIB, ModelShape, check_memory_plan, memory_plan

    llama8b = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256)
    assert llama8b.weights() == 8_030_261_248  # Llama-3-8B's published parameter count
    n, h200 = 1 << 20, 139 * GIB
    whole = memory_plan(llama8b, n, reserve=0)
    assert whole["kv_cache"] == 128 * GIB  # 32 layers x K,V x 8 heads x 128 x 2 bytes x 1M
    with pytest.raises(APBConfigError, match="--kv-budget") as err:
        check_memory_plan(whole, h200)
    assert err.value.field == "kv_budget"
    snap = memory_plan(llama8b, n, kv_budget=4096)
    check_memory_plan(snap, h200)  # fits
    assert snap["kv_layer_full"] == 4 * GIB and snap["total"] < whole["total"] - 100 * GIB
    with pytest.raises(APBConfigError, match="--prefill-chunk"):
        check_memory_plan(memory_plan(llama8b, n, kv_budget=4096, prefill_chunk=0), h200)
    # chunking bounds the MLP's share: doubling the length doubles only the per-row parts
    small, big = (memory_plan(llama8b, m, kv_budget=4096)["activations"] for m in (1 << 20, 1 << 21))
    per_row = 2 * (2 * 4096 + 3 * (4096 + 1024)) + 32 * 4
    assert big - small == per_row * (1 << 20)


def test_cli_flags():
    import argparse

    from megatron_apb.inference.launch import add_apb_args, apb_config_from_args

    parser = argparse.ArgumentParser()
    add_apb_args(parser)
    cfg = apb_config_from_args(parser.parse_args(["--kv-budget", "2048", "--kv-window", "64", "--prefill-chunk", "8192"]))
    assert cfg.compresses_kv and cfg.kv_budget_for(10**6) == 2048 and cfg.prefill_chunk == 8192

def test_cli_flags_name_themselves_in_errors(capsys):
    import argparse

    from megatron_apb.inference.launch import add_apb_args, apb_config_from_args

    parser = argparse.ArgumentParser()
    add_apb_args(parser)
    with pytest.raises(SystemExit):  # a usage error, in the flags' own spelling
        apb_config_from_args(parser.parse_args(["--kv-budget", "16", "--kv-window", "64"]))
    assert "--kv-budget (16) must be >= --kv-window (64)" in capsys.readouterr().err


def test_long_sequences_run_in_blocks_of_rows(monkeypatch):
    """Past 2^31 elements the causal attention and the RMSNorm run in blocks of rows; the
    same functions at a tiny limit against their whole-tensor forms."""
    from megatron_apb.ops import fused
    from megatron_apb.ops.attention import attention_with_lse
    from megatron_apb.ops.blocked import causal_attention_by_rows, needs_row_blocks, rows_per_block
    from megatron_apb.ops.reference import causal_mask, reference_attention

    torch.manual_seed(2)
    q, k, v = torch.randn(1, 23, 6, 8), torch.randn(1, 23, 2, 8), torch.randn(1, 23, 2, 8)
    out, lse = causal_attention_by_rows(q, k, v, rows=5)  # blocks that do not divide 23
    want, want_lse = attention_with_lse(q, k, v, causal=True)
    exact = reference_attention(q.double(), k.double(), v.double(), causal_mask(23, 23))[0].double()
    # flash-attention's rule: the blocked error vs float64 at most twice the unblocked one's
    assert (out.double() - exact).abs().max() <= 2 * (want.double() - exact).abs().max() + 1e-6
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    meta = torch.empty(1, 1 << 20, 32, 128, device="meta")
    assert needs_row_blocks(meta) and not needs_row_blocks(meta[:, : 1 << 19]) and rows_per_block(meta) == 1 << 16
    x, w = torch.randn(3, 7, 16), torch.rand(16)
    whole = fused.fused_rms_norm(x, w, 1e-5)
    monkeypatch.setattr(fused, "MAX_KERNEL_ELEMENTS", 40)  # blocks of one row
    assert torch.equal(fused.fused_rms_norm(x, w, 1e-5), whole)
