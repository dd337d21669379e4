"""Model families the checkpoint loader converts, one module each, found by the Hugging
Face ``model_type`` through :data:`megatron_apb.registry.MODEL_FAMILIES`.

Importing this package registers the built-in families (``llama``, ``qwen2``,
``mistral``, ``Yi``/``yi``).  A new family is one module that registers a
:class:`ModelFamily`::

    from megatron_apb.checkpoints.families import ModelFamily, register_family
    from megatron_apb.checkpoints.families.llama import LLAMA_KEYS

    register_family(ModelFamily(name="my_llama", keys=LLAMA_KEYS, hf_config_type="llama"))
"""

from . import llama, mistral, qwen2, yi  # noqa: F401  (the built-in families register themselves)
from .base import (
    SUPPORTED_ROPE_TYPES,
    KeyMap,
    ModelFamily,
    family_for,
    register_family,
    supported_model_types,
)

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "KeyMap",
    "ModelFamily",
    "family_for",
    "register_family",
    "supported_model_types",
]
