"""The model adapter of a Megatron-Core ``GPTModel`` built with the APB layer spec."""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from ..comm import group_size
from ..forward import ForwardContext

Tensor = torch.Tensor


class MegatronAdapter:
    """:class:`~megatron_apb.adapter.ModelAdapter` over a ``GPTModel``.

    The forward context goes down ``model.decoder`` as its ``inference_context`` argument
    (Megatron's blocks and layers pass it on to
    :class:`~megatron_apb.megatron.self_attention.APBSelfAttention`).

    Args:
        model: a ``GPTModel`` built with ``get_gpt_layer_apb_spec`` (``build_gpt_model``).
        vocab_size: the tokenizer's vocabulary (default: the model's, TP padding included).
        tp_group: the tensor-parallel group, to gather vocabulary-parallel logits.
    """

    def __init__(self, model, *, vocab_size: Optional[int] = None, tp_group=None):
        self.model, self.tp_group = model, tp_group
        self.vocab_size = vocab_size or model.vocab_size
        self.device = next(model.parameters()).device
        self.max_positions = getattr(model, "max_sequence_length", None)

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.embedding(input_ids=ids.to(self.device), position_ids=None)

    def run_layers(self, hidden: Tensor, context: ForwardContext) -> Tensor:
        """The decoder with ``context``; without a rotary table in it, the table covers
        ``rows x CP`` positions, as ``GPTModel.forward`` would give, or the layout's whole
        document when the context has one (its blocks may differ in length)."""
        if context.rotary_table is None:
            length = hidden.shape[0] * self.model.config.context_parallel_size
            if context.layout is not None:
                cp = self.model.config.context_parallel_size
                length = max(length, context.layout.padded_len(cp) + context.layout.anchor_len + 1)
            context.rotary_table = self.rotary_table(length)
        return self.model.decoder(hidden_states=hidden, attention_mask=None, inference_context=context)

    def rotary_table(self, length: int) -> Optional[Tensor]:
        rope = getattr(self.model, "rotary_pos_emb", None)
        return None if rope is None else rope(length)

    def logits(self, hidden: Tensor) -> Tensor:
        model = self.model
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(hidden, weight=weight)
        if getattr(model, "parallel_output", False) and group_size(self.tp_group) > 1:
            logits = gather_from_tensor_model_parallel_region(logits, group=self.tp_group)
        return logits.reshape(-1, logits.shape[-1])[:, : self.vocab_size].float()

    def layers(self) -> List[torch.nn.Module]:
        return list(self.model.decoder.layers)

    def forward_logits(self, ids: Tensor, context: Optional[ForwardContext] = None) -> Tensor:
        """Logits of every row [batch, seq, vocab] (TP-local vocabulary unless the model
        gathers it), for tests and scoring: embedding, layers with ``context``, output."""
        hidden = self.run_layers(self.embed(ids), context or ForwardContext())
        model = self.model
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(hidden, weight=weight)
        return logits.transpose(0, 1)
