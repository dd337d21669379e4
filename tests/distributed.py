"""Run a function on N CPU processes joined by gloo, collecting each rank's return value.

Workers start from a fork server that has imported torch and Megatron-Core once (a fresh
process per worker, as with spawn, without paying the imports each time; where CUDA is
present, from plain spawn: see :func:`_mp_context`), take the
parent's environment as it is at the call, set one thread each, and are killed if the
whole run exceeds ``timeout`` seconds, so a broken collective fails the test instead of
hanging it.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.multiprocessing as mp

#: modules the fork server imports once (those that fail to import are skipped)
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt", "megatron_apb",
           "tests.distributed"]
_context = None


def _mp_context():
    """The fork server on CPU machines; plain spawn where CUDA is present (a preloaded import
    may initialise CUDA in the fork server, and CUDA cannot be used in a child forked after
    that: on the GPU machine the workers failed with "Cannot re-initialize CUDA in forked
    subprocess")."""
    global _context
    if _context is None:
        if torch.cuda.is_available():
            _context = mp.get_context("spawn")
        else:
            _context = mp.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
    return _context


def error_message(fn):
    """``"Type: message"`` of the exception ``fn()`` raises, or None: for workers to report
    errors that the test then inspects."""
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, backend, env):
    import torch
    import torch.distributed as dist

    os.environ.clear()
    os.environ.update(env)  # the parent's, at the call (the fork server's is older)
    torch.set_num_threads(1)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        result = _plain(fn(rank, world_size, *args))
        queue.put((rank, "ok", result))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report, then let the parent fail the test
        queue.put((rank, "error", traceback.format_exc()))


def _plain(obj):
    """Tensors to numpy arrays (shared-memory tensors die with the worker)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0, backend: str = "gloo"):
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each in its own process.

    ``fn`` must be importable (a module-level function).  ``backend="nccl"`` puts rank r
    on GPU r.  Raises with the worker's traceback
    if any rank fails, and ``TimeoutError`` if the run does not finish in ``timeout`` s.
    """
    ctx = _mp_context()
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, backend, dict(os.environ)), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    import time

    deadline = time.monotonic() + timeout
    results, errors = {}, []
    try:
        while len(results) + len(errors) < world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed run of {fn.__name__} exceeded {timeout}s")
            if queue.empty():
                if errors or any(p.exitcode not in (None, 0) for p in procs):
                    break
                time.sleep(0.05)
                continue
            rank, status, payload = queue.get()
            (results.__setitem__(rank, payload) if status == "ok" else errors.append((rank, payload)))
    finally:
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()) if not errors else 1.0)
            if p.is_alive():
                p.kill()
    if errors:
        rank, tb = errors[0]
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{tb}")
    if len(results) < world_size:
        raise RuntimeError(f"only ranks {sorted(results)} of {world_size} reported a result")
    return [results[r] for r in range(world_size)]
