"""Hooks that let Megatron-LM's own entry points build and run models with APB attention.

Megatron-LM already has two hooks, so most of APB needs no patch at all:

* ``--spec MODULE NAME``: ``gpt_builder`` builds the layers from the object ``NAME`` of
  ``MODULE`` (``megatron.core.transformer.spec_utils.import_module``, which returns the
  attribute itself, not a call of it).  :data:`gpt_layer_apb_spec` is that object::

      PYTHONPATH=/path/to/megatron_apb/patches/megatron_lm:$PYTHONPATH \\
      APB_MODE=apb APB_ANCHOR_LEN=4096 APB_PASSING_LEN=2048 \\
      torchrun ... pretrain_gpt.py ... --spec apb_megatron_lm gpt_layer_apb_spec

  Its core attention reads its APB settings when the model is built: from Megatron-LM's
  parsed arguments when :func:`add_apb_args` added the ``--apb-*`` flags, otherwise from
  the ``APB_*`` environment variables (:data:`ENV_VARS`).
* ``extra_args_provider``: :func:`add_apb_args` adds ``--apb-mode``, ``--apb-anchor-len``,
  ``--apb-passing-len``, ``--apb-compressor``, ``--apb-heads``, ... (the entry points pass
  their own provider, so using ours is a one-line patch; see ``patches/megatron_lm``).

What still needs a patch (see the ``.patch`` files beside this module): calling
``megatron_apb.megatron.prepare_model(model)`` after the build when CP > 1 (Megatron's
rotary table is otherwise sliced for its zig-zag layout), loading ``--apb-heads``, and, for
the text generation server, generating with megatron_apb's engine
(:func:`get_apb_inference_engine`), since Megatron's static inference engine decodes
through its own KV-cache context, which APB attention does not use.
"""

from __future__ import annotations

import copy
import os
from typing import Mapping, Optional

from megatron_apb.config import APBConfig, APBConfigError
from megatron_apb.megatron.core_attention import APBCoreAttention

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


def add_apb_args(parser):
    """Megatron-LM ``extra_args_provider``: the ``--apb-*`` flags.  Returns ``parser``."""
    group = parser.add_argument_group(title="APB (megatron_apb)")
    group.add_argument("--apb-mode", choices=["apb", "star", "exact", "ulysses"], default=None,
                       help="context-parallel attention of the APB layer spec (default: apb)")
    group.add_argument("--apb-anchor-len", type=int, default=None, help="anchor tokens (default: block/4)")
    group.add_argument("--apb-passing-len", type=int, default=None, help="passing tokens per rank (default: block/8)")
    group.add_argument("--apb-compressor", choices=["retaining_head", "query_attention", "random"], default=None,
                       help="how passing tokens are chosen (default: query_attention; retaining_head with --apb-heads)")
    group.add_argument("--apb-heads", type=str, default=None,
                       help="trained retaining heads (safetensors, reference layout)")
    group.add_argument("--apb-query-prefix-len", type=int, default=None,
                       help="document tokens before the query in the anchor")
    group.add_argument("--apb-retaining-head-hidden", type=int, default=None,
                       help="retaining-head width (default: that of --apb-heads, else 1024)")
    group.add_argument("--apb-backend", choices=["auto", "sdpa", "flex", "math", "reference"], default=None)
    group.add_argument("--apb-query-tokens", type=int, default=64,
                       help="text generation server: the last N prompt tokens are the query "
                            "(phase 2, embedded in the anchor); the rest is the document")
    return parser


def apb_config_from_env(environ: Optional[Mapping[str, str]] = None) -> APBConfig:
    """The APBConfig that the ``APB_*`` environment variables describe (unset: defaults)."""
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
    """``--apb-*`` arguments over the ``APB_*`` environment variables over the defaults."""
    config = apb_config_from_env(environ)
    changes = {f: getattr(args, a) for a, f in ARG_FIELDS.items() if getattr(args, a, None) is not None}
    if getattr(args, "apb_heads", None) and "compressor" not in changes:
        changes["compressor"] = "retaining_head"
    return config.replace(**changes) if changes else config


def _megatron_lm_args():
    """Megatron-LM's parsed arguments, or None outside Megatron-LM (or before parsing)."""
    try:
        from megatron.training import get_args
    except ImportError:
        return None
    try:
        return get_args()
    except Exception:  # not initialised yet
        return None


def current_apb_config() -> APBConfig:
    """The settings the layer spec builds with: Megatron-LM's args if parsed, else env."""
    args = _megatron_lm_args()
    return apb_config_from_env() if args is None else apb_config_from_args(args)


class MegatronLMAPBCoreAttention(APBCoreAttention):
    """``APBCoreAttention`` whose settings come from :func:`current_apb_config` at build."""

    def __init__(self, *args, apb_config: Optional[APBConfig] = None, **kwargs):
        super().__init__(*args, apb_config=apb_config or current_apb_config(), **kwargs)


def _base_spec():
    """Megatron's TE spec when Megatron-LM runs with Transformer Engine, else its local spec,
    following Megatron-LM's ``--transformer-impl``, ``--normalization``, ``--qk-layernorm``
    (or ``APB_TRANSFORMER_IMPL`` / ``APB_NORMALIZATION`` outside it)."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_apb.megatron.spec import _have_te

    args = _megatron_lm_args()
    impl = getattr(args, "transformer_impl", None) or os.environ.get(
        "APB_TRANSFORMER_IMPL", "transformer_engine" if _have_te() else "local"
    )
    qk_layernorm = bool(getattr(args, "qk_layernorm", False))
    if impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    normalization = getattr(args, "normalization", None) or os.environ.get("APB_NORMALIZATION", "RMSNorm")
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)


def get_gpt_layer_apb_spec_for_megatron_lm():
    """The layer spec for ``--spec``: Megatron-LM's usual spec with APB attention whose
    settings are resolved when each layer is built."""
    from megatron_apb.megatron.spec import get_gpt_layer_apb_spec

    spec = copy.deepcopy(get_gpt_layer_apb_spec(APBConfig(mode="exact"), _base_spec()))
    spec.submodules.self_attention.submodules.core_attention = MegatronLMAPBCoreAttention
    return spec


#: the object ``--spec apb_megatron_lm gpt_layer_apb_spec`` names (built at first import,
#: which Megatron-LM does inside ``gpt_builder``, after parsing its arguments)
gpt_layer_apb_spec = get_gpt_layer_apb_spec_for_megatron_lm()


# ------------------------------------------------------------- after the model is built
def load_apb_heads(model, path: str) -> int:
    """Copy a retaining-head checkpoint (reference layout, full model) into the APB layers
    of ``model`` (this rank's TP shard).  Returns the number of layers loaded."""
    import torch

    from megatron_apb.comm import group_rank, group_size
    from megatron_apb.compress import shard_retaining_head
    from megatron_apb.heads import read_retaining_heads
    from megatron_apb.megatron import apb_modules

    heads = read_retaining_heads(path)
    cores = apb_modules(model)
    if not cores or any(c.retaining_head is None for c in cores):
        raise APBConfigError(
            f"--apb-heads {path}: the model has no retaining heads; build it with "
            "--apb-compressor retaining_head (and --apb-retaining-head-hidden = the file's width)"
        )
    c = model.config
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
    """What Megatron-LM's builder calls after building a GPTModel with this spec:
    ``prepare_model`` (unsliced rotary table, shared layout check) and ``--apb-heads``."""
    from megatron_apb.megatron import apb_modules, prepare_model

    if not apb_modules(model):
        return model
    prepare_model(model)
    heads = getattr(args, "apb_heads", None) if args is not None else os.environ.get("APB_HEADS")
    if heads:
        load_apb_heads(model, heads)
    return model


# ------------------------------------------------------------ text generation server
class APBServerEngine:
    """The part of Megatron's static inference engine that Megatron-LM's text generation
    server uses (``generate(prompts=..., sampling_params=...)`` on rank 0 and
    ``generate(inference_requests=...)`` through ``run_mcore_engine`` on every rank),
    answering with megatron_apb's engine: APB prefill of the prompt's document part over
    the CP group, exact decoding.

    The server sends plain prompts; the last ``query_tokens`` tokens of each are taken as
    the query (embedded in the anchor, run in phase 2), the rest as the document.
    Log-probabilities are not computed (empty lists); batch = one prompt at a time.
    """

    def __init__(self, model, tokenizer, apb_config: APBConfig, *, cp_group, tp_group, vocab_size,
                 query_tokens: int = 64):
        import torch

        from megatron_apb.inference import APBEngine

        self.engine = APBEngine(model, apb_config, cp_group=cp_group, tp_group=tp_group, vocab_size=vocab_size)
        self.query_tokens = query_tokens
        self._next_id = 0
        self.controller = type("Controller", (), {})()  # what run_mcore_engine reads
        self.controller.tokenizer = tokenizer
        self.controller.sampling_rng = torch.Generator()

    def get_new_request_id(self) -> str:
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
        from megatron_apb.inference import SamplingConfig

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


def get_apb_inference_engine(args, model, tokenizer):
    """The text generation server's engine when ``--apb-mode`` is given (see the patch)."""
    from megatron.core import parallel_state

    from megatron_apb.megatron import apb_modules

    if not apb_modules(model):
        raise APBConfigError("--apb-mode needs the APB layer spec: add --spec apb_megatron_lm gpt_layer_apb_spec")
    prepare_megatron_lm_model(model, args)
    config = apb_modules(model)[0].apb_config
    return APBServerEngine(
        model, tokenizer, config, cp_group=parallel_state.get_context_parallel_group(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        vocab_size=getattr(tokenizer, "vocab_size", None) or model.vocab_size,
        query_tokens=getattr(args, "apb_query_tokens", 64),
    )
