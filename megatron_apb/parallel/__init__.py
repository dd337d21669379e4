"""One module per distributed attention algorithm; each takes its process group as an argument."""

from .apb import apb_context_attention
from .decode import decode_attention
from .exact import exact_context_attention
from .ulysses import ulysses_attention

__all__ = ["apb_context_attention", "decode_attention", "exact_context_attention", "ulysses_attention"]
