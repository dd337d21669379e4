"""Collectives over a process group passed in (gloo or NCCL); no attention math here.

* :func:`all_gather_async` starts the all-gather of equal-shaped tensors and returns a
  :class:`PendingGather` whose ``wait()`` yields the stacked result: the APB passing blocks
  travel while the host computes its anchor and local attention.
* :func:`all_to_all_heads` re-shards [b, s, h, d] between sequence and head partitions
  (Ulysses).

These are inference collectives: they carry no gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def collective_device(group, device) -> torch.device:
    """Where tensors for a collective over ``group`` must live: host memory for a gloo group
    (several ranks may then share one GPU, e.g. for accuracy runs), else ``device``."""
    device = torch.device(device)
    if device.type != "cpu" and group is not None and dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return device


class PendingGather:
    """An all-gather in flight; ``wait()`` once to get [world, *shape]."""

    def __init__(self, out: Tensor, work, device=None):
        self._out, self._work, self._done, self._device = out, work, False, device

    def wait(self) -> Tensor:
        if self._done:
            raise RuntimeError("PendingGather.wait() called twice")
        if self._work is not None:
            self._work.wait()
        self._done = True
        if self._device is not None:  # staged through host memory (gloo group, GPU tensors)
            return self._out.to(self._device, non_blocking=True)
        return self._out


def all_gather_async(x: Tensor, group, *, local_only: bool = False) -> PendingGather:
    """Start gathering ``x`` (same shape on every rank) over ``group``.

    ``local_only`` (benchmarks only): every slot gets this rank's ``x``, with no
    communication, to measure how much communication time is not hidden (prefill time
    with communication minus without); results are then wrong.
    """
    world = group_size(group)
    x = x.detach().contiguous()
    if world == 1:
        return PendingGather(x.unsqueeze(0), None)
    if local_only:
        return PendingGather(x.unsqueeze(0).expand((world,) + tuple(x.shape)).contiguous(), None)
    origin, wire = x.device, collective_device(group, x.device)
    x = x.to(wire)
    flat = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=wire)
    work = dist.all_gather_into_tensor(flat, x, group=group, async_op=True)
    return PendingGather(flat.view((world,) + tuple(x.shape)), work, device=origin if wire != origin else None)


def all_to_all_heads(x: Tensor, group, *, scatter_heads: bool) -> Tensor:
    """Ulysses re-sharding over ``group`` of size W.

    ``scatter_heads=True``: [b, s_local, h, d] -> [b, W*s_local, h/W, d] (rank r keeps head
    slice r of the whole sequence).  ``False`` is the inverse.
    """
    world = group_size(group)
    if world == 1:
        return x
    if scatter_heads:
        b, s, h, d = x.shape
        send = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = _all_to_all(send, group)  # [W(src rank), b, s, h/W, d]
        return recv.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)
    b, s_full, hl, d = x.shape
    s = s_full // world
    send = x.reshape(b, world, s, hl, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = _all_to_all(send, group)  # [W(src rank = head slice), b, s, h/W, d]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, world * hl, d)


def _all_to_all(send: Tensor, group) -> Tensor:
    """``all_to_all_single`` of equal splits along dim 0 (staged through host memory for a
    gloo group holding GPU tensors)."""
    wire = collective_device(group, send.device)
    staged = send.to(wire)
    recv = torch.empty_like(staged)
    dist.all_to_all_single(recv, staged, group=group)
    return recv.to(send.device)
