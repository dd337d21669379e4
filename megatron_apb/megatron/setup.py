"""Preparing Megatron-Core for APB: CPU shims and model preparation."""

from __future__ import annotations

from typing import List

import torch
from megatron.core.tensor_parallel.random import initialize_rng_tracker

from .core_attention import APBCoreAttention
from .rope import disable_zigzag_rope

_CPU_SHIMS_DONE = False


def init_cpu_megatron(seed: int = 1234):
    """Let Megatron-Core modules build and run on a machine without CUDA.

    Megatron asks ``torch.cuda.current_device()`` for where to put RoPE frequencies and
    buffers, and its tensor-parallel RNG tracker seeds CUDA generators.  On CPU-only
    machines this points the former at the CPU and uses the inference RNG tracker.  On a
    machine with CUDA it does nothing.
    """
    global _CPU_SHIMS_DONE
    if torch.cuda.is_available() or _CPU_SHIMS_DONE:
        return
    torch.cuda.current_device = lambda: "cpu"
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    torch.manual_seed(seed)
    _CPU_SHIMS_DONE = True


def apb_modules(model: torch.nn.Module) -> List[APBCoreAttention]:
    """The APB core-attention modules of ``model``, in layer order."""
    return [m for m in model.modules() if isinstance(m, APBCoreAttention)]


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make a GPTModel built with the APB spec ready for context-parallel APB: stop
    Megatron's rotary embedding from slicing positions for its zig-zag layout (APB indexes
    the whole table at contiguous-block and anchor positions).  Idempotent; returns
    ``model``."""
    disable_zigzag_rope(model)
    return model
