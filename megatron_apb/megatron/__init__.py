"""Megatron-Core glue: the APB core attention, its layer spec, RoPE positions, set-up."""

from .context import apb_layout, apb_modules, apb_runtime
from .core_attention import APBCoreAttention, APBSelfAttention
from .models import build_gpt_model, rank_grid_groups, tiny_transformer_config
from .setup import init_cpu_megatron, prepare_model
from .spec import get_gpt_layer_apb_spec

__all__ = [
    "APBCoreAttention",
    "APBSelfAttention",
    "apb_layout",
    "build_gpt_model",
    "rank_grid_groups",
    "tiny_transformer_config",
    "apb_modules",
    "apb_runtime",
    "get_gpt_layer_apb_spec",
    "init_cpu_megatron",
    "prepare_model",
]
