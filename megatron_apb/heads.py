"""Retaining-head checkpoints in the reference layout (safetensors, per layer ``fc1``/``fc2``).

Accepted key names: any key containing ``layers.<i>.`` and ending in ``fc1.weight`` or
``fc2.weight`` (e.g. ``model.layers.3.self_attn.fc1.weight`` or ``layers.3.fc1.weight``).
``fc1.weight`` is [hidden, (heads + 2 kv_heads) head_dim], ``fc2.weight`` [kv_heads, hidden],
for the whole model (not TP-sharded).
"""

from __future__ import annotations

import os
import re
from typing import Dict, Tuple

import torch

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\..*(fc[12])\.weight$")


def read_retaining_heads(path: str) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """``{layer index: (fc1, fc2)}`` from a safetensors file (no pickle)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"retaining-head checkpoint {path!r} does not exist")
    from safetensors.torch import load_file

    found: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(path).items():
        m = _KEY.search(key)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
    if not found:
        raise ValueError(f"{path}: no 'layers.<i>.…fc1.weight' / 'fc2.weight' keys found")
    incomplete = sorted(i for i, d in found.items() if set(d) != {"fc1", "fc2"})
    if incomplete:
        raise ValueError(f"{path}: layers {incomplete} lack fc1 or fc2")
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
