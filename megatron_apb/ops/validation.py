"""The checks every public attention op runs on its tensor arguments, in one place.

    check_attention_inputs(q, k, v, where="attention_with_lse")
    check_merge_inputs(outs, lses, where="merge_attention")

They look at metadata only (type, layout, device, dtype, shape): no value is read, no
kernel is launched and the device is never synchronized, so they cost a few microseconds
of Python and run on every layer in production.  A failure raises
:class:`~megatron_apb.errors.InputError` (a ``ValueError``) whose message names the op
(``where``) and the tensor, and says what to change.

What is accepted:

* ``torch.Tensor`` in the strided layout, not on the meta device (a meta tensor has no
  values: the result would be garbage);
* floating point: float32, float16, bfloat16, and float64 (the math and reference paths
  compute it; the fused kernels refuse it with their own error);
* q, k, v (and a passing block) of one dtype and on one device: nothing is cast or moved
  silently;
* q [batch, q_len, heads, head_dim], k and v [batch, k_len, kv_heads, head_dim] with
  ``kv_heads`` dividing ``heads`` (grouped-query attention); the passing block
  [batch, P, kv_heads, head_dim].

Values are not checked: NaN propagates to the outputs it affects (see
:mod:`megatron_apb.ops.attention`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import InputError

Tensor = torch.Tensor

#: dtypes the attention ops compute (float64 on the math and reference paths only)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(t, name: str, *, where: str) -> None:
    """One tensor: a strided, floating-point ``torch.Tensor`` with values (not meta)."""
    if not isinstance(t, Tensor):
        raise InputError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise InputError(f"{where}: {name} has layout {t.layout}; pass a dense tensor ({name}.to_dense())")
    if t.is_meta:
        raise InputError(
            f"{where}: {name} is a meta tensor (shape only, no values); materialize the model "
            "on a real device (module.to_empty(device=...) and load the weights) before running it"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise InputError(
            f"{where}: {name} is {t.dtype}; attention needs floating-point inputs "
            f"({', '.join(map(str, FLOAT_DTYPES))}): cast it, e.g. {name}.to(torch.bfloat16)"
        )


def check_attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    where: str,
    passing_k: Optional[Tensor] = None,
    passing_v: Optional[Tensor] = None,
) -> None:
    """Raise :class:`InputError` unless (q, k, v[, passing_k, passing_v]) can be attended.

    See the module docstring for what is accepted; ``where`` (the op's name) starts every
    message.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, where=where)
    _same_device(where, "q", q, (("k", k), ("v", v)))
    _same_dtype(where, "q", q, (("k", k), ("v", v)))
    check_shapes(q, k, v, where=where)
    check_passing(k, passing_k, passing_v, where=where)


def check_shapes(q: Tensor, k: Tensor, v: Tensor, *, where: str) -> None:
    """q, k, v are [batch, seq, heads, head_dim] with GQA-compatible heads."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(
            f"{where}: q, k, v must be 4-D [batch, seq, heads, head_dim]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise InputError(f"{where}: k and v must have the same shape, got {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise InputError(
            f"{where}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim"
        )
    if q.shape[3] == 0:
        raise InputError(f"{where}: head_dim must be positive, got q {tuple(q.shape)}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise InputError(
            f"{where}: q {tuple(q.shape)} and k {tuple(k.shape)} need at least one head each"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise InputError(
            f"{where}: kv_heads ({k.shape[2]}) must divide heads ({q.shape[2]}) for grouped-query attention"
        )


def check_passing(k: Tensor, passing_k, passing_v, *, where: str) -> None:
    """The passing block: both or neither, [batch, P, kv_heads, head_dim] like k, k's dtype
    and device."""
    if (passing_k is None) != (passing_v is None):
        raise InputError(f"{where}: pass both passing_k and passing_v, or neither")
    if passing_k is None:
        return
    check_tensor(passing_k, "passing_k", where=where)
    check_tensor(passing_v, "passing_v", where=where)
    pairs = (("passing_k", passing_k), ("passing_v", passing_v))
    _same_device(where, "k", k, pairs)
    _same_dtype(where, "k", k, pairs)
    if passing_k.shape != passing_v.shape:
        raise InputError(
            f"{where}: passing_k {tuple(passing_k.shape)} and passing_v {tuple(passing_v.shape)} "
            "must have the same shape"
        )
    if passing_k.dim() != 4 or passing_k.shape[0] != k.shape[0] or passing_k.shape[2:] != k.shape[2:]:
        raise InputError(
            f"{where}: passing_k {tuple(passing_k.shape)} must be [batch, P, kv_heads, head_dim] "
            f"matching k {tuple(k.shape)}"
        )


def check_mask(mask, q: Tensor, k: Tensor, *, where: str) -> None:
    """A boolean mask broadcastable to [batch, heads, q_len, k_len] (True = attend)."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise InputError(f"{where}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise InputError(f"{where}: mask must be torch.bool (True = attend), got {mask.dtype}; use mask.bool()")
    full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    try:
        fits = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, full) == full
    except RuntimeError:
        fits = False
    if not fits:
        raise InputError(
            f"{where}: mask of shape {tuple(mask.shape)} does not broadcast to "
            f"[batch, heads, q_len, k_len] = {full}; pass [q_len, k_len] = {full[2:]}"
        )


def check_merge_inputs(outs: Sequence[Tensor], lses: Sequence[Tensor], *, where: str) -> None:
    """Partial results: outs [batch, seq, heads, d] of one dtype, shape and device; lses
    floating [batch, heads, seq] on that device."""
    if len(outs) != len(lses) or not outs:
        raise InputError(f"{where}: needs as many lse tensors as outputs, at least one")
    for i, (o, l) in enumerate(zip(outs, lses)):
        check_tensor(o, f"outs[{i}]", where=where)
        check_tensor(l, f"lses[{i}]", where=where)
    first = outs[0]
    if first.dim() != 4:
        raise InputError(f"{where}: outs[0] must be 4-D [batch, seq, heads, head_dim], got {tuple(first.shape)}")
    b, s, h, _ = first.shape
    named = [(f"outs[{i}]", o) for i, o in enumerate(outs)] + [(f"lses[{i}]", l) for i, l in enumerate(lses)]
    _same_device(where, "outs[0]", first, named[1:])
    _same_dtype(where, "outs[0]", first, named[1 : len(outs)])
    for name, o in named[1 : len(outs)]:
        if o.shape != first.shape:
            raise InputError(f"{where}: {name} has shape {tuple(o.shape)}, outs[0] {tuple(first.shape)}; all parts must match")
    for name, l in named[len(outs) :]:
        if tuple(l.shape) != (b, h, s):
            raise InputError(
                f"{where}: {name} has shape {tuple(l.shape)}; it must be [batch, heads, seq] = "
                f"{(b, h, s)} for outputs of shape {tuple(first.shape)}"
            )


def _same_device(where, ref_name, ref, others):
    bad = [name for name, t in others if t.device != ref.device]
    if bad:
        names = " and ".join(bad)
        first = dict(others)[bad[0]]
        raise InputError(
            f"{where}: {ref_name} is on {ref.device} but {bad[0]} is on {first.device}; move {names} "
            f"to {ref_name}'s device ({names.split(' and ')[0]}.to({ref_name}.device))"
        )


def _same_dtype(where, ref_name, ref, others):
    bad = [name for name, t in others if t.dtype != ref.dtype]
    if bad:
        names = " and ".join(bad)
        got = ", ".join(f"{name} is {dict(others)[name].dtype}" for name in bad)
        raise InputError(f"{where}: {got}; cast {names} to {ref_name}'s dtype ({ref.dtype})")
