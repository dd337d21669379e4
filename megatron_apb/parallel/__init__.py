"""One module per distributed attention algorithm; each takes its process group as an
argument and registers itself in :data:`megatron_apb.registry.ALGORITHMS`."""

from .algorithm import CPAlgorithm, register_algorithm
from .apb import apb_context_attention
from .decode import decode_attention
from .exact import exact_context_attention
from .ulysses import ulysses_attention

__all__ = [
    "CPAlgorithm",
    "apb_context_attention",
    "decode_attention",
    "exact_context_attention",
    "register_algorithm",
    "ulysses_attention",
]
