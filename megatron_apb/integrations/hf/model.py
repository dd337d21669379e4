"""APB attention inside a Hugging Face Llama-family model, and its model adapter.

:func:`swap_in_apb_attention` replaces every decoder layer's ``self_attn`` of a
``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` with
:class:`HFAPBAttention`: the layer's own ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (kept
under the same names, so DeepSpeed's injection policy and AutoTP still find and shard them)
around megatron_apb's :class:`~megatron_apb.megatron.core_attention.APBCoreAttention`,
which applies RoPE at each row's true position and runs the APB collectives over the CP
group.  Weights stay where they are: nothing is converted.

:class:`HFModelForAPB` is the model's :class:`~megatron_apb.adapter.ModelAdapter`, so the
engine that serves Megatron models runs APB prefill and exact distributed decoding on the
Hugging Face layers::

    hf = AutoModelForCausalLM.from_pretrained(path)
    view = HFModelForAPB(hf, APBConfig(mode="apb"), cp_group=cp, tp_group=tp)
    engine = APBEngine(view, view.apb_config, cp_group=cp, tp_group=tp, vocab_size=view.vocab_size)

The forward context reaches each attention as the ``apb_context`` keyword, which the
Hugging Face decoder layers pass on to their ``self_attn``.

Tensor parallelism of these layers is DeepSpeed's (``megatron_apb.integrations.deepspeed``):
once it has sharded ``q_proj``/``k_proj``/``v_proj`` by heads, each rank's attention sees
its own heads, and the core attention is sized for ``tp_group``.

The model's own ``forward``/``generate`` still work and do not run APB: without a forward
context each layer runs its original Hugging Face attention (exact, no CP; with DeepSpeed's
sharded projections under TP), so the model stays usable beside the engine.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn

from ...checkpoints import ModelSpec
from ...comm import group_rank, group_size
from ...compress import shard_retaining_head
from ...config import APBConfig
from ...errors import APBConfigError, UnsupportedModelError
from ...forward import ForwardContext
from ...megatron.core_attention import APBCoreAttention


def _layers(hf_model):
    inner = getattr(hf_model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(inner, "embed_tokens", None) is None or getattr(inner, "norm", None) is None:
        raise APBConfigError(
            f"{type(hf_model).__name__} is not a Llama-family *ForCausalLM (expected "
            "model.embed_tokens, model.layers, model.norm and lm_head)"
        )
    return inner, layers


class HFAPBAttention(nn.Module):
    """A Hugging Face attention layer whose attention runs through ``APBCoreAttention``.

    ``q_proj``/``k_proj``/``v_proj``/``o_proj`` are the original modules (or DeepSpeed's
    sharded replacements of them).  Input/output as the Hugging Face attention:
    hidden ``[b, s, hidden]`` -> ``(out [b, s, hidden], None)``.
    """

    def __init__(self, original: nn.Module, core_attention: nn.Module, head_dim: int):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, getattr(original, name))
        self.core_attention = core_attention
        self.head_dim = head_dim
        self.layer_idx = getattr(original, "layer_idx", None)
        # the original attention, for forwards without an APB context; kept in a tuple so
        # that its projections (the same modules as above) are not registered twice
        self._hf_attention = (original,)

    def forward(self, hidden_states, *args, apb_context: Optional[ForwardContext] = None, **kwargs):
        if apb_context is None:  # the model's own forward / generate: its exact attention
            return self._hf_attention[0](hidden_states, *args, **kwargs)
        b, s, _ = hidden_states.shape

        def heads(proj):  # [b, s, heads*d] -> Megatron's [s, b, heads, d]
            return proj(hidden_states).view(b, s, -1, self.head_dim).transpose(0, 1)

        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        out = self.core_attention(q, k, v, forward_context=apb_context, rotary_pos_emb=apb_context.rotary_table)
        return self.o_proj(out.transpose(0, 1)), None  # out: [s, b, heads*d]


def _rotary_table(inv_freq: torch.Tensor, position_scale: float, length: int, device) -> torch.Tensor:
    """Megatron-format rotary table ``[length, 1, 1, head_dim]`` of rotation angles, in
    float32 whatever the model was cast to."""
    positions = torch.arange(length, dtype=torch.float32, device=device) * position_scale
    angles = torch.outer(positions, inv_freq.to(device))
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def swap_in_apb_attention(hf_model, apb_config: APBConfig, *, cp_group, tp_group=None, heads=None):
    """Replace every ``self_attn`` of ``hf_model`` with :class:`HFAPBAttention` (in place).

    Args:
        apb_config: APB settings (validated); with ``compressor="retaining_head"``,
            ``heads`` must give trained heads.
        cp_group, tp_group: the context- and tensor-parallel groups of this rank.  TP is
            applied to the projections later (by DeepSpeed); the core attention is sized
            for it now.
        heads: ``{layer: (fc1, fc2)}`` full retaining-head weights (reference layout,
            ``megatron_apb.heads.read_retaining_heads``), sharded here for this TP rank.
    Returns:
        ``(spec, attentions)``: the model's :class:`~megatron_apb.checkpoints.ModelSpec`
        and the new attention modules in layer order.
    """
    _, layers = _layers(hf_model)
    spec = ModelSpec.from_hf_config(hf_model.config)  # refuses unsupported architectures
    tp, cp = group_size(tp_group), group_size(cp_group)
    if apb_config.needs_retaining_heads:
        if heads is None:
            raise APBConfigError(
                'compressor "retaining_head" needs trained heads: give "heads" (a safetensors '
                'file) in the "apb" section, or use compressor "query_attention"'
            )
        missing = sorted(set(range(spec.num_layers)) - set(heads))
        if missing:
            raise APBConfigError(f"the retaining-head checkpoint lacks layers {missing}")
        apb_config = apb_config.replace(retaining_head_hidden=int(heads[0][0].shape[0]))
    dtype = next(hf_model.parameters()).dtype
    config = spec.transformer_config(tp, cp, dtype=dtype)
    pg = ProcessGroupCollection(tp=tp_group, cp=cp_group)
    attentions = []
    for i, layer in enumerate(layers):
        original = layer.self_attn
        if isinstance(original, HFAPBAttention):
            raise APBConfigError("the model's attention is APB attention already; load the model afresh")
        core = APBCoreAttention(config=config, layer_number=i + 1, pg_collection=pg, apb_config=apb_config)
        if core.retaining_head is not None:
            fc1, fc2 = shard_retaining_head(
                *heads[i], num_heads=spec.num_attention_heads, num_kv_heads=spec.num_query_groups,
                head_dim=spec.kv_channels, tp_rank=group_rank(tp_group), tp_size=tp,
            )
            with torch.no_grad():
                core.retaining_head.fc1.weight.copy_(fc1)
                core.retaining_head.fc2.weight.copy_(fc2)
        device = next(original.parameters()).device
        attn = HFAPBAttention(original, core.to(device), spec.kv_channels)
        layer.self_attn = attn
        attentions.append(attn)
    return spec, attentions


class HFModelForAPB(nn.Module):
    """A Llama-family Hugging Face ``*ForCausalLM`` with APB attention, as a
    :class:`~megatron_apb.adapter.ModelAdapter` for
    :class:`~megatron_apb.inference.APBEngine`.

    Builds the APB attention in place (:func:`swap_in_apb_attention`).  Build it *after*
    DeepSpeed has sharded ``hf_model`` (DeepSpeed's AutoTP or injection policy replaces every
    ``nn.Linear`` of a decoder layer, the retaining heads' too); the model may still be
    moved or cast afterwards: the adapter looks its modules up on every call.
    """

    def __init__(self, hf_model, apb_config: APBConfig, *, cp_group, tp_group=None, heads=None):
        super().__init__()
        self.hf_model = hf_model
        self.spec, attentions = swap_in_apb_attention(
            hf_model, apb_config, cp_group=cp_group, tp_group=tp_group, heads=heads
        )
        if self.spec.rope_qk_scale() != 1:
            raise UnsupportedModelError(
                "rope_scaling (yarn): YaRN's attention factor is served by the Megatron model "
                "(megatron_apb.checkpoints, which folds it into q and k), not on the transformers model"
            )
        self.attentions = attentions  # a plain list: the modules are registered via hf_model
        self.apb_config = attentions[0].core_attention.apb_config if attentions else apb_config
        self.vocab_size = self.spec.vocab_size
        self.max_positions = self.spec.max_position_embeddings
        self._inv_freq = self.spec.rope_inv_freq().float()  # not a buffer: casts must not touch it
        self._position_scale = (
            1.0 / self.spec.rope_scaling_factor if self.spec.rope_scaling_type == "linear" else 1.0
        )

    # ------------------------------------------------------------ the adapter
    @property
    def device(self) -> torch.device:
        return self.hf_model.get_input_embeddings().weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf_model.get_input_embeddings()(ids.to(self.device)).transpose(0, 1)  # [s, b, hidden]

    def run_layers(self, hidden: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        """hidden [s, b, hidden] (Megatron's layout) -> [s, b, hidden] after the final norm."""
        inner, layers = _layers(self.hf_model)
        x = hidden.transpose(0, 1)
        for layer in layers:
            out = layer(x, attention_mask=None, position_ids=None, position_embeddings=None, apb_context=context)
            x = out[0] if isinstance(out, tuple) else out
        return inner.norm(x).transpose(0, 1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.hf_model.get_output_embeddings()(hidden)
        return logits.reshape(-1, logits.shape[-1])[:, : self.vocab_size].float()

    def rotary_table(self, length: int) -> Optional[torch.Tensor]:
        return _rotary_table(self._inv_freq, self._position_scale, length, self.device)

    def layers(self) -> List[nn.Module]:
        return list(_layers(self.hf_model)[1])

    def forward(self, *args, **kwargs):
        raise RuntimeError("run HFModelForAPB through megatron_apb.inference.APBEngine")
