"""Naming stalled collectives, and a watchdog that ends a process stuck in one.

:func:`megatron_apb.comm.wait_for` raises when a wait of its own outlasts the timeout; what
it cannot see, the :class:`Watchdog` thread does: a GPU (NCCL) collective whose CUDA event
has not completed, a host wait that should have raised, and the main thread sitting in any
other ``torch.distributed`` call (Megatron-Core's tensor-parallel all-reduces, a
rendezvous) for the timeout.  The messages name the rank, the operation, what it carried,
where it was called and the group (:func:`name_group`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist

#: exit status of a process that the watchdog ends (the command line's for errors)
EXIT_STATUS = 2

_group_names: dict = {}
_watchdog: Optional["Watchdog"] = None


# ------------------------------------------------------------------ naming
def name_group(group, name: str) -> None:
    """Call ``group`` ``name`` (``"context-parallel"``) in error messages."""
    _group_names[group] = name


def group_label(group) -> str:
    if group is None or group is dist.group.WORLD:
        name = _group_names.get(dist.group.WORLD, "default")
        return f"the {name} group" + (f" ({dist.get_world_size()} ranks)" if dist.is_initialized() else "")
    name = _group_names.get(group)
    return f"the {name} group" if name else f"a group of {dist.get_world_size(group)} ranks"



def grace_s(timeout_s: float) -> float:
    """The margin between the timeout of :func:`wait_for` / the :class:`Watchdog` and the
    process groups' own (the backend's last resort)."""
    return max(2.0, 0.1 * timeout_s)


def process_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_OWN_FILES = {os.path.join(_PACKAGE_DIR, "comm.py"), os.path.abspath(__file__)}
_DIST_DIR = os.path.dirname(os.path.abspath(dist.__file__))


def call_site(frame) -> str:
    """`` (at parallel/apb.py:70, apb_attention)``: the first frame of ``frame``'s stack
    outside :mod:`megatron_apb.comm`, this module and ``torch.distributed``."""
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path not in _OWN_FILES and not path.startswith(_DIST_DIR):
            where = os.path.relpath(path, _PACKAGE_DIR) if path.startswith(_PACKAGE_DIR) else path
            return f" (at {where}:{frame.f_lineno}, {frame.f_code.co_name})"
        frame = frame.f_back
    return ""


def stalled_message(rank, op, what, site, group, timeout_s) -> str:
    return (f"rank {rank}: {op}{what}{site} over {group_label(group)} did not finish in {timeout_s:g} s; "
            "a peer rank is stopped or dead; see its log")


class PendingOp:
    """A collective being waited for, described only if it fails."""

    __slots__ = ("op", "shape", "dtype", "group", "start")

    def __init__(self, op, tensor, group):
        self.op, self.group, self.start = op, group, time.monotonic()
        self.shape, self.dtype = (None, None) if tensor is None else (tuple(tensor.shape), tensor.dtype)

    def what(self) -> str:
        if self.shape is None:
            return ""
        return f" of a {list(self.shape)} {str(self.dtype).replace('torch.', '')} tensor"



# ----------------------------------------------------------------- watchdog
class Watchdog:
    """A daemon thread that ends this process (status :data:`EXIT_STATUS`, the reason on
    stderr) when a collective outlasts ``timeout_s``:

    * a wait of :func:`megatron_apb.comm.wait_for` on the host still running at timeout + grace (it should
      have raised at the timeout: the backstop);
    * a collective on the GPU (NCCL) whose CUDA event has not completed after the timeout;
    * the main thread sitting at the same point of a ``torch.distributed`` call (a
      collective not issued through this module, a rendezvous) for the timeout.

    ``check()`` does one round and returns the message (the thread then exits with it).
    """

    def __init__(self, timeout_s: float, *, poll_s: Optional[float] = None, exit_status: int = EXIT_STATUS):
        self.timeout_s, self.exit_status = float(timeout_s), exit_status
        self.poll_s = poll_s if poll_s is not None else min(1.0, self.timeout_s / 10)
        self._armed: Optional[PendingOp] = None
        self._gpu: deque = deque()  # (PendingOp, CUDA event), oldest first
        self._seen = None  # (frame, lasti, since) of the main thread inside torch.distributed
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._run, name="megatron-apb-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def arm(self, pending: PendingOp) -> None:
        self._armed = pending

    def disarm(self, pending: PendingOp) -> None:
        if self._armed is pending:
            self._armed = None

    def track(self, pending: PendingOp) -> None:
        event = torch.cuda.Event()
        event.record()
        self._gpu.append((pending, event))

    def check(self, now: Optional[float] = None) -> Optional[str]:
        now = time.monotonic() if now is None else now
        frame = sys._current_frames().get(self._main)
        armed = self._armed
        if armed is not None and now - armed.start > self.timeout_s + grace_s(self.timeout_s):
            return stalled_message(process_rank(), armed.op, armed.what(), call_site(frame), armed.group,
                                   self.timeout_s)
        while self._gpu and self._gpu[0][1].query():
            self._gpu.popleft()
        if self._gpu and now - self._gpu[0][0].start > self.timeout_s:
            pending = self._gpu[0][0]
            return stalled_message(process_rank(), pending.op, pending.what(), "", pending.group, self.timeout_s)
        return self._check_frame(frame, now)

    def _check_frame(self, frame, now) -> Optional[str]:
        if frame is None or not os.path.abspath(frame.f_code.co_filename).startswith(_DIST_DIR):
            self._seen = None
            return None
        seen = self._seen
        if seen is None or seen[0] is not frame or seen[1] != frame.f_lasti:
            self._seen = (frame, frame.f_lasti, now)
            return None
        if now - seen[2] < self.timeout_s:
            return None
        op, outer = frame.f_code.co_name, frame  # the outermost distributed_c10d call names it
        while outer is not None and os.path.abspath(outer.f_code.co_filename).startswith(_DIST_DIR):
            if outer.f_code.co_filename.endswith("distributed_c10d.py"):
                op, frame = outer.f_code.co_name, outer
            outer = outer.f_back
        local = frame.f_locals if op != "init_process_group" else {}
        tensor = local.get("tensor", local.get("input_tensor"))
        what = PendingOp(op, tensor if isinstance(tensor, torch.Tensor) else None, None).what()
        return stalled_message(process_rank(), op, what, call_site(frame), local.get("group"), self.timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                message = self.check()
            except Exception:  # noqa: BLE001 - a watchdog must not die of a bad round
                continue
            if message is not None:
                sys.stdout.flush()
                sys.stderr.write(f"megatron-apb: error: [rank {process_rank()}] {message} (watchdog)\n")
                sys.stderr.flush()
                os._exit(self.exit_status)


def start_watchdog(timeout_s: float) -> Watchdog:
    """Start (or restart with ``timeout_s``) this process's :class:`Watchdog`."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
    _watchdog = Watchdog(timeout_s).start()
    return _watchdog


def stop_watchdog() -> None:
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None


def current_watchdog() -> Optional[Watchdog]:
    """This process's watchdog, if one runs."""
    return _watchdog

