"""Lazy, tensor-by-tensor access to a checkpoint's weight files (:class:`CheckpointReader`).

Nothing is read when a reader is made but the files' headers: names, shapes, dtypes and
where each tensor lies, all checked against the file sizes (a truncated file is named with
the tensors it cuts off) and against the index (a shard it lists but that is missing is
named with the tensors it should hold).  :meth:`CheckpointReader.read` then returns one
tensor, or only some of its rows or columns, as stored: safetensors through
``safe_open``/``get_slice`` (memory-mapped, only the slice's bytes are touched),
``pytorch_model.bin`` through ``torch.load(mmap=True, weights_only=True)``, GGUF through
the ``gguf`` package's reader (one tensor, or its rows, dequantized at a time;
:mod:`.gguf_reader`).  ``bytes_read`` counts what was read.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from ..errors import CheckpointError

Tensor = torch.Tensor

#: safetensors dtype names
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies and what it is."""

    file: str
    shape: Tuple[int, ...]
    dtype: torch.dtype


class CheckpointReader:
    """Tensors by name, read on demand.  Subclasses fill ``infos`` and implement ``_read``."""

    def __init__(self, remedy: str):
        self.infos: Dict[str, TensorInfo] = {}
        self.remedy = remedy
        self.bytes_read = 0

    def names(self) -> List[str]:
        return list(self.infos)

    def __contains__(self, name) -> bool:
        return name in self.infos

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.infos[name].shape

    def read(self, name: str, rows: Optional[slice] = None, cols: Optional[slice] = None) -> Tensor:
        """Tensor ``name`` (or its ``rows`` / ``cols`` slice), in its stored dtype, on the CPU."""
        if name not in self.infos:
            raise CheckpointError(f"the checkpoint has no tensor {name!r}; {self.remedy}")
        shape = self.infos[name].shape
        rows, cols = _whole(rows, shape, 0), _whole(cols, shape, 1)  # whole dims read as whole tensors
        try:
            out, nbytes = self._read(name, rows, cols)
        except (MemoryError, CheckpointError):
            raise
        except Exception as exc:  # an I/O error midway, a file changed under us
            raise CheckpointError(
                f"cannot read tensor {name} from {self.infos[name].file}: {type(exc).__name__}: {exc}; {self.remedy}"
            ) from exc
        self.bytes_read += nbytes
        return out

    def _read(self, name, rows, cols) -> Tuple[Tensor, int]:
        """(the tensor or its slice, the bytes read from the file for it)"""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (the reader can still read afterwards: it reopens them)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _whole(part: Optional[slice], shape, dim: int) -> Optional[slice]:
    """None where ``part`` spans all of dimension ``dim``."""
    if part is None or len(shape) <= dim:
        return part
    start, stop, step = part.indices(shape[dim])
    return None if (start, stop, step) == (0, shape[dim], 1) else part


def _index_rows_cols(t, rows, cols):
    if rows is None and cols is None:
        return t[...] if not isinstance(t, Tensor) else t
    if cols is None:
        return t[rows]
    return t[rows if rows is not None else slice(None), cols]


# ------------------------------------------------------------------------ safetensors
def safetensors_header(path: str, remedy: str) -> Dict[str, TensorInfo]:
    """The tensors of a safetensors file from its header alone; a file too short for its
    header or for the tensors it declares raises :class:`CheckpointError` naming the file
    and the first tensors cut off."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"cannot read the weights file {path}: {size} bytes, too short for a header; {remedy}")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(
                f"cannot read the weights file {path}: truncated inside its header ({size} bytes, the header "
                f"declares {8 + n}); {remedy}"
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read the weights file {path}: not a safetensors file ({exc}); {remedy}") from None
    infos, cut = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            start, end = entry["data_offsets"]
            shape = tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"cannot read the weights file {path}: bad header entry for {name}; {remedy}") from None
        if 8 + n + end > size:
            cut.append((start, name))
        infos[name] = TensorInfo(path, shape, dtype)
    if cut:
        names = [name for _, name in sorted(cut)]
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise CheckpointError(
            f"the weights file {path} is truncated ({size} bytes): tensor {names[0]} and what follows it "
            f"({', '.join(names[:3])}{more}) lie past its end; {remedy} (a download may have stopped midway)"
        )
    return infos


class SafetensorsReader(CheckpointReader):
    """``*.safetensors`` files (one, or the shards of ``model.safetensors.index.json``)."""

    def __init__(self, files: Iterable[str], remedy: str, weight_map: Optional[Dict[str, str]] = None,
                 index: Optional[str] = None):
        super().__init__(remedy)
        files = list(files)
        if weight_map is not None:
            _check_index(files, weight_map, index, remedy)
        for path in files:
            for name, info in safetensors_header(path, remedy).items():
                self.infos[name] = info
        if weight_map is not None:
            lost = [f"{k} (in {v})" for k, v in weight_map.items() if k not in self.infos]
            if lost:
                raise CheckpointError(
                    f"{len(lost)} tensors listed in {index} are not in their files: {'; '.join(lost[:5])}; {remedy}"
                )
        self._handles: Dict[str, object] = {}

    def _handle(self, path):
        from safetensors import safe_open  # local: keeps the module's import light

        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt", device="cpu")
        return self._handles[path]

    def _read(self, name, rows, cols):
        handle = self._handle(self.infos[name].file)
        out = handle.get_tensor(name) if rows is None and cols is None else _index_rows_cols(handle.get_slice(name), rows, cols)
        return out, out.numel() * out.element_size()

    def close(self):
        self._handles.clear()


def _check_index(files, weight_map, index, remedy):
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        held = {}
        for k, v in weight_map.items():
            held.setdefault(os.path.basename(v), []).append(k)
        parts = []
        for p in missing[:5]:
            tensors = held.get(os.path.basename(p), [])
            parts.append(f"{p} (holding {len(tensors)} tensors, e.g. {', '.join(tensors[:2])})")
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{len(missing)} of the {len(files)} weight files listed in {index} are missing: "
            f"{'; '.join(parts)}{more}; {remedy} (a download may have stopped midway)"
        )


# ------------------------------------------------------------------- pytorch_model.bin
class TorchBinReader(CheckpointReader):
    """``pytorch_model.bin`` files, memory-mapped (``torch.load(mmap=True, weights_only=True)``;
    a file in torch's legacy format is read whole)."""

    def __init__(self, files: Iterable[str], remedy: str):
        super().__init__(remedy)
        self._tensors: Dict[str, Tensor] = {}
        for path in files:
            try:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except (FileNotFoundError, MemoryError):
                raise
            except Exception as exc:  # truncated zip, unpickling errors, ...
                raise CheckpointError(f"cannot read the weights file {path}: {type(exc).__name__}: {exc}; {remedy}") from exc
            for name, t in state.items():
                self._tensors[name] = t
                self.infos[name] = TensorInfo(path, tuple(t.shape), t.dtype)

    def _read(self, name, rows, cols):
        out = _index_rows_cols(self._tensors[name], rows, cols).clone()
        return out, out.numel() * out.element_size()
