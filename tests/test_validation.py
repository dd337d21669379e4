"""Faults and bad input at the boundary of the public attention ops.

* Strided inputs: q, k, v whose last dimension is not contiguous (a transposed copy seen
  through a transpose, a sliced head dimension, a head-dim-major buffer) give the same
  results as their contiguous copies on every backend (the CPU flash kernel read them as
  if the last stride were 1).
* Input checks: wrong dtypes (integers, q/k/v disagreeing), meta tensors, other layouts,
  wrong devices and shapes raise :class:`~megatron_apb.errors.InputError` naming the op and
  saying what to change; the checks read metadata only.
* NaN: a NaN in q, k or v reaches every output it affects (NaN out and, for q and k, NaN
  LSE) on every backend, as in the float64 reference; it does not turn into a zero row.

Tolerances: fp32 results against the float64 reference: max abs error <= 1e-5, the rule of
``tests/test_ops.py`` (fp32 round-off over a few dozen operations on O(1) values is ~1e-6;
a layout bug shifts results by O(1)).  Strided inputs on the fused kernels must give
*bit-identical* results to their contiguous copies (the same kernel on the same values in
the same layout).  Low-precision GPU results obey flash-attention's rule: error against the
float64 reference at most 2x that of plain PyTorch attention in the same precision.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_apb import apb_attention, attention_with_lse, merge_attention
from megatron_apb.errors import APBError, InputError
from megatron_apb.ops import attention as attention_module
from megatron_apb.ops.attention import grouped_small_query_attention
from megatron_apb.ops.reference import apb_reference_attention, causal_mask, reference_attention
from megatron_apb.ops.validation import check_attention_inputs, check_merge_inputs
from megatron_apb.parallel import decode_attention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ATOL_FP32 = 1e-5  # see the module docstring
BACKENDS = ("sdpa", "math", "reference", "auto", "flex")
NAN = float("nan")


def _randn(*shape, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# --------------------------------------------------------------------------------------
# 1. inputs whose last dimension is not contiguous
# --------------------------------------------------------------------------------------


def _transposed_copy(x):
    """The same values, stored head-dim-major within each row: stride(-1) = heads."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _every_other(x):
    """The same values as a slice ``[..., ::2]`` of a buffer twice as wide: stride(-1) = 2."""
    big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    big[..., ::2] = x
    return big[..., ::2]


def _dim_major(x):
    """The same values in a [head_dim, batch, seq, heads] buffer: stride(-1) = b*s*h."""
    return x.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)


VIEWS = {"transposed": _transposed_copy, "every_other": _every_other, "dim_major": _dim_major}


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("which", ["q", "k", "v", "qkv"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sq,sk,causal", [(16, 16, True), (16, 16, False), (5, 21, True), (9, 4, True)])
def test_strided_last_dim_matches_contiguous(view, which, backend, sq, sk, causal):
    b, h, hk, d = 2, 4, 2, 8
    q = _randn(b, sq, h, d, seed=1)
    k = _randn(b, sk, hk, d, seed=2)
    v = _randn(b, sk, hk, d, seed=3)
    args = [VIEWS[view](t) if name in which else t for name, t in zip("qkv", (q, k, v))]
    assert any(t.stride(-1) != 1 for t in args)
    out, lse = attention_with_lse(*args, causal=causal, backend=backend)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), causal_mask(sq, sk) if causal else None)
    assert _max_err(out, ref) <= ATOL_FP32
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert _max_err(lse[seen], ref_lse[seen]) <= ATOL_FP32
    if backend == "sdpa":  # the same kernel on the same values: bit-identical
        want, want_lse = attention_with_lse(q, k, v, causal=causal, backend=backend)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("view", VIEWS)
def test_strided_last_dim_low_precision_sdpa(view, dtype):
    q, k, v = (_randn(1, 24, 4, 16, seed=s, dtype=dtype) for s in (4, 5, 6))
    got = attention_with_lse(VIEWS[view](q), VIEWS[view](k), VIEWS[view](v), causal=True, backend="sdpa")
    want = attention_with_lse(q, k, v, causal=True, backend="sdpa")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", ["sdpa", "auto", "math"])
def test_apb_attention_strided_inputs(backend):
    la, lb, p, h, hk, d = 3, 9, 4, 4, 2, 16
    q = _randn(1, la + lb, h, d, seed=7)
    k, v = _randn(1, la + lb, hk, d, seed=8), _randn(1, la + lb, hk, d, seed=9)
    pk, pv = _randn(1, p, hk, d, seed=10), _randn(1, p, hk, d, seed=11)
    out = apb_attention(
        _transposed_copy(q), _every_other(k), _dim_major(v), anchor_len=la,
        passing_k=_every_other(pk), passing_v=_transposed_copy(pv), backend=backend,
    )
    ref, _ = apb_reference_attention(q, k, v, anchor_len=la, passing_k=pk, passing_v=pv)
    assert _max_err(out, ref) <= ATOL_FP32


def test_unit_stride_helper_copies_only_when_needed():
    """The fix is free for inputs that already have a unit last stride (the usual case,
    including the [batch, heads, seq, dim] transposes handed to the kernels)."""
    x = torch.randn(2, 5, 4, 8)
    unit = attention_module._unit_last_stride
    for view in (x, x.transpose(1, 2), x[:, 1:3], x[..., :4], x[:1].expand(3, 5, 4, 8)):
        assert unit(view) is view  # unit last stride: no copy, whatever the other strides
    y = _transposed_copy(x)
    assert unit(y).stride(-1) == 1 and torch.equal(unit(y), x)


# --------------------------------------------------------------------------------------
# 2. dtype / device / layout / shape checks
# --------------------------------------------------------------------------------------


def _ops(q, k, v):
    """Every public op taking (q, k, v), with the name its errors carry."""
    return {
        "attention_with_lse": lambda: attention_with_lse(q, k, v, causal=True),
        "apb_attention": lambda: apb_attention(q, k, v, anchor_len=1),
        "apb_reference_attention": lambda: apb_reference_attention(q, k, v, anchor_len=1),
        "reference_attention": lambda: reference_attention(q, k, v),
        "grouped_small_query_attention": lambda: grouped_small_query_attention(q, k, v, causal=True),
        "decode_attention": lambda: decode_attention(q, k, v, owner=True, group=None),
    }


OP_NAMES = list(_ops(None, None, None))


@pytest.mark.parametrize("op", OP_NAMES)
def test_integer_inputs_are_refused(op):
    q = torch.randint(0, 5, (1, 5, 4, 8))
    k = torch.randint(0, 5, (1, 5, 2, 8))
    with pytest.raises(InputError, match=rf"{op}: q is torch.int64.*floating") as info:
        _ops(q, k, k)[op]()
    assert isinstance(info.value, ValueError) and isinstance(info.value, APBError)


@pytest.mark.parametrize("op", OP_NAMES)
def test_mixed_dtypes_are_refused(op):
    q = torch.randn(1, 5, 4, 8, dtype=torch.bfloat16)
    k = torch.randn(1, 5, 2, 8, dtype=torch.float16)
    with pytest.raises(InputError, match=rf"{op}: .*cast k and v to q's dtype \(torch.bfloat16\)"):
        _ops(q, k, k)[op]()
    with pytest.raises(InputError, match=r"cast v to q's dtype \(torch.bfloat16\)"):
        _ops(q, k.bfloat16(), k)[op]()


@pytest.mark.parametrize("op", OP_NAMES)
def test_meta_tensors_are_refused(op):
    q = torch.empty(1, 5, 4, 8, device="meta")
    k = torch.empty(1, 5, 2, 8, device="meta")
    with pytest.raises(InputError, match=rf"{op}: q is a meta tensor"):
        _ops(q, k, k)[op]()
    with pytest.raises(InputError, match=rf"{op}: k is a meta tensor"):
        _ops(torch.randn(1, 5, 4, 8), k, torch.randn(1, 5, 2, 8))[op]()


@pytest.mark.parametrize("op", OP_NAMES)
def test_non_tensors_and_sparse_are_refused(op):
    q = torch.randn(1, 5, 4, 8)
    with pytest.raises(InputError, match=rf"{op}: k must be a torch.Tensor, got list"):
        _ops(q, [[1.0]], q)[op]()
    with pytest.raises(InputError, match=rf"{op}: q has layout torch.sparse_coo"):
        _ops(q.to_sparse(), q, q)[op]()


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("shape,message", [
    ((1, 5, 0, 8), r"at least one head"),
    ((1, 5, 4, 0), r"head_dim must be positive"),
    ((1, 5, 4, 8, 1), r"4-D"),
])
def test_degenerate_shapes_are_refused(op, shape, message):
    q = torch.randn(*shape)
    with pytest.raises(InputError, match=rf"{op}: .*{message}"):
        _ops(q, q, q)[op]()


def test_float64_is_accepted_where_supported():
    q = torch.randn(1, 5, 4, 8, dtype=torch.float64)
    for op in ("attention_with_lse", "reference_attention", "apb_reference_attention", "apb_attention"):
        out = _ops(q, q[:, :, :2], q[:, :, :2])[op]()
        out = out[0] if isinstance(out, tuple) else out
        assert out.dtype == torch.float64
    with pytest.raises(ValueError, match="backend='math' or 'reference'"):  # the fused CPU kernel
        attention_with_lse(q, q, q, causal=True, backend="sdpa")


def test_passing_block_dtype_and_device():
    q = torch.randn(1, 6, 4, 8)
    k = torch.randn(1, 6, 2, 8)
    p = torch.randn(1, 3, 2, 8)
    for fn in (apb_attention, apb_reference_attention):
        with pytest.raises(InputError, match=r"cast passing_k and passing_v to k's dtype \(torch.float32\)"):
            fn(q, k, k, anchor_len=2, passing_k=p.double(), passing_v=p.double())
        with pytest.raises(InputError, match=r"passing_v is a meta tensor"):
            fn(q, k, k, anchor_len=2, passing_k=p, passing_v=p.to("meta"))
        with pytest.raises(InputError, match=r"passing_k and passing_v"):
            fn(q, k, k, anchor_len=2, passing_k=p, passing_v=None)
    # a passing block delivered late (passing_fn) is checked as well
    with pytest.raises(InputError, match=r"apb_attention \(the block from passing_fn\): .*cast passing_k"):
        apb_attention(q, k, k, anchor_len=2, passing_fn=lambda: (p.half(), p.half()))


def test_merge_attention_checks():
    o, l = torch.randn(1, 5, 4, 8), torch.randn(1, 4, 5)
    with pytest.raises(InputError, match=r"merge_attention: outs\[0\] is torch.int64.*floating"):
        merge_attention([o.long(), o.long()], [l, l])
    with pytest.raises(InputError, match=r"merge_attention: .*cast outs\[1\] to outs\[0\]'s dtype \(torch.float32\)"):
        merge_attention([o, o.half()], [l, l])
    with pytest.raises(InputError, match=r"merge_attention: lses\[1\] has shape \(1, 5, 4\).*\[batch, heads, seq\] = \(1, 4, 5\)"):
        merge_attention([o, o], [l, l.transpose(1, 2)])
    with pytest.raises(InputError, match=r"merge_attention: outs\[1\] has shape"):
        merge_attention([o, o[:, :3]], [l, l])
    with pytest.raises(InputError, match=r"merge_attention: lses\[0\] is torch.int64"):
        merge_attention([o, o], [l.long(), l])
    with pytest.raises(InputError, match=r"merge_attention: outs\[0\] is a meta tensor"):
        merge_attention([o.to("meta"), o], [l, l])
    with pytest.raises(ValueError, match="as many lse"):
        merge_attention([o, o], [l])


def test_reference_mask_checks():
    q = torch.randn(1, 5, 4, 8)
    with pytest.raises(InputError, match=r"reference_attention: mask must be torch.bool"):
        reference_attention(q, q, q, causal_mask(5, 5).float())
    with pytest.raises(InputError, match=r"reference_attention: mask of shape \(5, 6\)"):
        reference_attention(q, q, q, causal_mask(5, 6))


def test_shape_errors_name_the_op():
    q, k = torch.randn(1, 5, 6, 8), torch.randn(1, 5, 4, 8)
    for op, call in _ops(q, k, k).items():
        with pytest.raises(InputError, match=rf"{op}: kv_heads \(4\) must divide heads \(6\)"):
            call()


class _Recorder(torch.Tensor):
    """Records every torch function and attribute read done on it."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = func.__name__
        if name == "__get__":  # a property: shape, dtype, ...
            name = func.__self__.__name__
        cls.seen.append(name)
        return super().__torch_function__(func, types, args, kwargs or {})


# what a check may look at: metadata, never values (no kernel, no device sync)
METADATA = {"shape", "dtype", "device", "is_meta", "layout", "dim", "ndim", "size", "stride",
            "is_cuda", "is_floating_point", "is_sparse"}


def test_checks_read_metadata_only():
    q = torch.randn(1, 5, 4, 8).as_subclass(_Recorder)
    k = torch.randn(1, 5, 2, 8).as_subclass(_Recorder)
    p = torch.randn(1, 3, 2, 8).as_subclass(_Recorder)
    lse = torch.randn(1, 4, 5).as_subclass(_Recorder)
    _Recorder.seen = []
    check_attention_inputs(q, k, k, where="t", passing_k=p, passing_v=p)
    check_merge_inputs([q, q], [lse, lse], where="t")
    seen = set(_Recorder.seen)
    assert seen and seen <= METADATA, seen - METADATA


# --------------------------------------------------------------------------------------
# 3. NaN propagation
# --------------------------------------------------------------------------------------

# small shapes: the CPU flash kernel zeroed rows whose every visible score was NaN for rows
# seeing fewer than ~16 keys; the larger shape checks the other code path
NAN_SHAPES = [(6, 6, 8), (3, 8, 8), (40, 40, 64)]  # (q_len, k_len, head_dim)


def _nan_inputs(sq, sk, d, seed=0):
    return _randn(2, sq, 4, d, seed=seed), _randn(2, sk, 2, d, seed=seed + 1), _randn(2, sk, 2, d, seed=seed + 2)


def _visible(sq, sk, causal):
    return causal_mask(sq, sk) if causal else torch.ones(sq, sk, dtype=torch.bool)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,sk,d", NAN_SHAPES)
def test_nan_in_query_row_gives_nan_row(backend, causal, sq, sk, d):
    q, k, v = _nan_inputs(sq, sk, d)
    row = sq - 2
    q[1, row, 3, d // 2] = NAN
    out, lse = attention_with_lse(q, k, v, causal=causal, backend=backend)
    assert out[1, row, 3].isnan().all() and lse[1, 3, row].isnan()
    bad = torch.zeros(2, sq, 4, dtype=torch.bool)
    bad[1, row, 3] = True
    assert torch.isfinite(out[~bad]).all() and torch.isfinite(lse.transpose(1, 2)[~bad]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("key", [0, 2])
@pytest.mark.parametrize("sq,sk,d", NAN_SHAPES)
def test_nan_in_key_gives_nan_in_rows_that_see_it(backend, causal, key, sq, sk, d):
    q, k, v = _nan_inputs(sq, sk, d, seed=3)
    k[0, key, 1, 0] = NAN  # KV head 1 serves query heads 2 and 3
    out, lse = attention_with_lse(q, k, v, causal=causal, backend=backend)
    sees = _visible(sq, sk, causal)[:, key]  # [sq]
    bad = torch.zeros(2, sq, 4, dtype=torch.bool)
    bad[0, :, 2:] = sees[:, None]
    assert out[bad].isnan().all() and lse.transpose(1, 2)[bad].isnan().all()
    assert torch.isfinite(out[~bad]).all() and not lse.isnan().transpose(1, 2)[~bad].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,sk,d", NAN_SHAPES)
def test_nan_in_value_gives_nan_in_rows_that_see_it(backend, causal, sq, sk, d):
    q, k, v = _nan_inputs(sq, sk, d, seed=5)
    key = 1
    v[1, key, 0, 3] = NAN  # KV head 0 serves query heads 0 and 1
    out, lse = attention_with_lse(q, k, v, causal=causal, backend=backend)
    sees = _visible(sq, sk, causal)[:, key]
    assert out[1, sees][:, :2, 3].isnan().all()
    assert torch.isfinite(lse[lse > float("-inf")]).all()  # the LSE does not read v
    assert torch.isfinite(out[..., :3]).all() and torch.isfinite(out[..., 4:]).all()


def test_reference_propagates_nan_query():
    """The float64 reference itself used to turn a NaN query row into zeros."""
    q, k, v = _nan_inputs(5, 5, 8)
    q[0, 2, 1, 0] = NAN
    out, lse = reference_attention(q, k, v, causal_mask(5, 5))
    assert out[0, 2, 1].isnan().all() and lse[0, 1, 2].isnan()
    # rows with no visible key still give exactly 0 and -inf
    out, lse = reference_attention(q, k, v, torch.zeros(5, 5, dtype=torch.bool))
    assert (out == 0).all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto"])
def test_apb_attention_propagates_nan(backend):
    la, lb, p = 2, 5, 3
    q, k, v = _nan_inputs(la + lb, la + lb, 8, seed=9)
    pk, pv = _randn(2, p, 2, 8, seed=20), _randn(2, p, 2, 8, seed=21)
    q[0, la + 1, 0, 0] = NAN  # one local row
    out = apb_attention(q, k, v, anchor_len=la, passing_k=pk, passing_v=pv, backend=backend)
    assert out[0, la + 1, 0].isnan().all() and torch.isfinite(out[1]).all()
    assert int(out.isnan().any(-1).sum()) == 1
    pk2 = pk.clone()
    pk2[1, 0, 0, 0] = NAN  # the passing block: every local row of batch 1, heads 0-1
    out = apb_attention(q.nan_to_num(), k, v, anchor_len=la, passing_k=pk2, passing_v=pv, backend=backend)
    assert out[1, la:, :2].isnan().all()
    assert torch.isfinite(out[1, :la]).all() and torch.isfinite(out[1, :, 2:]).all() and torch.isfinite(out[0]).all()
    k2 = k.clone()
    k2[0, 0, 1, 0] = NAN  # the first anchor key: every row of batch 0, heads 2-3, sees it
    out = apb_attention(q.nan_to_num(), k2, v, anchor_len=la, passing_k=pk, passing_v=pv, backend=backend)
    assert out[0, :, 2:].isnan().all() and torch.isfinite(out[0, :, :2]).all()


def test_merge_propagates_nan():
    o, l = torch.randn(1, 5, 4, 8), torch.randn(1, 4, 5)
    l_nan = l.clone()
    l_nan[0, 2, 3] = NAN
    out, lse = merge_attention([o, o + 1], [l, l_nan])
    assert out[0, 3, 2].isnan().all() and lse[0, 2, 3].isnan()
    assert int(out.isnan().any(-1).sum()) == 1


# --------------------------------------------------------------------------------------
# GPU: devices, mixed precision, the fused kernels (skipped without CUDA)
# --------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_BACKENDS = ("auto", "sdpa", "cudnn", "flash", "efficient", "math", "flex")


@cuda
@pytest.mark.parametrize("op", OP_NAMES)
def test_gpu_device_mismatch_is_refused(op):
    q = torch.randn(1, 5, 4, 8, device="cuda")
    k = torch.randn(1, 5, 2, 8)
    with pytest.raises(InputError, match=rf"{op}: q is on cuda:0 but k is on cpu.*move"):
        _ops(q, k, k.cuda())[op]()


@cuda
def test_gpu_bf16_query_with_fp16_cache_is_refused():
    q = torch.randn(1, 64, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.float16)
    for backend in GPU_BACKENDS:
        with pytest.raises(InputError, match=r"cast k and v to q's dtype \(torch.bfloat16\)"):
            attention_with_lse(q, k, k, causal=True, backend=backend)


def _plain(q, k, v, causal):
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2)
    s = torch.matmul(qt, kt.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[1], k.shape[1], device=q.device), float("-inf"))
    return torch.matmul(torch.softmax(s, -1), vt).transpose(1, 2)


@cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("sq,sk", [(256, 256), (4, 300)])
def test_gpu_strided_last_dim(backend, view, sq, sk):
    q = _randn(1, sq, 8, 64, seed=1, dtype=torch.bfloat16, device="cuda")
    k = _randn(1, sk, 2, 64, seed=2, dtype=torch.bfloat16, device="cuda")
    v = _randn(1, sk, 2, 64, seed=3, dtype=torch.bfloat16, device="cuda")
    out, _ = attention_with_lse(VIEWS[view](q), VIEWS[view](k), VIEWS[view](v), causal=True, backend=backend)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), causal_mask(sq, sk))
    plain = _max_err(_plain(q, k, v, True), ref)
    assert _max_err(out, ref) <= 2 * plain  # flash-attention's 2x rule


@cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("sq,sk", [(6, 6), (256, 256), (4, 300)])
def test_gpu_nan_propagates(backend, sq, sk):
    q = _randn(1, sq, 8, 64, seed=1, dtype=torch.bfloat16, device="cuda")
    k = _randn(1, sk, 2, 64, seed=2, dtype=torch.bfloat16, device="cuda")
    v = _randn(1, sk, 2, 64, seed=3, dtype=torch.bfloat16, device="cuda")
    q2 = q.clone()
    q2[0, sq - 1, 5, 0] = NAN
    out, lse = attention_with_lse(q2, k, v, causal=True, backend=backend)
    assert out[0, sq - 1, 5].isnan().all() and lse[0, 5, sq - 1].isnan()
    assert int(out.isnan().any(-1).sum()) == 1
    k2 = k.clone()
    k2[0, 0, 1, 0] = NAN  # every row of heads 4-7 sees key 0
    out, lse = attention_with_lse(q, k2, v, causal=True, backend=backend)
    assert out[0, :, 4:].isnan().all() and lse[0, 4:].isnan().all()
    assert torch.isfinite(out[0, :, :4]).all()


@cuda
def test_gpu_checks_do_not_synchronize():
    q = torch.randn(1, 64, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(1, 8, 64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        check_attention_inputs(q, k, k, where="t", passing_k=k, passing_v=k)
        check_merge_inputs([q, q], [lse, lse], where="t")
    finally:
        torch.cuda.set_sync_debug_mode("default")
