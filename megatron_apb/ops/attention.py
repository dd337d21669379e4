"""Softmax attention that also returns the log-sum-exp, with interchangeable backends.

One contract for every backend::

    out, lse = attention_with_lse(q, k, v, causal=..., softmax_scale=..., backend=...)

* q: [batch, q_len, heads, dim]; k, v: [batch, k_len, kv_heads, dim], kv_heads | heads
  (GQA: query head h reads KV head h // (heads // kv_heads)).
* ``causal`` is bottom-right aligned, as in flash-attn 2: query i sees key j iff
  ``j <= i + k_len - q_len``.  With q_len=2, k_len=5 (1 = attend)::

        1 1 1 1 0
        1 1 1 1 1

* out: [batch, q_len, heads, dim] in q's dtype; lse: float32 [batch, heads, q_len], natural
  log.  A row with no visible key gets out = 0 and lse = -inf, so it merges away exactly
  (see :mod:`megatron_apb.ops.merge`).
* Inputs are checked from their metadata (:mod:`megatron_apb.ops.validation`: floating
  dtype shared by q, k, v, one device, no meta tensor, the shapes above) and may have any
  strides: the fused kernels get a unit stride along head_dim (copied only where missing).
* NaN propagates, on every backend: a NaN in query row i gives NaN in row i's output and
  LSE; a NaN in key j gives NaN in the output and LSE of every row that sees key j; a NaN
  in value j gives NaN in that column of every row that sees key j (rows that do not see
  key j may or may not be affected, depending on the kernel).  Values are never checked
  (that would read every input and, on GPU, synchronize on every layer); a NaN is reported
  where the caller looks at the result.

Backends: ``reference`` (dense float64), ``math`` (chunked float32 matmuls, any device),
``flex`` (FlexAttention returning the LSE; compiled on GPU), and PyTorch's fused kernels
through the aten ops that return the LSE: ``cudnn``, ``flash`` and ``efficient`` on CUDA,
``sdpa`` for whichever of them fits (on CPU: the CPU flash kernel).  ``auto`` picks the
fastest that supports the dtype and head size (cuDNN on Hopper, see the benchmarks) and
falls back to ``math``; for a few query rows on GPU (decoding) it uses
:func:`grouped_small_query_attention`.  flash-attn and Transformer Engine are not required.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..config import BACKENDS
from ..errors import APBConfigError
from .merge import merge_attention
from .reference import causal_mask, reference_attention
from .validation import check_attention_inputs

Tensor = torch.Tensor

_SDPA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Query rows per chunk in the math backend: bounds the [b, h, chunk, k_len] score buffer.
_MATH_CHUNK_ELEMS = 1 << 26


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Attention of q over (k, v) returning ``(out, lse)``; see the module docstring.

    ``backend`` may also be a callable with this function's contract (e.g.
    :class:`megatron_apb.ops.sparse.SparseAttention`): the call is handed to it."""
    check_attention_inputs(q, k, v, where="attention_with_lse")
    if not isinstance(backend, str):
        return backend(q, k, v, causal=causal, softmax_scale=softmax_scale)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    requested, backend = backend, resolve_backend(backend, q)
    if b == 0 or sq == 0 or sk == 0:
        return _empty(q, sq)
    if requested == "auto" and q.is_cuda and _small_query_fits(q, k):
        return _grouped_small_query(q, k, v, causal, scale)
    if backend == "reference":
        mask = causal_mask(sq, sk, device=q.device) if causal else None
        return reference_attention(q, k, v, mask, scale)
    if backend == "math":
        return _math_attention(q, k, v, causal, scale)
    if causal and sq != sk and backend in _FUSED:
        return _bottom_right_by_parts(q, k, v, scale, backend)
    if backend in _FUSED:
        return _fused_attention(q, k, v, causal, scale, backend)
    if backend == "flex":
        if q.is_cuda and sq < _FLEX_MIN_ROWS:
            # the compiled FlexAttention kernel fails to build for short query blocks
            # (inductor, torch 2.11); few rows against many keys is the decoding case anyway
            if _small_query_fits(q, k):
                return _grouped_small_query(q, k, v, causal, scale)
            return _math_attention(q, k, v, causal, scale)
        return _flex_attention(q, k, v, causal, scale)
    raise ValueError(f"unknown attention backend {backend!r}")


_FUSED = ("sdpa", "cudnn", "flash", "efficient")
_HALF = (torch.float16, torch.bfloat16)


def resolve_backend(backend: str, q: Tensor) -> str:
    """The concrete backend ``backend`` means for tensors like ``q``."""
    if backend not in BACKENDS:
        raise APBConfigError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}", field="backend")
    cuda, d = q.device.type == "cuda", q.shape[-1]
    if backend in ("cudnn", "flash", "efficient") and not cuda:
        raise APBConfigError(
            f"backend={backend!r} runs on CUDA only; use 'sdpa' or 'math' on CPU", field="backend"
        )
    if backend == "sdpa":
        if q.dtype not in _SDPA_DTYPES:
            raise APBConfigError(
                f"backend='sdpa' supports {', '.join(map(str, _SDPA_DTYPES))}, not {q.dtype}; "
                "use backend='math' or 'reference'", field="backend"
            )
        if not cuda:
            return "sdpa"
        backend = "auto"
    if backend != "auto":
        if backend in ("cudnn", "flash") and q.dtype not in _HALF:
            raise APBConfigError(f"backend={backend!r} needs fp16/bf16, not {q.dtype}", field="backend")
        return backend
    if not cuda:
        return "sdpa" if q.dtype in _SDPA_DTYPES else "math"
    if q.dtype in _HALF and d <= 128 and d % 8 == 0:
        return "cudnn"
    if q.dtype in _HALF and d <= 256 and d % 8 == 0:
        return "flash"
    if q.dtype in _SDPA_DTYPES and d % 8 == 0:
        return "efficient"
    return "math"


def _empty(q, sq):
    b, _, h, _ = q.shape
    out = torch.zeros_like(q[:, :sq])
    lse = torch.full((b, h, sq), float("-inf"), device=q.device, dtype=torch.float32)
    return out, lse


def _expand_kv(k, heads):
    group = heads // k.shape[2]
    return k if group == 1 else k.repeat_interleave(group, dim=2)


def _math_attention(q, k, v, causal, scale):
    """Chunked float32 attention: plain matmuls, works on every device and dtype."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    kk = _expand_kv(k, h).float().transpose(1, 2)  # [b, h, sk, d]
    vv = _expand_kv(v, h).float().transpose(1, 2)
    qq = q.float().transpose(1, 2)  # [b, h, sq, d]
    chunk = max(1, _MATH_CHUNK_ELEMS // max(1, b * h * sk))
    outs, lses = [], []
    for start in range(0, sq, chunk):
        stop = min(sq, start + chunk)
        s = torch.matmul(qq[:, :, start:stop], kk.transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(start, stop, device=q.device)[:, None]
            cols = torch.arange(sk, device=q.device)[None, :]
            s = s.masked_fill(cols > rows + (sk - sq), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
        outs.append(torch.matmul(p, vv))
        lses.append(lse)
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return out, torch.cat(lses, dim=2)


# Decoding: a few query rows against a long cache.  Fused kernels parallelize over query
# blocks and heads only (a handful of thread blocks walking the whole cache); two batched
# matmuls per KV head group read the cache once, with no copy.
_SMALL_QUERY_ROWS = 64
_FLEX_MIN_ROWS = 128
_SMALL_QUERY_SCORES = 1 << 28  # fp32 score elements (1 GiB)


def _small_query_fits(q, k) -> bool:
    b, sq, h, _ = q.shape
    return sq <= _SMALL_QUERY_ROWS and b * h * sq * k.shape[1] <= _SMALL_QUERY_SCORES


def grouped_small_query_attention(q, k, v, *, causal: bool, softmax_scale: Optional[float] = None):
    """Attention for few query rows (decoding) by matmuls over KV-head groups.

    The same contract as :func:`attention_with_lse` (bottom-right causal, GQA, LSE); the
    ``heads // kv_heads`` query heads of a group share one matmul against their KV head, so
    K and V are read once and never expanded.  Scores are computed in the input dtype with
    float32 accumulation, softmax and LSE in float32.
    """
    check_attention_inputs(q, k, v, where="grouped_small_query_attention")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.shape[0] == 0 or q.shape[1] == 0 or k.shape[1] == 0:
        return _empty(q, q.shape[1])
    return _grouped_small_query(q, k, v, causal, scale)


def _grouped_small_query(q, k, v, causal, scale):
    """:func:`grouped_small_query_attention` on checked, non-empty inputs."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    # rows of a group: (query head within the group, query position)
    qg = q.reshape(b, sq, hk, g, d).permute(0, 2, 3, 1, 4).reshape(b, hk, g * sq, d)
    s = torch.matmul(qg, k.permute(0, 2, 3, 1)).float().mul_(scale)  # [b, hk, g*sq, sk]
    if causal:
        rows = torch.arange(sq, device=q.device).repeat(g)[:, None]
        cols = torch.arange(sk, device=q.device)[None, :]
        s.masked_fill_(cols > rows + (sk - sq), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [b, hk, g*sq]
    p = torch.exp(s.sub_(torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None]))
    out = torch.matmul(p.to(v.dtype), v.transpose(1, 2))  # [b, hk, g*sq, d]
    out = out.reshape(b, hk, g, sq, d).permute(0, 3, 1, 2, 4).reshape(b, sq, h, d)
    return out.to(q.dtype), lse.reshape(b, h, sq)


def _bottom_right_by_parts(q, k, v, scale, backend):
    """Bottom-right causal from square-causal and unmasked calls (kernels align top-left)."""
    sq, sk = q.shape[1], k.shape[1]
    if sq > sk:  # the first sq - sk rows see no key at all
        head_out, head_lse = _empty(q, sq - sk)
        tail_out, tail_lse = attention_with_lse(
            q[:, sq - sk :], k, v, causal=True, softmax_scale=scale, backend=backend
        )
        return torch.cat([head_out, tail_out], 1), torch.cat([head_lse, tail_lse], 2)
    prefix = sk - sq
    full = attention_with_lse(
        q, k[:, :prefix], v[:, :prefix], causal=False, softmax_scale=scale, backend=backend
    )
    diag = attention_with_lse(
        q, k[:, prefix:], v[:, prefix:], causal=True, softmax_scale=scale, backend=backend
    )
    return merge_attention([full[0], diag[0]], [full[1], diag[1]])


def _fused_attention(q, k, v, causal, scale, backend):
    """PyTorch's fused kernels via the aten ops that expose the LSE (top-left causal).

    K and V keep their KV heads when the kernel reads grouped heads itself (see
    :func:`native_gqa`); otherwise they are expanded to the query heads first.
    """
    h = q.shape[2]
    if k.shape[2] != h and not native_gqa(backend, q.device):
        k, v = _expand_kv(k, h), _expand_kv(v, h)
    return _fused_call(q, k, v, causal, scale, backend)


def _unit_last_stride(x):
    """``x`` itself if its last dimension has unit stride, else a contiguous copy.

    The aten attention ops index the head dimension as if its stride were 1: the CPU flash
    kernel silently reads wrong elements (a transposed copy, ``x[..., ::2]``, a
    head-dim-major buffer), the CUDA ones refuse.  Other strides are read as given.
    """
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _fused_call(q, k, v, causal, scale, backend):
    b, sq, h, _ = q.shape
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    aten = torch.ops.aten
    if backend == "sdpa":  # CPU
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, causal, scale=scale)
        return _propagate_nan(q, k, out.transpose(1, 2), lse.float(), causal)
    elif backend == "cudnn":
        res = aten._scaled_dot_product_cudnn_attention(
            qt, kt, vt, None, True, 0.0, causal, False, scale=scale
        )
        out, lse = res[0], res[1]
    elif backend == "flash":
        res = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
    else:  # efficient
        res = aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, causal, scale=scale)
        out, lse = res[0], res[1]
    lse = lse.reshape(b, h, -1)[:, :, :sq]  # cuDNN: [b, h, s, 1]; efficient pads s
    return out.transpose(1, 2), lse.float()


def _propagate_nan(q, k, out, lse, causal):
    """Make the CPU flash kernel's rows NaN where a NaN in q or k reaches them.

    The kernel drops NaN scores in its row maximum, so a row whose every visible score is
    NaN (a NaN query row, or a causal row whose visible keys all hold NaN; rows of up to
    ~16 keys) comes out as zeros with lse 0 instead of NaN.  Marks are per (batch, row,
    head): a NaN in query row i, or in a key row i sees (keys 0..i when ``causal``, the
    kernel's top-left alignment; every key otherwise).  ``amax`` propagates NaN and reads
    each input once, with [batch, rows, heads] temporaries; the result is copied only when
    some row is marked (on CPU the test costs no device synchronization).  NaN in v
    propagates through the kernel's matmul.
    """
    sq, sk = q.shape[1], k.shape[1]
    bad = q.amax(-1).isnan()  # [b, sq, h]
    key_bad = k.amax(-1).isnan()  # [b, sk, hk]
    if causal:  # row i: any NaN among keys 0..min(i, sk - 1)
        rows = torch.arange(sq, device=q.device).clamp_(max=sk - 1)
        key_bad = key_bad.cummax(1).values[:, rows]
    else:
        key_bad = key_bad.any(1, keepdim=True)
    group = q.shape[2] // k.shape[2]
    bad = bad | (key_bad if group == 1 else key_bad.repeat_interleave(group, dim=2))
    if not bool(bad.any()):
        return out, lse
    return out.masked_fill(bad[..., None], float("nan")), lse.masked_fill(bad.transpose(1, 2), float("nan"))


# Fused kernels that read grouped KV heads without the expansion copy, per device:
# established once by comparing against the expanded call on a small input.
_GQA_NATIVE_BACKENDS = ("cudnn", "flash")
_NATIVE_GQA = {}


def native_gqa(backend: str, device) -> bool:
    """Whether ``backend``'s aten kernel on ``device`` takes K/V with fewer heads than Q.

    cuDNN's and flash's kernels index KV head ``h // group`` themselves in recent PyTorch
    builds; older builds reject the shapes.  The answer is measured, not assumed: a small
    grouped call must run and match the expanded call (same kernel) to 1e-3, else the
    heads are expanded as before.
    """
    device = torch.device(device)
    if backend not in _GQA_NATIVE_BACKENDS or device.type != "cuda":
        return False
    key = (backend, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _NATIVE_GQA:
        _NATIVE_GQA[key] = _probe_native_gqa(backend, device)
    return _NATIVE_GQA[key]


def _probe_native_gqa(backend, device) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 192, 8, 64, device=device, generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, 256, 2, 64, device=device, generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, 256, 2, 64, device=device, generator=g, dtype=torch.bfloat16)
    try:
        for causal in (True, False):
            got, got_lse = _fused_call(q, k, v, causal, 0.125, backend)
            want, want_lse = _fused_call(q, _expand_kv(k, 8), _expand_kv(v, 8), causal, 0.125, backend)
            if (got.float() - want.float()).abs().max().item() > 1e-3:
                return False
            if (got_lse - want_lse).abs().max().item() > 1e-3:
                return False
    except RuntimeError:
        return False
    return True


def _flex_attention(q, k, v, causal, scale):
    # local: FlexAttention's module compiles kernels on import; only the flex backend needs it
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    sq, sk = q.shape[1], k.shape[1]
    block_mask = None
    if causal:
        offset = sk - sq

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        block_mask = create_block_mask(mask_mod, None, None, sq, sk, device=q.device)
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    try:  # torch >= 2.9 reports the LSE through an AuxRequest
        # local: AuxRequest exists from torch 2.9 on; older releases take the except branch
        from torch.nn.attention.flex_attention import AuxRequest

        out, aux = _flex_fn(flex_attention, q.device)(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            return_aux=AuxRequest(lse=True), **kwargs,
        )
        lse = aux.lse
    except ImportError:
        out, lse = _flex_fn(flex_attention, q.device)(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_lse=True, **kwargs
        )
    return out.transpose(1, 2), lse.float()


_COMPILED_FLEX = None


def _flex_fn(flex_attention, device):
    """FlexAttention compiled on GPU (its fused kernel); eager on CPU (tests only)."""
    global _COMPILED_FLEX
    if device.type == "cpu":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX
