"""Loading Hugging Face Llama-family checkpoints into Megatron-Core GPT models with APB.

Sources (:func:`open_checkpoint`):

* a Hugging Face model directory (``config.json`` and ``*.safetensors``, sharded or not;
  ``pytorch_model.bin`` only as a fallback, memory-mapped with ``weights_only=True``),
* a ``.gguf`` file (read tensor by tensor with the ``gguf`` package),
* a directory written by :func:`save_converted` / :func:`convert_checkpoint` (marker file
  ``megatron_apb_checkpoint.json``),
* a Megatron-Core distributed checkpoint written by :func:`convert_to_dist` (Megatron-LM's
  layout: ``latest_checkpointed_iteration.txt``, ``release/``; the same marker file holds
  the spec), read into a model at any TP/CP with :func:`load_dist`.

Opening parses the config into a :class:`ModelSpec` and checks the weight files' headers
(a missing or truncated shard is named with its tensors) without reading any weights.
:func:`load_shard` then reads, for one tensor-parallel rank, only the rows and columns it
owns, tensor by tensor, straight into a model built with :func:`build_model` (in the
target dtype, on the target device)::

    ckpt = open_checkpoint(path)
    model = build_model(ckpt.spec, APBConfig(mode="apb"), pg_collection=pg, dtype=torch.bfloat16,
                        config_overrides=dict(perform_initialization=False))
    load_shard(model, ckpt.reader, ckpt.spec, tp_rank, tp_size, megatron_names=ckpt.megatron_names)
    logits = model(tokens, None, None)[..., : ckpt.spec.vocab_size]   # drop the padded vocab rows

:func:`load_hf_checkpoint` gives the *full* (TP = 1) Megatron state instead (for tests
and in-memory work; :func:`load_into_model` shards such a state with :func:`shard_for_tp`,
the slow reference the streaming load is tested against).

The config's ``model_type`` picks a :class:`ModelFamily` (its tensor names and config
quirks) from :data:`megatron_apb.registry.MODEL_FAMILIES`; built in (``families/``):
``llama`` (Llama 2/3.x, Yi-1.5, SmolLM2, ...), ``qwen2`` (Qwen2, Qwen2.5), ``mistral`` and
``Yi``/``yi`` (01.AI's original format), with RoPE ``default``, ``llama3``, ``linear`` or
``yarn`` scaling and no sliding window or mixture of experts in use.  Registering a
:class:`ModelFamily` adds one.

The vocabulary is padded with zero rows to a multiple of the TP size (Megatron's
``VocabParallelEmbedding`` needs it); logits of the padded ids are 0, so slice
``[..., :spec.vocab_size]`` before any argmax or softmax.

Modules: :mod:`.spec` (``ModelSpec``), :mod:`.rope` (RoPE parsing, YaRN), :mod:`.families`
(one per family), :mod:`.convert` (HF -> Megatron names), :mod:`.sharding` (TP of a full
state), :mod:`.reader` / :mod:`.gguf_reader` (lazy tensor readers), :mod:`.stream` (the
sharded load), :mod:`.io` (opening, converted directories), :mod:`.writer` (streaming
conversion), :mod:`.dist` / :mod:`.dist_layout` (distributed checkpoints), :mod:`.build`
(models).
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
from .dist import convert_to_dist, load_dist
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
    "convert_to_dist",
    "load_dist",
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
