"""Helpers of ``tests/test_faults.py``: tiny checkpoints, rank launching, and small
programs run as ``python -m tests.fault_scripts CASE`` on each rank.

``collective CASE OP``: every rank joins through ``init_runtime`` (``--timeout`` from
``APB_TEST_TIMEOUT``), then the last rank stops itself (``stop``: SIGSTOP) or dies
(``kill``: SIGKILL) and the others run one collective ``OP``:

* ``all_gather``, ``all_to_all``, ``broadcast``: through :mod:`megatron_apb.comm`
  (the typed :class:`~megatron_apb.errors.CollectiveError` path);
* ``raw_barrier``, ``raw_all_reduce``: plain ``torch.distributed`` calls (the watchdog's).

It prints ``OK`` if the collective completes and ``ERROR <type>: <message>`` if it raises,
exiting 0 or 2 as the command line does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ tiny checkpoints
def make_tiny_llama(out: str, *, layers: int = 4, hidden: int = 64, seed: int = 0) -> str:
    """A tiny random HF Llama with a tokenizer (``examples/make_tiny_llama.py``) whose
    end-of-sequence token is never the greedy choice (its output row is -1e4 times a
    positive direction... in effect: its logit is pushed far down), so that ``generate``
    runs every ``--max-new-tokens`` step."""
    import importlib.util

    import torch
    from safetensors.torch import load_file, save_file

    spec = importlib.util.spec_from_file_location("make_tiny_llama", os.path.join(ROOT, "examples", "make_tiny_llama.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_model(out, layers=layers, hidden=hidden, seed=seed, vocab_size=400)
    path = os.path.join(out, "model.safetensors")
    state = load_file(path)
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(out).eos_token_id
    # the final norm's output has mixed signs: a zero row gives the EOS logit 0, below the
    # maximum of the other ~400 random logits at every step
    state["lm_head.weight"][eos] = 0.0
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
    return out


# ------------------------------------------------------------------ launching ranks
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    out = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    out.update({k: str(v) for k, v in extra.items()})
    return out


def start_ranks(argv, world: int, *, extra_env=None, cwd=ROOT):
    """``world`` processes running ``python argv...`` as the ranks of one job (the
    environment torchrun would give them), with stdout/stderr piped."""
    port = free_port()
    procs = []
    for rank in range(world):
        e = env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world,
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS=1, **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=e, cwd=cwd))
    return procs


def wait_for_line(proc, pattern: str, timeout: float) -> str:
    """Read ``proc``'s stdout until a line contains ``pattern``; returns what was read.
    Raises TimeoutError (the process is left running) or EOFError (it ended first)."""
    import selectors

    seen, deadline = [], time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line with {pattern!r} in {timeout} s; read: {''.join(seen)[-2000:]}")
            if not sel.select(left):
                continue
            line = proc.stdout.readline()
            if not line:
                raise EOFError(f"the process ended before printing {pattern!r}; read: {''.join(seen)[-2000:]}")
            seen.append(line)
            if pattern in line:
                return "".join(seen)


def kill_all(procs) -> None:
    """SIGKILL every process still running (a stopped one too) and reap it."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.communicate(timeout=30)
        except (subprocess.TimeoutExpired, ValueError):
            pass


# ------------------------------------------------------------------ rank programs
def _collective(fault: str, op: str) -> int:
    import torch
    import torch.distributed as dist

    from megatron_apb import comm
    from megatron_apb.errors import APBError
    from megatron_apb.inference.launch import init_runtime

    rt = init_runtime(1, None, timeout_s=float(os.environ["APB_TEST_TIMEOUT"]))
    group = rt.pg.cp
    comm.barrier(group)  # every rank is here
    if rt.cp_rank == rt.cp - 1:
        os.kill(os.getpid(), signal.SIGSTOP if fault == "stop" else signal.SIGKILL)
        time.sleep(600)
    print("READY", flush=True)
    x = torch.ones(2, 3)
    try:
        if op == "all_gather":
            comm.all_gather_async(x, group).wait()
        elif op == "all_to_all":
            comm.all_to_all_heads(torch.ones(1, 2, 2 * rt.cp, 4), group, scatter_heads=True)
        elif op == "broadcast":
            comm.broadcast(x, dist.get_global_rank(group, rt.cp - 1), group)
        elif op == "raw_barrier":
            dist.barrier(group=group)
        elif op == "raw_all_reduce":
            dist.all_reduce(x, group=group)
        else:
            raise SystemExit(f"unknown op {op}")
    except APBError as exc:
        print(f"ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 2
    print("OK", flush=True)
    return 0


def _ops() -> int:
    """Wrong dtypes to the public attention ops: one JSON line per case with the error."""
    import json

    import torch

    from megatron_apb import apb_attention, attention_with_lse, merge_attention
    from megatron_apb.errors import APBError

    def qkv(*dtypes):
        shapes = [(1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)]
        return [(torch.randint(0, 5, s) if d is torch.int64 else torch.randn(s, dtype=d)) for s, d in zip(shapes, dtypes)]

    int64, mixed = (torch.int64,) * 3, (torch.bfloat16, torch.float16, torch.float16)
    cases = {
        "attention_with_lse int64": lambda: attention_with_lse(*qkv(*int64), causal=True),
        "attention_with_lse bf16 q, fp16 k/v": lambda: attention_with_lse(*qkv(*mixed), causal=True),
        "attention_with_lse fp16 q/k, bf16 v": lambda: attention_with_lse(
            *qkv(torch.float16, torch.float16, torch.bfloat16), causal=False),
        "apb_attention int64": lambda: apb_attention(*qkv(*int64), anchor_len=2),
        "apb_attention bf16 q, fp16 k/v": lambda: apb_attention(*qkv(*mixed), anchor_len=2),
        "merge_attention int64 outputs": lambda: merge_attention(
            [torch.ones(1, 4, 2, 8, dtype=torch.int64)] * 2, [torch.zeros(1, 2, 4)] * 2),
        "merge_attention bf16 and fp16 outputs": lambda: merge_attention(
            [torch.ones(1, 4, 2, 8, dtype=torch.bfloat16), torch.ones(1, 4, 2, 8, dtype=torch.float16)],
            [torch.zeros(1, 2, 4)] * 2),
    }
    for name, call in cases.items():
        try:
            call()
            error = message = None
        except Exception as exc:  # noqa: BLE001 - reported to the test
            error, message = type(exc).__name__, str(exc)
            apb = isinstance(exc, APBError)
        print(json.dumps(dict(case=name, error=error, message=message, apb_error=error is not None and apb)), flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[0] == "collective":
        return _collective(argv[1], argv[2])
    if argv[0] == "ops":
        return _ops()
    if argv[0] == "tiny":
        make_tiny_llama(argv[1])
        return 0
    raise SystemExit(f"unknown case {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
