"""The per-rank KV cache of distributed generation.

After the APB prefill each CP rank keeps the post-RoPE K and V of its own document block
only (never the anchor, never the passing block), without the padding that ends the last
block.  During phase 2 one rank, the *owner* (the last), also appends the K and V of the
query and generated tokens.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

Tensor = torch.Tensor


class CPKVCache:
    """K/V per layer for this rank: ``keys[layer]`` [batch, tokens, kv_heads, head_dim].

    Args:
        valid_len: document tokens of this rank's block that are real (not padding).
        owner: whether this rank appends the K/V of phase-2 tokens.
    """

    def __init__(self, valid_len: int, owner: bool):
        if valid_len < 0:
            raise ValueError(f"valid_len must be >= 0, got {valid_len}")
        self.valid_len, self.owner = valid_len, owner
        self.keys: Dict[int, Tensor] = {}
        self.values: Dict[int, Tensor] = {}

    def store_prefill(self, layer: int, k: Tensor, v: Tensor):
        """Keep the block rows of a prefill (padding dropped)."""
        self.keys[layer] = k[:, : self.valid_len].contiguous()
        self.values[layer] = v[:, : self.valid_len].contiguous()

    def append(self, layer: int, k: Tensor, v: Tensor):
        """Append phase-2 tokens (owner only)."""
        if not self.owner:
            raise RuntimeError("only the owner rank appends phase-2 tokens to its cache")
        self.keys[layer] = torch.cat([self.keys[layer], k], dim=1)
        self.values[layer] = torch.cat([self.values[layer], v], dim=1)

    def get(self, layer: int) -> Tuple[Tensor, Tensor]:
        if layer not in self.keys:
            raise KeyError(f"no cached K/V for layer {layer}: run the prefill first")
        return self.keys[layer], self.values[layer]

    def tokens(self) -> int:
        """Tokens cached per layer on this rank."""
        return next(iter(self.keys.values())).shape[1] if self.keys else 0
