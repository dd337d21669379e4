"""Tensor-parallel sharding of the full Megatron state (:func:`shard_for_tp`) and the
checks it relies on: the TP size against the spec, the full state's names and shapes,
and the optional retaining-head tensors.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Tuple

import torch

from ..compress import shard_retaining_head
from ..errors import CheckpointError
from .convert import check_names
from .spec import ModelSpec

Tensor = torch.Tensor

#: a retaining-head tensor of the Megatron state: groups (layer index, "fc1" | "fc2")
RETAINING_KEY = re.compile(
    r"^decoder\.layers\.(\d+)\.self_attention\.core_attention\.retaining_head\.(fc1|fc2)\.weight$"
)


def check_tp(spec: ModelSpec, tp_rank: int, tp_size: int) -> None:
    """Raise ``ValueError`` unless ``tp_rank`` is in range and ``tp_size`` divides the heads,
    query groups and FFN width."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is not in [0, {tp_size})")
    bad = [
        f"{name} ({n})"
        for name, n in (
            ("num_attention_heads", spec.num_attention_heads),
            ("num_query_groups", spec.num_query_groups),
            ("ffn_hidden_size", spec.ffn_hidden_size),
        )
        if n % tp_size
    ]
    if bad:
        raise ValueError(f"tensor parallel size {tp_size} must divide {', '.join(bad)}")


def check_full_state(full_state: Mapping[str, Tensor], spec: ModelSpec, vocab_rows=()) -> None:
    """Every tensor of ``spec`` present with its shape; retaining heads allowed.

    ``vocab_rows``: vocabulary sizes also accepted for the embedding and output layer
    (the padded vocabulary)."""
    expected = spec.full_shapes()
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        t = full_state.get(name)
        if name in expected and t is not None and t.shape[0] in vocab_rows:
            expected[name] = (t.shape[0],) + expected[name][1:]
    extra = [k for k in full_state if RETAINING_KEY.match(k)]
    check_names(full_state, expected, "the Megatron state", unexpected_ok=extra)
    retaining_pairs(full_state, spec)


def retaining_pairs(state, spec: ModelSpec) -> Dict[int, Tuple[Tensor, Tensor]]:
    """{layer: (fc1, fc2)} of the full retaining heads in ``state``, checked."""
    found: Dict[int, Dict[str, Tensor]] = {}
    for k, v in state.items():
        m = RETAINING_KEY.match(k)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = v
    problems = []
    d = spec.kv_channels
    cols = (spec.num_attention_heads + 2 * spec.num_query_groups) * d
    for layer, parts in sorted(found.items()):
        p = f"decoder.layers.{layer}.self_attention.core_attention.retaining_head."
        if layer >= spec.num_layers:
            problems.append(f"{p}* (the model has {spec.num_layers} layers)")
            continue
        for part in ("fc1", "fc2"):
            if part not in parts:
                problems.append(f"{p}{part}.weight missing (its pair is present)")
        if len(parts) == 2:
            fc1, fc2 = parts["fc1"], parts["fc2"]
            if fc1.dim() != 2 or fc1.shape[1] != cols:
                problems.append(f"{p}fc1.weight: got {tuple(fc1.shape)}, expected (hidden, {cols})")
            elif tuple(fc2.shape) != (spec.num_query_groups, fc1.shape[0]):
                problems.append(
                    f"{p}fc2.weight: got {tuple(fc2.shape)}, expected ({spec.num_query_groups}, {fc1.shape[0]})"
                )
    if problems:
        raise CheckpointError("retaining heads do not fit the model: " + "; ".join(problems))
    return {layer: (parts["fc1"], parts["fc2"]) for layer, parts in found.items()}


def shard_for_tp(full_state: Mapping[str, Tensor], spec: ModelSpec, tp_rank: int, tp_size: int) -> Dict[str, Tensor]:
    """This tensor-parallel rank's shard of the full Megatron state.

    * ``linear_qkv`` weight and bias: a contiguous chunk of rows (rows are group-interleaved,
      so each rank gets whole query groups with their q, k and v heads);
    * ``linear_proj``, ``linear_fc2``: a chunk of columns;
    * ``linear_fc1``: ``[gate chunk; up chunk]`` (Megatron's GLU takes ``chunk(2)`` of the
      local output);
    * embedding and output layer: a chunk of rows of the vocabulary zero-padded to
      ``spec.padded_vocab(tp_size)``;
    * norms: replicated; retaining heads: ``megatron_apb.compress.shard_retaining_head``.
    """
    check_tp(spec, tp_rank, tp_size)
    padded = spec.padded_vocab(tp_size)
    check_full_state(full_state, spec, vocab_rows=(padded,))
    heads = retaining_pairs(full_state, spec)

    def rows(t):
        return t.chunk(tp_size, dim=0)[tp_rank]

    def cols(t):
        return t.chunk(tp_size, dim=1)[tp_rank]

    def vocab(t):
        if t.shape[0] < padded:
            t = torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])
        return rows(t)

    out: Dict[str, Tensor] = {}
    for name, t in full_state.items():
        if RETAINING_KEY.match(name):
            continue
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            out[name] = vocab(t)
        elif name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
            out[name] = rows(t)
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            out[name] = cols(t)
        elif name.endswith("linear_fc1.weight"):
            gate, up = t.chunk(2, dim=0)
            out[name] = torch.cat([rows(gate), rows(up)], dim=0)
        else:  # norms
            out[name] = t
    for layer, (fc1, fc2) in heads.items():
        p = f"decoder.layers.{layer}.self_attention.core_attention.retaining_head."
        out[p + "fc1.weight"], out[p + "fc2.weight"] = shard_retaining_head(
            fc1, fc2, num_heads=spec.num_attention_heads, num_kv_heads=spec.num_query_groups,
            head_dim=spec.kv_channels, tp_rank=tp_rank, tp_size=tp_size,
        )
    return {k: v.contiguous() for k, v in out.items()}
