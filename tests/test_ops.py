"""The attention ops pinned to their dense float64 references.

* ``apb_attention`` (three kernel calls merged by LSE) == ``apb_reference_attention`` (one
  dense masked call) for every backend over a seeded sweep of shapes.
* ``attention_with_lse``'s bottom-right causal semantics, empty inputs, and low-precision
  accuracy (flash-attention's "<= 2x plain PyTorch" rule).
* ``merge_attention`` over disjoint key sets == attention over their union.
* Input validation errors.

Tolerances: fp32 results are compared with max abs error <= 1e-5.  Outputs are convex
combinations of values ~N(0, 1) and LSEs are O(log k_len + |scores|) ~ 10, so float32
round-off (eps 1.2e-7, a few dozen accumulated operations) stays around 1e-6; measured
errors are ~5e-7.  1e-5 leaves a 10-20x margin yet catches any masking or merging bug,
which shifts results by O(0.1).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from megatron_apb import apb_attention, attention_with_lse, merge_attention
from megatron_apb.ops.reference import (
    apb_reference_attention,
    apb_reference_mask,
    causal_mask,
    reference_attention,
)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

BACKENDS = ("sdpa", "math", "flex", "reference", "auto")
FAST_BACKENDS = ("sdpa", "math", "reference", "auto")
# fp32 tolerance: see the module docstring.
ATOL_FP32 = 1e-5


def _randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# --------------------------------------------------------------------------------------
# apb_attention == apb_reference_attention: the seeded sweep
# --------------------------------------------------------------------------------------

ANCHORS = (0, 1, 13)
PASSINGS = (None, 0, 1, 9)  # None: passing_k=None; 0: an empty passing block
LOCALS = (1, 7, 33)
BATCHES = (1, 2)
GQA_RATIOS = (1, 3, 4)  # heads // kv_heads
HEAD_DIMS = (8, 16, 64)


def _make_cases():
    """Every (anchor, passing, local) combination with batch, GQA, head dim, scale drawn
    from a seeded RNG (so the sweep is random-looking but identical on every run)."""
    rng = random.Random(0xA9B)
    cases = []
    for anchor, passing, local in itertools.product(ANCHORS, PASSINGS, LOCALS):
        ratio = rng.choice(GQA_RATIOS)
        kv_heads = rng.choice((1, 2))
        cases.append(
            dict(
                batch=rng.choice(BATCHES),
                anchor=anchor,
                passing=passing,
                local=local,
                heads=ratio * kv_heads,
                kv_heads=kv_heads,
                dim=rng.choice(HEAD_DIMS),
                scale=rng.choice((None, None, 0.37)),
                seed=rng.randrange(1 << 30),
            )
        )
    return cases


CASES = _make_cases()
# FlexAttention runs unfused in eager mode on CPU (~50 ms a call, 3 calls per apb_attention):
# a slice of the sweep that still covers anchor 0/>0, every passing kind and local length.
FLEX_CASES = CASES[::5]


def _case_id(c):
    p = "None" if c["passing"] is None else c["passing"]
    return (
        f"b{c['batch']}-a{c['anchor']}-p{p}-l{c['local']}-h{c['heads']}kv{c['kv_heads']}"
        f"-d{c['dim']}-s{c['scale']}"
    )


def _apb_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    b, seq, h, kvh, d = c["batch"], c["anchor"] + c["local"], c["heads"], c["kv_heads"], c["dim"]
    q = _randn(b, seq, h, d, gen=gen)
    k = _randn(b, seq, kvh, d, gen=gen)
    v = _randn(b, seq, kvh, d, gen=gen)
    if c["passing"] is None:
        pk = pv = None
    else:
        pk = _randn(b, c["passing"], kvh, d, gen=gen)
        pv = _randn(b, c["passing"], kvh, d, gen=gen)
    return q, k, v, pk, pv


def test_sweep_covers_every_axis():
    """The random draws above must still hit every value the sweep promises."""
    for cases in (CASES, FLEX_CASES):
        assert {c["anchor"] > 0 for c in cases} == {False, True}
        assert {c["passing"] for c in cases} == set(PASSINGS)
        assert {c["local"] for c in cases} == set(LOCALS)
    assert {c["batch"] for c in CASES} == set(BATCHES)
    assert {c["heads"] // c["kv_heads"] for c in CASES} == set(GQA_RATIOS)
    assert {c["dim"] for c in CASES} == set(HEAD_DIMS)
    assert any(c["kv_heads"] > 1 and c["heads"] > c["kv_heads"] for c in CASES)
    assert {c["heads"] // c["kv_heads"] for c in FLEX_CASES} > {1}  # flex sees GQA too


def _check_apb(c, backend):
    q, k, v, pk, pv = _apb_inputs(c)
    out, lse = apb_attention(
        q, k, v, anchor_len=c["anchor"], passing_k=pk, passing_v=pv,
        softmax_scale=c["scale"], return_lse=True, backend=backend,
    )
    ref_out, ref_lse = apb_reference_attention(
        q, k, v, anchor_len=c["anchor"], passing_k=pk, passing_v=pv, softmax_scale=c["scale"]
    )
    b, seq, h, d = q.shape
    assert out.shape == (b, seq, h, d) and out.dtype == torch.float32
    assert lse.shape == (b, h, seq) and lse.dtype == torch.float32
    # every APB row sees at least its own key, so no row may be empty
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert _max_err(out, ref_out) <= ATOL_FP32
    assert _max_err(lse, ref_lse) <= ATOL_FP32
    # return_lse=False returns the same output alone
    plain = apb_attention(
        q, k, v, anchor_len=c["anchor"], passing_k=pk, passing_v=pv,
        softmax_scale=c["scale"], backend=backend,
    )
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_apb_attention_matches_reference(case, backend):
    _check_apb(case, backend)


@pytest.mark.parametrize("case", FLEX_CASES, ids=_case_id)
def test_apb_attention_matches_reference_flex(case):
    _check_apb(case, "flex")


def test_apb_reference_mask_picture():
    """The documented picture of the APB mask (anchor 2, passing 2, local 3)."""
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(apb_reference_mask(2, 2, 3), expected)


def test_apb_anchor_rows_ignore_passing_and_local():
    """Anchor outputs depend on the anchor only: changing P and B leaves them unchanged."""
    gen = torch.Generator().manual_seed(5)
    la, lb = 4, 6
    q = _randn(1, la + lb, 2, 8, gen=gen)
    k = _randn(1, la + lb, 2, 8, gen=gen)
    v = _randn(1, la + lb, 2, 8, gen=gen)
    pk, pv = _randn(1, 3, 2, 8, gen=gen), _randn(1, 3, 2, 8, gen=gen)
    out1 = apb_attention(q, k, v, anchor_len=la, passing_k=pk, passing_v=pv, backend="math")
    k2, v2 = k.clone(), v.clone()
    k2[:, la:] += 3.0
    v2[:, la:] -= 3.0
    out2 = apb_attention(q, k2, v2, anchor_len=la, passing_k=pk * 2, passing_v=pv + 1, backend="math")
    assert torch.equal(out1[:, :la], out2[:, :la])
    assert not torch.allclose(out1[:, la:], out2[:, la:])


# --------------------------------------------------------------------------------------
# attention_with_lse: bottom-right causal semantics and empty inputs
# --------------------------------------------------------------------------------------


def test_causal_mask_picture():
    """Bottom-right alignment as documented: q_len=2, k_len=5."""
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)
    # q_len > k_len: the first q_len - k_len rows see nothing
    assert torch.equal(causal_mask(4, 2), torch.tensor([[0, 0], [0, 0], [1, 0], [1, 1]]).bool())


SHAPES = [
    # (q_len, k_len, causal)
    (3, 8, True),  # q shorter: every row sees k_len - q_len extra keys
    (1, 5, True),
    (8, 8, True),  # square
    (8, 3, True),  # q longer: the first 5 rows see no key
    (5, 1, True),
    (3, 8, False),
    (8, 3, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_len,k_len,causal", SHAPES)
def test_attention_with_lse_bottom_right(q_len, k_len, causal, backend):
    gen = torch.Generator().manual_seed(q_len * 100 + k_len)
    q = _randn(2, q_len, 6, 16, gen=gen)
    k = _randn(2, k_len, 2, 16, gen=gen)
    v = _randn(2, k_len, 2, 16, gen=gen)
    out, lse = attention_with_lse(q, k, v, causal=causal, backend=backend)
    mask = causal_mask(q_len, k_len) if causal else None
    ref_out, ref_lse = reference_attention(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 6, q_len) and lse.dtype == torch.float32
    assert _max_err(out, ref_out) <= ATOL_FP32
    empty = ~torch.isfinite(ref_lse)
    assert torch.equal(~torch.isfinite(lse), empty)
    assert _max_err(lse[~empty], ref_lse[~empty]) <= ATOL_FP32
    if causal and q_len > k_len:
        # rows with no visible key: exactly 0 out and -inf lse (so they merge away)
        n_empty = q_len - k_len
        assert torch.all(out[:, :n_empty] == 0)
        assert torch.all(lse[:, :, :n_empty] == float("-inf"))
        assert empty[:, :, :n_empty].all() and not empty[:, :, n_empty:].any()
    else:
        assert not empty.any()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,k_len", [(4, 0), (0, 4), (0, 0)])
def test_attention_with_lse_empty(q_len, k_len, causal, backend):
    q = torch.randn(2, q_len, 4, 8)
    k = torch.randn(2, k_len, 2, 8)
    v = torch.randn(2, k_len, 2, 8)
    out, lse = attention_with_lse(q, k, v, causal=causal, backend=backend)
    assert out.shape == (2, q_len, 4, 8) and out.dtype == q.dtype
    assert lse.shape == (2, 4, q_len) and lse.dtype == torch.float32
    assert torch.all(out == 0)
    assert torch.all(lse == float("-inf"))


def test_softmax_scale_is_used():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (_randn(1, 6, 2, 8, gen=gen) for _ in range(3))
    for backend in FAST_BACKENDS:
        out, lse = attention_with_lse(q, k, v, causal=True, softmax_scale=0.9, backend=backend)
        ref_out, ref_lse = reference_attention(q, k, v, causal_mask(6, 6), 0.9)
        assert _max_err(out, ref_out) <= ATOL_FP32 and _max_err(lse, ref_lse) <= ATOL_FP32
        default, _ = attention_with_lse(q, k, v, causal=True, backend=backend)
        assert _max_err(default, out) > 1e-3  # 0.9 != 1/sqrt(8): results must differ


# --------------------------------------------------------------------------------------
# merge_attention
# --------------------------------------------------------------------------------------


def _partition(n, parts, gen):
    """A random partition of range(n) into ``parts`` non-empty, non-contiguous sets."""
    perm = torch.randperm(n, generator=gen)
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: parts - 1].add(1).tolist())
    return [perm[a:b] for a, b in zip([0] + cuts, cuts + [n])]


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_merge_disjoint_parts_equals_full(parts, causal):
    """Attention over K1 ∪ K2 (∪ K3) == LSE-merge of attention over each part.

    Parts are random (non-contiguous) key subsets; with the causal mask some rows of some
    parts see no key at all (lse -inf), which the merge must ignore.
    """
    gen = torch.Generator().manual_seed(10 * parts + causal)
    # causal with q_len > k_len: rows 0-2 see no key in any part; row 3 sees key 0 only,
    # so every part without key 0 is empty there.
    sq, sk = 12, 9
    q = _randn(2, sq, 4, 16, gen=gen)
    k = _randn(2, sk, 2, 16, gen=gen)
    v = _randn(2, sk, 2, 16, gen=gen)
    full_mask = causal_mask(sq, sk) if causal else torch.ones(sq, sk, dtype=torch.bool)
    ref_out, ref_lse = reference_attention(q, k, v, full_mask)
    outs, lses = [], []
    for keys in _partition(sk, parts, gen):
        in_part = torch.zeros(sk, dtype=torch.bool)
        in_part[keys] = True
        out, lse = reference_attention(q, k, v, full_mask & in_part)
        outs.append(out.float())
        lses.append(lse)
    if causal:  # parts with empty rows exist, and rows empty in every part
        assert sum(bool((~torch.isfinite(l)).any()) for l in lses) >= parts - 1
    out, lse = merge_attention(outs, lses)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert _max_err(out, ref_out) <= ATOL_FP32
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert _max_err(lse[finite], ref_lse[finite]) <= ATOL_FP32


def test_merge_contiguous_split_with_kernels():
    """The split used by APB: a kernel's unmasked prefix part merged with its causal part."""
    gen = torch.Generator().manual_seed(7)
    q = _randn(1, 10, 4, 16, gen=gen)
    k = _randn(1, 25, 4, 16, gen=gen)
    v = _randn(1, 25, 4, 16, gen=gen)
    a = attention_with_lse(q, k[:, :8], v[:, :8], causal=False, backend="sdpa")
    b = attention_with_lse(q, k[:, 8:15], v[:, 8:15], causal=False, backend="math")
    c = attention_with_lse(q, k[:, 15:], v[:, 15:], causal=True, backend="sdpa")
    out, lse = merge_attention([a[0], b[0], c[0]], [a[1], b[1], c[1]])
    ref_out, ref_lse = reference_attention(q, k, v, causal_mask(10, 25))
    assert _max_err(out, ref_out) <= ATOL_FP32 and _max_err(lse, ref_lse) <= ATOL_FP32


def test_merge_empty_part_contributes_nothing():
    gen = torch.Generator().manual_seed(11)
    out1 = _randn(2, 5, 3, 8, gen=gen)
    lse1 = _randn(2, 3, 5, gen=gen)
    # an empty part (lse -inf) whose out holds large garbage: its weight must be exactly 0
    garbage = torch.full((2, 5, 3, 8), 1e4)
    empty_lse = torch.full((2, 3, 5), float("-inf"))
    for outs, lses in (
        ([out1, garbage], [lse1, empty_lse]),
        ([garbage, out1, garbage], [empty_lse, lse1, empty_lse]),
    ):
        out, lse = merge_attention(outs, lses)
        # weights are exp(lse1 - lse1) = 1 up to one float32 logsumexp rounding
        assert _max_err(out, out1) <= 1e-6
        assert _max_err(lse, lse1) <= 1e-6


def test_merge_all_empty_rows_stay_empty():
    gen = torch.Generator().manual_seed(12)
    out1, out2 = torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8)
    lse1 = _randn(1, 2, 4, gen=gen)
    lse2 = _randn(1, 2, 4, gen=gen)
    out1[:, 1:3] = _randn(1, 2, 2, 8, gen=gen)
    out2[:, 1:3] = _randn(1, 2, 2, 8, gen=gen)
    # rows 0 and 3 are empty in both parts
    lse1[:, :, [0, 3]] = float("-inf")
    lse2[:, :, [0, 3]] = float("-inf")
    out, lse = merge_attention([out1, out2], [lse1, lse2])
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out[:, [0, 3]] == 0)
    assert torch.all(lse[:, :, [0, 3]] == float("-inf"))
    assert torch.isfinite(lse[:, :, 1:3]).all()
    # completely empty inputs: one and several parts
    e_out, e_lse = merge_attention([torch.zeros(1, 3, 2, 4)] * 3, [torch.full((1, 2, 3), -math.inf)] * 3)
    assert torch.all(e_out == 0) and torch.all(e_lse == float("-inf")) and not e_out.isnan().any()


@pytest.mark.parametrize("prefix_rows", [0, 3])
def test_concat_merged_equals_cat_of_merge(prefix_rows):
    """The rows the APB host returns: whole anchor rows, then its merged local rows."""
    from megatron_apb.ops.merge import concat_merged

    gen = torch.Generator().manual_seed(13)
    prefix = _randn(1, prefix_rows, 2, 8, gen=gen)
    outs = [_randn(1, 5, 2, 8, gen=gen) for _ in range(2)]
    lses = [_randn(1, 2, 5, gen=gen) for _ in range(2)]
    lses[1][:, :, 0] = float("-inf")  # a row the second part does not cover
    want = torch.cat([prefix, merge_attention(outs, lses)[0]], dim=1)
    assert torch.equal(concat_merged(prefix, outs, lses), want)


def test_merge_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="as many lse"):
        merge_attention([torch.zeros(1, 1, 1, 1)], [])
    with pytest.raises(ValueError, match="at least one"):
        merge_attention([], [])


# --------------------------------------------------------------------------------------
# Low precision: flash-attention's tolerance rule
# --------------------------------------------------------------------------------------


def _plain_bf16_attention(q, k, v, causal, scale):
    """softmax(q k^T * scale) v entirely in bf16, the way plain PyTorch code would do it."""
    group = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(group, dim=2).transpose(1, 2)
    s = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[1], k.shape[1]), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), vt).transpose(1, 2)


BF16_SHAPES = [
    # (batch, q_len, k_len, heads, kv_heads, dim, causal)
    (1, 128, 128, 4, 4, 64, True),
    (2, 33, 33, 6, 2, 16, True),
    (2, 64, 100, 4, 1, 64, True),  # bottom-right causal, q shorter (split + merge path)
    (1, 77, 77, 8, 2, 64, False),
    (2, 7, 7, 4, 4, 8, True),
    (1, 1, 50, 4, 2, 32, True),  # a single query row against many keys
]


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("shape", BF16_SHAPES, ids=str)
def test_bf16_error_at_most_twice_plain_pytorch(shape, backend):
    """Flash-attention's rule: in low precision a kernel's error against a high-precision
    reference must be at most 2x the error of plain PyTorch attention in that same low
    precision against the same reference.  The reference runs in float64 on the very bf16
    inputs (upcast exactly), so both errors measure only arithmetic, not input rounding.
    No absolute slack is needed: plain bf16's error here is >= ~2e-3 (bf16 eps is 7.8e-3),
    far from zero, and the measured ratios are <= ~1.3.
    """
    b, sq, sk, h, kvh, d, causal = shape
    gen = torch.Generator().manual_seed(sq * 1000 + sk)
    q = _randn(b, sq, h, d, gen=gen, dtype=torch.bfloat16)
    k = _randn(b, sk, kvh, d, gen=gen, dtype=torch.bfloat16)
    v = _randn(b, sk, kvh, d, gen=gen, dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(d)
    mask = causal_mask(sq, sk) if causal else None
    ref, _ = reference_attention(q.double(), k.double(), v.double(), mask, scale)
    out, lse = attention_with_lse(q, k, v, causal=causal, backend=backend)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    plain_err = _max_err(_plain_bf16_attention(q, k, v, causal, scale), ref)
    err = _max_err(out, ref)
    assert plain_err > 0
    assert err <= 2 * plain_err, f"{backend}: {err:.3e} > 2 x plain bf16 {plain_err:.3e}"


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------


def test_attention_with_lse_rejects_wrong_ndim():
    q, k = torch.randn(5, 4, 8), torch.randn(1, 5, 4, 8)
    with pytest.raises(ValueError, match="4-D"):
        attention_with_lse(q, k, k, causal=True)
    with pytest.raises(ValueError, match="4-D"):
        attention_with_lse(k, q, q, causal=True)


def test_apb_attention_rejects_wrong_ndim():
    # 3-D tensors whose dim 1 agree reach the 4-D check
    q3 = torch.randn(9, 4, 8)
    with pytest.raises(ValueError, match="4-D"):
        apb_attention(q3, q3, q3, anchor_len=2)


def test_apb_attention_wrong_ndim_gqa_message():
    q3, k3 = torch.randn(9, 6, 8), torch.randn(9, 2, 8)  # [seq, heads, dim]: batch forgotten
    with pytest.raises(ValueError, match="4-D"):
        apb_attention(q3, k3, k3, anchor_len=2)


def test_rejects_kv_heads_not_dividing_heads():
    q, k = torch.randn(1, 5, 6, 8), torch.randn(1, 5, 4, 8)
    with pytest.raises(ValueError, match=r"kv_heads \(4\) must divide heads \(6\)"):
        attention_with_lse(q, k, k, causal=True)
    with pytest.raises(ValueError, match="must divide heads"):
        apb_attention(q, k, k, anchor_len=2)


def test_rejects_k_v_shape_mismatch():
    q = torch.randn(1, 5, 4, 8)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        attention_with_lse(q, torch.randn(1, 5, 2, 8), torch.randn(1, 6, 2, 8), causal=False)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        attention_with_lse(q, torch.randn(1, 5, 2, 8), torch.randn(1, 5, 1, 8), causal=False)
    with pytest.raises(ValueError, match="same rows|same shape"):
        apb_attention(q, torch.randn(1, 5, 2, 8), torch.randn(1, 4, 2, 8), anchor_len=1)
    with pytest.raises(ValueError, match="batch and head_dim"):
        attention_with_lse(q, torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16), causal=False)


@pytest.mark.parametrize("anchor_len", [6, 100, -1])
def test_apb_rejects_anchor_outside_sequence(anchor_len):
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match=rf"anchor_len={anchor_len} must lie in \[0, seq=5\]"):
        apb_attention(q, q, q, anchor_len=anchor_len)


def test_apb_rejects_half_a_passing_block():
    q = torch.randn(1, 5, 2, 8)
    p = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="passing_k and passing_v"):
        apb_attention(q, q, q, anchor_len=1, passing_k=p)
    with pytest.raises(ValueError, match="passing_k and passing_v"):
        apb_attention(q, q, q, anchor_len=1, passing_v=p)
    with pytest.raises(ValueError, match="passing_k"):  # wrong kv_heads in the passing block
        apb_attention(q, q, q, anchor_len=1, passing_k=p[:, :, :1], passing_v=p[:, :, :1])


def test_backend_errors():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attention_with_lse(q, q, q, causal=True, backend="nope")
    with pytest.raises(ValueError, match="backend='math' or 'reference'"):
        attention_with_lse(q.double(), q.double(), q.double(), causal=True, backend="sdpa")
    # auto falls back to math for float64 and keeps the dtype
    out, lse = attention_with_lse(q.double(), q.double(), q.double(), causal=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float32


@pytest.mark.parametrize("b,sq,sk,h,hk,d", [(1, 1, 300, 8, 2, 16), (2, 5, 37, 6, 3, 8), (1, 9, 4, 4, 2, 8), (1, 64, 64, 4, 4, 32)])
@pytest.mark.parametrize("causal", [True, False])
def test_grouped_small_query_attention_matches_reference(b, sq, sk, h, hk, d, causal):
    """The decoding path (matmuls per KV-head group, no expansion) against float64."""
    from megatron_apb.ops.attention import grouped_small_query_attention

    g = torch.Generator().manual_seed(sq * sk)
    q, k, v = (torch.randn(b, n, heads, d, generator=g) for n, heads in ((sq, h), (sk, hk), (sk, hk)))
    out, lse = grouped_small_query_attention(q, k, v, causal=causal)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), causal_mask(sq, sk) if causal else None)
    assert (out.double() - ref).abs().max().item() <= 1e-5  # fp32 arithmetic, as the other backends
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse.double() - ref_lse)[finite].abs().max().item() <= 1e-5
