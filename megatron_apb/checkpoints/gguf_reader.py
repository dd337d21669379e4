"""GGUF files read tensor by tensor (:class:`GGUFTensorReader`) with the ``gguf`` package's
memory-mapped reader: one tensor, or only the rows a rank owns, is dequantized to float32
at a time and handed on under its Hugging Face name (llama.cpp's q/k row permutation of
Llama-architecture files undone per head).  The config comes from the file's metadata
through ``transformers`` (without its tensors).
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import numpy as np
import torch

from ..errors import CheckpointError
from .families import KeyMap
from .reader import CheckpointReader, TensorInfo

Tensor = torch.Tensor

#: llama.cpp tensor names (``blk.{i}.`` prefix for layers) -> KeyMap fields
GGUF_NAMES = {
    "token_embd": "embed", "output_norm": "final_norm", "output": "lm_head",
    "attn_norm": "input_norm", "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj",
    "attn_output": "o_proj", "ffn_norm": "post_attention_norm", "ffn_gate": "gate_proj",
    "ffn_up": "up_proj", "ffn_down": "down_proj",
}
#: architectures whose q/k rows llama.cpp permutes on conversion
PERMUTED_ARCHS = ("llama",)


def gguf_config(path: str) -> Dict:
    """The Hugging Face config dict of a GGUF file (``transformers`` parses its metadata)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # local: optional (hf extra)

    try:
        return dict(load_gguf_checkpoint(path, return_tensors=False)["config"])
    except (ImportError, MemoryError):
        raise
    except Exception as exc:  # the metadata parser's struct / numpy errors name no file
        raise CheckpointError(
            f"cannot read the GGUF file {path} ({os.path.getsize(path)} bytes): {type(exc).__name__}: {exc}; "
            "if it is truncated or damaged, re-download it"
        ) from exc


class GGUFTensorReader(CheckpointReader):
    """The tensors of a GGUF file under the Hugging Face names of ``keys``.

    ``head_dim``: the attention head size (to undo the q/k permutation per head)."""

    def __init__(self, path: str, keys: KeyMap, head_dim: int, remedy: str):
        super().__init__(remedy)
        from gguf import GGUFReader  # local: optional (hf extra)

        try:
            self._file = GGUFReader(path)
            arch_field = self._file.fields.get("general.architecture")
            arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else ""
        except (ImportError, MemoryError):
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read the GGUF file {path}: {type(exc).__name__}: {exc}; {remedy}") from exc
        self._permute = arch in PERMUTED_ARCHS
        self._head_dim = head_dim
        self._tensors: Dict[str, object] = {}
        for t in self._file.tensors:
            hf = _hf_name(t.name, keys)
            if hf is None:
                continue
            shape = tuple(int(n) for n in reversed([int(x) for x in t.shape]))
            self._tensors[hf] = t
            self.infos[hf] = TensorInfo(path, shape, torch.float32)

    def _read(self, name, rows, cols) -> Tuple[Tensor, int]:
        from gguf import dequantize  # local: optional (hf extra)

        t = self._tensors[name]
        data = t.data if rows is None else t.data[rows]
        values = np.asarray(dequantize(data, t.tensor_type), dtype=np.float32)
        shape = self.infos[name].shape
        values = values.reshape((-1,) + shape[1:]) if len(shape) > 1 else values.reshape(-1)
        out = torch.from_numpy(values.copy())
        if self._permute and (".q_proj." in name or ".k_proj." in name):
            d = self._head_dim
            tail = out.shape[1:]
            out = out.reshape(-1, d // 2, 2, *tail).transpose(1, 2).reshape(-1, *tail)
        if cols is not None:
            out = out[:, cols].contiguous()
        return out, int(data.nbytes)


def _hf_name(gguf_name: str, keys: KeyMap):
    stem, _, suffix = gguf_name.rpartition(".")
    layer = None
    if stem.startswith("blk."):
        _, index, stem = stem.split(".", 2)
        layer = int(index)
    field = GGUF_NAMES.get(stem)
    if field is None:
        return None
    template = getattr(keys, field)
    if (layer is None) != ("{i}" not in template):
        return None
    return template.format(i=layer) + "." + suffix
