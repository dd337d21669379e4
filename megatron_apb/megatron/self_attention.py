"""``APBSelfAttention``: Megatron's ``SelfAttention`` with APB's per-forward context.

It runs Megatron's own QKV projection (``get_query_key_value_tensors``), hands the
**pre-RoPE** q, k, v, the rotary table and the :class:`~megatron_apb.forward.ForwardContext`
to :class:`~megatron_apb.megatron.core_attention.APBCoreAttention` as keyword arguments,
and applies Megatron's output projection.  The context comes down Megatron's layers as
their ``inference_context`` argument (``TransformerBlock`` and ``TransformerLayer`` only
pass it on), so nothing is set on modules between calls and nothing depends on the
positional order of Megatron's arguments.
"""

from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state
from megatron.core.transformer.attention import SelfAttention

from ..comm import group_size
from ..errors import APBConfigError
from ..forward import ForwardContext
from .core_attention import check_heads
from .layer import prefill_chunk


class APBSelfAttention(SelfAttention):
    """Megatron's ``SelfAttention`` whose core attention applies RoPE itself.

    It checks the head split before Megatron does (with an error naming the fix).
    ``forward`` takes Megatron's keywords; ``inference_context`` must be a
    :class:`ForwardContext` or None (Megatron's own inference contexts and KV caches are not
    used: decode with megatron_apb's engine).
    """

    def __init__(self, config, submodules, layer_number, attn_mask_type, *args, **kwargs):
        pg_collection = kwargs.get("pg_collection")
        tp_group = pg_collection.tp if pg_collection is not None else None
        if tp_group is None:
            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        else:
            tp_size = group_size(tp_group)
        check_heads(config.num_attention_heads, config.num_query_groups or config.num_attention_heads, tp_size)
        super().__init__(config, submodules, layer_number, attn_mask_type, *args, **kwargs)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        key_value_states=None,
        inference_context: Optional[ForwardContext] = None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
        input_norm=None,
        **unused,
    ):
        """[s, b, hidden] -> (output [s, b, hidden], bias), like Megatron's.

        ``input_norm``: a norm to apply to ``hidden_states`` first (a chunked prefill
        applies it chunk by chunk, see :class:`~megatron_apb.megatron.layer.APBTransformerLayer`)."""
        ctx = inference_context if inference_context is not None else inference_params
        if ctx is not None and not isinstance(ctx, ForwardContext):
            raise APBConfigError(
                "Megatron's inference_context is not used with APB attention; prefill and decode "
                "through megatron_apb's engine (or pass a megatron_apb.forward.ForwardContext)"
            )
        if key_value_states is not None:
            raise APBConfigError("APB attention supports self-attention only (no key_value_states)")
        table = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
        if ctx is not None and ctx.rotary_table is not None:
            table = ctx.rotary_table
        no_rope = getattr(self.config, "no_rope_freq", None)
        if no_rope and no_rope[self.layer_number - 1]:
            table = None
        gated = bool(getattr(self.config, "attention_output_gate", False))
        chunk = 0 if gated else prefill_chunk(ctx, self.core_attention.apb_config, hidden_states.shape[0],
                                              self.config)
        if chunk:
            query, key, value = self._chunked_qkv(hidden_states, chunk, input_norm)
        else:
            if input_norm is not None:
                hidden_states = input_norm(hidden_states)
            qkv = self.get_query_key_value_tensors(hidden_states, None, split_qkv=True, output_gate=gated)
            query, key, value = qkv[:3]
        out = self.core_attention(
            query, key, value, attention_mask,
            attn_mask_type=self.attn_mask_type, attention_bias=attention_bias,
            packed_seq_params=packed_seq_params, forward_context=ctx, rotary_pos_emb=table,
        )
        del query, key, value
        if gated:
            out = self._apply_output_gate(out, qkv[3])
        if chunk:
            return self._chunked_proj(out, chunk)
        return self.linear_proj(out)

    def _chunked_qkv(self, hidden_states, chunk, input_norm=None):
        """(``input_norm`` and) Megatron's QKV projection over ``chunk`` rows at a time, into
        q [s, b, heads, d] and k, v [s, b, kv_heads, d]: the mixed projection never exists
        for all rows."""
        rows, whole = hidden_states.shape[0], None
        for start in range(0, rows, chunk):
            block = hidden_states[start : start + chunk]
            qkv = self.get_query_key_value_tensors(block if input_norm is None else input_norm(block), None,
                                                   split_qkv=True)[:3]
            if whole is None:
                whole = [t.new_empty((rows,) + tuple(t.shape[1:])) for t in qkv]
            for dest, part in zip(whole, qkv):
                dest[start : start + chunk] = part
        return whole

    def _chunked_proj(self, out, chunk):
        """The output projection over ``chunk`` rows at a time: (output, bias) as Megatron's."""
        result, bias = None, None
        for start in range(0, out.shape[0], chunk):
            y, bias = self.linear_proj(out[start : start + chunk])
            if result is None:
                result = y.new_empty((out.shape[0],) + tuple(y.shape[1:]))
            result[start : start + chunk] = y
        return result, bias
