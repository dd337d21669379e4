"""The split-KV decoding kernel against its plain-PyTorch reference.

On CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, fp32; bf16
``tl.dot`` is wrong in the interpreter) when Triton is installed, else these tests skip;
the reference itself is pinned to dense float64 attention here, always.  On GPU,
``tests/test_gpu.py`` holds the kernel to flash-attention's 2x rule in bf16.

Tolerance in fp32: 1e-5 absolute (both sides accumulate in fp32 over at most a few hundred
keys of unit-variance inputs; observed errors are ~5e-7).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from megatron_apb.ops.decode_kernel import HAVE_TRITON, split_kv_attention, split_kv_attention_reference
from megatron_apb.ops.reference import causal_mask, reference_attention

CASES = [  # batch, new rows m, heads, kv_heads, head_dim, cache length, causal, lengths, splits
    (1, 1, 8, 2, 64, 200, True, None, 3),
    (2, 3, 8, 2, 32, 150, True, [150, 77], 4),  # ragged; lengths not multiples of the split
    (3, 2, 4, 4, 16, 100, False, [5, 100, 0], 2),  # an empty sequence: lse -inf, out 0
    (1, 4, 12, 4, 64, 300, True, None, None),
]


def _inputs(b, m, h, kvh, d, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, m, h, d, generator=g), torch.randn(b, L, kvh, d, generator=g),
            torch.randn(b, L, kvh, d, generator=g))


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_dense_float64(case):
    b, m, h, kvh, d, L, causal, lens, _ = case
    q, k, v = _inputs(b, m, h, kvh, d, L)
    out, lse = split_kv_attention_reference(q, k, v, lengths=lens and torch.tensor(lens), causal=causal)
    for i in range(b):
        n = L if lens is None else lens[i]
        if n == 0:
            assert torch.isinf(lse[i]).all() and (out[i] == 0).all()
            continue
        mask = causal_mask(m, n) if causal else None
        ro, rl = reference_attention(q[i : i + 1].double(), k[i : i + 1, :n].double(), v[i : i + 1, :n].double(),
                                     mask, softmax_scale=1 / math.sqrt(d))
        assert (out[i : i + 1].double() - ro).abs().max() < 1e-5
        assert (lse[i : i + 1].double() - rl).abs().max() < 1e-5


needs_interpreter = pytest.mark.skipif(
    not HAVE_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
    reason="the kernel runs on CPU only under TRITON_INTERPRET=1 with Triton installed",
)


@needs_interpreter
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_interpreted(case):
    b, m, h, kvh, d, L, causal, lens, splits = case
    q, k, v = _inputs(b, m, h, kvh, d, L, seed=1)
    lengths = lens and torch.tensor(lens)
    out, lse = split_kv_attention(q, k, v, lengths=lengths, causal=causal, num_splits=splits)
    ro, rl = split_kv_attention_reference(q, k, v, lengths=lengths, causal=causal)
    assert (out - ro).abs().max() < 1e-5
    finite = torch.isfinite(rl)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - rl[finite]).abs().max() < 1e-5


def test_bad_shapes_are_refused():
    q, k, v = _inputs(1, 1, 6, 4, 16, 10)
    with pytest.raises(ValueError, match="must divide"):
        split_kv_attention(q, k, v)
    with pytest.raises(ValueError, match="lengths has 2 entries"):
        split_kv_attention_reference(q[:, :, :4], k, v, lengths=torch.tensor([1, 2]))
