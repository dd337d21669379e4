"""Megatron's transformer layer with its MLP chunked over the sequence in long prefills.

A prefill of ``s`` rows makes activations of ``s x ffn_hidden x 2`` in the MLP (Llama-3-8B at
1M tokens: 57 GB for the first projection alone).  With :attr:`APBConfig.prefill_chunk
<megatron_apb.config.APBConfig.prefill_chunk>` rows per chunk the MLP (its norm, both
projections, the residual add) runs one chunk at a time into one output, so its
temporaries are ``chunk x ffn_hidden`` whatever the length; the QKV and output projections
are chunked the same way in :class:`~megatron_apb.megatron.self_attention.APBSelfAttention`,
with the input norm applied per chunk before them.
Every row's math is unchanged (each row of a linear layer, a norm and an activation
depends on that row only), so the output equals the unchunked layer's.

Chunking applies to prefill forwards with a :class:`~megatron_apb.forward.ForwardContext`,
without gradients, on plain layers (no MoE, no sequence parallelism, no recomputation);
anything else runs Megatron's own forward.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer

from ..forward import ForwardContext


def prefill_chunk(context, apb_config, rows: int, config) -> int:
    """Rows per chunk of this forward's projections and MLP; 0: do not chunk (a decode,
    no context, gradients, sequence parallelism, or ``rows`` within one chunk)."""
    if not isinstance(context, ForwardContext) or context.is_decode or torch.is_grad_enabled():
        return 0
    if getattr(config, "sequence_parallel", False):
        return 0
    chunk = context.config_for(apb_config).prefill_chunk
    return chunk if 0 < chunk < rows else 0


class APBTransformerLayer(TransformerLayer):
    """``TransformerLayer`` whose MLP runs over chunks of rows in a long prefill."""

    def _chunk(self, hidden_states, inference_context) -> int:
        flags = ("is_moe_layer", "recompute_mlp", "recompute_pre_mlp_layernorm", "offload_mlp_norm")
        if (any(getattr(self, name, False) for name in flags) or isinstance(self.mlp, IdentityOp)
                or getattr(self.config, "inference_fuse_tp_communication", False)
                or getattr(self.config, "fp32_residual_connection", False)
                or not hasattr(self, "_forward_pre_mlp_layernorm") or not hasattr(self, "_forward_post_mlp")):
            return 0  # anything but a plain layer (of the Megatron-Core versions this was built on)
        core = getattr(self.self_attention, "core_attention", None)
        apb_config = getattr(core, "apb_config", None)
        if apb_config is None:
            return 0
        return prefill_chunk(inference_context, apb_config, hidden_states.shape[0], self.config)

    def _forward_attention(self, hidden_states, *args, **kwargs):
        """In a chunked prefill the input norm runs per chunk inside the QKV projection
        (its output never exists for all rows); otherwise Megatron's own."""
        chunk = 0 if args else self._chunk(hidden_states, kwargs.get("inference_context"))
        plain = (isinstance(self.cross_attention, IdentityOp) and isinstance(self.pre_cross_attn_layernorm, IdentityOp)
                 and not getattr(self, "recompute_input_layernorm", False)
                 and not getattr(self, "offload_attn_norm", False)
                 and kwargs.get("context") is None)
        if not chunk or not plain:
            return super()._forward_attention(hidden_states, *args, **kwargs)
        names = ("attention_mask", "inference_context", "rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin",
                 "rotary_pos_cos_sin", "attention_bias", "packed_seq_params", "sequence_len_offset")
        out_with_bias = self.self_attention(hidden_states, input_norm=self.input_layernorm,
                                            **{k: kwargs[k] for k in names if k in kwargs})
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                out_with_bias, hidden_states, self.hidden_dropout)
        return hidden_states, kwargs.get("context")

    def _forward_mlp(self, hidden_states, inference_context=None, *args, **kwargs):
        """In a chunked prefill the MLP (norm, projections, residual add) runs per chunk of rows;
        otherwise Megatron's own, with whatever arguments its version passes (``padding_mask``,
        and ``packed_seq_params`` from megatron-core 0.19)."""
        chunk = self._chunk(hidden_states, inference_context)
        if not chunk:
            return super()._forward_mlp(hidden_states, inference_context, *args, **kwargs)
        out = torch.empty_like(hidden_states)
        for start in range(0, hidden_states.shape[0], chunk):
            rows = hidden_states[start : start + chunk]
            normed = self._forward_pre_mlp_layernorm(rows)
            residual = rows
            if isinstance(normed, tuple):  # a norm fused with the residual returns both
                normed, residual = normed
            out[start : start + chunk] = self._forward_post_mlp(self.mlp(normed), residual)
        return out
