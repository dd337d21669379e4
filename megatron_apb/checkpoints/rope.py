"""RoPE settings of a Hugging Face config (:func:`rope_parameters`: ``rope_parameters`` of
transformers 5, or ``rope_theta`` + ``rope_scaling``) and YaRN's inverse frequencies
(:func:`yarn_inv_freq`)."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Sequence

import torch

from ..errors import UnsupportedModelError
from .families import SUPPORTED_ROPE_TYPES

Tensor = torch.Tensor


def yarn_inv_freq(inv_freq: Tensor, d: int, base: float, factor: float, original: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True) -> Tensor:
    """YaRN (Peng et al. 2023): frequencies that turn fewer than ``beta_slow`` times over
    the original context are interpolated (divided by the factor), those that turn more than
    ``beta_fast`` times are kept, with a linear ramp between the two dimensions."""

    def dim_of(rotations):  # the dimension whose frequency turns `rotations` times over `original`
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency, 0: interpolated
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def rope_parameters(get, max_pos: int, rope_types: Sequence[str] = SUPPORTED_ROPE_TYPES) -> Dict[str, Any]:
    """RoPE theta and scaling from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (transformers 4 and older config.json files); ``rope_types`` are the
    accepted ``rope_type`` values."""
    params = get("rope_parameters")
    field = "rope_parameters"
    if isinstance(params, Mapping) and params and all(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedModelError(f"per-layer-type rope_parameters {sorted(params)} are not supported")
    if not isinstance(params, Mapping) or not params:
        field = "rope_scaling"
        params = dict(get("rope_scaling") or {})
        params.setdefault("rope_theta", get("rope_theta", 10000.0))
    else:
        params = dict(params)
        if params.get("rope_theta") is None:
            params["rope_theta"] = get("rope_theta", 10000.0)
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    partial = params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported (only full RoPE)")
    if kind not in rope_types:
        raise UnsupportedModelError(f"{field} rope_type={kind!r} is not supported; supported: {', '.join(rope_types)}")
    out: Dict[str, Any] = {"rope_theta": float(params["rope_theta"]), "rope_scaling_type": None}
    if kind == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if params.get(k) is None]
        if missing:
            raise UnsupportedModelError(f"{field} (llama3) lacks {missing}")
        out.update(
            rope_scaling_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings") or max_pos),
        )
    elif kind == "linear":
        if params.get("factor") is None:
            raise UnsupportedModelError(f"{field} (linear) lacks 'factor'")
        out.update(rope_scaling_type="linear", factor=float(params["factor"]))
    elif kind == "yarn":
        if params.get("mscale") or params.get("mscale_all_dim"):
            raise UnsupportedModelError(f"{field} (yarn) mscale / mscale_all_dim are not supported")
        original = params.get("original_max_position_embeddings") or max_pos
        factor = params.get("factor") or max_pos / original
        out.update(
            rope_scaling_type="yarn", factor=float(factor), original_max_position_embeddings=int(original),
            beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
            truncate=bool(params.get("truncate", True)),
        )
    return out
