"""Making a model that Megatron-LM built with the APB spec ready for APB: the unsliced
rotary table (:func:`megatron_apb.megatron.prepare_model`) and the trained retaining heads
of ``--apb-heads`` / ``APB_HEADS``."""

from __future__ import annotations

import os

import torch

from ...comm import group_rank, group_size
from ...compress import shard_retaining_head
from ...errors import APBConfigError
from ...heads import read_retaining_heads
from ...megatron import apb_modules, prepare_model
from .args import HEADS_ENV


def unwrap(model):
    """The GPTModel inside Megatron-LM's wrappers (``Float16Module``, DDP)."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def load_apb_heads(model, path: str) -> int:
    """Copy a retaining-head checkpoint (reference layout, full model) into the APB layers
    of ``model`` (this rank's TP shard).  Returns the number of layers loaded."""
    heads = read_retaining_heads(path)
    cores = apb_modules(model)
    if not cores or any(c.retaining_head is None for c in cores):
        raise APBConfigError(
            f"--apb-heads {path}: the model has no retaining heads; build it with "
            "--apb-compressor retaining_head (and --apb-retaining-head-hidden = the file's width)"
        )
    c = unwrap(model).config
    with torch.no_grad():
        for i, core in enumerate(cores):
            if i not in heads:
                raise APBConfigError(f"--apb-heads {path} lacks layer {i}")
            fc1, fc2 = shard_retaining_head(
                *heads[i], num_heads=c.num_attention_heads, num_kv_heads=c.num_query_groups,
                head_dim=c.kv_channels, tp_rank=group_rank(core.tp_group), tp_size=group_size(core.tp_group),
            )
            core.retaining_head.fc1.weight.copy_(fc1)
            core.retaining_head.fc2.weight.copy_(fc2)
    return len(cores)


def prepare_megatron_lm_model(model, args=None):
    """Make a GPTModel built by Megatron-LM with the APB spec ready for APB:
    ``megatron_apb.megatron.prepare_model`` (unsliced rotary table, shared layout check)
    and the retaining heads of ``--apb-heads`` (or ``APB_HEADS``).  A model without APB
    layers is returned untouched.  Returns ``model``."""
    if not apb_modules(model):
        return model
    prepare_model(model)
    heads = getattr(args, "apb_heads", None) if args is not None else None
    heads = heads or os.environ.get(HEADS_ENV)
    if heads:
        load_apb_heads(model, heads)
    return model
