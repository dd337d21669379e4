"""Process set-up for the command line: torchrun environment, groups, model loading, and
the flags shared by the commands that run a model.

The APB flags are generated from :class:`~megatron_apb.config.APBConfig`'s fields
(:mod:`megatron_apb.configargs`), so a new field is a new flag of every command at once.
Importing this module is cheap (the command-line parser is built from it): Megatron-Core
is imported when a runtime or a model is first made.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from .. import megatron as megatron_glue  # lazy package: Megatron-Core loads on first use
from ..comm import DEFAULT_TIMEOUT_S, barrier, grace_s, name_group, set_collective_timeout, start_watchdog, stop_watchdog
from ..config import DTYPES, APBConfig, parse_dtype
from ..configargs import add_config_arguments, config_from_namespace
from ..errors import APBConfigError, CheckpointError
from ..heads import heads_to_megatron, read_retaining_heads

#: flags spelled differently from their APBConfig field: ``mode`` is the context-parallel
#: mode, and ``seed`` (the random compressor's) must not clash with a command's own
#: ``--seed`` (sampling, task generation, training)
APB_FLAG_RENAMES = {"mode": "--cp-mode", "seed": "--apb-seed"}


@dataclass
class Runtime:
    """This process's place: global rank/world, its groups, device and dtype."""

    rank: int
    world: int
    tp: int
    cp: int
    pg: object  # megatron ProcessGroupCollection
    device: torch.device
    dtype: torch.dtype

    @property
    def cp_rank(self) -> int:
        return dist.get_rank(self.pg.cp)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.pg.tp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def add_runtime_args(parser, *, dtype_help: str = "default bf16 on GPU, fp32 on CPU"):
    """``--tp``, ``--dtype``, ``--timeout`` and ``--verbose``: how a command lays out and
    runs the model, and which ranks print."""
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (CP = processes / TP)")
    parser.add_argument("--dtype", choices=list(DTYPES), help=dtype_help)

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
        return value

    parser.add_argument(
        "--timeout", type=seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help="how long a rank waits for the others in a collective before it stops with an error "
        "naming the operation: a peer rank that is stopped, hung or dead ends the job instead of "
        f"hanging it (default: {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--verbose", action="store_true",
        help="every rank prints its progress bars and library messages (default: the first rank only)",
    )


def add_apb_args(parser, *, exclude: Iterable[str] = ()):
    """One flag per :class:`APBConfig` field but those in ``exclude``, in an argument group
    of ``parser`` (``mode`` is ``--cp-mode``, ``seed`` is ``--apb-seed``).

    Unset flags keep the config's defaults (or the command's, see
    :func:`apb_config_from_args`); a combination the config rejects is a usage error.
    """
    group = parser.add_argument_group(
        "APB attention", "APBConfig settings (unset: the default, or what the command derives)"
    )
    group._apb_root_parser = parser  # validate on the parser, not the group
    add_config_arguments(group, rename=APB_FLAG_RENAMES, exclude=exclude)
    return group


def apb_config_from_args(args, **defaults) -> APBConfig:
    """The :class:`APBConfig` of :func:`add_apb_args`'s flags: set flags over ``defaults``
    over the config's defaults (``APBConfig`` validates the result)."""
    return config_from_namespace(args, rename=APB_FLAG_RENAMES, **defaults)


def context_parallel_size(tp: int) -> int:
    """CP = processes / ``tp`` for this run's ``WORLD_SIZE`` (torchrun's), read before any
    process group exists; a ``--tp`` that does not divide the processes is refused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or world % tp:
        raise APBConfigError(f"--tp {tp} must divide the number of processes ({world}); CP = processes / TP")
    return world // tp


def check_input_file(path: str, flag: str) -> None:
    """``flag``'s ``path`` is a file this process can read (not a directory)."""
    if not os.path.exists(path):
        raise APBConfigError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise APBConfigError(f"{flag} {path} is a directory; give a file")
    if not os.access(path, os.R_OK):
        raise APBConfigError(f"{flag} {path}: no permission to read it")


def read_text_file(path: str, flag: str) -> str:
    """The UTF-8 text of ``flag``'s file; an empty (or blank) one is refused."""
    check_input_file(path, flag)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise APBConfigError(f"{flag} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise APBConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    if not text.strip():
        raise APBConfigError(f"{flag} {path}: the document is empty; give a non-empty text file")
    return text


def check_output_path(path: str, flag: str) -> None:
    """``flag``'s ``path`` can be written: not a directory, in a directory that exists, both
    writable.  Nothing is created."""
    if os.path.isdir(path):
        raise APBConfigError(f"{flag} {path} is a directory; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise APBConfigError(f"{flag} {path}: the directory {directory} does not exist; create it first")
    if not os.access(directory, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise APBConfigError(f"{flag} {path}: no permission to write there")


def check_model_path(path: Optional[str]) -> None:
    """``--model``: None (the embedded SmolLM2) or a path that exists."""
    if path is not None and not os.path.exists(path):
        raise APBConfigError(
            f"--model {path}: no such file or directory; give a Hugging Face directory, a .gguf "
            "file or a directory written by `megatron-apb convert`"
        )


def load_tokenizer(path: Optional[str]):
    """The tokenizer of checkpoint ``path`` (None: the embedded SmolLM2) without its
    weights, so that a command checks its prompts before the model loads."""
    # local: the checkpoints package imports Megatron-Core, and this module builds every parser
    from ..checkpoints import default_checkpoint, load_tokenizer as read_tokenizer

    tokenizer = read_tokenizer(path or default_checkpoint(report=_say_once))
    if tokenizer is None:
        raise CheckpointError(f"{path}: no tokenizer found next to the weights")
    return tokenizer


def checkpoint_spec(path: Optional[str]):
    """The :class:`~megatron_apb.checkpoints.ModelSpec` of checkpoint ``path`` (None: the
    embedded SmolLM2) from its config and file headers, without reading weights: a config
    the family cannot serve, or a missing or truncated shard, is refused here."""
    from ..checkpoints import default_checkpoint, open_checkpoint  # local: imports Megatron-Core

    return open_checkpoint(path or default_checkpoint(report=_say_once), report=_say_once).spec


def _say_once(message: str) -> None:
    """Progress of one-off work (the default model's conversion) from the first process only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def quiet_other_ranks(rank: int, verbose: bool = False) -> bool:
    """Progress output from rank 0 only: on the other ranks (unless ``verbose``) the
    progress bars of Hugging Face loading and conversion (transformers, huggingface_hub,
    through their public switches; tqdm's ``TQDM_DISABLE`` for libraries imported later)
    are off, transformers logs errors only, and Python warnings are silenced.  Errors
    still reach stderr on every rank.  Returns whether this rank was quieted."""
    if rank == 0 or verbose:
        return False
    os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it when first imported
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    try:  # local: optional packages, switched off if present
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    except ImportError:
        pass
    try:  # local: optional package, switched off if present
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    warnings.simplefilter("ignore")
    return True


def quiet_warnings():
    """Megatron warns at import about optional fused kernels it falls back from."""
    for pattern in ("Transformer Engine", "Apex", "flex_attention called without"):
        warnings.filterwarnings("ignore", message=f".*{pattern}.*")


def finish_runtime() -> None:
    """End a command's distributed run: every rank meets at a barrier, then leaves the process
    group.  Without the barrier a rank that finishes first (the others still writing results)
    closes its gloo connections under ranks that still hold them, which can abort them
    (SIGABRT from gloo's I/O thread).  Stops the watchdog first (nothing is stalled now)."""
    if dist.is_initialized():
        barrier(None)
        stop_watchdog()
        dist.destroy_process_group()
    else:
        stop_watchdog()


def init_runtime(
    tp: int = 1, dtype: Optional[str] = None, timeout_s: Optional[float] = None, backend: Optional[str] = None,
    verbose: bool = False,
) -> Runtime:
    """Join the process group set up by ``torchrun`` (or a one-process group), make the
    TP x CP grid (CP = world / TP) and pick device and dtype (bf16 on GPU, fp32 on CPU).

    ``backend``: ``"nccl"`` (default with GPUs: one GPU per rank) or ``"gloo"`` (default on
    CPU; with GPUs, ranks may outnumber them and share them round-robin, collectives go
    through host memory: for accuracy runs, not for speed).

    ``timeout_s``: how long any collective may wait for the other ranks (``--timeout`` of
    :func:`add_runtime_args`; default ``comm.DEFAULT_TIMEOUT_S``, 120 s).  A longer wait ends in
    :class:`~megatron_apb.errors.CollectiveTimeout` (or, for a collective not issued
    through :mod:`megatron_apb.comm`, the watchdog ending the process with status 2), naming
    the rank, the operation and the group; a dead peer ends in ``CollectiveError``.  The
    process groups get timeout + grace (gloo: their own error; NCCL, with
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` as torchrun sets it: the process is torn down).

    ``verbose``: every rank prints progress (default: rank 0 only, :func:`quiet_other_ranks`).
    """
    quiet_warnings()
    quiet_other_ranks(int(os.environ.get("RANK", "0")), verbose)
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    if not 0 < timeout_s < float("inf"):
        raise APBConfigError(f"--timeout must be > 0 seconds, got {timeout_s}")
    # a process group the caller already made counts; else torchrun's (or one process)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or world % tp:
        raise APBConfigError(
            f"--tp {tp} must divide the number of processes ({world}); CP = processes / TP"
        )
    cuda = torch.cuda.is_available()
    torch_dtype = parse_dtype(dtype, default=torch.bfloat16 if cuda else torch.float32)
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("nccl", "gloo") or (backend == "nccl" and not cuda):
        raise APBConfigError(f"--comm-backend {backend!r}: use gloo, or nccl on a machine with GPUs")
    if cuda:
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if backend == "nccl" and local_rank >= gpus:
            raise APBConfigError(
                f"{world} processes per node but {gpus} GPU(s): NCCL needs one GPU per rank; use "
                "fewer processes or --comm-backend gloo to share GPUs"
            )
        torch.cuda.set_device(local_rank % gpus)
    set_collective_timeout(timeout_s)
    # the groups' own timeout is the backstop, after ours (wait_for, the watchdog) has named the stall
    backstop = datetime.timedelta(seconds=timeout_s + grace_s(timeout_s))
    if backend == "nccl":  # a timed-out NCCL collective tears the process down (torchrun's default)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    start_watchdog(timeout_s)  # from here: a rendezvous that never completes is named too
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        dist.init_process_group(
            backend,
            rank=int(os.environ.get("RANK", "0")),
            world_size=world,
            timeout=backstop,
        )
    megatron_glue.init_cpu_megatron()
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    pg = megatron_glue.rank_grid_groups(tp, world // tp)
    name_group(dist.group.WORLD, "default")
    for name, group in (("data-parallel", pg.dp), ("pipeline", pg.pp), ("tensor-parallel", pg.tp),
                        ("context-parallel", pg.cp)):
        name_group(group, name)
        # new_group gives torch's default timeout (30 min gloo, 10 min NCCL), not the world's
        dist.distributed_c10d._set_pg_timeout(backstop, group)
    return Runtime(
        rank=dist.get_rank(), world=world, tp=tp, cp=world // tp, pg=pg,
        device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
        dtype=torch_dtype,
    )


def load_model(path: Optional[str], apb_config: APBConfig, rt: Runtime, *, heads: Optional[str] = None):
    """Build the Megatron GPTModel for checkpoint ``path`` (HF directory, GGUF file,
    converted checkpoint, or distributed checkpoint of ``convert --format torch_dist``;
    None: the embedded SmolLM2 default) on this rank's TP shard.

    The model is built in ``rt.dtype`` on ``rt.device`` without initialising its weights;
    each tensor's shard is then read from the files and copied in, one at a time
    (:func:`~megatron_apb.checkpoints.load_shard`): no rank reads more than its shard or
    holds a float32 copy.  Rank 0 shows the progress.

    ``heads``: a retaining-head checkpoint (reference layout) to load; the model then has
    retaining heads and ``apb_config`` is returned with their width.

    Returns (model, spec, tokenizer, apb_config).
    """
    # local: the checkpoints package imports Megatron-Core, and this module builds every parser
    from ..checkpoints import build_model, default_checkpoint, load_dist, load_shard, open_checkpoint, shard_heads

    path = path or default_checkpoint(report=_say_once)
    ckpt = open_checkpoint(path, report=_say_once)
    spec, extra = ckpt.spec, None
    if heads is not None:
        full = heads_to_megatron(
            read_retaining_heads(heads), num_layers=spec.num_layers,
            num_heads=spec.num_attention_heads, num_kv_heads=spec.num_query_groups,
            head_dim=spec.kv_channels,
        )
        hidden = full[next(k for k in full if k.endswith("retaining_head.fc1.weight"))].shape[0]
        apb_config = apb_config.replace(retaining_head_hidden=hidden)
        extra = shard_heads(full, spec, rt.tp_rank, rt.tp)
    model = build_model(
        spec, apb_config, pg_collection=rt.pg, tp_size=rt.tp, cp_size=rt.cp, dtype=rt.dtype,
        config_overrides=dict(perform_initialization=False, use_cpu_initialization=rt.device.type == "cpu"),
        parallel_output=False,
    )
    if ckpt.dist_dir is not None:  # a Megatron-Core distributed checkpoint: dist_checkpointing reads the shards
        if rt.is_main:
            print(f"loading the distributed checkpoint {ckpt.dist_dir}", flush=True)
        load_dist(model, ckpt.dist_dir, rt.pg, where=path, extra=extra)
    else:
        with ckpt.reader:
            load_shard(model, ckpt.reader, spec, rt.tp_rank, rt.tp, megatron_names=ckpt.megatron_names,
                       where=path, extra=extra, progress=rt.is_main)
    # the norms Megatron makes in float32 whatever params_dtype says (vectors); the rest is in place
    model = model.to(device=rt.device, dtype=rt.dtype).eval()
    return model, spec, ckpt.tokenizer(), apb_config
