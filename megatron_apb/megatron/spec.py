"""Layer specs that put APB attention into Megatron-Core's transformer layer."""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from ..config import APBConfig
from .core_attention import APBCoreAttention
from .layer import APBTransformerLayer
from .norms import FusedRMSNorm, RMSNormFusedWhenPossible
from .self_attention import APBSelfAttention

try:  # Transformer Engine is an optional accelerator, never required
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except Exception:
    HAVE_TE = False


def core_attention_spec(apb_config: Optional[APBConfig] = None) -> ModuleSpec:
    """The ``core_attention`` submodule spec: :class:`APBCoreAttention` with its settings
    in ``params`` (Megatron's ``build_module`` passes them to the constructor)."""
    return ModuleSpec(module=APBCoreAttention, params={"apb_config": apb_config or APBConfig()})


def get_gpt_layer_apb_spec(
    apb_config: Optional[APBConfig] = None,
    base_spec: Optional[ModuleSpec] = None,
    *,
    normalization: str = "RMSNorm",
    qk_layernorm: bool = False,
    fused_norm: Optional[bool] = None,
) -> ModuleSpec:
    """A GPT layer spec whose self-attention runs APB (or the mode in ``apb_config``).

    Args:
        apb_config: APB settings; default ``APBConfig()``.
        base_spec: the layer spec to start from.  Default: Megatron's Transformer Engine
            spec when TE is installed, else its local spec, with ``normalization`` and
            ``qk_layernorm``.
        fused_norm: with Megatron's local spec and RMSNorm, use :class:`FusedRMSNorm`
            (one kernel per norm on CUDA) for the layer's two norms.  ``None`` (default):
            whenever the layer's config asks for RMSNorm; ``True``: required (error for
            other norms); ``False``: Megatron's own norm.
    Returns:
        A copy of ``base_spec`` whose layer is :class:`APBTransformerLayer` (where it was
        Megatron's ``TransformerLayer``: the MLP chunked in long prefills), whose
        ``self_attention`` is :class:`APBSelfAttention` and whose ``core_attention`` is
        ``ModuleSpec(APBCoreAttention, params={"apb_config": ...})``.

    After building the model, call ``megatron_apb.megatron.prepare_model(model)`` so the
    rotary table is not sliced for Megatron's zig-zag layout.
    """
    if base_spec is None:
        if HAVE_TE:
            base_spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
        else:
            base_spec = gpt_layer_specs.get_gpt_layer_local_spec(
                normalization=normalization, qk_layernorm=qk_layernorm
            )
    spec = copy.deepcopy(base_spec)
    attention = spec.submodules.self_attention
    if not isinstance(attention, ModuleSpec) or not hasattr(attention.submodules, "core_attention"):
        raise ValueError("base_spec has no self_attention.submodules.core_attention to replace")
    if spec.module is TransformerLayer:  # the MLP chunked over long prefills
        spec.module = APBTransformerLayer
    attention.module = APBSelfAttention
    attention.submodules.core_attention = core_attention_spec(apb_config)
    if fused_norm is not False:
        if fused_norm and normalization != "RMSNorm":
            raise ValueError(f"fused_norm fuses RMSNorm; normalization is {normalization!r}")
        norm = FusedRMSNorm if fused_norm else RMSNormFusedWhenPossible
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            current = getattr(spec.submodules, name, None)
            if current is not None and getattr(current, "__name__", "") == "WrappedTorchNorm":
                setattr(spec.submodules, name, norm)
    return spec
