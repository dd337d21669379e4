"""The family-independent description of a model (:class:`ModelSpec`): parsed from a
Hugging Face config (the ``model_type``'s :class:`~.families.ModelFamily` supplies the
per-family quirks), turned into Megatron's ``TransformerConfig`` and ``GPTModel``
arguments, and its RoPE frequencies (Llama-3 through Megatron's own formula, YaRN through
:mod:`.rope`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.transformer_config import TransformerConfig

from ..errors import UnsupportedModelError
from .families import ModelFamily, family_for
from .rope import rope_parameters, yarn_inv_freq

Tensor = torch.Tensor

# Megatron's hard-coded Llama-3 scaling constants (RotaryEmbedding._apply_scaling defaults)
MEGATRON_LLAMA3_DEFAULTS = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


@dataclass
class ModelSpec:
    """What building a Megatron ``GPTModel`` for a Llama-family checkpoint needs.

    ``rope_scaling_type`` is None (plain RoPE), ``"llama3"`` (``rope_scaling_factor``,
    ``rope_low_freq_factor``, ``rope_high_freq_factor``,
    ``rope_original_max_position_embeddings``), ``"linear"`` (``rope_scaling_factor``) or
    ``"yarn"`` (``rope_scaling_factor``, ``rope_original_max_position_embeddings``,
    ``rope_beta_fast``, ``rope_beta_slow``, ``rope_attention_factor``, ``rope_truncate``).
    YaRN's attention factor multiplies cos and sin; RoPE being linear, the Megatron state
    holds it folded into the q and k rows of ``linear_qkv`` (:meth:`rope_qk_scale`).
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
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_attention_factor: Optional[float] = None
    rope_truncate: bool = True

    # ------------------------------------------------------------ construction
    @classmethod
    def from_hf_config(cls, config) -> "ModelSpec":
        """The spec of a Hugging Face config (a ``PretrainedConfig`` or its ``config.json`` dict).

        Raises :class:`UnsupportedModelError` naming the field for model types or features
        that are not converted (unregistered ``model_type``, biases other than the
        family's q/k/v ones, a sliding window in use, partial rotary, RoPE scaling the
        family does not list, activations other than SiLU).
        """
        get = _config_getter(config)
        model_type = get("model_type")
        family = family_for(model_type)
        if isinstance(config, Mapping):
            # fields a config.json leaves out take the model class's defaults, as in transformers
            get = _config_getter(_with_class_defaults(config, family))
        for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
            if get(name) is None:
                raise UnsupportedModelError(f"the {model_type} config has no {name!r}")
        act = get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only 'silu' SwiGLU MLPs)")
        if not family.qkv_bias and get("attention_bias", False):
            raise UnsupportedModelError(
                f"attention_bias=True ({model_type} q/k/v/o projection biases) is not "
                "supported: the Megatron layer has no linear_proj bias without MLP biases"
            )
        for name in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size"):
            if get(name):
                raise UnsupportedModelError(
                    f"{name}={get(name)}: mixture-of-experts models are not supported (only dense MLPs)"
                )
        if get("mlp_bias", False):
            raise UnsupportedModelError("mlp_bias=True is not supported (Megatron add_bias_linear=False)")
        family.check_sliding_window(get)

        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        kv_heads = get("num_key_value_heads")
        kv_heads = heads if kv_heads is None else int(kv_heads)
        head_dim = get("head_dim")
        head_dim = hidden // heads if head_dim is None else int(head_dim)
        max_pos = int(get("max_position_embeddings", 2048) or 2048)
        rope = rope_parameters(get, max_pos, family.rope_types)
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
            qkv_bias=family.qkv_bias,
            rope_scaling_type=rope["rope_scaling_type"],
            rope_scaling_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
            rope_beta_fast=float(rope.get("beta_fast", 32.0)),
            rope_beta_slow=float(rope.get("beta_slow", 1.0)),
            rope_attention_factor=rope.get("attention_factor"),
            rope_truncate=bool(rope.get("truncate", True)),
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
        if self.rope_scaling_type not in (None, "llama3", "linear", "yarn"):
            raise ValueError(f"rope_scaling_type={self.rope_scaling_type!r} is not supported")
        if self.kv_channels % 2:
            raise ValueError(f"head_dim ({self.kv_channels}) must be even for RoPE")
        return self

    @property
    def max_positions(self) -> int:
        """The positions the model serves: ``max_position_embeddings``, or with YaRN the
        original positions times the factor when that is more."""
        if self.rope_scaling_type == "yarn":
            return max(self.max_position_embeddings,
                       int(self.rope_original_max_position_embeddings * self.rope_scaling_factor))
        return self.max_position_embeddings

    def rope_qk_scale(self) -> float:
        """The factor on q and k (each) that YaRN's attention factor amounts to (1 otherwise)."""
        if self.rope_scaling_type != "yarn":
            return 1.0
        if self.rope_attention_factor is not None:
            return float(self.rope_attention_factor)
        return 1.0 if self.rope_scaling_factor <= 1 else 0.1 * math.log(self.rope_scaling_factor) + 1.0

    def rope_description(self) -> str:
        """The RoPE scaling in words, for messages."""
        if self.rope_scaling_type == "yarn":
            return (f"YaRN RoPE scaling, factor {self.rope_scaling_factor:g} from "
                    f"{self.rope_original_max_position_embeddings} original positions")
        if self.rope_scaling_type == "llama3":
            return (f"llama3 RoPE scaling, factor {self.rope_scaling_factor:g} from "
                    f"{self.rope_original_max_position_embeddings} original positions")
        if self.rope_scaling_type == "linear":
            return f"linear RoPE scaling, factor {self.rope_scaling_factor:g}"
        return "no RoPE scaling"

    def check_positions(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a prompt plus answer longer than the model's positions, naming both numbers."""
        need = prompt_tokens + max_new_tokens
        if need > self.max_positions:
            raise UnsupportedModelError(
                f"the prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) is {need} positions, "
                f"more than the model's {self.max_positions} (max_position_embeddings="
                f"{self.max_position_embeddings}, {self.rope_description()}): shorten the prompt or lower "
                "max_new_tokens"
            )

    # -------------------------------------------------------------- Megatron side
    def padded_vocab(self, tp_size: int = 1) -> int:
        """The vocabulary rounded up to a multiple of ``tp_size`` (the model's vocab size)."""
        return -(-self.vocab_size // tp_size) * tp_size

    def transformer_config(self, tp_size: int = 1, cp_size: int = 1, dtype=torch.float32, **overrides):
        """A Megatron ``TransformerConfig`` of this model (RMSNorm, SwiGLU, no dropout).

        ``overrides`` replace any field (e.g. ``perform_initialization=False`` to skip the
        random init of weights that a checkpoint overwrites anyway).
        """
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
        ``allow_inv_freq_override`` (used by :func:`~.build.build_model`, which then
        replaces the rotary ``inv_freq`` after the build with
        :func:`~.build.set_rope_inv_freq`).
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
                    "megatron_apb.checkpoints.build_model (it replaces the rotary "
                    "inv_freq after the build) or call set_rope_inv_freq(model, spec)"
                )
        elif self.rope_scaling_type == "linear":
            kwargs["seq_len_interpolation_factor"] = self.rope_scaling_factor
        return kwargs

    def needs_inv_freq_override(self) -> bool:
        """True for YaRN, and when the llama3 constants differ from Megatron's hard-coded ones."""
        if self.rope_scaling_type == "yarn":
            return True
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
            inv_freq = RotaryEmbedding._apply_scaling(
                None,
                inv_freq,
                factor=self.rope_scaling_factor,
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        elif self.rope_scaling_type == "yarn":
            inv_freq = yarn_inv_freq(inv_freq, d, self.rope_theta, self.rope_scaling_factor,
                                     self.rope_original_max_position_embeddings, self.rope_beta_fast,
                                     self.rope_beta_slow, self.rope_truncate)
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


# ------------------------------------------------------------------- config parsing
def _config_getter(config):
    if isinstance(config, Mapping):
        return lambda name, default=None: config.get(name, default)
    if hasattr(config, "to_dict") or hasattr(config, "model_type"):
        return lambda name, default=None: getattr(config, name, default)
    raise TypeError(f"expected a Hugging Face PretrainedConfig or a config dict, got {type(config).__name__}")


def _with_class_defaults(config: Mapping, family: ModelFamily):
    """The config dict as the transformers config class of the family (class defaults for
    absent fields, old rope_scaling fields standardized); the dict itself without
    transformers or when transformers has no class for ``family.defaults_type``."""
    try:
        from transformers import CONFIG_MAPPING, AutoConfig  # local: transformers is optional (the `hf` extra)
    except ImportError:
        return config
    if family.defaults_type not in CONFIG_MAPPING:
        return config
    fields = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(family.defaults_type, **fields)
