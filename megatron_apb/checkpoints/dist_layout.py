"""The on-disk layout of a distributed checkpoint (:mod:`.dist`), in Megatron-LM's save
directory form, and the checks made when one is opened (before any model is built)::

    DIR/latest_checkpointed_iteration.txt   "release" (or an iteration number N)
    DIR/release/  (or DIR/iter_000000N/)    dist_checkpointing's files
    DIR/megatron_apb_checkpoint.json        format "megatron_apb.torch_dist" and the ModelSpec
"""

from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import torch

from ..errors import APBError, CheckpointError
from .spec import ModelSpec

DIST_FORMAT_NAME = "megatron_apb.torch_dist"
DIST_FORMAT_VERSION = 1
#: Megatron-LM's tracker file: ``release`` or the iteration number
TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
RECONVERT = "convert it again: megatron-apb convert --model SOURCE --output DIR --format torch_dist"
_SCRATCH = ".scratch"


def iteration_directory(path: str) -> Optional[str]:
    """The distributed checkpoint a Megatron-LM save directory ``path`` points at through
    its tracker file (``release/`` or ``iter_0000123/``), or None without a tracker."""
    tracker = os.path.join(path, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    with open(tracker, encoding="utf-8") as f:
        text = f.read().strip()
    if text == RELEASE:
        return os.path.join(path, RELEASE)
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(
            f"{tracker} holds {text[:40]!r}, neither 'release' nor an iteration number; {RECONVERT}"
        ) from None
    if iteration < 0:
        raise CheckpointError(f"{tracker}: iteration {iteration} < 0; {RECONVERT}")
    return os.path.join(path, f"iter_{iteration:07d}")


def check_dist_directory(directory: str, where: str) -> None:
    """The files ``dist_checkpointing`` needs are in ``directory`` (named in the error),
    checked before any model is built; a truncated shard shows at :func:`load_dist`."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{where}: the distributed checkpoint directory {directory} is missing; {RECONVERT}")
    missing = [n for n in ("metadata.json", ".metadata", "common.pt") if not os.path.isfile(os.path.join(directory, n))]
    shards = [n for n in os.listdir(directory) if n.endswith(".distcp")]
    if not shards:
        missing.append("*.distcp (the tensor data)")
    empty = [n for n in shards if os.path.getsize(os.path.join(directory, n)) == 0]
    if missing or empty:
        what = "; ".join(filter(None, [
            f"missing: {', '.join(missing)}" if missing else "",
            f"empty: {', '.join(sorted(empty))}" if empty else "",
        ]))
        raise CheckpointError(f"{where}: the distributed checkpoint in {directory} is incomplete ({what}); {RECONVERT}")


def dist_marker(spec: ModelSpec, dtype: torch.dtype) -> dict:
    """The ``megatron_apb_checkpoint.json`` of a distributed checkpoint."""
    return {"format": DIST_FORMAT_NAME, "format_version": DIST_FORMAT_VERSION, "checkpoint": RELEASE,
            "dtype": str(dtype).replace("torch.", ""), "spec": spec.to_dict()}


def open_dist_layout(path: str, marker_file: str) -> Optional[Tuple[str, str, ModelSpec]]:
    """``(save directory, dist_checkpointing directory, spec)`` of a distributed checkpoint
    at ``path`` (its save directory, or the ``release``/``iter_*`` directory inside it), its
    files checked; None where ``path`` is no such checkpoint.  A Megatron-LM save directory
    without our marker (the model's config unknown) is refused."""
    top, inner = path, None
    if os.path.isfile(os.path.join(path, "metadata.json")) and not os.path.exists(os.path.join(path, marker_file)):
        top, inner = os.path.dirname(os.path.abspath(path)), path
    marker = os.path.join(top, marker_file)
    meta = None
    if os.path.isfile(marker):
        try:
            with open(marker, encoding="utf-8") as f:
                meta = json.load(f)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read {marker}: not valid JSON ({exc}); {RECONVERT}") from exc
    if not (isinstance(meta, dict) and meta.get("format") == DIST_FORMAT_NAME):
        if inner is None and iteration_directory(path) is not None:
            raise CheckpointError(
                f"{path} is a Megatron-LM checkpoint without {marker_file}: the model's config is not known; "
                "convert the Hugging Face or GGUF source with megatron-apb convert --format torch_dist"
            )
        return None
    if meta.get("format_version") != DIST_FORMAT_VERSION:
        raise CheckpointError(f"{marker}: format version {meta.get('format_version')!r}; this reader takes "
                              f"{DIST_FORMAT_VERSION}")
    try:
        spec = ModelSpec.from_dict(meta["spec"])
    except APBError:  # a model this package cannot serve says so itself
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{marker}: its \"spec\" is missing or damaged ({type(exc).__name__}: {exc}); "
                              f"{RECONVERT}") from exc
    inner = inner or iteration_directory(top)
    if inner is None:
        raise CheckpointError(f"{top}: {marker_file} names a distributed checkpoint but {TRACKER_FILE} is missing; "
                              f"{RECONVERT}")
    check_dist_directory(inner, top)
    return top, inner, spec
