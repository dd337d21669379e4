"""Streaming conversion (:func:`convert_checkpoint`): a Hugging Face directory or GGUF
file written as a converted directory (full Megatron state, :func:`~.io.save_converted`'s
format) one tensor at a time, so that memory holds one tensor however large the model
(:func:`write_safetensors` writes the header first, from the shapes, then each tensor's
bytes as it is made).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Callable, Iterable, Optional, Tuple

import torch

from ..atomic import Report, atomic_directory
from .io import FORMAT_NAME, FORMAT_VERSION, MARKER_FILE, WEIGHTS_FILE, check_output_directory, open_checkpoint
from .stream import Progress, check_sources, shard_recipes, source_names

#: safetensors names of the dtypes written
_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}
Entry = Tuple[str, Tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]


def write_safetensors(path: str, entries: Iterable[Entry], metadata: Optional[dict] = None,
                      progress: Optional[Progress] = None) -> int:
    """Write a safetensors file of ``entries`` ``(name, shape, dtype, make)``: the header
    from the shapes, then ``make()`` of each in turn (cast to ``dtype``), so that one tensor
    is in memory at a time.  Returns the bytes written."""
    entries = list(entries)
    header, offset = {"__metadata__": dict(metadata or {})}, 0
    for name, shape, dtype, _ in entries:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, dtype, make in entries:
            t = make().to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: made {tuple(t.shape)}, the header says {tuple(shape)}")
            f.write(t.view(torch.uint8).numpy().data)
            if progress is not None:
                progress.update(t.numel() * t.element_size())
        f.flush()
        os.fsync(f.fileno())
    return offset


def convert_checkpoint(source, out_dir, *, dtype: Optional[torch.dtype] = None, report: Report = None,
                       progress: bool = False) -> str:
    """Convert checkpoint ``source`` (anything :func:`~.io.open_checkpoint` opens) into the
    converted-directory format at ``out_dir``, tensor by tensor.

    ``dtype`` casts the weights (default: as stored; GGUF gives float32).  The directory is
    written whole or not at all (a conversion killed midway leaves nothing, or the earlier
    converted checkpoint; run it again); one holding other files is refused.  The result
    loads as :func:`~.io.load_hf_checkpoint` of ``source`` would (bit-exact without
    ``dtype``).  Returns ``out_dir``.
    """
    out_dir = os.fspath(out_dir)
    check_output_directory(out_dir)
    ckpt = open_checkpoint(source, report=report)
    spec, reader = ckpt.spec, ckpt.reader
    resolve = check_sources(reader, spec, ckpt.megatron_names, os.fspath(source))
    recipes = shard_recipes(spec, 0, 1, ckpt.megatron_names, resolve)
    sources = source_names(spec, ckpt.megatron_names)
    entries = []
    for name, (read, shape) in recipes.items():
        stored = reader.infos[resolve(sources[name][0])].dtype
        entries.append((name, shape, dtype or stored, lambda read=read: read(reader)))
    total = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, s, d, _ in entries)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "weights": WEIGHTS_FILE, "spec": spec.to_dict()}
    tokenizer = ckpt.tokenizer()
    bar = Progress(len(entries), total, progress, label="converting", unit="written")
    with reader, atomic_directory(out_dir, report=report) as tmp:
        write_safetensors(os.path.join(tmp, WEIGHTS_FILE), entries, {"format": "pt", "names": "megatron"}, bar)
        with open(os.path.join(tmp, MARKER_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        generation = os.path.join(os.fspath(source), "generation_config.json")
        if os.path.isfile(generation):  # its EOS ids end generation (eos_token_ids)
            shutil.copyfile(generation, os.path.join(tmp, "generation_config.json"))
    return out_dir
