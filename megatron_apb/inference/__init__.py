"""Generation: APB prefill, exact distributed decoding, sampling.

Names are imported on first use, so that ``megatron_apb.inference.prompts`` (tokenizing
prompts, e.g. for the task generators) does not import Megatron-Core.
"""

import importlib

_EXPORTS = {
    "APBEngine": ".engine",
    "GenerationResult": ".engine",
    "CPKVCache": ".cache",
    "SamplingConfig": ".sampling",
    "sample": ".sampling",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
