"""The ``--spec`` object and the model builder of the Megatron-LM hooks.

``--spec megatron_apb.integrations.megatron_lm gpt_layer_apb_spec`` (:data:`SPEC_ARGS`):
Megatron-LM's ``gpt_builder`` builds its layers from :data:`gpt_layer_apb_spec`, whose
layers pick their parts when built (Megatron's Transformer Engine or local layer following
the ``TransformerConfig``, with APB attention configured by :func:`.args.current_apb_config`).
:func:`apb_gpt_builder` has ``gpt_builder``'s signature, for scripts of one's own.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel, gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from ...errors import APBConfigError
from ...megatron.layer import APBTransformerLayer
from ...megatron.spec import HAVE_TE, get_gpt_layer_apb_spec
from .args import current_apb_config, megatron_lm_args
from .prepare import prepare_megatron_lm_model

#: the package whose ``gpt_layer_apb_spec`` ``--spec`` names
SPEC_MODULE = __name__.rpartition(".")[0]
#: what ``--spec`` names: ``--spec megatron_apb.integrations.megatron_lm gpt_layer_apb_spec``
SPEC_ARGS = (SPEC_MODULE, "gpt_layer_apb_spec")


def megatron_lm_base_spec(config) -> ModuleSpec:
    """Megatron's layer spec that Megatron-LM would use without ``--spec``, for a dense
    GPT with ``config`` (a ``TransformerConfig``): the Transformer Engine spec when
    ``config.transformer_impl`` is ``'transformer_engine'`` and Transformer Engine is
    installed, else the local spec (with ``normalization``); ``qk_layernorm``,
    ``qk_l2_norm`` and the MoE settings follow ``config``."""
    impl = getattr(config, "transformer_impl", "transformer_engine")
    if getattr(config, "multi_latent_attention", False):
        raise APBConfigError("the APB layer spec replaces self-attention; --multi-latent-attention is not supported")
    if impl == "inference_optimized":
        raise APBConfigError(
            "--transformer-impl inference_optimized has its own attention; use 'local' or "
            "'transformer_engine' with the APB layer spec"
        )
    common = dict(
        num_experts=getattr(config, "num_moe_experts", None),
        moe_grouped_gemm=getattr(config, "moe_grouped_gemm", False),
        qk_layernorm=getattr(config, "qk_layernorm", False),
        qk_l2_norm=getattr(config, "qk_l2_norm", False),
    )
    if impl == "transformer_engine" and HAVE_TE:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**common)
    return gpt_layer_specs.get_gpt_layer_local_spec(
        normalization=getattr(config, "normalization", "RMSNorm"), **common
    )


def get_gpt_layer_apb_spec_for_megatron_lm(config, args=None) -> ModuleSpec:
    """The layer spec Megatron-LM builds with: :func:`megatron_lm_base_spec` for
    ``config`` with APB attention whose settings are :func:`.args.current_apb_config` of
    ``args`` (default: Megatron-LM's parsed arguments, else the environment)."""
    return get_gpt_layer_apb_spec(current_apb_config(args), megatron_lm_base_spec(config))


class _ChosenAtBuild(TransformerLayerSubmodules):
    """Placeholder submodules of :data:`gpt_layer_apb_spec`; each layer picks its own."""


class MegatronLMAPBTransformerLayer(APBTransformerLayer):
    """APB's ``TransformerLayer`` (the MLP chunked over long prefills) whose submodules are
    chosen when it is built.

    Built from :data:`gpt_layer_apb_spec`, it takes those of
    :func:`get_gpt_layer_apb_spec_for_megatron_lm` for its own ``TransformerConfig`` and
    the APB settings current at that moment, so the ``--spec`` object can be imported at
    any time (even before Megatron-LM parses its arguments).  Given real submodules, it
    is a plain :class:`~megatron_apb.megatron.layer.APBTransformerLayer`.
    """

    def __init__(self, config, submodules, *args, **kwargs):
        if isinstance(submodules, _ChosenAtBuild):
            spec = get_gpt_layer_apb_spec_for_megatron_lm(config)
            if spec.module not in (TransformerLayer, APBTransformerLayer):
                raise APBConfigError(f"the base layer spec builds {spec.module.__name__}, not TransformerLayer")
            submodules = spec.submodules
        super().__init__(config, submodules, *args, **kwargs)


#: the object ``--spec megatron_apb.integrations.megatron_lm gpt_layer_apb_spec`` names
gpt_layer_apb_spec = ModuleSpec(module=MegatronLMAPBTransformerLayer, submodules=_ChosenAtBuild())


def transformer_config_from_args(args):
    """A ``TransformerConfig`` from Megatron-LM-style ``args``.

    Inside Megatron-LM (its arguments parsed and set, as when its ``model_provider``
    runs) this is Megatron-LM's own ``core_transformer_config_from_args``, which reads
    every one of its arguments.  Otherwise (megatron-core alone, or a Namespace of one's
    own; megatron-core 0.19 wheels ship ``megatron.training`` too, so its presence says
    nothing) it is the subset a dense GPT needs, translated the same way: every
    ``TransformerConfig`` field found in ``args``, then ``--swiglu``,
    ``--group-query-attention``/``--num-query-groups``, ``--no-persist-layer-norm``,
    ``--num-experts``, ``--rotary-interleaved``.
    """
    if megatron_lm_args() is not None:
        # local: megatron.training is imported only inside Megatron-LM
        from megatron.training.arguments import core_transformer_config_from_args

        return core_transformer_config_from_args(args)
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TransformerConfig) if hasattr(args, f.name)}
    kw["persist_layer_norm"] = not getattr(args, "no_persist_layer_norm", False)
    kw["num_moe_experts"] = getattr(args, "num_experts", None)
    kw["rotary_interleaved"] = getattr(args, "rotary_interleaved", False)
    if getattr(args, "swiglu", False):
        kw["activation_func"] = F.silu
        kw["gated_linear_unit"] = True
        kw["bias_activation_fusion"] = getattr(args, "bias_swiglu_fusion", False)
    else:
        kw["bias_activation_fusion"] = getattr(args, "bias_gelu_fusion", False)
    kw["num_query_groups"] = args.num_query_groups if getattr(args, "group_query_attention", False) else None
    return TransformerConfig(**kw)


def apb_gpt_builder(args, pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Megatron-LM's ``gpt_builder`` for the APB layer spec, prepared: same signature, same
    ``GPTModel`` arguments taken from ``args``, then :func:`.prepare.prepare_megatron_lm_model`.

    Use it where a script passes a builder to Megatron-LM's ``model_provider``
    (``partial(model_provider, apb_gpt_builder)``).  The stock ``gpt_builder`` with
    ``--spec`` builds the same model unprepared (enough at CP = 1; the patched text
    generation server prepares it through ``get_apb_inference_engine``).  ``args`` is
    Megatron-LM's parsed arguments or a Namespace with the same names
    (``padded_vocab_size`` or ``vocab_size``, ``max_position_embeddings``,
    ``position_embedding_type``, ...); the APB settings come from its ``--apb-*``
    attributes over the ``APB_*`` environment.
    """
    if getattr(args, "use_legacy_models", False):
        raise APBConfigError("the APB layer spec needs Megatron-Core models, not --use-legacy-models")
    if config is None:
        config = transformer_config_from_args(args)
    spec = get_gpt_layer_apb_spec_for_megatron_lm(config, args)
    vocab_size = getattr(args, "padded_vocab_size", None) or args.vocab_size
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=getattr(args, "fp16_lm_cross_entropy", False),
        parallel_output=True,
        share_embeddings_and_output_weights=not getattr(args, "untie_embeddings_and_output_weights", False),
        position_embedding_type=getattr(args, "position_embedding_type", "rope"),
        rotary_percent=getattr(args, "rotary_percent", 1.0),
        rotary_base=getattr(args, "rotary_base", 10000),
        rope_scaling=getattr(args, "use_rope_scaling", False),
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    return prepare_megatron_lm_model(model, args)
