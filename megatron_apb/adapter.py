"""The model adapter protocol: what the inference engine needs of a model.

The engine (:class:`megatron_apb.inference.APBEngine`) talks to models only through this
protocol, so one engine serves a Megatron-Core ``GPTModel``
(:class:`megatron_apb.megatron.adapter.MegatronAdapter`) and a Hugging Face causal LM
(:class:`megatron_apb.integrations.hf.HFModelForAPB`) alike.  Hidden states use Megatron's
layout ``[seq, batch, hidden]``.  Per-forward state travels in the
:class:`~megatron_apb.forward.ForwardContext` argument of :meth:`ModelAdapter.run_layers`.
"""

from __future__ import annotations

from typing import List, Optional, Protocol, runtime_checkable

import torch

from .forward import ForwardContext

Tensor = torch.Tensor


@runtime_checkable
class ModelAdapter(Protocol):
    """Embed, run the layers with a forward context, compute logits.

    Attributes:
        device: where the model's weights (and so its inputs) live.
        vocab_size: rows of the logits that are real tokens (TP padding excluded).
        max_positions: optional; the most positions the model was built for (None or
            absent: no limit known); a prompt plus its answer must fit.
    """

    device: torch.device
    vocab_size: int

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids [batch, seq] -> hidden states [seq, batch, hidden]."""

    def run_layers(self, hidden: Tensor, context: ForwardContext) -> Tensor:
        """Every transformer layer, then the final norm: [s, b, hidden] -> [s, b, hidden]."""

    def logits(self, hidden: Tensor) -> Tensor:
        """Full-vocabulary float logits [s * b, vocab_size] of hidden states [s, b, hidden]
        (unchecked: the engine checks them for NaN/inf, outside a captured step)."""

    def rotary_table(self, length: int) -> Optional[Tensor]:
        """The whole rotary table for positions 0..length-1 [length, 1, 1, rot_dim], or None."""

    def layers(self) -> List[torch.nn.Module]:
        """The transformer layers in order (for progress reports)."""
