"""Retaining heads as trainable modules beside a frozen model, and their checkpoints.

Heads are one :class:`~megatron_apb.compress.RetainingHead` per layer, holding this TP
rank's shard (the same shard the model's own compressor would hold), float32.  Files are
always full (unsharded) tensors, so a checkpoint written at one TP size loads at any:

* ``heads.safetensors``: the heads in the reference layout;
* ``optimizer.safetensors``: AdamW's ``exp_avg`` / ``exp_avg_sq`` in the same layout
  (key prefixes ``exp_avg.`` / ``exp_avg_sq.``);
* ``trainer_state.json``: step, configuration, history.

The directory is written whole or not at all (:func:`megatron_apb.atomic.atomic_directory`:
into a sibling ``DIR.tmp-…``, fsync'ed, then renamed into place; other files in ``DIR``,
such as ``train_log.json``, are kept).  Both safetensors files carry the step in their
metadata, and resuming refuses a directory whose parts disagree.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import torch
from safetensors.torch import save_file
import torch.distributed as dist

from ..atomic import Report, atomic_directory, recover
from ..comm import collective_device, group_rank, group_size
from ..compress import RetainingHead, init_retaining_head_, shard_retaining_head
from ..errors import CheckpointError
from ..heads import (
    check_heads_fit,
    heads_from_state_dict,
    heads_state_dict,
    load_into_retaining_heads,
    load_safetensors,
    read_retaining_heads,
    safetensors_metadata,
    unshard_retaining_head,
    write_retaining_heads,
)
from ..megatron.setup import apb_modules

HEADS_FILE = "heads.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
STATE_FORMAT = "megatron_apb.retaining_head_trainer"
STATE_VERSION = 1
#: what to do about a damaged training checkpoint
REMEDY = "resume from another checkpoint (an earlier --output directory), or start afresh without --resume"


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


def save_training_state(directory: str, heads, optimizer, *, step: int, config: dict, history: dict, write: bool,
                        report: Report = None) -> None:
    """Write heads, optimizer moments and ``trainer_state.json`` to ``directory``, atomically:
    a save killed midway leaves the previous checkpoint whole (leftovers are resolved by
    the next save or load, and reported through ``report``; default: a warning).

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
    stamp = {"step": str(int(step))}
    flat = {}
    for name, tensors in moments.items():
        flat.update({f"{name}.{k}": v.contiguous() for k, v in heads_state_dict(tensors).items()})
    meta = dict(format=STATE_FORMAT, version=STATE_VERSION, step=step, config=config, history=history,
                num_layers=len(heads), hidden=heads[0].fc1.out_features)
    # the ".tmp" name is what saves before atomic directories left behind
    with atomic_directory(directory, keep_others=True, drop=(STATE_FILE + ".tmp",), report=report) as tmp:
        write_retaining_heads(os.path.join(tmp, HEADS_FILE), full, metadata=stamp)
        save_file(flat, os.path.join(tmp, OPTIMIZER_FILE), metadata={**stamp, "format": "pt"})
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)


def _read_state(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot resume: {path} is not valid JSON ({exc}); {REMEDY}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"cannot resume: {path} holds no JSON object; {REMEDY}")
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} v{meta.get('version')}, expected {STATE_FORMAT!r} v{STATE_VERSION}")
    missing = [k for k in ("step", "num_layers", "hidden", "history") if k not in meta]
    if missing:
        raise CheckpointError(f"cannot resume: {path} lacks {missing}; {REMEDY}")
    return meta


def _check_steps(directory: str, step: int) -> None:
    """Every part of the checkpoint from the same step (files without a step, written
    before steps were recorded, pass)."""
    steps = {STATE_FILE: step}
    for name in (HEADS_FILE, OPTIMIZER_FILE):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"cannot resume from {directory}: {name} is missing (an incomplete checkpoint); {REMEDY}")
        found = safetensors_metadata(path, what="the training checkpoint file", remedy=REMEDY).get("step")
        if found is not None:
            if not found.isdigit():
                raise CheckpointError(f"cannot resume: {path} records step {found!r}, not a number; {REMEDY}")
            steps[name] = int(found)
    if len(set(steps.values())) > 1:
        parts = ", ".join(f"{name} step {s}" for name, s in steps.items())
        raise CheckpointError(
            f"cannot resume from {directory}: its parts come from different steps ({parts}); a save was "
            f"interrupted or files were copied in from another checkpoint; {REMEDY}"
        )


def load_training_state(directory: str, heads, optimizer, *, report: Report = None) -> dict:
    """Load what :func:`save_training_state` wrote into ``heads`` and ``optimizer`` (this TP
    rank's shards); returns the JSON state (``step``, ``config``, ``history``).

    Leftovers of an interrupted save are resolved first (reported through ``report``).  A
    damaged file, a missing part or parts of different steps raise :class:`CheckpointError`
    naming the files."""
    recover(directory, report=report)
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot resume: {path} does not exist (was {directory!r} written by train-heads?)")
    meta = _read_state(path)
    if meta["num_layers"] != len(heads) or meta["hidden"] != heads[0].fc1.out_features:
        raise CheckpointError(
            f"cannot resume from {directory}: it holds {meta['num_layers']} heads {meta['hidden']} wide, "
            f"this run {len(heads)} heads {heads[0].fc1.out_features} wide; pass --hidden {meta['hidden']}"
        )
    _check_steps(directory, int(meta["step"]))
    heads_path = os.path.join(directory, HEADS_FILE)
    full = heads_from_state_dict(
        load_safetensors(heads_path, what="the training checkpoint file", remedy=REMEDY), where=heads_path)
    load_retaining_heads(heads, full)
    opt_path = os.path.join(directory, OPTIMIZER_FILE)
    flat = load_safetensors(opt_path, what="the training checkpoint file", remedy=REMEDY)
    num_heads, num_kv_heads, d, group = _counts(heads)
    tp_rank, tp = group_rank(group), group_size(group)
    step = int(meta["step"])
    moments = {}
    for name in ("exp_avg", "exp_avg_sq"):
        prefix = name + "."
        full = heads_from_state_dict({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}, where=f"{opt_path} ({name})")
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
