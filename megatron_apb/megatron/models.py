"""Building Megatron-Core GPT models with APB attention, and their process groups."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import APBConfig
from .setup import prepare_model
from .spec import get_gpt_layer_apb_spec


def rank_grid_groups(tp_size: int, cp_size: int):
    """Process groups of a ``[dp, pp=1, cp, tp]`` rank grid over the default group.

    Ranks are laid out as ``arange(world).view(dp, cp, tp)`` (TP fastest, as Megatron).
    Every rank must call this, in the same order, since each group is created collectively.
    Returns a Megatron ``ProcessGroupCollection`` with ``tp``, ``cp``, ``pp``, ``embd`` and
    ``dp`` for this rank.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp_size * cp_size) != 0:
        raise ValueError(
            f"world size {world} is not a multiple of tp ({tp_size}) x cp ({cp_size})"
        )
    grid = torch.arange(world).view(world // (tp_size * cp_size), cp_size, tp_size)
    groups = {}

    options = {}
    if dist.get_backend() == "nccl":
        # high-priority NCCL streams: the passing-block gather is scheduled ahead of the
        # attention kernels it overlaps with instead of waiting for free SMs
        options["pg_options"] = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)

    def pick(name, lines):
        for line in lines:
            ranks = line.tolist()
            group = dist.new_group(ranks, **options)
            if rank in ranks:
                groups[name] = group

    pick("tp", grid.reshape(-1, tp_size))
    pick("cp", grid.permute(0, 2, 1).reshape(-1, cp_size))
    pick("dp", grid.permute(1, 2, 0).reshape(-1, grid.shape[0]))
    pick("pp", torch.arange(world).view(-1, 1))
    return ProcessGroupCollection(
        tp=groups["tp"], cp=groups["cp"], dp=groups["dp"], pp=groups["pp"], embd=groups["pp"]
    )


def build_gpt_model(
    transformer_config,
    apb_config: Optional[APBConfig] = None,
    *,
    vocab_size: int,
    max_sequence_length: int,
    pg_collection=None,
    base_spec=None,
    fused_norm: Optional[bool] = None,
    **gpt_kwargs,
):
    """A Megatron ``GPTModel`` with APB attention, ready for context parallelism.

    ``gpt_kwargs`` go to ``GPTModel`` (e.g. ``rotary_base``, ``rope_scaling``,
    ``share_embeddings_and_output_weights``, ``parallel_output``);
    ``position_embedding_type`` defaults to ``'rope'``.  ``fused_norm``: see
    :func:`~megatron_apb.megatron.spec.get_gpt_layer_apb_spec`.
    """
    spec = get_gpt_layer_apb_spec(
        apb_config,
        base_spec,
        normalization=transformer_config.normalization,
        qk_layernorm=getattr(transformer_config, "qk_layernorm", False),
        fused_norm=fused_norm,
    )
    gpt_kwargs.setdefault("position_embedding_type", "rope")
    if pg_collection is not None:
        gpt_kwargs["pg_collection"] = pg_collection
    model = GPTModel(
        transformer_config,
        spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        **gpt_kwargs,
    )
    return prepare_model(model)


def tiny_transformer_config(**overrides):
    """A small Llama-style TransformerConfig (RMSNorm, SwiGLU, GQA, no biases), fp32.

    For tests and CPU examples; any field can be overridden.
    """
    fields = dict(
        num_layers=2,
        hidden_size=96,
        num_attention_heads=12,
        num_query_groups=4,
        ffn_hidden_size=192,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=1e-5,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)
