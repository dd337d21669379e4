"""Elementwise chains of the transformer layer, each fused into one kernel on CUDA.

Without Transformer Engine or Apex, Megatron's local layer runs RMSNorm and the rotary
embedding as chains of PyTorch kernels (RMSNorm: square, mean, rsqrt, two products and two
casts; RoPE: a negation, a concatenation, two products and a sum), each a full pass over a
``[tokens, hidden]`` activation.  Here each chain is one function that ``torch.compile``
turns into a single kernel on CUDA (arithmetic in float32, one read and one write);
elsewhere (CPU) the same function runs eagerly, so the math is tested everywhere.  RoPE
on CUDA runs a hand-written Triton kernel instead (see :mod:`.triton_kernels`): the
compiled dynamic-shape kernel reached about a seventh of the memory bandwidth on H200.

References: ``torch.nn.functional.rms_norm`` and
:func:`megatron_apb.megatron.rope.apply_rope` (the unfused chains).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from . import triton_kernels

Tensor = torch.Tensor


def _rms_norm_math(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def _rope_math(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x [b, s, h, d]; cos/sin float32 [s, d] (both halves, as Megatron's table)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]).to(x.dtype)


_MATH = {"rms_norm": _rms_norm_math, "rope": _rope_math}


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    return torch.compile(_MATH[name], dynamic=True)


def _run(name, x, *args):
    return (_compiled(name) if x.is_cuda else _MATH[name])(x, *args)


#: tensors with more elements than this are normed in blocks of rows (a kernel then never
#: needs an element offset past a signed 32-bit integer, e.g. a million-token prefill)
MAX_KERNEL_ELEMENTS = 2**31


def fused_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x * rsqrt(mean(x**2, -1) + eps) * weight`` in float32, returned in x's dtype."""
    if x.numel() <= MAX_KERNEL_ELEMENTS or not x.is_contiguous():
        return _run("rms_norm", x, weight, eps)
    rows = x.view(-1, x.shape[-1])
    out = torch.empty_like(rows)
    step = max(1, MAX_KERNEL_ELEMENTS // 2 // x.shape[-1])
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = _run("rms_norm", rows[start : start + step], weight, eps)
    return out.view(x.shape)


def rope_cos_sin(freqs: Tensor, device=None) -> Tuple[Tensor, Tensor]:
    """float32 (cos, sin) of the angles ``freqs`` [s, d], for :func:`fused_rope`."""
    angles = freqs.to(device if device is not None else freqs.device).float()
    return angles.cos(), angles.sin()


def fused_rope(x: Tensor, freqs: Tensor, *, cos_sin: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """Rotate x [b, s, heads, d] (non-interleaved halves) by angles freqs [s, d].

    ``cos_sin``: :func:`rope_cos_sin` of ``freqs``, when several tensors (q and k, every
    layer of a forward) share the angles."""
    if freqs.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"fused_rope rotates the whole head ({x.shape[-1]}), got rotary dim {freqs.shape[-1]}; "
            "use megatron_apb.megatron.rope.apply_rope for partial rotary embeddings"
        )
    cos, sin = cos_sin if cos_sin is not None else rope_cos_sin(freqs, x.device)
    if triton_kernels.usable(x) and x.stride(-1) == 1:
        return triton_kernels.rope_triton(x, cos, sin)
    return _run("rope", x, cos, sin)
