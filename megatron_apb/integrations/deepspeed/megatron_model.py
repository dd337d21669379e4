"""A Megatron-Core ``GPTModel`` under DeepSpeed inference: APB attention swapped into a
model built with Megatron's own layer spec, or a model built with the APB spec checked;
trained retaining heads copied in (this TP rank's shards)."""

from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention

from ...comm import group_rank, group_size
from ...compress import shard_retaining_head
from ...config import APBConfig
from ...errors import APBConfigError
from ...heads import read_retaining_heads
from ...megatron import APBCoreAttention, APBSelfAttention, apb_modules
from .config import APBSection, section_error, tp_size_of
from .groups import make_groups, ranks


def setup_megatron_model(model, section: APBSection, ds_config, cp_group, tp_group):
    """Put APB attention into ``model`` (or check the one it has) and load the section's
    heads.  Returns ``(apb_config the engine runs with, cp_group, tp_group)``."""
    tp_size = tp_size_of(ds_config)
    if tp_size != 1 or ds_config.get("injection_policy"):
        raise APBConfigError(
            f"DeepSpeed config: tensor_parallel.tp_size={tp_size}"
            + (" and an injection_policy" if ds_config.get("injection_policy") else "")
            + " for a Megatron-Core model: Megatron already splits its layers over its TP group "
            "(build the model with tensor_model_parallel_size=N); set tp_size to 1 and drop "
            "injection_policy"
        )
    model_tp = tp_group if tp_group is not None else model.pg_collection.tp
    existing = apb_modules(model)
    if existing and cp_group is None:
        cp_group = existing[0].cp_group
    cp_group, model_tp = make_groups(group_size(model_tp), section.cp_size, cp_group, model_tp)
    if existing:
        check_existing(existing, cp_group, section)
        engine_config = section.apb_config
        if section.heads is not None:
            engine_config = load_heads(model, existing, section, model_tp)
    else:
        engine_config = swap_in_apb(model, section, cp_group, model_tp)
    return engine_config, cp_group, model_tp


def check_existing(modules, cp_group, section: APBSection):
    """A model built with the APB spec must agree with the section."""
    core = modules[0]
    if ranks(core.cp_group) != ranks(cp_group):
        raise APBConfigError(
            f"the model's APB attention runs over CP ranks {ranks(core.cp_group)}, not "
            f"{ranks(cp_group)}: build it with the CP group you pass, or pass none"
        )
    if section.cp_size is not None and group_size(core.cp_group) != section.cp_size:
        raise section_error(
            f"cp_size={section.cp_size} but the model was built with APB over "
            f"{group_size(core.cp_group)} CP ranks"
        )
    if section.apb_config.needs_retaining_heads and core.retaining_head is None:
        raise section_error(
            'compressor "retaining_head" but the model was built without retaining heads; '
            "build it with APBConfig(compressor='retaining_head') or use query_attention"
        )


def heads_for_model(model, section: APBSection, tp_group):
    """This TP rank's shards of the heads file, per layer, checked against the model."""
    heads = read_retaining_heads(section.heads)
    c = model.config
    layers = list(model.decoder.layers)
    missing = sorted(set(range(len(layers))) - set(heads))
    if missing:
        raise section_error(f"the retaining-head checkpoint {section.heads} lacks layers {missing}")
    shards = {}
    for i in range(len(layers)):
        try:
            shards[i] = shard_retaining_head(
                *heads[i], num_heads=c.num_attention_heads, num_kv_heads=c.num_query_groups,
                head_dim=c.kv_channels, tp_rank=group_rank(tp_group), tp_size=group_size(tp_group),
            )
        except ValueError as exc:
            raise section_error(f"heads file {section.heads}, layer {i}: {exc}") from None
    return shards


def copy_heads(cores, shards, section: APBSection):
    with torch.no_grad():
        for i, core in enumerate(cores):
            fc1, fc2 = shards[i]
            if core.retaining_head.fc1.weight.shape != fc1.shape:
                raise section_error(
                    f"heads file {section.heads}: layer {i} fc1 shard {tuple(fc1.shape)} does not "
                    f"fit the model's retaining head {tuple(core.retaining_head.fc1.weight.shape)} "
                    "(hidden width differs)"
                )
            core.retaining_head.fc1.weight.copy_(fc1)
            core.retaining_head.fc2.weight.copy_(fc2)


def load_heads(model, cores, section: APBSection, tp_group) -> APBConfig:
    """The section's heads into a model built with retaining heads."""
    if any(c.retaining_head is None for c in cores):
        raise section_error(
            f"heads {section.heads} given but the model was built without retaining heads; build it "
            "with APBConfig(compressor='retaining_head', retaining_head_hidden=<the file's width>)"
        )
    copy_heads(cores, heads_for_model(model, section, tp_group), section)
    return section.apb_config.replace(retaining_head_hidden=cores[0].retaining_head.fc1.weight.shape[0])


def swap_in_apb(model, section: APBSection, cp_group, tp_group) -> APBConfig:
    """Put APB attention into every layer of a GPTModel built with Megatron's own spec."""
    apb_config = section.apb_config
    shards = None
    if apb_config.needs_retaining_heads:
        shards = heads_for_model(model, section, tp_group)
        apb_config = apb_config.replace(retaining_head_hidden=int(shards[0][0].shape[0]))
    layers = list(model.decoder.layers)
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attention", None)
        if type(attn) is not SelfAttention:
            raise APBConfigError(
                f"layer {i}: cannot swap APB attention into {type(attn).__name__}; init_inference "
                "takes GPTModels whose layers use Megatron's SelfAttention (or built with "
                "megatron_apb.get_gpt_layer_apb_spec)"
            )
    # Megatron sizes rotary tables and checks from context_parallel_size; the config object
    # is shared by every module of the model
    model.config.context_parallel_size = group_size(cp_group)
    pg = ProcessGroupCollection(tp=tp_group, cp=cp_group)
    cores = []
    for layer in layers:
        attn = layer.self_attention
        device = next(attn.parameters()).device
        core = APBCoreAttention(
            config=attn.config, layer_number=attn.layer_number, attn_mask_type=attn.attn_mask_type,
            attention_type="self", pg_collection=pg, apb_config=apb_config,
        ).to(device)
        attn.core_attention = core
        attn.__class__ = APBSelfAttention  # a SelfAttention that hands RoPE to the core
        cores.append(core)
    if shards is not None:
        copy_heads(cores, shards, section)
    return apb_config
