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

The config's ``model_type`` picks a :class:`ModelFamily` (its tensor names and config
quirks) from :data:`megatron_apb.registry.MODEL_FAMILIES`; built in (``families/``):
``llama`` (Llama 2/3.x, Yi-1.5, SmolLM2, ...), ``qwen2``, ``mistral`` and ``Yi``/``yi``
(01.AI's original format), with RoPE ``default``, ``llama3`` or ``linear`` scaling and no
sliding window in use.  Registering a :class:`ModelFamily` adds one.

The vocabulary is padded with zero rows to a multiple of the TP size (Megatron's
``VocabParallelEmbedding`` needs it); logits of the padded ids are 0, so slice
``[..., :spec.vocab_size]`` before any argmax or softmax.

Modules: :mod:`.spec` (``ModelSpec``, RoPE), :mod:`.families` (one per family),
:mod:`.convert` (HF -> Megatron names), :mod:`.sharding` (TP), :mod:`.io` (files),
:mod:`.build` (models).
"""

from ..errors import CheckpointError, UnsupportedModelError
from .build import build_model, load_into_model, set_rope_inv_freq
from .convert import hf_shapes, hf_to_megatron
from .families import SUPPORTED_ROPE_TYPES, KeyMap, ModelFamily, family_for, register_family, supported_model_types
from .io import (
    Checkpoint,
    eos_token_ids,
    open_checkpoint,
    FORMAT_NAME,
    FORMAT_VERSION,
    MARKER_FILE,
    WEIGHTS_FILE,
    default_checkpoint,
    default_model_path,
    load_hf_checkpoint,
    load_tokenizer,
    save_converted,
)
from .reader import CheckpointReader
from .sharding import shard_for_tp
from .stream import load_shard, shard_heads
from .writer import convert_checkpoint
from .spec import MEGATRON_LLAMA3_DEFAULTS, ModelSpec

__all__ = [
    "CheckpointError",
    "UnsupportedModelError",
    "ModelSpec",
    "ModelFamily",
    "KeyMap",
    "register_family",
    "family_for",
    "supported_model_types",
    "load_hf_checkpoint",
    "open_checkpoint",
    "eos_token_ids",
    "Checkpoint",
    "CheckpointReader",
    "load_shard",
    "convert_checkpoint",
    "shard_heads",
    "build_model",
    "load_into_model",
    "set_rope_inv_freq",
    "save_converted",
    "load_tokenizer",
    "default_checkpoint",
    "default_model_path",
    "hf_to_megatron",
    "hf_shapes",
    "shard_for_tp",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MARKER_FILE",
    "WEIGHTS_FILE",
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_ROPE_TYPES",
    "MEGATRON_LLAMA3_DEFAULTS",
]


def __getattr__(name):
    # the registry grows when a family registers, so the tuple is read when asked for
    if name == "SUPPORTED_MODEL_TYPES":
        return supported_model_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
