"""Megatron-Core distributed checkpoints (``megatron.core.dist_checkpointing``, the
``torch_dist`` format) in Megatron-LM's save-directory layout::

    DIR/
      latest_checkpointed_iteration.txt   "release"
      release/                            the distributed checkpoint (metadata.json,
                                          common.pt, .metadata, __*_*.distcp)
      megatron_apb_checkpoint.json        format "megatron_apb.torch_dist": the ModelSpec
      tokenizer files, generation_config.json

:func:`convert_to_dist` writes one from anything :func:`~.io.open_checkpoint` opens: the
model is built once at TP = 1 in the target dtype with every parameter (and every shard
``dist_checkpointing`` would otherwise copy: ``linear_fc1``'s gate and up halves) backed by
a scratch file beside the output (so the weights live in the page cache, which the kernel
can write back and evict, not in the process's own memory; the scratch files need the
checkpoint's size again on disk, plus ``linear_fc1``, until the end), filled tensor by
tensor by the streaming loader (:func:`~.stream.load_shard`), then saved by ``dist_checkpointing.save`` with the keys
Megatron-LM's ``--load`` looks up (``model``, ``checkpoint_version``, ``iteration``).
The whole directory is written beside ``DIR`` and renamed into place
(:func:`megatron_apb.atomic.atomic_directory`): a conversion killed midway leaves no
directory that looks complete.  The scratch files live in ``DIR.partial-dist/`` with a
record of the parameters already filled (``filled.json``, rewritten after each one), so a
conversion killed while filling resumes when run again with the same source, model and
dtype: the filled parameters are not read again (the scratch files are shared file
mappings, whose written pages survive the process).

:func:`load_dist` reads one into a model built at any TP (and CP): each rank reads only
its shard (``dist_checkpointing.load`` of the model's ``sharded_state_dict``).  The
vocabulary is stored unpadded; Megatron's embedding and output layer accept a padded one
on load (the extra rows are zeros).  The layout and its checks: :mod:`.dist_layout`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from typing import Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from ..atomic import Report, atomic_directory, atomic_file
from ..config import APBConfig
from ..errors import CheckpointError
from ..megatron import init_cpu_megatron, rank_grid_groups
from .build import build_model
from .dist_layout import RELEASE, RECONVERT, TRACKER_FILE, check_dist_directory, dist_marker
from .io import MARKER_FILE, check_output_directory, open_checkpoint
from .sharding import RETAINING_KEY
from .stream import check_sources, load_shard, model_tensors, source_names

#: the scratch directory beside the output (``DIR`` + this) backing the weights, and its
#: record of the parameters filled so far
PARTIAL_SUFFIX = ".partial-dist"
FILL_RECORD = "filled.json"

@contextlib.contextmanager
def _one_process_group():
    """A one-process gloo group for ``dist_checkpointing`` unless one exists already (a
    larger one is refused: every process would write the same checkpoint)."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _host_only_cuda_sync():
    """``dist_checkpointing``'s writer calls ``torch.cuda.synchronize`` after staging
    tensors; on a machine without CUDA there is nothing to wait for."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.cuda.synchronize = saved


def _back_with_files(model, directory: str) -> int:
    """Give every parameter of ``model`` (its shape and dtype) storage in a file of
    ``directory`` (``torch.from_file``, shared mapping): filling them dirties page-cache
    pages, not the process's anonymous memory.  Returns the bytes mapped."""
    total = 0
    for i, (name, p) in enumerate(model.named_parameters()):
        n = p.numel()
        path = os.path.join(directory, f"{i:05d}.bin")
        p.data = torch.from_file(path, shared=True, size=n, dtype=p.dtype).view(p.shape)
        total += n * p.element_size()
    return total


def _views_to_files(sharded, directory: str) -> None:
    """Resolve the factories of a sharded state dict (``linear_fc1``'s gate/up halves) and
    give every shard that is a view of a larger tensor its own file-backed copy:
    ``dist_checkpointing``'s writer clones such views into anonymous memory, all at once."""
    apply_factories(sharded)
    count = [0]

    def own_file(x):
        if isinstance(x, ShardedTensor) and x.data is not None:
            t = x.data.detach()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                count[0] += 1
                path = os.path.join(directory, f"view{count[0]:05d}.bin")
                copy = torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
                copy.copy_(t)
                x.data = copy
        return x

    dict_list_map_inplace(own_file, sharded)


def _fill_key(source, spec, dtype) -> str:
    """What a resumed fill must match: the source, the model it builds and the dtype."""
    return json.dumps([os.path.abspath(os.fspath(source)), spec.to_dict(), str(dtype)], sort_keys=True, default=str)


def _filled(scratch: str, key: str) -> set:
    """Parameters an earlier, interrupted conversion of the same ``key`` filled (else
    the scratch directory is emptied and made anew)."""
    try:
        with open(os.path.join(scratch, FILL_RECORD), encoding="utf-8") as f:
            record = json.load(f)
        if record.get("key") == key:
            return set(record.get("filled", []))
    except (OSError, ValueError):
        pass
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    return set()


def _record_fill(scratch: str, key: str, filled: set) -> None:
    with atomic_file(os.path.join(scratch, FILL_RECORD)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump({"key": key, "filled": sorted(filled)}, f)


def _dp_cp_group(pg):
    """Megatron's data-parallel x context-parallel group: the CP group (our grids have DP 1)."""
    if pg is None or getattr(pg, "dp", None) is None or dist.get_world_size(pg.dp) != 1:
        raise CheckpointError("a distributed checkpoint is read or written on a TP x CP grid without data parallelism")
    return pg.cp


def convert_to_dist(source, out_dir, *, dtype: Optional[torch.dtype] = None, report: Report = None,
                    progress: bool = False) -> str:
    """Convert checkpoint ``source`` (HF directory, GGUF file or converted directory) into a
    Megatron-Core distributed checkpoint in Megatron-LM's layout at ``out_dir`` (module
    docstring), streaming: one tensor at a time is read, and the weights are held in
    file-backed pages.  ``dtype``: the stored dtype (default: the source's embedding's;
    GGUF gives float32).  Returns ``out_dir``."""
    out_dir = os.fspath(out_dir)
    check_output_directory(out_dir)
    ckpt = open_checkpoint(source, report=report)
    if ckpt.dist_dir is not None:
        raise CheckpointError(f"{source} is already a distributed checkpoint; convert from the Hugging Face or GGUF source")
    spec, reader = ckpt.spec, ckpt.reader
    resolve = check_sources(reader, spec, ckpt.megatron_names, os.fspath(source))  # before any heavy work
    embed = resolve(source_names(spec, ckpt.megatron_names)["embedding.word_embeddings.weight"][0])
    dtype = dtype or reader.infos[embed].dtype
    tokenizer = ckpt.tokenizer()
    say = report or (lambda message: None)
    with _one_process_group(), reader, atomic_directory(out_dir, report=report) as tmp:
        init_cpu_megatron()
        pg = rank_grid_groups(1, dist.get_world_size())
        scratch = out_dir.rstrip(os.sep) + PARTIAL_SUFFIX
        key = _fill_key(source, spec, dtype)
        filled = _filled(scratch, key)
        if filled:
            say(f"resuming the conversion into {out_dir}: {len(filled)} tensors already filled ({scratch})")
        model = build_model(
            spec, APBConfig(mode="exact"), pg_collection=pg, tp_size=1, cp_size=dist.get_world_size(), dtype=dtype,
            config_overrides=dict(perform_initialization=False, use_cpu_initialization=True), parallel_output=False,
        ).to(dtype)
        _back_with_files(model, scratch)

        def done(name):
            filled.add(name)
            _record_fill(scratch, key, filled)

        load_shard(model, reader, spec, 0, 1, megatron_names=ckpt.megatron_names, where=os.fspath(source),
                   progress=progress, label="converting", skip=filled, on_tensor=done)
        directory = os.path.join(tmp, RELEASE)
        os.mkdir(directory)
        say(f"saving the distributed checkpoint into {out_dir}/{RELEASE}")
        state = {"model": model.sharded_state_dict(metadata={"dp_cp_group": _dp_cp_group(pg)}),
                 "checkpoint_version": 3.0, "iteration": 0}
        _views_to_files(state, scratch)
        with _host_only_cuda_sync():
            dist_checkpointing.save(state, directory)
        del state, model
        with open(os.path.join(tmp, TRACKER_FILE), "w", encoding="utf-8") as f:
            f.write(RELEASE)
        with open(os.path.join(tmp, MARKER_FILE), "w", encoding="utf-8") as f:
            json.dump(dist_marker(spec, dtype), f, indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        generation = os.path.join(os.fspath(source), "generation_config.json")
        if os.path.isfile(generation):
            shutil.copyfile(generation, os.path.join(tmp, "generation_config.json"))
    shutil.rmtree(scratch, ignore_errors=True)  # the checkpoint is in place: the scratch files go
    return out_dir


def load_dist(model, directory: str, pg, *, where: Optional[str] = None,
              extra: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Read the distributed checkpoint in ``directory`` into ``model`` (built with
    :func:`~.build.build_model` on the groups ``pg``, at any TP and CP): every rank reads
    only its shard.  ``extra``: this rank's retaining-head tensors (Megatron names, already
    sharded), copied in after; the checkpoint holds none.  A tensor the model lacks or the
    checkpoint lacks, or unreadable data, raises :class:`CheckpointError` naming the
    directory."""
    where = where or directory
    check_dist_directory(directory, where)
    extra = dict(extra or {})
    model_sd = model.sharded_state_dict(metadata={"dp_cp_group": _dp_cp_group(pg)})
    if extra:  # the heads come from their own file
        model_sd = {k: v for k, v in model_sd.items() if "retaining_head" not in k}
    sharded = {"model": model_sd}
    try:
        state = dist_checkpointing.load(sharded, directory, strict=StrictHandling.RAISE_ALL)
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(
            f"cannot load the distributed checkpoint {directory} ({where}): {type(exc).__name__}: "
            f"{str(exc)[:600]}; {RECONVERT}"
        ) from exc
    result = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in result.missing_keys
               if not k.endswith("_extra_state") and not (extra and RETAINING_KEY.match(k) and k in extra)]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(
            f"the distributed checkpoint {directory} does not fit the model: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}; {RECONVERT}"
        )
    target = model_tensors(model)
    with torch.no_grad():
        for name, tensor in extra.items():
            target[name].copy_(tensor)
