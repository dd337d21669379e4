"""APB (distributed long-context prefill by passing compressed context blocks) for Megatron-Core.

Top-level names are imported lazily so that ``import megatron_apb`` stays cheap and the
attention math works without Megatron-Core installed.
"""

from .config import APBConfig, APBConfigError, CPLayout
from .ops import apb_attention, attention_with_lse, merge_attention

__version__ = "0.1.0"

__all__ = [
    "APBConfig",
    "APBConfigError",
    "CPLayout",
    "apb_attention",
    "attention_with_lse",
    "merge_attention",
    "get_gpt_layer_apb_spec",
]


def __getattr__(name):
    if name == "get_gpt_layer_apb_spec":
        from .megatron.spec import get_gpt_layer_apb_spec

        return get_gpt_layer_apb_spec
    raise AttributeError(f"module 'megatron_apb' has no attribute {name!r}")
