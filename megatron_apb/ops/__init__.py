"""Attention math with no process groups: kernels, references, LSE merging, the APB op."""

from .apb import apb_attention
from .attention import attention_with_lse
from .merge import merge_attention
from .reference import apb_reference_attention, reference_attention

__all__ = [
    "apb_attention",
    "apb_reference_attention",
    "attention_with_lse",
    "merge_attention",
    "reference_attention",
]
