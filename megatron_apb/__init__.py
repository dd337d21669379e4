"""APB (distributed long-context prefill by passing compressed context blocks) for Megatron-Core.

Top-level names are imported lazily so that ``import megatron_apb`` stays cheap and the
attention math works without Megatron-Core installed.
"""

from ._lazy import lazy_getattr
from .config import APBConfig, CPLayout
from .errors import APBConfigError, APBError
from .ops import apb_attention, attention_with_lse, merge_attention

__version__ = "0.1.0"

__all__ = [
    "APBConfig",
    "APBConfigError",
    "APBError",
    "CPLayout",
    "apb_attention",
    "attention_with_lse",
    "merge_attention",
    "get_gpt_layer_apb_spec",
    "LongContextLM",
    "Generation",
]


__getattr__ = lazy_getattr(__name__, {
    "get_gpt_layer_apb_spec": ".megatron.spec",
    "LongContextLM": ".inference.lm",
    "Generation": ".inference.lm",
})
