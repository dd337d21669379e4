"""Rotary embeddings at each token's true position, for contiguous CP blocks plus an anchor.

Megatron's ``RotaryEmbedding`` hands each CP rank the rows of its zig-zag chunks
(``get_pos_emb_on_this_cp_rank``).  APB ranks instead hold a contiguous block plus an
anchor at positions 0..anchor-1, so the APB attention takes the *whole* table
(:func:`disable_zigzag_rope` stops the slicing) and indexes it at its own positions.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

Tensor = torch.Tensor


def disable_zigzag_rope(model: torch.nn.Module) -> int:
    """Make every Megatron ``RotaryEmbedding`` in ``model`` return the unsliced table.

    Returns how many were changed.  Call once after building a GPTModel that uses APB
    attention with context parallelism (``megatron_apb.megatron.prepare_model`` does).
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.cp_group = None
            changed += 1
    if changed:
        RotaryEmbedding.forward.cache_clear()  # its lru_cache may hold sliced tables
    return changed


def rope_positions(layout, rank: int, device=None) -> Tensor:
    """Positions of rank ``rank``'s rows: anchor 0..a-1, then its block's global positions."""
    anchor = torch.arange(layout.anchor_len_on(rank), device=device)
    start = layout.block_start(rank)
    block = torch.arange(start, start + layout.block_len_on(rank), device=device)
    return torch.cat([anchor, block])


def apply_rope(x: Tensor, freqs: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate x [b, s, heads, d] by angles freqs [s, rot_dim] (rot_dim <= d; the rest passes).

    Same formula as Megatron: ``t·cos + rotate_half(t)·sin`` with cos/sin computed in float32
    and cast to x's dtype.
    """
    rot_dim = freqs.shape[-1]
    freqs = freqs.to(x.device)
    t, t_pass = x[..., :rot_dim], x[..., rot_dim:]
    cos = torch.cos(freqs.float()).to(x.dtype)[None, :, None, :]
    sin = torch.sin(freqs.float()).to(x.dtype)[None, :, None, :]
    t = t * cos + _rotate_half(t, interleaved) * sin
    return torch.cat([t, t_pass], dim=-1) if t_pass.shape[-1] else t


def _rotate_half(x: Tensor, interleaved: bool) -> Tensor:
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([-x2, x1], dim=-1).flatten(-2)


def table_rows(table: Tensor, positions: Tensor, cp_size: int, local_len: int) -> Tensor:
    """Rows of Megatron's rotary table [S, 1, 1, rot_dim] at ``positions`` -> [s, rot_dim].

    Raises when the table is Megatron's zig-zag slice rather than the whole table.
    """
    need = int(positions.max()) + 1 if positions.numel() else 0  # host positions: no sync
    if table.shape[0] < need or (cp_size > 1 and table.shape[0] <= local_len):
        raise RuntimeError(
            f"the rotary table has {table.shape[0]} rows, but APB needs positions up to "
            f"{need - 1} across {cp_size} context-parallel ranks: Megatron sliced it for its "
            "zig-zag layout. Call megatron_apb.megatron.prepare_model(model) once after "
            "building the GPTModel."
        )
    return table.reshape(table.shape[0], -1)[positions.to(table.device)]
