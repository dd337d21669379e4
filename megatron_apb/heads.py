"""Retaining-head checkpoints in the reference layout (safetensors, per layer ``fc1``/``fc2``):
reading, writing, converting to and from Megatron names, and (un)sharding for TP.

Accepted key names: any key containing ``layers.<i>.`` and ending in ``fc1.weight`` or
``fc2.weight`` (e.g. ``model.layers.3.self_attn.fc1.weight`` or ``layers.3.fc1.weight``).
``fc1.weight`` is [hidden, (heads + 2 kv_heads) head_dim], ``fc2.weight`` [kv_heads, hidden],
for the whole model (not TP-sharded).

Files are written atomically (a save killed midway leaves the previous file) and read
checked: a damaged file, or NaN / inf weights, raise :class:`~megatron_apb.errors.CheckpointError`
naming the file, layer and tensor.  :func:`load_safetensors` is the checked reader the
other checkpoint readers share.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atomic import Report, atomic_file, recover
from .compress import shard_retaining_head
from .errors import CheckpointError

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\..*(fc[12])\.weight$")
#: what to do about a damaged retaining-head file
HEADS_REMEDY = "re-convert or re-download it, or train the heads again (train-heads)"


# ------------------------------------------------------------------ safetensors, checked
def _safetensors_problem(path: str) -> Optional[str]:
    """What is wrong with a safetensors file that failed to load, from its header, naming
    the tensors cut off when it is truncated; None when the header looks sound."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"it has {size} bytes, too few for a safetensors header (empty or truncated)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return (f"its header claims {length} bytes but the file has {size}: it is truncated, "
                    "or not a safetensors file")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        ends = {k: int(v["data_offsets"][1]) for k, v in entries.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "its header is not a valid safetensors header: not a safetensors file, or damaged"
    data = size - 8 - length
    cut = sorted((k for k, end in ends.items() if end > data), key=ends.get)
    if cut:
        more = f" and {len(cut) - 5} more" if len(cut) > 5 else ""
        return (f"it is truncated: {data} bytes of tensor data where the header needs {max(ends.values())}; "
                f"tensors cut off: {', '.join(cut[:5])}{more}")
    return None


def _safetensors_error(path: str, what: str, remedy: str, exc: Exception) -> CheckpointError:
    try:
        problem = _safetensors_problem(path) or f"{type(exc).__name__}: {exc}"
    except OSError as io_error:
        problem = f"{type(io_error).__name__}: {io_error}"
    return CheckpointError(f"cannot read {what} {path}: {problem}; {remedy}")


def load_safetensors(path: str, *, what: str = "the checkpoint file", remedy: str = "re-download or re-convert it") -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a damaged file (truncated, garbage) raises
    :class:`CheckpointError` naming it, the tensors cut off when known, and ``remedy``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return load_file(path)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as exc:  # safetensors' own error type, OSError, ...
        raise _safetensors_error(path, what, remedy, exc) from exc


def safetensors_metadata(path: str, *, what: str = "the checkpoint file", remedy: str = "re-download or re-convert it") -> Dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (its header only), checked as
    :func:`load_safetensors` checks."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as exc:
        raise _safetensors_error(path, what, remedy, exc) from exc


# ------------------------------------------------------------------------ reading heads
def check_finite(tensor: torch.Tensor, where: str, layer: int, part: str, key: Optional[str] = None) -> None:
    """Raise :class:`CheckpointError` naming the layer and tensor when ``tensor`` holds NaN
    or infinite values (a diverged training run, or a damaged file)."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    name = f"{part}.weight" + (f" ({key})" if key else "")
    raise CheckpointError(
        f"{where}: layer {layer} {name} holds {nan} NaN and {inf} inf values; these heads are unusable "
        "(training diverged or the file is damaged): use an earlier checkpoint or train them again"
    )


def read_retaining_heads(path: str, *, report: Report = None) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """``{layer index: (fc1, fc2)}`` from a safetensors file (no pickle).

    Leftovers of an interrupted save of ``path`` are resolved first (and reported,
    :func:`megatron_apb.atomic.recover`).  A damaged file, one without retaining heads, or
    non-finite weights raise :class:`CheckpointError` naming the file (layer, tensor)."""
    path = os.fspath(path)
    recover(path, report=report)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"retaining-head checkpoint {path!r} does not exist")
    tensors = load_safetensors(path, what="the retaining-head checkpoint", remedy=HEADS_REMEDY)
    return heads_from_state_dict(tensors, where=path)


def heads_from_state_dict(tensors, where: str = "the state dict") -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """``{layer index: (fc1, fc2)}`` from the accepted key names of ``tensors`` (others
    ignored); :class:`CheckpointError` when none are there, a layer lacks one, or a
    weight is not finite."""
    found: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m:
            layer, part = int(m.group(1)), m.group(2)
            check_finite(tensor, where, layer, part, key)
            found.setdefault(layer, {})[part] = tensor
    if not found:
        raise CheckpointError(f"{where}: no 'layers.<i>.…fc1.weight' / 'fc2.weight' keys found")
    incomplete = sorted(i for i, d in found.items() if set(d) != {"fc1", "fc2"})
    if incomplete:
        raise CheckpointError(f"{where}: layers {incomplete} lack fc1 or fc2")
    return {i: (d["fc1"], d["fc2"]) for i, d in sorted(found.items())}


def heads_to_megatron(heads, *, num_layers, num_heads, num_kv_heads, head_dim):
    """Megatron state-dict entries (full, unsharded) for the retaining heads, checked."""
    missing = sorted(set(range(num_layers)) - set(heads))
    if missing:
        raise ValueError(f"the retaining-head checkpoint lacks layers {missing}")
    out = {}
    width = (num_heads + 2 * num_kv_heads) * head_dim
    for i in range(num_layers):
        fc1, fc2 = heads[i]
        if fc1.shape[1] != width or fc2.shape[0] != num_kv_heads or fc2.shape[1] != fc1.shape[0]:
            raise ValueError(
                f"layer {i}: retaining head fc1 {tuple(fc1.shape)} / fc2 {tuple(fc2.shape)} do not "
                f"fit this model (fc1 needs {width} inputs, fc2 {num_kv_heads} outputs)"
            )
        prefix = f"decoder.layers.{i}.self_attention.core_attention.retaining_head."
        out[prefix + "fc1.weight"], out[prefix + "fc2.weight"] = fc1, fc2
    return out


# ------------------------------------------------------------------- writing, converting
REFERENCE_KEY = "model.layers.{}.self_attn.{}.weight"
MEGATRON_KEY = "decoder.layers.{}.self_attention.core_attention.retaining_head.{}.weight"
LAYOUTS = {"reference": REFERENCE_KEY, "megatron": MEGATRON_KEY}


def heads_state_dict(heads, layout: str = "reference") -> Dict[str, torch.Tensor]:
    """``{layer: (fc1, fc2)}`` as a flat state dict under the names of ``layout``.

    ``layout``: ``"reference"`` (``model.layers.<i>.self_attn.fc1.weight``, what
    :func:`read_retaining_heads` and the reference implementation read) or ``"megatron"``
    (``decoder.layers.<i>.self_attention.core_attention.retaining_head.fc1.weight``, the
    names inside a GPTModel built with the retaining-head compressor).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    key = LAYOUTS[layout]
    out = {}
    for i, (fc1, fc2) in sorted(heads.items()):
        if fc1.dim() != 2 or fc2.dim() != 2 or fc2.shape[1] != fc1.shape[0]:
            raise ValueError(
                f"layer {i}: fc1 {tuple(fc1.shape)} / fc2 {tuple(fc2.shape)} are not a retaining "
                "head (fc1 [hidden, inputs], fc2 [kv_heads, hidden])"
            )
        out[key.format(i, "fc1")] = fc1
        out[key.format(i, "fc2")] = fc2
    return out


def write_retaining_heads(path: str, heads, *, layout: str = "reference", dtype=None, metadata=None) -> str:
    """:func:`save_retaining_heads` without the atomic replace: for a file inside a
    directory that is itself written atomically (:func:`megatron_apb.atomic.atomic_directory`)."""
    tensors = {
        k: (v.detach().to("cpu", dtype) if dtype is not None else v.detach().cpu()).contiguous().clone()
        for k, v in heads_state_dict(heads, layout).items()
    }
    save_file(tensors, path, metadata={**(metadata or {}), "format": "pt", "layout": layout})
    return path


def save_retaining_heads(path: str, heads, *, layout: str = "reference", dtype=None, metadata=None,
                         report: Report = None) -> str:
    """Write full (unsharded) heads ``{layer: (fc1, fc2)}`` as safetensors; returns ``path``.

    The default layout is the reference one; :func:`read_retaining_heads` reads either
    layout back bit-exactly (``dtype``, if given, casts first).  ``metadata``: extra
    strings for the file's header.  The file is replaced atomically: a save killed midway
    leaves the previous file (:func:`megatron_apb.atomic.atomic_file`).
    """
    heads_state_dict(heads, layout)  # check the layout and shapes before touching the disk
    with atomic_file(path, report=report) as tmp:
        write_retaining_heads(tmp, heads, layout=layout, dtype=dtype, metadata=metadata)
    return path


def megatron_to_heads(state) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (fc1, fc2)}`` from a Megatron state dict (full, TP = 1); other keys ignored."""
    pattern = re.compile(r"^decoder\.layers\.\d+\.self_attention\.core_attention\.retaining_head\.fc[12]\.weight$")
    return heads_from_state_dict({k: v for k, v in state.items() if pattern.match(k)}, where="the Megatron state dict")


def convert_retaining_heads(src: str, dst: str, *, to: str = "reference") -> Dict[str, int]:
    """Rewrite the retaining heads of safetensors file ``src`` into ``dst`` under the names
    of layout ``to`` (``"reference"`` or ``"megatron"``); the tensors are copied unchanged.

    Reads any name :func:`read_retaining_heads` accepts (so a Megatron-named file, or a
    whole converted checkpoint's ``model.safetensors``, works as ``src``).  Returns
    ``{"layers": n, "hidden": width}``.
    """
    heads = read_retaining_heads(src)
    save_retaining_heads(dst, heads, layout=to)
    return {"layers": len(heads), "hidden": int(next(iter(heads.values()))[0].shape[0])}


def check_heads_fit(heads, *, num_layers, num_heads, num_kv_heads, head_dim, hidden=None):
    """Raise ``ValueError`` naming the layer when full heads do not fit the model (or,
    if given, a retaining-head width ``hidden``)."""
    heads_to_megatron(heads, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    extra = sorted(set(heads) - set(range(num_layers)))
    if extra:
        raise ValueError(f"the retaining-head checkpoint has layers {extra}, the model only {num_layers}")
    if hidden is not None:
        widths = sorted({int(fc1.shape[0]) for fc1, _ in heads.values()})
        if widths != [hidden]:
            raise ValueError(
                f"the retaining heads are {widths[0] if len(widths) == 1 else widths} wide but "
                f"{hidden} was asked for; pass --hidden {widths[0]} (or start from fresh heads)"
            )


def unshard_retaining_head(fc1_shards, fc2_shards, *, num_heads, num_kv_heads, head_dim):
    """Full (fc1, fc2) from the TP shards of every rank, in rank order: the inverse of
    :func:`megatron_apb.compress.shard_retaining_head` (``num_heads``/``num_kv_heads``:
    whole-model counts)."""
    tp = len(fc1_shards)
    hq, hk = num_heads // tp * head_dim, num_kv_heads // tp * head_dim
    q = torch.cat([s[:, :hq] for s in fc1_shards], dim=1)
    k = torch.cat([s[:, hq : hq + hk] for s in fc1_shards], dim=1)
    v = torch.cat([s[:, hq + hk :] for s in fc1_shards], dim=1)
    return torch.cat([q, k, v], dim=1), torch.cat(list(fc2_shards), dim=0)


def load_into_retaining_heads(modules, heads, *, num_heads, num_kv_heads, tp_rank=0, tp_size=1):
    """Copy full heads ``{layer: (fc1, fc2)}`` into ``modules`` (one
    :class:`~megatron_apb.compress.RetainingHead` per layer, in layer order) as this TP
    rank's shards.  ``num_heads``/``num_kv_heads`` count the whole model.  Raises
    ``ValueError`` naming the layer when a head does not fit (missing layer, other width,
    other head counts)."""
    modules = list(modules)
    if not modules:
        raise ValueError("no retaining-head modules to load into")
    for i, (fc1, fc2) in sorted(heads.items()):
        check_finite(fc1, "the retaining heads to load", i, "fc1")
        check_finite(fc2, "the retaining heads to load", i, "fc2")
    head_dim, hidden = modules[0].head_dim, modules[0].fc1.out_features
    check_heads_fit(
        heads, num_layers=len(modules), num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, hidden=hidden,
    )
    with torch.no_grad():
        for i, module in enumerate(modules):
            fc1, fc2 = shard_retaining_head(
                *heads[i], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                tp_rank=tp_rank, tp_size=tp_size,
            )
            module.fc1.weight.copy_(fc1)
            module.fc2.weight.copy_(fc2)
    return modules
