"""Hugging Face state dict -> full (TP = 1) Megatron state dict, with the tensor names
of the spec's model family (:class:`~.families.KeyMap`), and the name/shape check that
lists every missing, mis-shaped and unexpected tensor at once.
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch

from ..errors import CheckpointError
from .families import KeyMap, family_for
from .spec import ModelSpec

Tensor = torch.Tensor


def check_names(state, expected, what, *, unexpected_ok=(), strict=True):
    """Raise one CheckpointError listing every missing, mis-shaped and unexpected tensor."""
    missing = [f"{k} {tuple(s)}" for k, s in expected.items() if k not in state]
    wrong = [
        f"{k}: got {tuple(state[k].shape)}, expected {tuple(s)}"
        for k, s in expected.items()
        if k in state and tuple(state[k].shape) != tuple(s)
    ]
    extra = [k for k in state if k not in expected and k not in unexpected_ok] if strict else []
    if missing or wrong or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (name, expected shape): " + "; ".join(missing))
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape: " + "; ".join(wrong))
        if extra:
            parts.append(f"{len(extra)} unexpected: " + "; ".join(sorted(extra)))
        raise CheckpointError(f"{what} does not fit the model: " + " | ".join(parts))


def _name(template: str, i: int, suffix: str = ".weight") -> str:
    """The tensor name of layer ``i`` from a :class:`~.families.KeyMap` template."""
    return template.format(i=i) + suffix


def _normalize_hf_keys(hf_state: Mapping[str, Tensor], keys: KeyMap) -> Dict[str, Tensor]:
    """Drop rotary buffers; give a bare base-model state (``LlamaModel``) its ``model.`` prefix."""
    state = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
    embed, prefix = keys.embed + ".weight", keys.bare_prefix
    if embed not in state and prefix and embed.startswith(prefix) and embed[len(prefix) :] in state:
        head = keys.lm_head + "."
        state = {(k if k.startswith(head) else prefix + k): v for k, v in state.items()}
    return state


def hf_shapes(spec: ModelSpec) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the Hugging Face tensors ``spec`` needs."""
    keys = family_for(spec.model_type).keys
    h, d = spec.hidden_size, spec.kv_channels
    q, kv, f = spec.num_attention_heads * d, spec.num_query_groups * d, spec.ffn_hidden_size
    shapes: Dict[str, Tuple[int, ...]] = {keys.embed + ".weight": (spec.vocab_size, h)}
    for i in range(spec.num_layers):
        shapes[_name(keys.input_norm, i)] = (h,)
        shapes[_name(keys.q_proj, i)] = (q, h)
        shapes[_name(keys.k_proj, i)] = (kv, h)
        shapes[_name(keys.v_proj, i)] = (kv, h)
        if spec.qkv_bias:
            shapes[_name(keys.q_proj, i, ".bias")] = (q,)
            shapes[_name(keys.k_proj, i, ".bias")] = (kv,)
            shapes[_name(keys.v_proj, i, ".bias")] = (kv,)
        shapes[_name(keys.o_proj, i)] = (h, q)
        shapes[_name(keys.post_attention_norm, i)] = (h,)
        shapes[_name(keys.gate_proj, i)] = (f, h)
        shapes[_name(keys.up_proj, i)] = (f, h)
        shapes[_name(keys.down_proj, i)] = (h, f)
    shapes[keys.final_norm + ".weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes[keys.lm_head + ".weight"] = (spec.vocab_size, h)
    return shapes


def interleave_qkv(q: Tensor, k: Tensor, v: Tensor, groups: int, per_group: int, head_dim: int) -> Tensor:
    """Rows ``[q of group 0; k of group 0; v of group 0; q of group 1; ...]`` of ``groups``
    query groups (``per_group`` q rows and ``head_dim`` k and v rows each), as Megatron's
    ``linear_qkv`` holds them."""
    tail = q.shape[1:]
    parts = [q.reshape(groups, per_group, *tail), k.reshape(groups, head_dim, *tail), v.reshape(groups, head_dim, *tail)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def hf_to_megatron(hf_state_dict: Mapping[str, Tensor], spec: ModelSpec, *, strict: bool = True) -> Dict[str, Tensor]:
    """Full (TP = 1) Megatron-named tensors from a Hugging Face state dict of the spec's
    model family (tensor names from its :class:`~.families.KeyMap`).

    ``linear_qkv`` rows are interleaved per query group as Megatron's
    ``SelfAttention.get_query_key_value_tensors`` splits them: for each group, the q rows
    of its heads, then its k rows, then its v rows.  ``linear_fc1`` is ``[gate; up]``.
    Raises :class:`CheckpointError` listing every missing or mis-shaped tensor (and, with
    ``strict``, every unexpected one; the LM head is ignored when tied).
    """
    keys = family_for(spec.model_type).keys
    state = _normalize_hf_keys(hf_state_dict, keys)
    check_names(
        state, hf_shapes(spec), "the Hugging Face state dict",
        unexpected_ok=(keys.lm_head + ".weight",) if spec.tie_word_embeddings else (), strict=strict,
    )
    g, d = spec.num_query_groups, spec.kv_channels
    per_group = spec.num_attention_heads // g * d

    s = spec.rope_qk_scale()  # YaRN's attention factor, folded into q and k

    def interleave(q, k, v):
        return interleave_qkv(q * s, k * s, v, g, per_group, d) if s != 1 else interleave_qkv(q, k, v, g, per_group, d)

    out = {"embedding.word_embeddings.weight": state[keys.embed + ".weight"]}
    for i in range(spec.num_layers):
        q, k, v = (keys.q_proj, keys.k_proj, keys.v_proj)
        dst = f"decoder.layers.{i}."
        out[dst + "input_layernorm.weight"] = state[_name(keys.input_norm, i)]
        out[dst + "self_attention.linear_qkv.weight"] = interleave(
            state[_name(q, i)], state[_name(k, i)], state[_name(v, i)]
        )
        if spec.qkv_bias:
            out[dst + "self_attention.linear_qkv.bias"] = interleave(
                state[_name(q, i, ".bias")], state[_name(k, i, ".bias")], state[_name(v, i, ".bias")]
            )
        out[dst + "self_attention.linear_proj.weight"] = state[_name(keys.o_proj, i)]
        out[dst + "pre_mlp_layernorm.weight"] = state[_name(keys.post_attention_norm, i)]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [state[_name(keys.gate_proj, i)], state[_name(keys.up_proj, i)]], dim=0
        )
        out[dst + "mlp.linear_fc2.weight"] = state[_name(keys.down_proj, i)]
    out["decoder.final_layernorm.weight"] = state[keys.final_norm + ".weight"]
    if not spec.tie_word_embeddings:
        out["output_layer.weight"] = state[keys.lm_head + ".weight"]
    return out
