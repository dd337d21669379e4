"""What a model family is: its Hugging Face tensor names (:class:`KeyMap`) and config
quirks (:class:`ModelFamily`), and how families are registered and found by ``model_type``.

A family module builds one :class:`ModelFamily` and calls :func:`register_family`; nothing
else in the package names a family.  Families go into
:data:`megatron_apb.registry.MODEL_FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from ...errors import UnsupportedModelError
from ...registry import MODEL_FAMILIES

#: RoPE types the converter can express in a Megatron model (a family lists a subset)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "yarn")

#: ``get(name, default=None)`` of a Hugging Face config, as :class:`~..spec.ModelSpec` reads it
ConfigGetter = Callable[..., object]


@dataclass(frozen=True)
class KeyMap:
    """The Hugging Face tensor names of a Llama-style decoder, as module paths without the
    ``.weight`` / ``.bias`` suffix; ``{i}`` stands for the layer index.

    ``bare_prefix`` is what a bare base-model state (``LlamaModel.state_dict()``) lacks in
    front of every name but the LM head; it is added back before conversion.
    """

    embed: str
    input_norm: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    post_attention_norm: str
    gate_proj: str
    up_proj: str
    down_proj: str
    final_norm: str
    lm_head: str
    bare_prefix: str = "model."


@dataclass(frozen=True)
class ModelFamily:
    """One Hugging Face ``model_type`` the checkpoint loader converts.

    Args:
        name: the ``model_type`` of the family's ``config.json``.
        keys: its tensor names.
        qkv_bias: q/k/v projections carry biases (Qwen2).  Families without them refuse
            ``attention_bias=True`` (Megatron has no ``linear_proj`` bias without MLP biases).
        rope_types: the ``rope_type`` values converted (a subset of ``SUPPORTED_ROPE_TYPES``).
        sliding_window_flag: the boolean config field that turns the sliding window on
            (Qwen2's ``use_sliding_window``); None: a ``sliding_window`` below
            ``max_position_embeddings`` is in use.  Either way a window in use is refused.
        hf_config_type: the transformers ``model_type`` whose config class gives the
            defaults of fields a ``config.json`` leaves out (default: ``name``; a type
            transformers does not know: no defaults, the ``config.json`` must be complete).
        note: a hint added to the message refusing an unknown ``model_type``.
    """

    name: str
    keys: KeyMap
    qkv_bias: bool = False
    rope_types: Tuple[str, ...] = SUPPORTED_ROPE_TYPES
    sliding_window_flag: Optional[str] = None
    hf_config_type: Optional[str] = None
    note: str = ""

    def __post_init__(self):
        unknown = sorted(set(self.rope_types) - set(SUPPORTED_ROPE_TYPES))
        if unknown:
            raise ValueError(f"model family {self.name!r}: rope types {unknown} are not in {SUPPORTED_ROPE_TYPES}")

    @property
    def defaults_type(self) -> str:
        """The transformers ``model_type`` whose config class gives the field defaults."""
        return self.hf_config_type or self.name

    def check_sliding_window(self, get: ConfigGetter) -> None:
        """Raise :class:`UnsupportedModelError` when the config uses a sliding window."""
        layer_types = get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            kinds = sorted(set(layer_types))
            raise UnsupportedModelError(
                f"layer_types={kinds} (use_sliding_window={get('use_sliding_window')}, "
                f"max_window_layers={get('max_window_layers')}): sliding-window attention is not "
                "supported; only 'full_attention' layers"
            )
        if self.sliding_window_flag is not None:
            if get(self.sliding_window_flag, False):
                raise UnsupportedModelError(
                    f"{self.sliding_window_flag}=True (sliding_window={get('sliding_window')}, "
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


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Make ``family`` loadable under ``family.name``; returns it."""
    return MODEL_FAMILIES.register(family, replace=replace)


def supported_model_types() -> Tuple[str, ...]:
    """The ``model_type`` names of every registered family."""
    return MODEL_FAMILIES.names()


def family_for(model_type) -> ModelFamily:
    """The family registered under ``model_type``; :class:`UnsupportedModelError` naming
    the ``model_type`` field and listing the supported ones otherwise."""
    if not (isinstance(model_type, str) and model_type in MODEL_FAMILIES):
        names = supported_model_types()
        notes = dict.fromkeys(MODEL_FAMILIES.get(name).note for name in names)
        hint = "".join(f" ({note})" for note in notes if note)
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not supported; supported model types: {', '.join(names)}{hint}"
        )
    return MODEL_FAMILIES.get(model_type)
