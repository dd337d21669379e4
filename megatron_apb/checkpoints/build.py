"""Megatron models for a :class:`~.spec.ModelSpec`: :func:`build_model` (a ``GPTModel``
with APB attention), :func:`load_into_model` (shard the full state for a TP rank and copy
it in, naming every misfit) and :func:`set_rope_inv_freq` (Llama-3 scaling constants that
Megatron does not take as arguments).
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from ..comm import group_size
from ..errors import CheckpointError
from ..megatron import build_gpt_model
from .sharding import RETAINING_KEY, shard_for_tp
from .spec import ModelSpec

Tensor = torch.Tensor

# Transformer Engine's spec fuses the layer norms into the following linear layer.
_TE_ALIASES = (
    (re.compile(r"^(decoder\.layers\.\d+\.)input_layernorm\.weight$"), r"\1self_attention.linear_qkv.layer_norm_weight"),
    (re.compile(r"^(decoder\.layers\.\d+\.)pre_mlp_layernorm\.weight$"), r"\1mlp.linear_fc1.layer_norm_weight"),
)


_TE_NAMES = (
    (re.compile(r"^(decoder\.layers\.\d+\.)self_attention\.linear_qkv\.layer_norm_weight$"), r"\1input_layernorm.weight"),
    (re.compile(r"^(decoder\.layers\.\d+\.)mlp\.linear_fc1\.layer_norm_weight$"), r"\1pre_mlp_layernorm.weight"),
)


def canonical_name(name: str) -> str:
    """The Megatron name of a model tensor (Transformer Engine's fused norm names mapped back)."""
    for pattern, plain in _TE_NAMES:
        name = pattern.sub(plain, name)
    return name


def _model_tensors(model) -> Dict[str, Tensor]:
    return {
        k: v
        for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, Tensor) and not k.endswith("_extra_state")
    }


def load_into_model(
    model,
    full_state: Mapping[str, Tensor],
    spec: ModelSpec,
    tp_rank: int,
    tp_size: int,
    strict: bool = True,
    *,
    allow_missing_retaining_heads: bool = False,
) -> Dict[str, List[str]]:
    """Shard ``full_state`` for this TP rank and copy it into ``model`` (in place).

    Errors (:class:`CheckpointError`, naming the tensors): a model tensor without a
    checkpoint tensor, a checkpoint tensor the model lacks, or a shape mismatch.
    ``_extra_state`` entries are ignored.  Retaining-head tensors in the checkpoint are
    skipped when the model has none; when the model has retaining heads the checkpoint
    lacks, it is an error unless ``allow_missing_retaining_heads`` (the model keeps its
    own initialisation).  ``strict=False`` tolerates missing and unexpected tensors but
    never a shape mismatch.  Returns ``{"missing": [...], "unexpected": [...], "skipped": [...]}``.
    """
    shard = shard_for_tp(full_state, spec, tp_rank, tp_size)
    target = _model_tensors(model)
    for pattern, alias in _TE_ALIASES:
        for name in list(shard):
            te_name = pattern.sub(alias, name)
            if te_name != name and name not in target and te_name in target:
                shard[te_name] = shard.pop(name)
    skipped, missing, unexpected = [], [], []
    model_has_heads = any(RETAINING_KEY.match(k) for k in target)
    for name in list(shard):
        if RETAINING_KEY.match(name) and not model_has_heads:
            skipped.append(name)
            shard.pop(name)
    for name in target:
        if name not in shard:
            if RETAINING_KEY.match(name) and allow_missing_retaining_heads:
                skipped.append(name)
            else:
                missing.append(name)
    unexpected = [k for k in shard if k not in target]
    wrong = [
        f"{k}: checkpoint shard {tuple(shard[k].shape)}, model {tuple(target[k].shape)}"
        for k in shard
        if k in target and shard[k].shape != target[k].shape
    ]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches at TP rank {tp_rank}/{tp_size}: " + "; ".join(wrong))
    if strict and missing:
        hint = (
            " (the model has retaining heads the checkpoint lacks: pass "
            "allow_missing_retaining_heads=True to keep their initialisation)"
            if any(RETAINING_KEY.match(k) for k in missing)
            else ""
        )
        problems.append(f"{len(missing)} model tensors missing from the checkpoint{hint}: " + "; ".join(missing))
    if strict and unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors the model does not have: " + "; ".join(unexpected))
    if problems:
        raise CheckpointError("cannot load the checkpoint: " + " | ".join(problems))
    with torch.no_grad():
        for name, tensor in shard.items():
            if name in target:
                target[name].copy_(tensor)
    return {"missing": missing, "unexpected": unexpected, "skipped": skipped}


def set_rope_inv_freq(model, spec: ModelSpec) -> None:
    """Give every Megatron ``RotaryEmbedding`` of ``model`` ``spec.rope_inv_freq()``.

    Needed only for Llama-3 scaling constants other than Megatron's hard-coded ones
    (:meth:`ModelSpec.needs_inv_freq_override`); harmless otherwise.
    """
    inv_freq = spec.rope_inv_freq()
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            if module.inv_freq.shape != inv_freq.shape:
                raise ValueError(
                    f"rotary inv_freq has {module.inv_freq.numel()} entries, the spec "
                    f"{inv_freq.numel()} (rotary_percent < 1 is not supported here)"
                )
            module.inv_freq = inv_freq.to(module.inv_freq.device)
    RotaryEmbedding.forward.cache_clear()


def build_model(
    spec: ModelSpec,
    apb_config=None,
    *,
    pg_collection=None,
    tp_size: Optional[int] = None,
    cp_size: Optional[int] = None,
    dtype=torch.float32,
    max_sequence_length: Optional[int] = None,
    config_overrides: Optional[Dict[str, Any]] = None,
    **gpt_kwargs,
):
    """A Megatron GPTModel with APB attention for ``spec`` (weights still to be loaded).

    TP and CP sizes default to those of ``pg_collection``; the vocabulary is
    ``spec.padded_vocab(tp)``.  Llama-3 scaling constants that Megatron does not take as
    arguments are applied by replacing the rotary ``inv_freq`` after the build.
    """
    if pg_collection is not None:
        tp_size = tp_size or group_size(pg_collection.tp)
        cp_size = cp_size or group_size(pg_collection.cp)
    tp_size, cp_size = tp_size or 1, cp_size or 1
    config = spec.transformer_config(tp_size, cp_size, dtype, **(config_overrides or {}))
    kwargs = spec.gpt_kwargs(allow_inv_freq_override=True)
    kwargs.update(gpt_kwargs)
    model = build_gpt_model(
        config, apb_config, vocab_size=spec.padded_vocab(tp_size),
        max_sequence_length=max_sequence_length or spec.max_positions,
        pg_collection=pg_collection, **kwargs,
    )
    if spec.needs_inv_freq_override():
        set_rope_inv_freq(model, spec)
    return model
