"""Per-forward state: one :class:`ForwardContext`, made for each forward and passed down.

The engine (or any caller) builds a context for one forward and hands it to the model
adapter, which passes it down the layers as an argument: through Megatron-Core as the
``inference_context`` of ``TransformerBlock``/``TransformerLayer`` (they only pass it on,
or ask the few questions answered below), through HF layers as the ``apb_context``
keyword.  Nothing is stored on modules between calls.

    ctx = ForwardContext.prefill(layout, rotary_table=table, kv_cache=cache)
    hidden = adapter.decode_layers(adapter.embed(ids), ctx)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Protocol, Tuple

import torch

from .config import APBConfig, CPLayout

Tensor = torch.Tensor

PREFILL, DECODE = "prefill", "decode"


class KVCacheHandle(Protocol):
    """Where the attention keeps and reads each layer's K/V (see
    :class:`megatron_apb.inference.cache.CPKVCache`)."""

    owner: bool  # this rank appends the K/V of decoded tokens
    complete: bool  # the cache holds every rank's block: no collective while decoding

    def store_prefill(self, layer: int, k: Tensor, v: Tensor) -> None: ...

    def append(self, layer: int, k: Tensor, v: Tensor) -> None: ...

    def get(self, layer: int) -> Tuple[Tensor, Tensor]: ...

    # static storage (a ``static`` decode forward): device length and write position
    lengths: Optional[Tensor]
    slots: Optional[Tensor]

    def write(self, layer: int, k: Tensor, v: Tensor) -> None: ...

    def buffers(self, layer: int) -> Tuple[Tensor, Tensor]: ...


@dataclass
class ForwardContext:
    """State of one forward of an APB model.

    Attributes:
        phase: ``"prefill"`` (a rank's ``[anchor; block]`` rows) or ``"decode"`` (new
            tokens against the cached K/V of every rank).
        layout: the prompt's layout (prefill); None: derived from the sequence length,
            which exact modes and single-rank runs allow.
        positions: 1-D positions of the rows of a decode forward.
        rotary_table: the model's whole rotary table [S, 1, 1, rot_dim] (None: the one
            Megatron hands the layer, or no rotary embedding).
        kv_cache: where the prefill keeps the block's K/V and decoding reads it.
        config: run these APB settings instead of the ones the model was built with
            (e.g. several modes on one set of weights).
        local_only: benchmarks only: collectives become local copies (wrong results),
            to measure the communication that is not hidden.
        kv_plan: a prefill whose cache keeps only what SnapKV selects
            (:class:`megatron_apb.ops.snapkv.SnapKVPlan`); None: the whole block.
        static: a decode forward that reads no host value (CUDA-graph capturable):
            ``positions`` on the device, the new K/V written at the cache's device
            ``slots``, attention over its device ``lengths`` with the split-KV kernel.
        cp_group: the context-parallel group of this prefill (None: the model's own);
            benchmarks pass a :class:`megatron_apb.comm.EmulatedGroup` to run one rank's
            share of a larger group alone, on a model built for one rank.
        sparse_stats: a prefill whose sparse local attention records what each call
            computed into this list (see :class:`megatron_apb.ops.sparse.SparseAttention`;
            dense attention records nothing); None: no record.
    """

    phase: str = PREFILL
    layout: Optional[CPLayout] = None
    positions: Optional[Tensor] = None
    rotary_table: Optional[Tensor] = None
    kv_cache: Optional[KVCacheHandle] = None
    config: Optional[APBConfig] = None
    local_only: bool = False
    static: bool = False
    cp_group: Any = None
    kv_plan: Optional[Any] = None
    sparse_stats: Optional[list] = None
    # the layout the first APB layer checked with the other ranks: (rows, layout)
    checked: Optional[Tuple[int, CPLayout]] = field(default=None, repr=False)
    # values derived once per forward and shared by its layers (e.g. the rotary rows of this
    # forward's positions: one host-to-device copy and one gather instead of one per layer)
    memo: Dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.phase not in (PREFILL, DECODE):
            raise ValueError(f"phase must be {PREFILL!r} or {DECODE!r}, got {self.phase!r}")
        if self.phase == DECODE and (self.positions is None or self.kv_cache is None):
            raise ValueError("a decode forward needs the new tokens' positions and a KV cache")

    @classmethod
    def prefill(cls, layout: Optional[CPLayout] = None, **kwargs) -> "ForwardContext":
        return cls(phase=PREFILL, layout=layout, **kwargs)

    @classmethod
    def decode(cls, positions: Tensor, kv_cache: KVCacheHandle, **kwargs) -> "ForwardContext":
        return cls(phase=DECODE, positions=positions, kv_cache=kv_cache, **kwargs)

    @property
    def is_decode(self) -> bool:
        return self.phase == DECODE

    def config_for(self, built_with: APBConfig) -> APBConfig:
        """The settings of this forward: the override, else the model's own."""
        return self.config or built_with

    # Megatron-Core's TransformerBlock/Layer ask an ``inference_context`` these questions
    # (MLP chunking during prefill, CUDA-graph selection); they carry no other meaning here.
    materialize_only_last_token_logits = False

    def is_decode_only(self) -> bool:
        return self.is_decode

    def is_static_batching(self) -> bool:
        return True

    def is_dynamic_batching(self) -> bool:
        return False

    def using_cuda_graph_this_step(self) -> bool:
        return False
