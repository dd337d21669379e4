"""RMSNorm for Megatron's local (non-Transformer-Engine) layer spec, fused on CUDA."""

from __future__ import annotations

import torch
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from ..ops.fused import fused_rms_norm


class FusedRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` (same ``weight`` parameter and state-dict key) whose forward is
    one kernel on CUDA (:func:`megatron_apb.ops.fused.fused_rms_norm`).

    Built by Megatron through a layer spec, like its ``WrappedTorchNorm``:
    ``FusedRMSNorm(config, hidden_size, eps)``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"FusedRMSNorm is an RMSNorm; the config asks for {config.normalization}")
        super().__init__(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_rms_norm(x, self.weight, self.eps)


class RMSNormFusedWhenPossible:
    """A layer-spec norm that builds :class:`FusedRMSNorm` when the layer's config asks for
    RMSNorm, and Megatron's ``WrappedTorchNorm`` (whatever the config asks) otherwise.

    The default of :func:`~megatron_apb.megatron.spec.get_gpt_layer_apb_spec`: the spec
    is often built before the config is known (Megatron-LM's ``--spec``).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if getattr(config, "normalization", "RMSNorm") == "RMSNorm":
            return FusedRMSNorm(config, hidden_size, eps)
        return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
