"""Generation: APB prefill, exact distributed decoding, sampling.

Names are imported on first use, so that ``megatron_apb.inference.launch`` and
``.sampling`` (used to build the command line) do not import Megatron-Core.
"""


from .._lazy import lazy_getattr

_EXPORTS = {
    "APBEngine": ".engine",
    "GenerationResult": ".engine",
    "CPKVCache": ".cache",
    "SamplingConfig": ".sampling",
    "sample": ".sampling",
    "StopStrings": ".sampling",
    "LongContextLM": ".lm",
    "Generation": ".lm",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
