"""Retaining heads as trainable modules beside a frozen model, and their checkpoints.

Heads are one :class:`~megatron_apb.compress.RetainingHead` per layer, holding this TP
rank's shard (the same shard the model's own compressor would hold), float32.  Files are
always full (unsharded) tensors, so a checkpoint written at one TP size loads at any:

* ``heads.safetensors``: the heads in the reference layout;
* ``optimizer.safetensors``: AdamW's ``exp_avg`` / ``exp_avg_sq`` in the same layout
  (key prefixes ``exp_avg.`` / ``exp_avg_sq.``);
* ``trainer_state.json``: step, configuration, history.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import torch
from safetensors.torch import load_file, save_file
import torch.distributed as dist

from ..comm import collective_device, group_rank, group_size
from ..compress import RetainingHead, init_retaining_head_, shard_retaining_head
from ..heads import (
    check_heads_fit,
    heads_from_state_dict,
    heads_state_dict,
    load_into_retaining_heads,
    read_retaining_heads,
    save_retaining_heads,
    unshard_retaining_head,
)
from ..megatron.setup import apb_modules

HEADS_FILE = "heads.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
STATE_FORMAT = "megatron_apb.retaining_head_trainer"
STATE_VERSION = 1


def build_retaining_heads(model, *, hidden: int = 1024, seed: int = 0) -> torch.nn.ModuleList:
    """Fresh float32 retaining heads for ``model``'s layers, on its device, on this TP rank.

    Initialised as a model built with ``APBConfig(compressor="retaining_head",
    retaining_head_hidden=hidden, seed=seed)`` initialises its own (seed + layer number),
    so "untrained heads" are the same at any TP size.
    """
    modules = apb_modules(model)
    if not modules:
        raise ValueError("the model has no APB attention modules; build it with the APB layer spec")
    device = next(model.parameters()).device
    heads = []
    for m in modules:
        tp = group_size(m.tp_group)
        head = RetainingHead(m.num_heads, m.num_kv_heads, m.head_dim, hidden=hidden, tp_group=m.tp_group, dtype=torch.float32)
        init_retaining_head_(
            head, seed=seed + m.layer_number, num_heads=m.num_heads * tp, num_kv_heads=m.num_kv_heads * tp,
            tp_rank=group_rank(m.tp_group), tp_size=tp,
        )
        heads.append(head.to(device))
    return torch.nn.ModuleList(heads)


def _counts(heads) -> Tuple[int, int, int, object]:
    h = heads[0]
    tp = group_size(h.tp_group)
    return h.num_heads * tp, h.num_kv_heads * tp, h.head_dim, h.tp_group


def gather_tensors(heads, tensors: List[Tuple[torch.Tensor, torch.Tensor]]) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """Full ``{layer: (fc1-shaped, fc2-shaped)}`` (CPU) from per-layer shards shaped like
    the heads' weights (the weights themselves or optimizer moments), gathered over TP."""
    num_heads, num_kv_heads, d, group = _counts(heads)
    tp = group_size(group)
    out = {}
    for i, pair in enumerate(tensors):
        shards = []
        for t in pair:
            if tp == 1:
                shards.append([t.detach().cpu()])
                continue
            wire = t.detach().contiguous().to(collective_device(group, t.device))
            parts = [torch.empty_like(wire) for _ in range(tp)]
            dist.all_gather(parts, wire, group=group)
            shards.append([p.cpu() for p in parts])
        out[i] = unshard_retaining_head(shards[0], shards[1], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=d)
    return out


def gather_retaining_heads(heads) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """The full (unsharded) weights ``{layer: (fc1, fc2)}`` on every TP rank (collective)."""
    return gather_tensors(heads, [(h.fc1.weight, h.fc2.weight) for h in heads])


def load_retaining_heads(heads, path_or_heads) -> None:
    """Load full heads (a safetensors file in either layout, or ``{layer: (fc1, fc2)}``)
    into ``heads`` as this TP rank's shards; errors name the missing layer or the width."""
    full = read_retaining_heads(path_or_heads) if isinstance(path_or_heads, (str, os.PathLike)) else path_or_heads
    num_heads, num_kv_heads, _, group = _counts(heads)
    load_into_retaining_heads(
        heads, full, num_heads=num_heads, num_kv_heads=num_kv_heads,
        tp_rank=group_rank(group), tp_size=group_size(group),
    )


def save_training_state(directory: str, heads, optimizer, *, step: int, config: dict, history: dict, write: bool) -> None:
    """Write heads, optimizer moments and ``trainer_state.json`` to ``directory``.

    Collective over TP (every rank calls it); only ranks with ``write`` touch the disk.
    """
    params = [(h.fc1.weight, h.fc2.weight) for h in heads]
    full = gather_tensors(heads, params)
    moments = {}
    for name in ("exp_avg", "exp_avg_sq"):
        shards = []
        for fc1, fc2 in params:
            s1, s2 = optimizer.state.get(fc1, {}), optimizer.state.get(fc2, {})
            shards.append((s1.get(name, torch.zeros_like(fc1)), s2.get(name, torch.zeros_like(fc2))))
        moments[name] = gather_tensors(heads, shards)
    if not write:
        return
    os.makedirs(directory, exist_ok=True)
    save_retaining_heads(os.path.join(directory, HEADS_FILE), full)
    flat = {}
    for name, tensors in moments.items():
        flat.update({f"{name}.{k}": v.contiguous() for k, v in heads_state_dict(tensors).items()})
    save_file(flat, os.path.join(directory, OPTIMIZER_FILE), metadata={"format": "pt"})
    meta = dict(format=STATE_FORMAT, version=STATE_VERSION, step=step, config=config, history=history,
                num_layers=len(heads), hidden=heads[0].fc1.out_features)
    tmp = os.path.join(directory, STATE_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(directory, STATE_FILE))


def load_training_state(directory: str, heads, optimizer) -> dict:
    """Load what :func:`save_training_state` wrote into ``heads`` and ``optimizer`` (this TP
    rank's shards); returns the JSON state (``step``, ``config``, ``history``)."""
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot resume: {path} does not exist (was {directory!r} written by train-heads?)")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r} v{meta.get('version')}, expected {STATE_FORMAT!r} v{STATE_VERSION}")
    if meta["num_layers"] != len(heads) or meta["hidden"] != heads[0].fc1.out_features:
        raise ValueError(
            f"cannot resume from {directory}: it holds {meta['num_layers']} heads {meta['hidden']} wide, "
            f"this run {len(heads)} heads {heads[0].fc1.out_features} wide; pass --hidden {meta['hidden']}"
        )
    load_retaining_heads(heads, os.path.join(directory, HEADS_FILE))
    flat = load_file(os.path.join(directory, OPTIMIZER_FILE))
    num_heads, num_kv_heads, d, group = _counts(heads)
    tp_rank, tp = group_rank(group), group_size(group)
    step = int(meta["step"])
    moments = {}
    for name in ("exp_avg", "exp_avg_sq"):
        prefix = name + "."
        full = heads_from_state_dict({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}, where=f"{OPTIMIZER_FILE} ({name})")
        check_heads_fit(full, num_layers=len(heads), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=d, hidden=meta["hidden"])
        moments[name] = [
            shard_retaining_head(*full[i], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=d, tp_rank=tp_rank, tp_size=tp)
            for i in range(len(heads))
        ]
    for i, h in enumerate(heads):
        for j, p in enumerate((h.fc1.weight, h.fc2.weight)):
            optimizer.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": moments["exp_avg"][i][j].to(p.device, p.dtype).contiguous(),
                "exp_avg_sq": moments["exp_avg_sq"][i][j].to(p.device, p.dtype).contiguous(),
            }
    return meta
