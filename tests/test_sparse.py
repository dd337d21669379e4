"""Dynamic sparse attention (:mod:`megatron_apb.ops.sparse`): masks, estimation, reference,
kernel, the ``minference`` backend and its settings.

* The reference (float32, dense under the index's mask) is pinned to the float64 dense
  reference: equal to full causal attention when the budget covers every key, and equal to
  the float64 masked reference under any index (1e-5 absolute: fp32 accumulation over at
  most a few hundred keys of unit-variance inputs).
* The masks hold the ideal pattern (sinks + window; the estimated top verticals and
  slashes; the top pooled blocks), computed here by plain loops in float64.
* The Triton kernel runs under ``TRITON_INTERPRET=1`` in a child process (the interpreter
  must be chosen before Triton compiles anything): fp32 within 1e-5 of the reference, fp16
  within flash-attention's rule (max error against the float32 reference at most 2x that of
  plain fp16 PyTorch attention under the same mask).  bf16 ``tl.dot`` is wrong in the
  interpreter: ``tests/test_gpu.py`` checks bf16 on CUDA.  Without Triton the child skips.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_apb import APBConfig
from megatron_apb.errors import APBConfigError
from megatron_apb.ops.apb import apb_attention
from megatron_apb.ops.attention import attention_with_lse
from megatron_apb.ops.merge import merge_attention
from megatron_apb.ops.reference import causal_mask, reference_attention
from megatron_apb.ops.sparse import (
    AShape, BlockSparse, SparseAttention, SparsePlan, VerticalSlash, build_index, density, index_mask,
    load_plan, plan_from_dict, sparse_attention, sparse_reference_attention,
)

B = 16  # small blocks keep the shapes (and the interpreter) small
PATTERNS = {
    "block": BlockSparse(block=B, topk=2),
    "vslash": VerticalSlash(block=B, vertical_topk=5, slash_topk=20, last_q=16),
    "ashape": AShape(block=B, sink=3, window=20),
}
MIXED = (PATTERNS["block"], PATTERNS["vslash"], PATTERNS["ashape"], BlockSparse(block=B, topk=1))
# (q_len, k_len): not multiples of the block; a query offset (queries at the end of the keys)
LENGTHS = [(83, 83), (45, 83), (100, 100)]


def _inputs(sq, sk, h=4, kvh=2, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, n, heads, d, generator=g).to(dtype) for n, heads in ((sq, h), (sk, kvh), (sk, kvh)))


def _full(pattern, sk):
    return {BlockSparse: lambda p: BlockSparse(block=B, topk=1000),
            VerticalSlash: lambda p: VerticalSlash(block=B, vertical_topk=1, slash_topk=sk, last_q=4),
            AShape: lambda p: AShape(block=B, sink=0, window=sk)}[type(pattern)](pattern)


@pytest.mark.parametrize("sq, sk", LENGTHS)
def test_reference_is_masked_attention_and_dense_at_full_budget(sq, sk):
    q, k, v = _inputs(sq, sk)
    scale = 1 / math.sqrt(q.shape[-1])
    dense = reference_attention(q.double(), k.double(), v.double(), causal_mask(sq, sk), scale)
    for name, p in PATTERNS.items():
        full = build_index(q, k, (_full(p, sk),) * 4, scale)
        out, lse = sparse_reference_attention(q, k, v, full, scale)
        assert density(full) == 1.0, name
        assert (out.double() - dense[0]).abs().max() < 1e-5, name
        assert (lse.double() - dense[1].double()).abs().max() < 1e-5, name
    index = build_index(q, k, MIXED, scale)
    mask = index_mask(index)
    out, lse = sparse_reference_attention(q, k, v, index, scale)
    for h in range(4):
        ro, rl = reference_attention(q[:, :, h:h + 1].double(), k[:, :, h // 2:h // 2 + 1].double(),
                                     v[:, :, h // 2:h // 2 + 1].double(), mask[0, h], scale)
        assert (out[:, :, h:h + 1].double() - ro).abs().max() < 1e-5
        assert (lse[:, h].double() - rl[:, 0].double()).abs().max() < 1e-5
    assert not (mask & ~causal_mask(sq, sk)).any(), "a mask reads a future key"
    assert mask.any(-1).all(), "every row reads a key"
    assert 0 < density(index) < 1


def _ideal_vertical_slash(q, k, p, scale):
    """Per head: the top verticals, and the top diagonal block offsets by the summed mass of
    the slashes each covers, from the last queries, by plain float64 loops."""
    sq, h, sk = q.shape[1], q.shape[2], k.shape[1]
    off, last = sk - sq, min(p.last_q, sq)
    out = []
    for i in range(h):
        vert, slash = torch.zeros(sk, dtype=torch.float64), torch.zeros(sk, dtype=torch.float64)
        for r in range(sq - last, sq):
            pos = r + off
            s = (k[0, : pos + 1, i // (h // k.shape[2])].double() @ q[0, r, i].double()) * scale
            probs = torch.softmax(s, 0)
            vert[: pos + 1] += probs
            slash[: pos + 1] += probs.flip(0)  # slash t = pos - key
        diag = {}
        for t in range(sk):  # the key blocks slash t crosses, as offsets from the query block
            first, lastq = off % B - t, off % B + B - 1 - t  # keys of the rows of a block at 0
            for dd in {-(first // B), -(lastq // B)}:
                diag[dd] = diag.get(dd, 0.0) + float(slash[t])
        top = sorted(diag, key=lambda dd: -diag[dd])[: -(-p.slash_topk // B)]
        out.append((vert.topk(min(p.vertical_topk, sk)).indices, set(top) | {0, -1}))
    return out


@pytest.mark.parametrize("sq, sk", LENGTHS[:2])
def test_masks_hold_the_ideal_patterns(sq, sk):
    q, k, _ = _inputs(sq, sk, seed=1)
    scale = 1 / math.sqrt(q.shape[-1])
    rows = torch.arange(sq)[:, None] + (sk - sq)
    keys = torch.arange(sk)[None, :]
    causal = keys <= rows
    a = PATTERNS["ashape"]
    mask = index_mask(build_index(q, k, (a,) * 4, scale))[0]
    ideal = ((keys < a.sink) | (keys > rows - a.window)) & causal
    assert not (ideal & ~mask).any()
    p = PATTERNS["vslash"]
    mask = index_mask(build_index(q, k, (p,) * 4, scale))[0]
    qblock = (torch.arange(sq)[:, None] + (sk - sq) - (sk - sq) % B) // B  # m + offset // B
    for i, (cols, offsets) in enumerate(_ideal_vertical_slash(q, k, p, scale)):
        ideal = (torch.isin(keys, cols) | torch.isin(qblock - keys // B, torch.tensor(sorted(offsets)))) & causal
        assert torch.equal(ideal, mask[i]), i
    p = PATTERNS["block"]
    index = build_index(q, k, (p,) * 4, scale)
    nqb, nkb = -(-sq // B), -(-sk // B)
    pk = torch.stack([k[0, j * B:(j + 1) * B].double().mean(0) for j in range(nkb)])  # [nkb, kvh, d]
    for i in range(4):
        for m in range(nqb):
            first, last = m * B + sk - sq, min(m * B + B, sq) - 1 + sk - sq
            pq = q[0, m * B:(m + 1) * B, i].double().mean(0)
            score = pk[:, i // 2] @ pq
            visible = [j for j in range(nkb) if j * B <= last]
            order = [first // B, 0] + [j for j in visible if j > first // B]  # taken first
            order += sorted((j for j in visible if j not in order), key=lambda j: -score[j])
            want = sorted(list(dict.fromkeys(order))[: p.topk])
            got = index.block_idx[0, i, m, : index.block_cnt[0, i, m]].tolist()
            assert got == want, (i, m, got, want)


def _plain(q, k, v, mask, scale):
    """Masked softmax attention entirely in q's dtype: the 2x rule's yardstick."""
    g = q.shape[2] // k.shape[2]
    kk, vv = (t.repeat_interleave(g, 2).transpose(1, 2) for t in (k, v))
    s = (q.transpose(1, 2) @ kk.transpose(-1, -2)) * scale
    return (torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vv).transpose(1, 2)


def kernel_checks(device="cpu", dtypes=(torch.float32, torch.float16)):
    """Kernel vs reference (under TRITON_INTERPRET=1 on CPU; on CUDA from test_gpu).  The
    interpreter is slow: one fp16 case there."""
    from megatron_apb.ops.sparse import kernel_available

    cases = [(dtypes[0], sq, sk, MIXED) for sq, sk in LENGTHS[:2]]
    cases.append((dtypes[0], 45, 83, (_full(PATTERNS["vslash"], 83),) * 4))  # dense: every key
    cases += [(dtype, 45, 83, MIXED) for dtype in dtypes[1:]]
    for dtype, sq, sk, patterns in cases:
        q, k, v = (t.to(device) for t in _inputs(sq, sk, dtype=dtype, seed=2))
        assert kernel_available(q)
        scale = 1 / math.sqrt(q.shape[-1])
        index = build_index(q, k, patterns, scale)
        out, lse = sparse_attention(q, k, v, index, scale)
        ref, ref_lse = sparse_reference_attention(q.float(), k.float(), v.float(), index, scale)
        err = (out.float() - ref).abs().max().item()
        assert (lse - ref_lse).abs().max().item() < 1e-4, (dtype, sq, sk)
        if dtype == torch.float32:
            assert err < 1e-5, (sq, sk, err)
        else:
            base = (_plain(q, k, v, index_mask(index), scale).float() - ref).abs().max().item()
            assert err <= 2 * base + 1e-6, (dtype, sq, sk, err, base)
    print("sparse kernel checks passed")


def test_kernel_matches_reference_under_the_interpreter():
    code = ("import sys; sys.path.insert(0, '.');"
            "from megatron_apb.ops.sparse.kernel import HAVE_TRITON;"
            "import tests.test_sparse as t; t.kernel_checks() if HAVE_TRITON else print('no triton')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if "no triton" in res.stdout:
        pytest.skip("Triton is not installed")
    assert res.returncode == 0 and "checks passed" in res.stdout, res.stdout + res.stderr


def test_backend_routes_calls_and_keeps_the_lse_for_apb():
    q, k, v = _inputs(83, 83, seed=3)
    scale = 1 / math.sqrt(16)
    sparse = SparseAttention(MIXED, dense_below=50)
    out, lse = attention_with_lse(q, k, v, causal=True, backend=sparse)
    ref = sparse_reference_attention(q, k, v, build_index(q, k, MIXED, scale), scale)
    assert torch.allclose(out, ref[0], atol=1e-5) and torch.allclose(lse, ref[1], atol=1e-5)
    for kw in (dict(causal=False), dict(causal=True, short=True)):  # non-causal / below dense_below: dense
        n = 40 if kw.pop("short", False) else 83
        got = attention_with_lse(q[:, :n], k[:, :n], v[:, :n], backend=sparse, **kw)
        want = attention_with_lse(q[:, :n], k[:, :n], v[:, :n], backend="reference", **kw)
        assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)
    # an APB rank: anchor (causal, 20 rows: dense here) + own block (causal, sparse) + passing (dense)
    la, lp = 20, 9
    pk, pv = _inputs(lp, lp, seed=4)[1:]
    out, lse = apb_attention(q, k, v, anchor_len=la, passing_k=pk, passing_v=pv, return_lse=True, backend=sparse)
    own = sparse_reference_attention(q[:, la:], k[:, la:], v[:, la:], build_index(q[:, la:], k[:, la:], MIXED, scale), scale)
    ctx = reference_attention(q[:, la:], torch.cat([k[:, :la], pk], 1), torch.cat([v[:, :la], pv], 1), None, scale)
    want, want_lse = merge_attention([own[0], ctx[0]], [own[1], ctx[1]])
    anchor = reference_attention(q[:, :la], k[:, :la], v[:, :la], causal_mask(la, la), scale)
    assert torch.allclose(out[:, la:], want, atol=1e-5) and torch.allclose(lse[:, :, la:], want_lse, atol=1e-5)
    assert torch.allclose(out[:, :la], anchor[0], atol=1e-5)


def _error(fn, field):
    with pytest.raises(APBConfigError) as info:
        fn()
    assert info.value.field == field and field in str(info.value), str(info.value)


def test_bad_settings_name_the_field(tmp_path):
    _error(lambda: BlockSparse(topk=0), "topk")
    _error(lambda: VerticalSlash(slash_topk=0), "slash_topk")
    _error(lambda: AShape(window=0), "window")
    _error(lambda: BlockSparse(block=48), "block")
    _error(lambda: APBConfig(sparse="minference", sparse_budget=0), "sparse_budget")
    _error(lambda: APBConfig(sparse="minferense"), "sparse")
    _error(lambda: APBConfig(sparse_config=str(tmp_path / "x.json")), "sparse_config")
    q, k, v = _inputs(40, 40)
    _error(lambda: SparseAttention(AShape(block=B, window=64))(q, k, v, causal=True), "window")
    plan = SparsePlan(default=PATTERNS["block"], layers={2: MIXED}, num_layers=2, num_heads=4, model="tiny")
    path = tmp_path / "plan.json"
    plan.save(str(path))
    assert load_plan(str(path)) == plan
    cfg = APBConfig(sparse="minference", sparse_config=str(path))
    assert cfg.local_backend(1, 4, 2).patterns == PATTERNS["block"]
    assert cfg.local_backend(2, 4, 2).patterns == MIXED
    _error(lambda: cfg.local_backend(1, 8, 2), "sparse_config")  # another head count
    _error(lambda: cfg.local_backend(1, 4, 32), "sparse_config")  # another model (layers)
    _error(lambda: plan.check_model(model="llama"), "sparse_config")
    data = plan.to_dict()
    data["layers"]["2"] = data["layers"]["2"][:3]
    _error(lambda: plan_from_dict(data), "sparse_config")
    data["layers"]["2"] = [{"kind": "diagonal"}] * 4
    _error(lambda: plan_from_dict(data), "kind")
    data["layers"]["2"] = [{"kind": "block_sparse", "top_k": 3}] * 4
    _error(lambda: plan_from_dict(data), "top_k")
    shipped = APBConfig(sparse="minference", sparse_config="embedded")  # the embedded model's plan
    assert len(shipped.local_backend(1, 9, 30).patterns) == 9
    _error(lambda: shipped.local_backend(1, 32, 32), "sparse_config")  # an 8B-shaped model
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    _error(lambda: APBConfig(sparse="minference", sparse_config=str(tmp_path / "bad.json")), "sparse_config")


def test_pattern_search_scores_and_choice():
    """Recall = attention mass inside each candidate's mask (by a plain loop here), density =
    its share of the causal keys; full-budget candidates keep everything; the choice takes
    the best recall within the density budget, else the cheapest."""
    from megatron_apb.ops.sparse.search import choose_patterns, score_patterns

    q, k, _ = _inputs(70, 70, seed=6)
    scale = 1 / math.sqrt(16)
    cands = [PATTERNS["block"], PATTERNS["vslash"], AShape(block=B, sink=2, window=30), _full(PATTERNS["block"], 70)]
    recall, dens = score_patterns(q, k, cands, scale)
    assert torch.allclose(recall[3], torch.ones(4)) and torch.allclose(dens[3], torch.ones(4))
    causal = causal_mask(70, 70)
    for c, p in enumerate(cands[:3]):
        mask = index_mask(build_index(q, k, (p,) * 4, scale))[0]
        for h in range(4):
            probs = torch.softmax((q[0, :, h] @ k[0, :, h // 2].T * scale).masked_fill(~causal, float("-inf")), -1)
            assert abs(float(recall[c, h]) - float((probs * mask[h]).sum(-1).mean())) < 1e-5
            assert abs(float(dens[c, h]) - float(mask[h].sum() / causal.sum())) < 1e-6
    chosen, rows = choose_patterns(cands, recall, dens, max_density=float(dens[:3].max()))
    for h, p in enumerate(chosen):
        c = cands.index(p)
        assert c != 3 and all(recall[c, h] >= recall[j, h] for j in range(3)), (h, c)
        assert rows[h]["kind"] == p.kind
    cheapest, _ = choose_patterns(cands, recall, dens, max_density=1e-6)
    assert all(float(dens[cands.index(p), h]) == float(dens[:, h].min()) for h, p in enumerate(cheapest))
    # a measured cost per candidate replaces density as the budget's measure
    cost = torch.tensor([0.3, 0.9, 0.2, 1.0])
    timed, trows = choose_patterns(cands, recall, dens, 1.0, cost=cost, max_cost=0.5)
    for h, p in enumerate(timed):
        c = cands.index(p)
        assert c in (0, 2) and recall[c, h] >= recall[2 - c, h] and trows[h]["time"] == float(cost[c])
    assert set(choose_patterns(cands, recall, dens, 1.0, cost=cost, max_cost=0.1)[0]) == {cands[2]}
    with pytest.raises(ValueError):
        choose_patterns(cands, recall, dens, 1.0, cost=cost)


def test_time_patterns_measures_every_candidate_against_dense():
    """One positive cost per candidate, 1 for one longer than the sequence (it runs dense)."""
    from megatron_apb.ops.sparse.search import time_patterns

    q, k, v = _inputs(70, 70, seed=8)
    cands = [PATTERNS["block"], PATTERNS["ashape"], AShape(block=B, sink=2, window=500)]
    cost, dense_s = time_patterns(q, k, v, cands, runs=1)
    assert cost.shape == (3,) and dense_s > 0 and bool((cost[:2] > 0).all()) and float(cost[2]) == 1.0


def test_sparse_search_flags_are_checked_before_loading(tmp_path, capsys):
    from megatron_apb.cli import main

    out = str(tmp_path / "plan.json")
    flags_words = [(["--max-density", "0"], "--max-density"), (["--budgets", "0"], "--budgets"),
                   (["--block", "48"], "block"), (["--tp", "2"], "--tp"), (["--max-time", "0"], "--max-time")]
    if not torch.cuda.is_available():  # the kernel's time cannot be measured here
        flags_words.append((["--cost", "time"], "--cost density"))
    for flags, word in flags_words:
        assert main(["sparse-search", "--output", out, *flags]) == 2
        assert word in capsys.readouterr().err


def test_backend_records_the_pairs_each_call_computed():
    """``stats``: a dense call (non-causal, or below ``dense_below``) reads every pair it has;
    a sparse call reads the index's share of the causal pairs (counted here from the mask);
    :func:`summarize_stats` weighs calls by their pairs."""
    from megatron_apb.ops.sparse import summarize_stats

    q, k, v = _inputs(83, 83, seed=7)
    scale = 1 / math.sqrt(16)
    stats = []
    sparse = SparseAttention(MIXED, dense_below=50, stats=stats)
    attention_with_lse(q, k, v, causal=True, backend=sparse)
    attention_with_lse(q[:, :40], k[:, :40], v[:, :40], causal=True, backend=sparse)  # short: dense
    attention_with_lse(q[:, :10], k, v, causal=False, backend=sparse)  # unmasked: dense
    mask = index_mask(build_index(q, k, MIXED, scale))
    causal = int(causal_mask(83, 83).sum())
    assert [(r["sparse"], r["pairs"]) for r in stats] == [(True, causal), (False, 40 * 41 // 2), (False, 830)]
    assert stats[0]["read"] == pytest.approx(float(mask.float().sum()) / 4)  # per head, averaged
    assert stats[1]["read"] == stats[1]["pairs"] and "index_s" not in stats[0]
    summary = summarize_stats(stats)
    assert summary["sparse_density"] == pytest.approx(stats[0]["read"] / causal)
    assert summary["attention_density"] == pytest.approx((stats[0]["read"] + 820 + 830) / (causal + 820 + 830))
    assert (summary["sparse_calls"], summary["dense_calls"]) == (1, 2)
    assert summarize_stats([])["attention_density"] is None
    timed = []
    SparseAttention(MIXED, dense_below=50, stats=timed, timed=True)(q, k, v, causal=True)
    assert timed[0]["index_s"] >= 0 and timed[0]["attention_s"] >= 0


@pytest.mark.parametrize("sq,sk", LENGTHS + [(33, 33), (1, 83)])
def test_gathered_path_matches_the_reference(sq, sk):
    """The PyTorch path without the kernel (it reads only the indexed keys; columns inside a
    query block's own blocks are read once) equals the masked dense reference, fp32 within
    1e-5 and a half-precision input within flash-attention's 2x rule; :func:`sparse_attention`
    runs it where the kernel does not."""
    from megatron_apb.ops.sparse.gathered import gathered_sparse_attention

    scale = 1 / math.sqrt(16)
    for pats in (MIXED, (PATTERNS["vslash"],) * 4, (PATTERNS["ashape"],) * 4, (_full(PATTERNS["block"], sk),) * 4):
        q, k, v = _inputs(sq, sk, seed=sq + sk)
        index = build_index(q, k, pats, scale)
        want, want_lse = sparse_reference_attention(q, k, v, index, scale)
        got, lse = gathered_sparse_attention(q, k, v, index, scale)
        assert torch.allclose(got, want, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5), pats
        if os.environ.get("TRITON_INTERPRET") != "1":
            out, _ = sparse_attention(q, k, v, index, scale)
            assert torch.equal(out, got)
        half = gathered_sparse_attention(*(t.to(torch.float16) for t in (q, k, v)), index, scale)[0].float()
        plain = sparse_reference_attention(*(t.to(torch.float16) for t in (q, k, v)), index, scale)[0].float()
        assert (half - want).abs().max() <= 2 * (plain - want).abs().max() + 1e-6
