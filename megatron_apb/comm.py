"""Collectives over a process group passed in (gloo or NCCL); no attention math here.

* :func:`all_gather_async` starts the all-gather of equal-shaped tensors and returns a
  :class:`PendingGather` whose ``wait()`` yields the stacked result: the APB passing blocks
  travel while the host computes its anchor and local attention.
* :func:`all_to_all_heads` re-shards [b, s, h, d] between sequence and head partitions
  (Ulysses).
* :func:`broadcast`, :func:`all_reduce` and :func:`barrier` for the other collectives.
* :class:`EmulatedGroup` stands for one rank of a larger group in a single process
  (benchmarks: one rank's work at its real shapes, on one GPU).

These are inference collectives: they carry no gradient.

**Faults.**  Every wait goes through one helper, :func:`wait_for`.  A rank that is stopped
(SIGSTOP), hung or dead must not hang the others: with a timeout set
(:func:`set_collective_timeout`; ``init_runtime`` sets ``--timeout``), a wait that lasts
longer raises :class:`~megatron_apb.errors.CollectiveTimeout` naming this rank, the
operation, what it carried, where it was called and the group; a peer that closed its
connection (killed, crashed) raises :class:`~megatron_apb.errors.CollectiveError` at once.
Gloo waits end by themselves (``Work.wait(timeout)``).  NCCL waits return at once (the
collective runs on the GPU stream), so there the :class:`Watchdog` thread tracks a CUDA
event per collective.  The watchdog also ends the process, naming the operation, when the
main thread sits in any other ``torch.distributed`` call for longer than the timeout (the
collectives this package does not issue through here, e.g. Megatron-Core's tensor-parallel
all-reduces); the process groups' own timeout (``init_runtime``: timeout + grace) is the
last resort, on NCCL through ``TORCH_NCCL_ASYNC_ERROR_HANDLING``.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from .errors import CollectiveError, CollectiveTimeout
from .watchdog import (  # noqa: F401 - EXIT_STATUS, grace_s, name_group, start/stop_watchdog: re-exported
    EXIT_STATUS,
    PendingOp,
    Watchdog,
    call_site,
    current_watchdog,
    grace_s,
    group_label,
    name_group,
    process_rank,
    stalled_message,
    start_watchdog,
    stop_watchdog,
)

Tensor = torch.Tensor

#: seconds a collective may wait for the other ranks by default (``--timeout``): far above
#: any wait of a healthy inference job (ranks run each layer in step; the longest waits are
#: the slowest rank's model load and, with local decoding, one rank's generation) and far
#: below the 10/30 minutes of torch's NCCL/gloo defaults
DEFAULT_TIMEOUT_S = 120.0
_timeout_s: Optional[float] = None  # None: no timeout of our own (the groups' own applies)


# ----------------------------------------------------------------- groups
class EmulatedGroup:
    """Stands for rank ``rank`` of a group of ``size`` ranks inside one process, to run
    that rank's share of a forward alone (``tools/emulate_prefill.py``): sizes and ranks
    are the group's, and each collective hands back tensors of the shapes the real one
    would, filled from this rank's input (an all-gather repeats it in every slot, an
    all-to-all returns it), so every kernel runs at its real size; the values are wrong.
    """

    def __init__(self, rank: int, size: int):
        if not 0 <= rank < size:
            raise ValueError(f"an emulated group of {size} ranks has no rank {rank}")
        self.rank, self.size = rank, size

    def __repr__(self):
        return f"EmulatedGroup(rank={self.rank}, size={self.size})"


def is_emulated(group) -> bool:
    """Whether ``group`` is an :class:`EmulatedGroup` (no process talks to another)."""
    return isinstance(group, EmulatedGroup)


def group_size(group) -> int:
    if is_emulated(group):
        return group.size
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    if is_emulated(group):
        return group.rank
    return 0 if group is None else dist.get_rank(group)


def collective_device(group, device) -> torch.device:
    """Where tensors for a collective over ``group`` must live: host memory for a gloo group
    (several ranks may then share one GPU, e.g. for accuracy runs), else ``device``."""
    device = torch.device(device)
    if is_emulated(group):
        return device
    if device.type != "cpu" and group is not None and dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return device


# --------------------------------------------------------------- timeouts
def set_collective_timeout(seconds: Optional[float]) -> None:
    """Seconds any collective wait of this process may last (None: the groups' own)."""
    global _timeout_s
    if seconds is not None and not seconds > 0:
        raise ValueError(f"the collective timeout must be > 0 seconds, got {seconds}")
    _timeout_s = None if seconds is None else float(seconds)


def collective_timeout() -> Optional[float]:
    return _timeout_s


def wait_for(work, op: str, group, tensor: Optional[Tensor] = None) -> None:
    """Wait for ``work`` (an ``async_op=True`` collective ``op`` over ``group``; ``tensor``:
    what it carried, for the message).

    Raises :class:`CollectiveTimeout` past :func:`collective_timeout` and
    :class:`CollectiveError` when the backend fails the wait (a peer closed its
    connection), each naming this rank, the operation, the call site and the group.
    """
    if work is None:
        return
    timeout = _timeout_s
    pending = PendingOp(op, tensor, group)
    on_gpu = tensor is not None and tensor.is_cuda
    dog = current_watchdog()
    if dog is not None and not on_gpu:
        dog.arm(pending)
    try:
        if timeout is None or on_gpu:  # NCCL: returns at once (the stream waits); the watchdog times it
            work.wait()
        else:
            work.wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as exc:  # gloo: RuntimeError; NCCL: DistBackendError (a RuntimeError)
        elapsed = time.monotonic() - pending.start
        site = call_site(sys._getframe(1))
        if timeout is not None and elapsed >= 0.95 * timeout:
            raise CollectiveTimeout(stalled_message(process_rank(), op, pending.what(), site, group, timeout)) from exc
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = detail.split("] ", 1)[-1].split(". ")[0]  # gloo: "[file:line] What. Hint."
        raise CollectiveError(
            f"rank {process_rank()}: {op}{pending.what()}{site} over {group_label(group)} failed after "
            f"{elapsed:.1f} s ({detail}); a peer rank crashed or was killed; see its log"
        ) from exc
    finally:
        if dog is not None and not on_gpu:
            dog.disarm(pending)
    if on_gpu and dog is not None and not torch.cuda.is_current_stream_capturing():
        dog.track(pending)


# ------------------------------------------------------------ collectives
class PendingGather:
    """An all-gather in flight; ``wait()`` once to get [world, *shape]."""

    def __init__(self, out: Tensor, work, device=None, group=None):
        self._out, self._work, self._done, self._device, self._group = out, work, False, device, group

    def wait(self) -> Tensor:
        if self._done:
            raise RuntimeError("PendingGather.wait() called twice")
        wait_for(self._work, "all_gather", self._group, self._out[0] if self._work is not None else None)
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
    if local_only or is_emulated(group):
        return PendingGather(x.unsqueeze(0).expand((world,) + tuple(x.shape)).contiguous(), None)
    origin, wire = x.device, collective_device(group, x.device)
    x = x.to(wire)
    flat = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=wire)
    work = dist.all_gather_into_tensor(flat, x, group=group, async_op=True)
    return PendingGather(flat.view((world,) + tuple(x.shape)), work,
                         device=origin if wire != origin else None, group=group)


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
    gloo group holding GPU tensors; an emulated group hands back a copy)."""
    if is_emulated(group):
        return send.clone()
    wire = collective_device(group, send.device)
    staged = send.to(wire)
    recv = torch.empty_like(staged)
    wait_for(dist.all_to_all_single(recv, staged, group=group, async_op=True), "all_to_all", group, staged)
    return recv.to(send.device)


def _single(group) -> bool:
    """No collective needed (``group`` None: the default group, as in torch.distributed;
    an emulated group: its one process holds every value)."""
    return is_emulated(group) or not dist.is_initialized() or dist.get_world_size(group) == 1


class PeerWait:
    """Ranks waiting for one rank's long work (e.g. its whole generation) without a
    collective that outlasts the timeout: the working rank ``src`` calls :meth:`beat` as it
    makes progress (a "still working" broadcast at most every half timeout) and
    :meth:`done` at the end; the others call :meth:`wait`, which returns when ``src`` is
    done.  A ``src`` that stops making progress still fails them after one timeout."""

    def __init__(self, group, src: int, device):
        self.group, self.src = group, src
        self.device = collective_device(group, device) if not _single(group) else device
        self.interval = None if _timeout_s is None else _timeout_s / 2
        self._last = time.monotonic()

    def _send(self, flag: int) -> int:
        x = torch.full((1,), flag, dtype=torch.int32, device=self.device)
        return int(broadcast(x, self.src, self.group).item())

    def beat(self) -> None:
        if _single(self.group) or self.interval is None or time.monotonic() - self._last < self.interval:
            return
        self._send(0)
        self._last = time.monotonic()

    def done(self) -> None:
        if not _single(self.group):
            self._send(1)

    def wait(self) -> None:
        if not _single(self.group):
            while not self._send(0):
                pass


def broadcast(x: Tensor, src: int, group) -> Tensor:
    """Global rank ``src``'s ``x`` on every rank of ``group`` (returned; ``x`` is filled
    in place unless it was staged through host memory)."""
    if _single(group):
        return x
    wire = x if collective_device(group, x.device) == x.device else x.cpu()
    wait_for(dist.broadcast(wire, src=src, group=group, async_op=True), "broadcast", group, wire)
    return wire if wire is x else wire.to(x.device)


def all_reduce(x: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    """``x`` reduced with ``op`` over ``group`` (returned, as :func:`broadcast`)."""
    if _single(group):
        return x
    wire = x if collective_device(group, x.device) == x.device else x.cpu()
    wait_for(dist.all_reduce(wire, op=op, group=group, async_op=True), "all_reduce", group, wire)
    return wire if wire is x else wire.to(x.device)


def barrier(group) -> None:
    if not _single(group):
        wait_for(dist.barrier(group=group, async_op=True), "barrier", group)
