"""Process groups and communication set-up for DeepSpeed inference with APB.

Ranks are laid out as ``arange(world).view(dp, cp, tp)`` (TP fastest, as Megatron).
DeepSpeed's communication backend is started over the existing ``torch.distributed``
world, without its CPU shared-memory all-reduce (see :func:`no_shm_allreduce`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional

import deepspeed
import deepspeed.comm as ds_dist
import deepspeed.comm.torch  # noqa: F401  (so the shm builder can be switched off)
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from ...comm import group_size
from ...errors import APBConfigError
from ...megatron import rank_grid_groups
from .config import section_error


def ranks(group):
    """The global ranks of ``group`` (None: the world)."""
    return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))


def make_groups(tp: int, cp: Optional[int], cp_group, tp_group):
    """(cp_group, tp_group) of this rank: the given ones (checked), else a ``[dp, cp, tp]``
    rank grid (created collectively: every rank calls this)."""
    world = dist.get_world_size()
    if cp_group is not None:
        if cp is not None and group_size(cp_group) != cp:
            raise section_error(
                f"cp_size={cp} but the cp_group given has {group_size(cp_group)} ranks; "
                "make them agree or leave cp_size out"
            )
        if tp_group is not None and group_size(tp_group) != tp:
            raise APBConfigError(
                f"the tp_group given has {group_size(tp_group)} ranks but the model's tensor "
                f"parallelism is {tp}"
            )
        if tp_group is None and tp > 1:
            raise APBConfigError("a cp_group was given for a tensor-parallel model: give its tp_group too")
        return cp_group, tp_group
    if cp is None:
        if world % tp:
            raise APBConfigError(f"the world size {world} is not a multiple of the TP size {tp}")
        cp = world // tp
    if world % (tp * cp):
        choices = [c for c in range(1, world // tp + 1) if (world // tp) % c == 0] if world % tp == 0 else []
        raise section_error(
            f"cp_size={cp} x TP {tp} = {cp * tp} does not divide the {world} processes; "
            f"launch a multiple of {cp * tp} processes or pick cp_size among {choices}"
        )
    pg = rank_grid_groups(tp, cp)
    if tp_group is not None and ranks(tp_group) != ranks(pg.tp):
        raise APBConfigError(
            f"the model's TP group holds ranks {ranks(tp_group)} but the [dp, cp, tp] rank grid "
            f"puts this rank's TP peers at {ranks(pg.tp)}; lay the model's TP groups out with TP "
            "fastest (as Megatron) or pass cp_group explicitly"
        )
    return pg.cp, (tp_group if tp_group is not None else pg.tp)


@contextlib.contextmanager
def no_shm_allreduce():
    """Build DeepSpeed's communication backend without its CPU shared-memory all-reduce.

    On CPU, DeepSpeed routes the all-reduce of its tensor-parallel layers to a shared-memory
    op that reduces over *every* process, whatever group it is given (wrong as soon as
    CP > 1); on our CI machine it also crashed.  Without it, DeepSpeed falls back to
    ``torch.distributed.all_reduce`` on the TP group.
    """
    module = sys.modules.get("deepspeed.comm.torch")
    original = getattr(module, "build_shm_op", None)
    if original is not None:
        module.build_shm_op = lambda: None
    try:
        yield
    finally:
        if original is not None:
            module.build_shm_op = original


def init_deepspeed_comm():
    """Initialise ``deepspeed.comm`` over the existing ``torch.distributed`` world."""
    cpu = get_accelerator().device_name() == "cpu"
    if not ds_dist.is_initialized():
        backend = "gloo" if cpu else None  # DeepSpeed's CPU default, oneCCL, is optional
        with no_shm_allreduce() if cpu else contextlib.nullcontext():
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
    backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
    if cpu and backend is not None and getattr(backend, "shm_vector_kernel_level", 0):
        backend.shm_vector_kernel_level = 0  # built by someone else: do not use it (see above)


def init_torch_distributed():
    """``torch.distributed`` from the launcher's variables (a world of one without them)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


class ModelParallelUnit:
    """The ``mpu`` DeepSpeed asks for: our TP group (and the CP x DP ranks as 'data')."""

    def __init__(self, tp_group):
        self.tp_group = tp_group

    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_rank(self):
        return dist.get_rank(self.tp_group)

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.tp_group)

    def get_data_parallel_group(self):
        return None

    def get_data_parallel_rank(self):
        return 0

    def get_data_parallel_world_size(self):
        return 1
