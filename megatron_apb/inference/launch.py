"""Process set-up for the command line: torchrun environment, groups, model loading, and
the flags shared by the commands that run a model.

The APB flags are generated from :class:`~megatron_apb.config.APBConfig`'s fields
(:mod:`megatron_apb.configargs`), so a new field is a new flag of every command at once.
Importing this module is cheap (the command-line parser is built from it): Megatron-Core
is imported when a runtime or a model is first made.
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from .. import megatron as megatron_glue  # lazy package: Megatron-Core loads on first use
from ..config import DTYPES, APBConfig, parse_dtype
from ..configargs import add_config_arguments, config_from_namespace
from ..errors import APBConfigError
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
    """``--tp`` and ``--dtype``: how a command lays out and runs the model."""
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (CP = processes / TP)")
    parser.add_argument("--dtype", choices=list(DTYPES), help=dtype_help)


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


def quiet_warnings():
    """Megatron warns at import about optional fused kernels it falls back from."""
    for pattern in ("Transformer Engine", "Apex", "flex_attention called without"):
        warnings.filterwarnings("ignore", message=f".*{pattern}.*")


def init_runtime(tp: int = 1, dtype: Optional[str] = None, timeout_s: int = 900, backend: Optional[str] = None) -> Runtime:
    """Join the process group set up by ``torchrun`` (or a one-process group), make the
    TP x CP grid (CP = world / TP) and pick device and dtype (bf16 on GPU, fp32 on CPU).

    ``backend``: ``"nccl"`` (default with GPUs: one GPU per rank) or ``"gloo"`` (default on
    CPU; with GPUs, ranks may outnumber them and share them round-robin, collectives go
    through host memory: for accuracy runs, not for speed).
    """
    quiet_warnings()
    world = int(os.environ.get("WORLD_SIZE", "1"))
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
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    megatron_glue.init_cpu_megatron()
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    pg = megatron_glue.rank_grid_groups(tp, world // tp)
    return Runtime(
        rank=dist.get_rank(), world=world, tp=tp, cp=world // tp, pg=pg,
        device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
        dtype=torch_dtype,
    )


def load_model(path: Optional[str], apb_config: APBConfig, rt: Runtime, *, heads: Optional[str] = None):
    """Build the Megatron GPTModel for checkpoint ``path`` (HF directory, GGUF file, or
    converted checkpoint; None: the embedded SmolLM2 default) on this rank's TP shard.

    ``heads``: a retaining-head checkpoint (reference layout) to load; the model then has
    retaining heads and ``apb_config`` is returned with their width.

    Returns (model, spec, tokenizer, apb_config).
    """
    # local: the checkpoints package imports Megatron-Core, and this module builds every parser
    from ..checkpoints import build_model, default_model_path, load_hf_checkpoint, load_into_model

    path = path or default_model_path()
    spec, state, tokenizer = load_hf_checkpoint(path)
    if heads is not None:
        state.update(
            heads_to_megatron(
                read_retaining_heads(heads), num_layers=spec.num_layers,
                num_heads=spec.num_attention_heads, num_kv_heads=spec.num_query_groups,
                head_dim=spec.kv_channels,
            )
        )
        hidden = state[next(k for k in state if k.endswith("retaining_head.fc1.weight"))].shape[0]
        apb_config = apb_config.replace(retaining_head_hidden=hidden)
    model = build_model(
        spec, apb_config, pg_collection=rt.pg, tp_size=rt.tp, cp_size=rt.cp,
        config_overrides=dict(perform_initialization=False), parallel_output=False,
    )
    load_into_model(model, state, spec, rt.tp_rank, rt.tp)
    del state
    model = model.to(device=rt.device, dtype=rt.dtype).eval()
    return model, spec, tokenizer, apb_config
