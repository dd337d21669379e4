"""Preparing Megatron-Core for APB: CPU shims and model preparation."""

from __future__ import annotations

import torch

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
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    torch.manual_seed(seed)
    _CPU_SHIMS_DONE = True


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make a GPTModel built with the APB spec ready for context-parallel APB.

    * Stops Megatron's rotary embedding from slicing positions for its zig-zag layout (APB
      indexes the whole table at contiguous-block and anchor positions).
    * Shares one ``ForwardGuard`` among the APB layers, reset before every forward, so the
      cross-rank input check runs once per forward instead of once per layer.

    Idempotent; returns ``model``.
    """
    from .context import apb_modules
    from .core_attention import ForwardGuard

    disable_zigzag_rope(model)
    modules = apb_modules(model)
    if modules and getattr(model, "_apb_forward_guard", None) is None:
        guard = ForwardGuard()
        for module in modules:
            module.forward_guard = guard
        model._apb_forward_guard = guard
        model.register_forward_pre_hook(guard.reset)
    return model
