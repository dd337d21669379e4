"""The ``qwen2`` family (Qwen2, Qwen2.5): Llama's tensor names plus q/k/v biases; the
sliding window is switched on by ``use_sliding_window`` (refused when on)."""

from __future__ import annotations

from .base import ModelFamily, register_family
from .llama import LLAMA_KEYS

QWEN2 = register_family(
    ModelFamily(name="qwen2", keys=LLAMA_KEYS, qkv_bias=True, sliding_window_flag="use_sliding_window")
)
