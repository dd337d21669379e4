"""The generation engine: distributed prefill + exact phase 2 against full recomputation.

The reference decodes greedily by re-running the single-rank model on the whole sequence
for every token, so it shares neither the KV cache nor the cross-rank LSE merge with the
engine.  Logit tolerance 1e-5 (fp32, see test_megatron_cp.py); tokens must be identical.
"""

import pytest

from tests.distributed import run_distributed
from tests.engine_workers import generate_vs_recompute, sparse_attention_stats

EXACT = ("exact", dict(mode="exact"))
ULYSSES = ("ulysses", dict(mode="ulysses"))
# no anchor, every token passed: APB's prefill is exact, so generation must match token for token
LOSSLESS = ("apb_lossless", dict(mode="apb", anchor_len=0, passing_len=10**6))


def _check(results, n_doc, world_cp, n_new):
    ref = results[0]["reference"]
    for rank, res in enumerate(results):
        for name, (tokens, logit_err, _) in ((k, v) for k, v in res.items() if k != "reference"):
            assert logit_err <= 1e-5, (rank, name, logit_err)
            assert list(tokens) == ref, (rank, name, tokens, ref)


@pytest.mark.parametrize("tp,cp,n_doc", [(1, 4, 37), (2, 2, 30)])
def test_generation_matches_recompute(tp, cp, n_doc):
    results = run_distributed(generate_vs_recompute, tp * cp, tp, cp, n_doc, 12, [EXACT, ULYSSES, LOSSLESS])
    _check(results, n_doc, cp, 12)


def test_rank_with_only_padding():
    # 9 tokens over 4 ranks: blocks of 3, the last block is all padding (empty cache)
    results = run_distributed(generate_vs_recompute, 4, 1, 4, 9, 6, [EXACT, LOSSLESS])
    _check(results, 9, 4, 6)
    # after prefill + the query step: the last rank cached no document token, only the
    # 4 query tokens; the others hold exactly their 3-token blocks
    assert results[3]["exact"][2] == 4
    assert [results[r]["exact"][2] for r in range(3)] == [3, 3, 3]


def test_document_shorter_than_world_fails_on_every_rank():
    from tests.engine_workers import prefill_error

    errors = run_distributed(prefill_error, 4, 3, timeout=120)
    assert all(e is not None and "fewer than the 4" in e for e in errors), errors


def test_local_decode_equals_distributed_decode_for_lossy_apb():
    """APB's prefill is approximate, phase 2 is exact: decoding on gathered caches must give
    the distributed phase 2's logits (1e-5, fp32 summation order) and tokens."""
    from tests.engine_workers import local_vs_distributed_decode

    results = run_distributed(local_vs_distributed_decode, 4, 30, 10, dict(mode="apb", anchor_len=5, passing_len=2, query_prefix_len=0))
    for dist_tokens, local_tokens, logit_err, full_tokens, own_tokens in results:
        assert dist_tokens == local_tokens == results[0][0]
        assert logit_err <= 1e-5
        assert full_tokens == 30 + 4  # the whole document and the query
    assert [r[4] for r in results] == [8, 8, 8, 6 + 4]  # own blocks (the last one + query)


@pytest.mark.parametrize("world", [1, 2])
def test_static_decode_step_equals_growing_cache_step(world):
    """The captured-step path (static cache written in place at a device row, attention
    over a device length) gives the logits of the growing-cache step: 1e-5 (fp32)."""
    from tests.engine_workers import static_vs_dynamic_steps

    kwargs = dict(mode="apb", anchor_len=4, passing_len=3, query_prefix_len=0)
    results = run_distributed(static_vs_dynamic_steps, world, 21, 6, kwargs)
    for err, ours, theirs, static_tokens, dynamic_tokens in results:
        assert err <= 1e-5, err
        assert ours == theirs == results[0][2]
        assert static_tokens == dynamic_tokens


def test_prompt_beyond_positions_or_cache_is_refused():
    """A prompt plus max_new_tokens beyond the model's positions, or beyond the cache a
    decoding step was given, is refused naming what to change."""
    from tests.engine_workers import positions_and_room_errors

    (errors,) = run_distributed(positions_and_room_errors, 1)
    positions, room = errors
    assert "need 70 positions but the model has 64" in positions and "max_new_tokens" in positions
    assert "KV cache holds" in room and "lower max_new_tokens" in room


@pytest.mark.parametrize("tp,cp", [(1, 1), (2, 2)])
def test_batch_generation_equals_one_by_one(tp, cp):
    """Prompts of different lengths decoded together give each prompt's own tokens (also
    when a stop token ends one early); bad batches are refused naming the prompt."""
    from tests.engine_workers import batch_vs_one_by_one

    kwargs = dict(mode="apb", anchor_len=4, passing_len=3, query_prefix_len=0)
    results = run_distributed(batch_vs_one_by_one, tp * cp, tp, cp, 6, kwargs)
    for together, alone, errors in results:
        assert together == alone == results[0][1]
        assert len(alone[1][1]) == 3 and len(alone[1][0]) == 6  # the stop token ended it early
        assert [e.split(":")[0] for e in errors] == [
            "generate_batch needs at least one (document, query) prompt", "prompt 0", "prompt 0", "prompt 0"]


@pytest.mark.parametrize("tp,cp,mode", [(1, 1, "exact"), (1, 2, "apb"), (2, 2, "apb")])
def test_sparse_prefill_reports_the_attention_it_computed(tp, cp, mode):
    """The density in ``GenerationResult.attention`` sums every rank's calls (every rank
    returns the same); a budget covering every key gives density 1, one block per query
    block less; without ``attention_stats`` nothing is recorded and the tokens are the same."""
    from megatron_apb.ops.sparse import summarize_stats

    for topk, full in ((100, True), (1, False)):
        results = run_distributed(sparse_attention_stats, tp * cp, tp, cp, 90, topk, mode)
        tokens, summary, _, plain_summary, plain_tokens = results[0]
        assert all(r[0] == tokens and r[1] == summary for r in results), "ranks disagree"
        assert plain_summary == {} and plain_tokens == tokens
        assert summary["sparse_calls"] > 0
        own = [summarize_stats(r[2]) for r in results]  # each rank's records of one prefill
        assert sum(s["sparse_calls"] for s in own) == summary["sparse_calls"]
        assert sum(s["dense_calls"] for s in own) == summary["dense_calls"]
        if full:
            assert summary["sparse_density"] == pytest.approx(1.0) and summary["attention_density"] == pytest.approx(1.0)
        else:
            assert 0 < summary["sparse_density"] < 0.9 and summary["sparse_density"] <= summary["attention_density"] < 1
