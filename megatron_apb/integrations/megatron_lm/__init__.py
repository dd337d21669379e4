"""Hooks that let Megatron-LM's own entry points build and run models with APB attention.

Megatron-LM (the repository with ``pretrain_gpt.py``, ``gpt_builders.py`` and
``tools/run_text_generation_server.py``) already offers hooks, so most of APB needs no
patch:

* ``--spec MODULE NAME``: ``gpt_builder`` builds the layers from the object ``NAME`` of
  ``MODULE`` (``megatron.core.transformer.spec_utils.import_module``, which returns the
  attribute itself, not a call of it).  :data:`gpt_layer_apb_spec` is that object::

      APB_MODE=exact torchrun ... pretrain_gpt.py ... \\
          --spec megatron_apb.integrations.megatron_lm gpt_layer_apb_spec

  Each layer chooses its parts when it is built: Megatron's Transformer Engine or local
  layer following the model's ``TransformerConfig`` (``--transformer-impl``,
  ``--normalization``, ``--qk-layernorm``), with APB attention whose settings come from
  Megatron-LM's parsed ``--apb-*`` arguments when :func:`add_apb_args` added them,
  otherwise from the ``APB_*`` environment variables (:data:`ENV_VARS`).
* ``extra_args_provider`` of ``initialize_megatron`` / ``pretrain``: :func:`add_apb_args`
  adds the ``--apb-*`` flags (one per :class:`~megatron_apb.config.APBConfig` field, plus
  ``--apb-heads`` and ``--apb-query-tokens``).  The stock entry points pass their own
  provider: the server patch adds the flags to the server's; ``pretrain_gpt.py`` takes the
  ``APB_<FIELD>`` environment variables instead, with no patch.
* ``model_provider(model_builder, ...)``: :func:`apb_gpt_builder` has the signature of
  Megatron-LM's ``gpt_builder`` and builds and prepares a GPTModel with the APB spec, for
  scripts of your own (``partial(model_provider, apb_gpt_builder)``).

What needs a patch (``patches/megatron_lm`` in this repository): the text generation
server, which must answer through megatron_apb's engine (:func:`get_apb_inference_engine`)
since Megatron's static inference engine decodes through its own KV-cache context, which
APB attention does not use.  That engine also prepares the model
(:func:`prepare_megatron_lm_model`: Megatron's rotary table is otherwise sliced for its
zig-zag context-parallel layout; ``--apb-heads`` loads trained retaining heads).

Modules: :mod:`.args` (flags, variables), :mod:`.spec` (``--spec`` object, builder),
:mod:`.prepare` (rotary table, heads), :mod:`.server` (the server's engine).
"""

from .args import (
    ARG_FIELDS,
    ENV_VARS,
    add_apb_args,
    apb_config_from_args,
    apb_config_from_env,
    current_apb_config,
    megatron_lm_args,
)
from .prepare import load_apb_heads, prepare_megatron_lm_model
from .server import APBServerEngine, get_apb_inference_engine
from .spec import (
    SPEC_ARGS,
    MegatronLMAPBTransformerLayer,
    apb_gpt_builder,
    get_gpt_layer_apb_spec_for_megatron_lm,
    gpt_layer_apb_spec,
    megatron_lm_base_spec,
    transformer_config_from_args,
)

__all__ = [
    "ARG_FIELDS",
    "ENV_VARS",
    "SPEC_ARGS",
    "APBServerEngine",
    "MegatronLMAPBTransformerLayer",
    "add_apb_args",
    "apb_config_from_args",
    "apb_config_from_env",
    "apb_gpt_builder",
    "current_apb_config",
    "get_apb_inference_engine",
    "get_gpt_layer_apb_spec_for_megatron_lm",
    "gpt_layer_apb_spec",
    "load_apb_heads",
    "megatron_lm_args",
    "megatron_lm_base_spec",
    "prepare_megatron_lm_model",
    "transformer_config_from_args",
]
