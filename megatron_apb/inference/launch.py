"""Process set-up for the command line: torchrun environment, groups, model loading."""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..config import BACKENDS, APBConfig, APBConfigError


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
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help=dtype_help)


def add_apb_args(parser):
    """The APB layout and kernel flags shared by the commands that run APB attention."""
    parser.add_argument("--anchor-len", type=int, help="anchor tokens (default: block/4)")
    parser.add_argument("--passing-len", type=int, help="passing tokens per rank (default: block/8)")
    parser.add_argument("--query-prefix-len", type=int,
                        help="document tokens before the query in the anchor (default: the chat header)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="attention kernel (default: auto)")


def apb_config_from_args(args, *, mode: str, compressor: str) -> APBConfig:
    """The :class:`APBConfig` of ``add_apb_args``'s flags (unset ones keep the defaults;
    ``APBConfig`` validates the rest)."""
    return APBConfig(
        mode=mode,
        anchor_len=args.anchor_len,
        passing_len=args.passing_len,
        compressor=compressor,
        backend=args.backend,
        **({"query_prefix_len": args.query_prefix_len} if args.query_prefix_len is not None else {}),
    )


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
    from ..megatron import init_cpu_megatron, rank_grid_groups

    init_cpu_megatron()
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype is not None and dtype not in names:
        raise APBConfigError(f"--dtype must be one of {sorted(names)}, got {dtype!r}")
    torch_dtype = names[dtype] if dtype else (torch.bfloat16 if cuda else torch.float32)
    pg = rank_grid_groups(tp, world // tp)
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
    from ..megatron.checkpoint import build_model, default_model_path, load_hf_checkpoint, load_into_model

    path = path or default_model_path()
    spec, state, tokenizer = load_hf_checkpoint(path)
    if heads is not None:
        from ..heads import heads_to_megatron, read_retaining_heads

        state.update(
            heads_to_megatron(
                read_retaining_heads(heads), num_layers=spec.num_layers,
                num_heads=spec.num_attention_heads, num_kv_heads=spec.num_query_groups,
                head_dim=spec.kv_channels,
            )
        )
    hidden = apb_config.retaining_head_hidden
    if heads is not None:
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
