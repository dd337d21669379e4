"""DeepSpeed inference with APB context parallelism.

:func:`init_inference` takes a DeepSpeed inference config (a dict or a JSON file) with one
extra section, ``"apb"``::

    {
      "dtype": "bf16",
      "tensor_parallel": {"tp_size": 2},
      "apb": {
        "mode": "apb",              # apb | star | exact | ulysses
        "cp_size": 2,               # context-parallel ranks (default: world / tp_size)
        "anchor_len": 4096,         # optional; default block/4
        "passing_len": 2048,        # optional; default block/8
        "compressor": "query_attention",   # retaining_head | query_attention | random
        "heads": "/ckpt/retaining_heads.safetensors"   # needed by retaining_head
      }
    }

Every :class:`~megatron_apb.config.APBConfig` field is a key of the section
(``APB_SECTION_KEYS``); unknown keys are refused with the list of valid ones.  See
:mod:`.engine` for the models it takes.  ``split_config`` and ``APBSection`` need no
DeepSpeed; ``init_inference`` and ``APBInferenceEngine`` import it on first use.
"""

from ..._lazy import lazy_getattr
from .config import APB_CONFIG_KEYS, APB_SECTION_KEYS, APBSection, split_config

_EXPORTS = {"init_inference": ".engine", "APBInferenceEngine": ".engine"}
__all__ = ["APB_CONFIG_KEYS", "APB_SECTION_KEYS", "APBSection", "split_config", *_EXPORTS]

__getattr__ = lazy_getattr(__name__, _EXPORTS)
