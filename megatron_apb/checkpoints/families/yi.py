"""Yi checkpoints in 01.AI's original format (``model_type`` ``"Yi"``, or ``"yi"``, with
remote code ``YiForCausalLM``): Llama's tensor names except the decoder norms, ``ln1``
and ``ln2``; the config fields are Llama's.

Yi checkpoints re-saved as ``LlamaForCausalLM`` (``model_type`` ``"llama"``, e.g. the
current Yi-6B/34B and Yi-1.5 uploads) are served by the ``llama`` family.
"""

from __future__ import annotations

import dataclasses

from .base import ModelFamily, register_family
from .llama import LLAMA_KEYS

YI_KEYS = dataclasses.replace(
    LLAMA_KEYS,
    input_norm="model.layers.{i}.ln1",
    post_attention_norm="model.layers.{i}.ln2",
)

YI = register_family(ModelFamily(name="Yi", keys=YI_KEYS, hf_config_type="llama"))
YI_LOWER = register_family(dataclasses.replace(YI, name="yi"))
