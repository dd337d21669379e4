"""Triton kernels for two memory-bound steps of an APB host's layer (CUDA only).

* :func:`rope_triton`: the rotary embedding (non-interleaved halves) of q or k, read in
  place from Megatron's strided q/k views, written once.  Reference:
  :func:`megatron_apb.ops.fused._rope_math`.
* :func:`merge_two_into`: the LSE merge of two partial attention outputs written straight
  into a slice of the layer's output, so the anchor rows and the merged block rows need no
  concatenation pass.  Reference: :func:`megatron_apb.ops.merge.merge_attention`.

Each program handles one token row (all heads of a row, or a block of them).  Arithmetic is
float32; offsets are 64-bit, so a million-token prompt's strides do not overflow.  Both are
used only where Triton imports (it ships with PyTorch's CUDA wheels); otherwise callers
fall back to ``torch.compile`` or eager PyTorch.
"""

from __future__ import annotations

import torch

try:  # Triton is an optional accelerator (CUDA, or its CPU interpreter in tests); the
    # other kernel modules (decode_kernel, sparse.kernel) take it from here
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs, or a broken Triton
    triton = tl = None
    HAVE_TRITON = False

Tensor = torch.Tensor


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels can run on these tensors (Triton present, CUDA tensors)."""
    return HAVE_TRITON and all(t.is_cuda for t in tensors)


def _heads_block(heads: int, width: int) -> int:
    """Heads per program: about 4096 elements per program, a power of two."""
    return max(1, min(triton.next_power_of_2(heads), max(1, 4096 // width)))


if HAVE_TRITON:

    @triton.jit
    def _rope_kernel(
        x, cos, sin, out, S, H,
        sxb, sxs, sxh, scs, ssn, sob, sos, soh,
        HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b, s = row // S, row % S
        h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None]
        d = tl.arange(0, HALF_P2)[None, :]
        mask = (h < H) & (d < HALF)
        xp = x + b * sxb + s * sxs + h * sxh + d
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
        dm = d < HALF
        c1 = tl.load(cos + s * scs + d, mask=dm, other=0.0)
        c2 = tl.load(cos + s * scs + HALF + d, mask=dm, other=0.0)
        s1 = tl.load(sin + s * ssn + d, mask=dm, other=0.0)
        s2 = tl.load(sin + s * ssn + HALF + d, mask=dm, other=0.0)
        op = out + b * sob + s * sos + h * soh + d
        tl.store(op, (x1 * c1 - x2 * s1).to(out.dtype.element_ty), mask=mask)
        tl.store(op + HALF, (x2 * c2 + x1 * s2).to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _merge_two_kernel(
        o1, l1, o2, l2, out, S, H, D,
        s1b, s1s, s1h, s2b, s2s, s2h,
        sl1b, sl1h, sl1s, sl2b, sl2h, sl2s,
        sob, sos, soh,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b, s = row // S, row % S
        h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        hm = h < H
        mask = hm & (d < D)
        a = tl.load(l1 + b * sl1b + h * sl1h + s * sl1s, mask=hm, other=float("-inf"))
        c = tl.load(l2 + b * sl2b + h * sl2h + s * sl2s, mask=hm, other=float("-inf"))
        top = tl.maximum(a, c)
        top = tl.where(top == float("-inf"), 0.0, top)  # rows no part covers: weights 0
        ea, ec = tl.exp(a - top), tl.exp(c - top)
        total = ea + ec
        total = tl.where(total > 0, total, 1.0)  # both parts empty: ea = ec = 0
        w1, w2 = ea / total, ec / total
        x = tl.load(o1 + b * s1b + s * s1s + h * s1h + d, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(o2 + b * s2b + s * s2s + h * s2h + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + b * sob + s * sos + h * soh + d, (w1 * x + w2 * y).to(out.dtype.element_ty), mask=mask)


def rope_triton(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [b, s, heads, d] by float32 tables cos/sin [s, d]; a new contiguous tensor."""
    b, s, h, d = x.shape
    if d % 2 or x.stride(3) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("rope_triton needs an even head size and unit stride along it")
    out = torch.empty((b, s, h, d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = d // 2
    block_h = _heads_block(h, d)
    grid = (b * s, triton.cdiv(h, block_h))
    _rope_kernel[grid](
        x, cos, sin, out, s, h,
        x.stride(0), x.stride(1), x.stride(2), cos.stride(0), sin.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        HALF=half, HALF_P2=triton.next_power_of_2(half), BLOCK_H=block_h,
    )
    return out


def merge_two_into(out: Tensor, o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> Tensor:
    """Write the LSE merge of (o1, l1) and (o2, l2) into ``out`` (a view is fine).

    o1, o2, out: [b, s, heads, d] (unit stride along d); l1, l2: float32 [b, heads, s].
    """
    b, s, h, d = out.shape
    for t in (o1, o2, out):
        if t.shape != out.shape or t.stride(3) != 1:
            raise ValueError("merge_two_into needs outputs of one shape with unit stride along head_dim")
    if out.numel() == 0:
        return out
    l1, l2 = l1.float(), l2.float()
    block_h = _heads_block(h, d)
    grid = (b * s, triton.cdiv(h, block_h))
    _merge_two_kernel[grid](
        o1, l1, o2, l2, out, s, h, d,
        o1.stride(0), o1.stride(1), o1.stride(2), o2.stride(0), o2.stride(1), o2.stride(2),
        l1.stride(0), l1.stride(1), l1.stride(2), l2.stride(0), l2.stride(1), l2.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(d),
    )
    return out
