"""Hooks that let Megatron-LM's own entry points build and run models with APB attention.

Megatron-LM (the repository with ``pretrain_gpt.py``, ``gpt_builders.py`` and
``tools/run_text_generation_server.py``) already offers hooks, so most of APB needs no
patch:

* ``--spec MODULE NAME``: ``gpt_builder`` builds the layers from the object ``NAME`` of
  ``MODULE`` (``megatron.core.transformer.spec_utils.import_module``, which returns the
  attribute itself, not a call of it).  :data:`gpt_layer_apb_spec` is that object::

      APB_MODE=exact torchrun ... pretrain_gpt.py ... \\
          --spec megatron_apb.megatron.lm_hooks gpt_layer_apb_spec

  Each layer chooses its parts when it is built: Megatron's Transformer Engine or local
  layer following the model's ``TransformerConfig`` (``--transformer-impl``,
  ``--normalization``, ``--qk-layernorm``), with APB attention whose settings come from
  Megatron-LM's parsed ``--apb-*`` arguments when :func:`add_apb_args` added them,
  otherwise from the ``APB_*`` environment variables (:data:`ENV_VARS`).
* ``extra_args_provider`` of ``initialize_megatron`` / ``pretrain``: :func:`add_apb_args`
  adds the ``--apb-*`` flags.  The stock entry points pass their own provider: the server
  patch adds the flags to the server's; ``pretrain_gpt.py`` takes the ``APB_*``
  environment variables instead, with no patch.
* ``model_provider(model_builder, ...)``: :func:`apb_gpt_builder` has the signature of
  Megatron-LM's ``gpt_builder`` and builds and prepares a GPTModel with the APB spec, for
  scripts of your own (``partial(model_provider, apb_gpt_builder)``).

What needs a patch (``patches/megatron_lm`` in this repository): the text generation
server, which must answer through megatron_apb's engine (:func:`get_apb_inference_engine`)
since Megatron's static inference engine decodes through its own KV-cache context, which
APB attention does not use.  That engine also prepares the model
(:func:`prepare_megatron_lm_model`: Megatron's rotary table is otherwise sliced for its
zig-zag context-parallel layout; ``--apb-heads`` loads trained retaining heads).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Mapping, Optional

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from ..config import BACKENDS, COMPRESSORS, MODES, APBConfig, APBConfigError

#: environment variable -> (APBConfig field, type)
ENV_VARS = {
    "APB_MODE": ("mode", str),
    "APB_ANCHOR_LEN": ("anchor_len", int),
    "APB_PASSING_LEN": ("passing_len", int),
    "APB_COMPRESSOR": ("compressor", str),
    "APB_QUERY_PREFIX_LEN": ("query_prefix_len", int),
    "APB_RETAINING_HEAD_HIDDEN": ("retaining_head_hidden", int),
    "APB_BACKEND": ("backend", str),
}
#: ``--apb-*`` argument (its ``args`` attribute) -> APBConfig field
ARG_FIELDS = {
    "apb_mode": "mode",
    "apb_anchor_len": "anchor_len",
    "apb_passing_len": "passing_len",
    "apb_compressor": "compressor",
    "apb_query_prefix_len": "query_prefix_len",
    "apb_retaining_head_hidden": "retaining_head_hidden",
    "apb_backend": "backend",
}
#: what ``--spec`` names: ``--spec megatron_apb.megatron.lm_hooks gpt_layer_apb_spec``
SPEC_ARGS = (__name__, "gpt_layer_apb_spec")


# ------------------------------------------------------------------------- arguments
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _heads_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r} (trained retaining heads, safetensors)")
    return text


def add_apb_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: the ``--apb-*`` flags.  Returns ``parser``.

    Each flag is checked on its own when parsed (choices, integer ranges, an existing
    ``--apb-heads`` file); the combination (e.g. ``--apb-passing-len`` with
    ``--apb-mode star``) is checked right after parsing, so a bad command line stops
    with argparse's usage message and exit status 2 naming the flags, before anything
    is built.  Unset flags fall back to the ``APB_*`` environment variables, then to
    ``APBConfig``'s defaults.
    """
    group = parser.add_argument_group(title="APB (megatron_apb)")
    group.add_argument("--apb-mode", choices=MODES, default=None,
                       help="context-parallel attention of the APB layer spec (default: apb)")
    group.add_argument("--apb-anchor-len", type=_int_at_least(0), default=None,
                       help="anchor tokens (default: block/4)")
    group.add_argument("--apb-passing-len", type=_int_at_least(0), default=None,
                       help="passing tokens per rank (default: block/8)")
    group.add_argument("--apb-compressor", choices=COMPRESSORS, default=None,
                       help="how passing tokens are chosen (default: query_attention; "
                            "retaining_head with --apb-heads)")
    group.add_argument("--apb-heads", type=_heads_file, default=None,
                       help="trained retaining heads (safetensors, reference layout)")
    group.add_argument("--apb-query-prefix-len", type=_int_at_least(0), default=None,
                       help="document tokens before the query in the anchor")
    group.add_argument("--apb-retaining-head-hidden", type=_int_at_least(1), default=None,
                       help="retaining-head width (default: 1024)")
    group.add_argument("--apb-backend", choices=BACKENDS, default=None,
                       help="attention kernel backend (default: auto)")
    group.add_argument("--apb-query-tokens", type=_int_at_least(1), default=64,
                       help="text generation server: the last N prompt tokens are the query "
                            "(phase 2, embedded in the anchor); the rest is the document")
    _check_after_parsing(parser)
    return parser


def _check_after_parsing(parser: argparse.ArgumentParser):
    """Make ``parser`` (this instance only) reject a bad combination of ``--apb-*`` flags."""
    if getattr(parser, "_apb_checked", False):
        return
    parse_known_args = parser.parse_known_args  # parse_args calls it too

    def checked(*a, **kw):
        namespace, extras = parse_known_args(*a, **kw)
        if any(getattr(namespace, name, None) is not None for name in (*ARG_FIELDS, "apb_heads")):
            try:
                apb_config_from_args(namespace)
            except APBConfigError as exc:
                parser.error(_flag_names(str(exc)))
        return namespace, extras

    parser.parse_known_args = checked
    parser._apb_checked = True


def _flag_names(message: str) -> str:
    """An APBConfig error with its field names written as the ``--apb-*`` flags."""
    for attr, field in ARG_FIELDS.items():
        message = re.sub(rf"(?<![-\w]){field}\b", "--" + attr.replace("_", "-"), message)
    return message


def apb_config_from_env(environ: Optional[Mapping[str, str]] = None) -> APBConfig:
    """The APBConfig that the ``APB_*`` environment variables describe (unset: defaults).

    ``APB_HEADS`` alone selects ``compressor='retaining_head'``.  Raises
    :class:`APBConfigError` naming the variable for a value of the wrong type.
    """
    environ = os.environ if environ is None else environ
    fields = {}
    for name, (field, kind) in ENV_VARS.items():
        value = environ.get(name)
        if value in (None, ""):
            continue
        try:
            fields[field] = kind(value)
        except ValueError:
            raise APBConfigError(f"{name}={value!r}: expected {kind.__name__}") from None
    if environ.get("APB_HEADS") and "compressor" not in fields:
        fields["compressor"] = "retaining_head"
    return APBConfig(**fields)


def apb_config_from_args(args, environ: Optional[Mapping[str, str]] = None) -> APBConfig:
    """``--apb-*`` arguments over the ``APB_*`` environment variables over the defaults.

    ``args`` is any object with (some of) the attributes :func:`add_apb_args` defines;
    missing attributes count as unset.
    """
    config = apb_config_from_env(environ)
    changes = {f: getattr(args, a) for a, f in ARG_FIELDS.items() if getattr(args, a, None) is not None}
    if getattr(args, "apb_heads", None) and "compressor" not in changes:
        changes["compressor"] = "retaining_head"
    return config.replace(**changes) if changes else config


def megatron_lm_args():
    """Megatron-LM's parsed arguments, or None outside Megatron-LM or before they are set.

    Looks only at an already imported ``megatron.training``; never imports it.
    """
    global_vars = sys.modules.get("megatron.training.global_vars")
    if global_vars is None:
        return None
    try:
        return global_vars.get_args()
    except Exception:  # not set yet
        return None


def current_apb_config(args=None) -> APBConfig:
    """The APB settings a layer is built with: ``args`` (default: Megatron-LM's parsed
    arguments, when set) over the environment, else the environment alone."""
    args = megatron_lm_args() if args is None else args
    return apb_config_from_env() if args is None else apb_config_from_args(args)


# ---------------------------------------------------------------------------- spec
def megatron_lm_base_spec(config) -> ModuleSpec:
    """Megatron's layer spec that Megatron-LM would use without ``--spec``, for a dense
    GPT with ``config`` (a ``TransformerConfig``): the Transformer Engine spec when
    ``config.transformer_impl`` is ``'transformer_engine'`` and Transformer Engine is
    installed, else the local spec (with ``normalization``); ``qk_layernorm``,
    ``qk_l2_norm`` and the MoE settings follow ``config``."""
    from megatron.core.models.gpt import gpt_layer_specs

    from .spec import _have_te

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
    if impl == "transformer_engine" and _have_te():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**common)
    return gpt_layer_specs.get_gpt_layer_local_spec(
        normalization=getattr(config, "normalization", "RMSNorm"), **common
    )


def get_gpt_layer_apb_spec_for_megatron_lm(config, args=None) -> ModuleSpec:
    """The layer spec Megatron-LM builds with: :func:`megatron_lm_base_spec` for
    ``config`` with APB attention whose settings are :func:`current_apb_config` of
    ``args`` (default: Megatron-LM's parsed arguments, else the environment)."""
    from .spec import get_gpt_layer_apb_spec

    return get_gpt_layer_apb_spec(current_apb_config(args), megatron_lm_base_spec(config))


class _ChosenAtBuild(TransformerLayerSubmodules):
    """Placeholder submodules of :data:`gpt_layer_apb_spec`; each layer picks its own."""


class MegatronLMAPBTransformerLayer(TransformerLayer):
    """Megatron's ``TransformerLayer`` whose submodules are chosen when it is built.

    Built from :data:`gpt_layer_apb_spec`, it takes those of
    :func:`get_gpt_layer_apb_spec_for_megatron_lm` for its own ``TransformerConfig`` and
    the APB settings current at that moment, so the ``--spec`` object can be imported at
    any time (even before Megatron-LM parses its arguments).  Given real submodules, it
    is a plain ``TransformerLayer``.
    """

    def __init__(self, config, submodules, *args, **kwargs):
        if isinstance(submodules, _ChosenAtBuild):
            spec = get_gpt_layer_apb_spec_for_megatron_lm(config)
            if spec.module is not TransformerLayer:
                raise APBConfigError(f"the base layer spec builds {spec.module.__name__}, not TransformerLayer")
            submodules = spec.submodules
        super().__init__(config, submodules, *args, **kwargs)


#: the object ``--spec megatron_apb.megatron.lm_hooks gpt_layer_apb_spec`` names
gpt_layer_apb_spec = ModuleSpec(module=MegatronLMAPBTransformerLayer, submodules=_ChosenAtBuild())


# -------------------------------------------------------------------- model building
def transformer_config_from_args(args):
    """A ``TransformerConfig`` from Megatron-LM-style ``args``.

    Inside a Megatron-LM checkout this is Megatron-LM's own
    ``core_transformer_config_from_args``.  With megatron-core alone it is the subset a
    dense GPT needs, translated the same way: every ``TransformerConfig`` field found in
    ``args``, then ``--swiglu``, ``--group-query-attention``/``--num-query-groups``,
    ``--no-persist-layer-norm``, ``--num-experts``, ``--rotary-interleaved``.
    """
    import importlib.util

    if importlib.util.find_spec("megatron.training") is not None:
        from megatron.training.arguments import core_transformer_config_from_args

        return core_transformer_config_from_args(args)

    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

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
    ``GPTModel`` arguments taken from ``args``, then :func:`prepare_megatron_lm_model`.

    Use it where a script passes a builder to Megatron-LM's ``model_provider``
    (``partial(model_provider, apb_gpt_builder)``).  The stock ``gpt_builder`` with
    ``--spec`` builds the same model unprepared (enough at CP = 1; the patched text
    generation server prepares it through :func:`get_apb_inference_engine`).  ``args`` is
    Megatron-LM's parsed arguments or a Namespace with the same names
    (``padded_vocab_size`` or ``vocab_size``, ``max_position_embeddings``,
    ``position_embedding_type``, ...); the APB settings come from its ``--apb-*``
    attributes over the ``APB_*`` environment.
    """
    from megatron.core.models.gpt import GPTModel

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


# ------------------------------------------------------------- after the model is built
def _unwrap(model):
    """The GPTModel inside Megatron-LM's wrappers (``Float16Module``, DDP)."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def load_apb_heads(model, path: str) -> int:
    """Copy a retaining-head checkpoint (reference layout, full model) into the APB layers
    of ``model`` (this rank's TP shard).  Returns the number of layers loaded."""
    import torch

    from ..comm import group_rank, group_size
    from ..compress import shard_retaining_head
    from ..heads import read_retaining_heads
    from .context import apb_modules

    heads = read_retaining_heads(path)
    cores = apb_modules(model)
    if not cores or any(c.retaining_head is None for c in cores):
        raise APBConfigError(
            f"--apb-heads {path}: the model has no retaining heads; build it with "
            "--apb-compressor retaining_head (and --apb-retaining-head-hidden = the file's width)"
        )
    c = _unwrap(model).config
    with torch.no_grad():
        for i, core in enumerate(cores):
            if i not in heads:
                raise APBConfigError(f"--apb-heads {path} lacks layer {i}")
            fc1, fc2 = shard_retaining_head(
                *heads[i], num_heads=c.num_attention_heads, num_kv_heads=c.num_query_groups,
                head_dim=c.kv_channels, tp_rank=group_rank(core.tp_group), tp_size=group_size(core.tp_group),
            )
            core.retaining_head.fc1.weight.copy_(fc1)
            core.retaining_head.fc2.weight.copy_(fc2)
    return len(cores)


def prepare_megatron_lm_model(model, args=None):
    """Make a GPTModel built by Megatron-LM with the APB spec ready for APB:
    ``megatron_apb.megatron.prepare_model`` (unsliced rotary table, shared layout check)
    and the retaining heads of ``--apb-heads`` (or ``APB_HEADS``).  A model without APB
    layers is returned untouched.  Returns ``model``."""
    from .context import apb_modules
    from .setup import prepare_model

    if not apb_modules(model):
        return model
    prepare_model(model)
    heads = getattr(args, "apb_heads", None) if args is not None else None
    heads = heads or os.environ.get("APB_HEADS")
    if heads:
        load_apb_heads(model, heads)
    return model


# ------------------------------------------------------------ text generation server
class APBServerEngine:
    """The part of Megatron's static inference engine that Megatron-LM's text generation
    server uses (``generate(inference_requests=...)`` from ``run_mcore_engine`` on every
    rank, ``generate(prompts=..., sampling_params=...)`` for its warm-up), answering with
    megatron_apb's engine: APB prefill of the prompt's document part over the CP group,
    exact decoding.

    The server sends plain prompts; the last ``query_tokens`` tokens of each are taken as
    the query (embedded in the anchor, run in phase 2), the rest as the document.
    Log-probabilities are not computed (empty lists); prompts are answered one at a time.
    """

    def __init__(self, model, tokenizer, apb_config: APBConfig, *, cp_group, tp_group, vocab_size,
                 query_tokens: int = 64):
        import torch

        from ..inference import APBEngine

        self.engine = APBEngine(_unwrap(model), apb_config, cp_group=cp_group, tp_group=tp_group,
                                vocab_size=vocab_size)
        self.query_tokens = query_tokens
        self._next_id = 0
        self.controller = type("Controller", (), {})()  # what run_mcore_engine reads
        self.controller.tokenizer = tokenizer
        self.controller.sampling_rng = torch.Generator()

    def get_new_request_id(self) -> str:
        """A new request id (a counter, as Megatron's engine)."""
        self._next_id += 1
        return str(self._next_id)

    def _split(self, tokens):
        if len(tokens) < 2:
            raise APBConfigError("the prompt needs at least two tokens (document and query)")
        q = max(1, min(self.query_tokens, len(tokens) // 2))
        return tokens[:-q], tokens[-q:]

    def generate_tokens(self, prompt_tokens, *, num_tokens_to_generate, temperature=0.0, top_p=1.0, seed=0,
                        stop_ids=()):
        """Generated token ids for one tokenized prompt (every rank returns the same)."""
        from ..inference import SamplingConfig

        doc, query = self._split(list(prompt_tokens))
        sampling = SamplingConfig(
            temperature=temperature, top_p=top_p if 0 < top_p <= 1 else 1.0, seed=seed,
            max_new_tokens=num_tokens_to_generate, stop_ids=list(stop_ids),
        )
        return self.engine.generate(doc, query, sampling).output_ids

    def generate(self, prompts=None, sampling_params=None, inference_requests=None, **unused):
        """Megatron's engine contract: returns one request object per prompt with
        ``prompt``, ``prompt_tokens``, ``generated_text``, ``generated_tokens`` (a tensor),
        empty ``prompt_log_probs``/``generated_log_probs`` and ``segments``."""
        import torch
        from megatron.core.inference.inference_request import InferenceRequest

        tok = self.controller.tokenizer
        if inference_requests is None:
            inference_requests = [
                InferenceRequest(prompt=p, prompt_tokens=tok.tokenize(p), sampling_params=sampling_params,
                                 request_id=self.get_new_request_id())
                for p in prompts
            ]
        eod = getattr(tok, "eod", None)
        for req in inference_requests:
            params = req.sampling_params
            temperature = 0.0 if (params.top_k == 1 or params.temperature == 0) else params.temperature
            out = self.generate_tokens(
                req.prompt_tokens, num_tokens_to_generate=params.num_tokens_to_generate,
                temperature=temperature, top_p=params.top_p, stop_ids=[eod] if eod is not None else [],
            )
            req.generated_tokens = torch.tensor(out, dtype=torch.long)
            req.generated_length = len(out)
            req.generated_text = tok.detokenize(out)
            req.prompt_log_probs, req.generated_log_probs = [], []
            req.segments = []
        return inference_requests


def get_apb_inference_engine(args, model, tokenizer) -> APBServerEngine:
    """The text generation server's engine for a model built with the APB spec (see
    ``patches/megatron_lm``): prepares the model (after the server loaded its checkpoint)
    and wraps megatron_apb's engine over Megatron's parallel-state CP and TP groups."""
    from megatron.core import parallel_state

    from .context import apb_modules

    cores = apb_modules(model)
    if not cores:
        raise APBConfigError(
            "the APB server engine needs the APB layer spec: add --spec " + " ".join(SPEC_ARGS)
        )
    prepare_megatron_lm_model(model, args)
    return APBServerEngine(
        model, tokenizer, cores[0].apb_config, cp_group=parallel_state.get_context_parallel_group(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        vocab_size=getattr(tokenizer, "vocab_size", None) or _unwrap(model).vocab_size,
        query_tokens=getattr(args, "apb_query_tokens", 64),
    )
