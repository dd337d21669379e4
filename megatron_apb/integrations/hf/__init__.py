"""APB attention in a Hugging Face transformers causal LM, and its model adapter."""

from .model import HFModelForAPB, swap_in_apb_attention

__all__ = ["HFModelForAPB", "swap_in_apb_attention"]
