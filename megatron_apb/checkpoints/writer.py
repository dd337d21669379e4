"""Streaming conversion (:func:`convert_checkpoint`): a Hugging Face directory or GGUF
file written as a converted directory (full Megatron state, :func:`~.io.save_converted`'s
format) one tensor at a time, so that memory holds one tensor however large the model
(:func:`write_safetensors` writes the header first, from the shapes, then each tensor's
bytes as it is made).

A conversion that is killed resumes: the weights are written into ``<out>.partial`` beside
the output, with ``<out>.partial.json`` recording (after an fsync) how many tensors are
complete; a rerun with the same source and dtype (the same safetensors header) continues
after the last complete tensor.  The output directory itself still appears whole or not at
all (:func:`~megatron_apb.atomic.atomic_directory`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from typing import Callable, Iterable, Optional, Tuple

import torch

from ..atomic import Report, atomic_directory, atomic_file
from .io import FORMAT_NAME, FORMAT_VERSION, MARKER_FILE, WEIGHTS_FILE, check_output_directory, open_checkpoint
from .stream import Progress, check_sources, shard_recipes, source_names

#: safetensors names of the dtypes written
_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}
Entry = Tuple[str, Tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]


def _header(entries, metadata) -> Tuple[bytes, list]:
    """The safetensors header of ``entries`` (8-byte length + padded JSON) and each
    entry's data offset."""
    header, offset, offsets = {"__metadata__": dict(metadata or {})}, 0, []
    for name, shape, dtype, _ in entries:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offsets.append(offset)
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets + [offset]


def write_safetensors(path: str, entries: Iterable[Entry], metadata: Optional[dict] = None,
                      progress: Optional[Progress] = None, *, start: int = 0,
                      on_tensor: Optional[Callable[[int], None]] = None) -> int:
    """Write a safetensors file of ``entries`` ``(name, shape, dtype, make)``: the header
    from the shapes, then ``make()`` of each in turn (cast to ``dtype``), so that one tensor
    is in memory at a time.  Returns the bytes of tensor data.

    ``start``: entries before it are already in the file (a resumed write: the file is
    opened in place and written from entry ``start``'s offset); ``on_tensor(i)``: called
    after entry ``i`` is written and synced to disk."""
    entries = list(entries)
    raw, offsets = _header(entries, metadata)
    resume = start > 0 and os.path.isfile(path)
    with open(path, "r+b" if resume else "wb") as f:
        if not resume:
            start = 0
            f.write(raw)
        f.seek(len(raw) + offsets[start])
        for i in range(start, len(entries)):
            name, shape, dtype, make = entries[i]
            t = make().to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: made {tuple(t.shape)}, the header says {tuple(shape)}")
            f.write(t.view(torch.uint8).numpy().data)
            if progress is not None:
                progress.update(t.numel() * t.element_size())
            if on_tensor is not None:
                f.flush()
                os.fsync(f.fileno())
                on_tensor(i)
        f.truncate(len(raw) + offsets[-1])
        f.flush()
        os.fsync(f.fileno())
    return offsets[-1]


def _resume_point(partial: str, record: str, header: bytes) -> int:
    """Complete tensors of an earlier, interrupted write of the same header (0: none)."""
    try:
        with open(record, encoding="utf-8") as f:
            state = json.load(f)
        with open(partial, "rb") as f:
            same = f.read(len(header)) == header
    except (OSError, ValueError):
        return 0
    done = state.get("done", 0) if same and state.get("header_sha256") == hashlib.sha256(header).hexdigest() else 0
    return done if isinstance(done, int) and done > 0 else 0


def _record_progress(record: str, header: bytes, done: int) -> None:
    with atomic_file(record) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump({"header_sha256": hashlib.sha256(header).hexdigest(), "done": done}, f)


def convert_checkpoint(source, out_dir, *, dtype: Optional[torch.dtype] = None, report: Report = None,
                       progress: bool = False) -> str:
    """Convert checkpoint ``source`` (anything :func:`~.io.open_checkpoint` opens) into the
    converted-directory format at ``out_dir``, tensor by tensor.

    ``dtype`` casts the weights (default: as stored; GGUF gives float32).  The directory is
    written whole or not at all (a conversion killed midway leaves the earlier converted
    checkpoint, if any); one holding other files is refused.  Run it again after a kill:
    it resumes after the last complete tensor (``<out_dir>.partial``, see the module).  The result
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
    names = {"format": "pt", "names": "megatron"}
    header, _ = _header(entries, names)
    partial, record = out_dir.rstrip(os.sep) + ".partial", out_dir.rstrip(os.sep) + ".partial.json"
    start = _resume_point(partial, record, header)
    if start and report is not None:
        report(f"resuming the conversion into {out_dir} after {start} of {len(entries)} tensors ({partial})")
    with reader:
        write_safetensors(partial, entries, names, bar, start=start,
                          on_tensor=lambda i: _record_progress(record, header, i + 1))
    with atomic_directory(out_dir, report=report) as tmp:
        os.replace(partial, os.path.join(tmp, WEIGHTS_FILE))
        with open(os.path.join(tmp, MARKER_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        generation = os.path.join(os.fspath(source), "generation_config.json")
        if os.path.isfile(generation):  # its EOS ids end generation (eos_token_ids)
            shutil.copyfile(generation, os.path.join(tmp, "generation_config.json"))
    if os.path.exists(record):
        os.remove(record)
    return out_dir
