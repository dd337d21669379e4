"""The ``llama`` family: Llama 2, Llama 3.x (``llama3`` RoPE scaling), Yi-1.5 and
converted Yi, SmolLM2 and other checkpoints saved as ``LlamaForCausalLM``.

:data:`LLAMA_KEYS` is the Hugging Face naming that most Llama-style families share.
"""

from __future__ import annotations

from .base import KeyMap, ModelFamily, register_family

LLAMA_KEYS = KeyMap(
    embed="model.embed_tokens",
    input_norm="model.layers.{i}.input_layernorm",
    q_proj="model.layers.{i}.self_attn.q_proj",
    k_proj="model.layers.{i}.self_attn.k_proj",
    v_proj="model.layers.{i}.self_attn.v_proj",
    o_proj="model.layers.{i}.self_attn.o_proj",
    post_attention_norm="model.layers.{i}.post_attention_layernorm",
    gate_proj="model.layers.{i}.mlp.gate_proj",
    up_proj="model.layers.{i}.mlp.up_proj",
    down_proj="model.layers.{i}.mlp.down_proj",
    final_norm="model.norm",
    lm_head="lm_head",
)

LLAMA = register_family(
    ModelFamily(name="llama", keys=LLAMA_KEYS, note="Llama 3.x, Yi-1.5 and SmolLM2 are 'llama'")
)
