"""Generation: APB prefill, exact distributed decoding, sampling."""

from .cache import CPKVCache
from .engine import APBEngine, GenerationResult
from .sampling import SamplingConfig, sample

__all__ = ["APBEngine", "CPKVCache", "GenerationResult", "SamplingConfig", "sample"]
