"""Loading benchmark: time and host memory of the command line's loader on one checkpoint,
and optionally a long ``generate`` through the command line on it.

    python tools/bench_load.py --model /data/llama3-8b-random --out results/load_llama3_8b_h200.json
    python tools/bench_load.py --model /data/llama3-8b-random --generate-tokens 131072 --out results/load_llama3_8b_h200.json
    torchrun --nproc-per-node 2 tools/bench_load.py --model DIR --tp 2 --out results/load_tp2.json

Per rank (``ranks`` in the JSON; rank 0's at the top level):

* ``load_s``: wall clock of :func:`megatron_apb.inference.launch.load_model` (open, build,
  read, copy), after the process group exists;
* ``peak_host_anon_gib``: the peak of ``RssAnon`` (anonymous resident memory: what the
  process allocated, not the page cache of memory-mapped files) sampled from
  ``/proc/self/status`` every ``--sample-ms`` during the load; ``host_anon_before_gib``
  what it was before the load; ``vm_hwm_gib``: the kernel's own resident peak
  (``VmHWM``, mapped file pages included);
* ``shard_gib``: bytes of this rank's weights (its TP shard, in the loaded dtype);
* ``gpu_mem_gib``: peak GPU memory allocated by torch during the load;
* ``target_host_anon_gib``: 2 GiB + 10% of the shard, and ``meets_host_target``.

With ``--generate-tokens N``, rank 0 then runs ``megatron-apb generate`` (a pass-key prompt
of N document tokens, ``--max-new-tokens``) on the same checkpoint in a new process group
(``torchrun`` with ``--nproc-per-node`` = this run's world size) and records its
``prefill_s``, ``time_to_first_token_s`` and ``decode_tokens_per_s`` under ``generate``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

GIB = 2**30


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakSampler:
    """The peak of ``/proc/self/status`` ``RssAnon`` sampled in a thread."""

    def __init__(self, every_s: float):
        self.every_s, self.peak_kib = every_s, _status_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))


def measure_load(model_path: str, tp: int, dtype, every_s: float) -> dict:
    """This rank's load figures (see the module docstring)."""
    import torch

    from megatron_apb import APBConfig
    from megatron_apb.inference.launch import init_runtime, load_model

    rt = init_runtime(tp, dtype)
    import megatron.core  # noqa: F401  (imported before the baseline: its import is not the load's)

    import gc

    gc.collect()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = _status_kib("RssAnon")
    start = time.perf_counter()
    with PeakSampler(every_s) as sampler:
        model, spec, _, _ = load_model(model_path, APBConfig(mode="apb"), rt)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    shard = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    target = 2 * GIB + 0.1 * shard
    out = dict(
        rank=rt.rank, tp=rt.tp, cp=rt.cp, device=torch.cuda.get_device_name() if rt.device.type == "cuda" else "cpu",
        dtype=str(rt.dtype).replace("torch.", ""), model=model_path, parameters_this_rank=sum(
            p.numel() for p in model.parameters()), load_s=round(load_s, 3),
        host_anon_before_gib=round(before * 1024 / GIB, 3), peak_host_anon_gib=round(sampler.peak_kib * 1024 / GIB, 3),
        load_host_anon_increase_gib=round((sampler.peak_kib - before) * 1024 / GIB, 3),
        vm_hwm_gib=round(_status_kib("VmHWM") * 1024 / GIB, 3), shard_gib=round(shard / GIB, 3),
        gpu_mem_gib=round(torch.cuda.max_memory_allocated() / GIB, 3) if rt.device.type == "cuda" else 0.0,
        target_host_anon_gib=round(target / GIB, 3), meets_host_target=sampler.peak_kib * 1024 <= target,
    )
    import torch.distributed as dist

    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, out)
    del model
    dist.destroy_process_group()
    return {**ranks[0], "ranks": ranks, "world": len(ranks)}


def run_generate(model_path: str, world: int, tp: int, tokens: int, new_tokens: int, dtype, timeout_s: float) -> dict:
    """``megatron-apb generate`` on ``model_path``: its record and wall clock."""
    with tempfile.TemporaryDirectory() as tmp:
        record = os.path.join(tmp, "generate.jsonl")
        cli = ["-m", "megatron_apb.cli"] if world == 1 else ["-m", "torch.distributed.run", "--standalone",
                                                             f"--nproc-per-node={world}", "-m", "megatron_apb.cli"]
        cmd = [sys.executable, *cli, "generate", "--model", model_path, "--tp", str(tp),
               "--haystack-tokens", str(tokens), "--max-new-tokens", str(new_tokens), "--output-json", record,
               "--timeout", str(timeout_s)]
        if dtype:
            cmd += ["--dtype", dtype]
        # a fresh rendezvous: not this process's (its store may still hold the port), nor torchrun's
        env = {k: v for k, v in os.environ.items() if k not in (
            "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
            "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": round(wall, 1),
                    "error_tail": (proc.stdout + proc.stderr)[-3000:]}
        from megatron_apb.eval.records import read_generation

        run = read_generation(record)["runs"][0]
        return {"command": " ".join(cmd[1:]), "returncode": 0, "wall_s": round(wall, 1),
                "document_tokens": len(run["document_ids"]), "query_tokens": len(run["query_ids"]),
                "new_tokens": len(run["output_ids"]), **{k: run[k] for k in (
                    "mode", "prefill_s", "time_to_first_token_s", "decode_tokens_per_s")}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint: HF directory, .gguf file or converted directory")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--sample-ms", type=float, default=5.0, help="RssAnon sampling period")
    parser.add_argument("--generate-tokens", type=int, default=0, help="also run generate with this many document tokens")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--generate-timeout", type=float, default=600.0, help="the generate run's --timeout")
    parser.add_argument("--out", help="JSON file to write (default: print only)")
    args = parser.parse_args(argv)
    result = measure_load(args.model, args.tp, args.dtype, args.sample_ms / 1000)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return 0
    if args.generate_tokens:
        result["generate"] = run_generate(args.model, result["world"], args.tp, args.generate_tokens,
                                          args.max_new_tokens, args.dtype, args.generate_timeout)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
