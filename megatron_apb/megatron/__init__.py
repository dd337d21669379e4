"""Megatron-Core glue: the APB core attention, its layer spec, RoPE positions, set-up,
and the model adapter the engine talks to.

Names are imported on first use, so importing a submodule (or the package) does not
import Megatron-Core until one of them is needed.
"""

from .._lazy import lazy_getattr

_EXPORTS = {
    "APBCoreAttention": ".core_attention",
    "APBSelfAttention": ".self_attention",
    "MegatronAdapter": ".adapter",
    "apb_modules": ".setup",
    "build_gpt_model": ".models",
    "core_attention_spec": ".spec",
    "get_gpt_layer_apb_spec": ".spec",
    "init_cpu_megatron": ".setup",
    "prepare_model": ".setup",
    "rank_grid_groups": ".models",
    "tiny_transformer_config": ".models",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
