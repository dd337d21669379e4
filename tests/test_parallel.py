"""Collectives and the distributed attention algorithms, on 1-4 CPU processes over gloo.

References are single-process dense float64 attentions on the whole sequence.  Tolerance
1e-5: fp32 blockwise kernels + LSE merge against a float64 softmax differ by ~1e-6.
"""

import pytest

from tests import comm_workers as w
from tests.distributed import run_distributed

TOL = 1e-5


@pytest.mark.parametrize("world", [2, 4])
def test_collectives(world):
    for errors in run_distributed(w.collectives, world):
        assert errors["gather"] == 0 and errors["scatter"] == 0 and errors["roundtrip"] == 0
        assert errors["double_wait_raises"]


@pytest.mark.parametrize(
    "world,heads,kv_heads,block",
    [(1, 4, 2, 9), (2, 4, 2, 7), (3, 6, 3, 5), (4, 8, 4, 6), (4, 8, 2, 5)],  # last: KV repeated
)
def test_exact_and_ulysses_match_single_process(world, heads, kv_heads, block):
    for errors in run_distributed(w.exact_algorithms, world, heads, kv_heads, block):
        assert errors["exact"] <= TOL and errors["ulysses"] <= TOL, errors


@pytest.mark.parametrize("world,anchor,block,passing", [(4, 3, 7, 2), (3, 0, 5, 5), (2, 4, 9, 0)])
def test_apb_algorithm_matches_hand_built_passing(world, anchor, block, passing):
    """Also Star Attention with the sparse backend as each rank's local attention."""
    for err, sparse_err in run_distributed(w.apb_algorithm, world, anchor, block, passing):
        assert err <= TOL and sparse_err <= TOL, (err, sparse_err)


def test_retaining_head_tensor_parallel():
    for err in run_distributed(w.retaining_head_tp, 2):
        assert err <= TOL


@pytest.mark.parametrize("lengths,new", [([5, 4, 6, 3], 3), ([3, 3, 3, 0], 1), ([7, 0], 2), ([0, 0, 4], 2)])
def test_decode_merge_across_ranks(lengths, new):
    # includes ranks whose block is all padding (an empty cache, lse = -inf)
    for err in run_distributed(w.decode_merge, len(lengths), lengths, new):
        assert err <= TOL


@pytest.mark.parametrize("beats", [True, False])
def test_peer_wait_outlasts_the_timeout_only_while_the_peer_works(beats):
    """A wait for another rank's long work (its generation) lasts as long as that rank keeps
    beating; a rank that stops beating fails the waiters after one timeout."""
    from tests.comm_workers import peer_wait

    (outcome, waited), _ = run_distributed(peer_wait, 2, beats, timeout=60)
    if beats:
        assert outcome == "waited" and waited >= 2.5, (outcome, waited)
    else:
        assert "did not finish in 1 s" in outcome and "rank 0: broadcast" in outcome, outcome
