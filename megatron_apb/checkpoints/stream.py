"""Streaming, sharded loading: each tensor-parallel rank reads only the rows and columns it
owns, tensor by tensor, and copies them straight into its model's parameters (cast to the
parameter's dtype, on its device).  No rank holds the full state or a float32 copy.

What a rank reads for each Megatron tensor (``spec`` layout, TP size ``t``, rank ``r``):

* ``linear_qkv`` (weight, bias): the q rows of its query groups and the k and v rows of
  the same groups (three contiguous row ranges of ``q_proj``/``k_proj``/``v_proj``, or one
  of a converted checkpoint's interleaved ``linear_qkv``), interleaved per group (q and k
  times YaRN's attention factor, as :func:`~.convert.hf_to_megatron` gives them);
* ``linear_fc1``: its row chunk of ``gate_proj`` and of ``up_proj``;
* ``linear_proj``, ``linear_fc2``: its column chunk;
* embedding and output layer: its rows of the vocabulary padded to a multiple of ``t``
  (the padding rows are zeros and read nothing);
* norms: whole (replicated).

The result is exactly :func:`~.sharding.shard_for_tp` of the full state (the slow
reference the tests compare against).  Every name and shape, of the files and of the
model, is checked before the first tensor is read.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Collection, Dict, List, Optional, Tuple

import torch

from ..errors import CheckpointError
from .build import canonical_name
from .convert import _name, hf_shapes, interleave_qkv
from .families import family_for
from .reader import CheckpointReader
from ..compress import shard_retaining_head
from .sharding import RETAINING_KEY, check_tp, retaining_pairs
from .spec import ModelSpec

Tensor = torch.Tensor
#: how one Megatron tensor's shard is read: ``fn(reader) -> tensor``, plus its shape
Recipe = Tuple[Callable[[CheckpointReader], Tensor], Tuple[int, ...]]


def _chunk(n: int, r: int, t: int) -> slice:
    k = n // t
    return slice(r * k, (r + 1) * k)


def source_names(spec: ModelSpec, megatron_names: bool) -> Dict[str, Tuple[str, ...]]:
    """{Megatron name: the checkpoint tensors it is made of}."""
    if megatron_names:
        return {k: (k,) for k in spec.full_shapes()}
    keys = family_for(spec.model_type).keys
    out = {"embedding.word_embeddings.weight": (keys.embed + ".weight",)}
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}."
        out[p + "input_layernorm.weight"] = (_name(keys.input_norm, i),)
        for suffix in (".weight", ".bias") if spec.qkv_bias else (".weight",):
            out[p + "self_attention.linear_qkv" + suffix] = tuple(
                _name(k, i, suffix) for k in (keys.q_proj, keys.k_proj, keys.v_proj)
            )
        out[p + "self_attention.linear_proj.weight"] = (_name(keys.o_proj, i),)
        out[p + "pre_mlp_layernorm.weight"] = (_name(keys.post_attention_norm, i),)
        out[p + "mlp.linear_fc1.weight"] = (_name(keys.gate_proj, i), _name(keys.up_proj, i))
        out[p + "mlp.linear_fc2.weight"] = (_name(keys.down_proj, i),)
    out["decoder.final_layernorm.weight"] = (keys.final_norm + ".weight",)
    if not spec.tie_word_embeddings:
        out["output_layer.weight"] = (keys.lm_head + ".weight",)
    return out


def shard_recipes(spec: ModelSpec, tp_rank: int, tp_size: int, megatron_names: bool,
                  resolve: Callable[[str], str] = lambda n: n) -> Dict[str, Recipe]:
    """{Megatron name: (how this rank reads its shard, the shard's shape)}.

    ``megatron_names``: the checkpoint holds the full Megatron state (a converted
    directory) rather than Hugging Face tensors; ``resolve`` maps a source name to the
    name in the files (a bare base model lacks the ``model.`` prefix)."""
    check_tp(spec, tp_rank, tp_size)
    r, t = tp_rank, tp_size
    g, d = spec.num_query_groups, spec.kv_channels
    per_group = spec.num_attention_heads // g * d
    groups = g // t
    f = spec.ffn_hidden_size
    padded = spec.padded_vocab(t)
    full = spec.full_shapes()
    out: Dict[str, Recipe] = {}
    for name, sources in source_names(spec, megatron_names).items():
        src = [resolve(s) for s in sources]
        shape = full[name]
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            rows = _chunk(padded, r, t)
            out[name] = (_vocab_reader(src[0], rows, spec.vocab_size), (padded // t,) + shape[1:])
        elif ".linear_qkv." in name:
            if megatron_names:
                out[name] = (_rows_reader(src[0], _chunk(shape[0], r, t)), (shape[0] // t,) + shape[1:])
            else:
                a = r * groups
                q_rows, kv_rows = slice(a * per_group, (a + groups) * per_group), slice(a * d, (a + groups) * d)
                out[name] = (_qkv_reader(src, q_rows, kv_rows, groups, per_group, d, spec.rope_qk_scale()),
                             (shape[0] // t,) + shape[1:])
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            cols = _chunk(shape[1], r, t)
            out[name] = (lambda rd, s=src[0], c=cols: rd.read(s, cols=c), (shape[0], shape[1] // t))
        elif name.endswith("linear_fc1.weight"):
            rows = _chunk(f, r, t)
            if megatron_names:
                up = slice(f + rows.start, f + rows.stop)
                parts = ((src[0], rows), (src[0], up))
            else:
                parts = ((src[0], rows), (src[1], rows))
            out[name] = (_cat_reader(parts), (2 * f // t,) + shape[1:])
        else:
            out[name] = (lambda rd, s=src[0]: rd.read(s), shape)
    return out


def _rows_reader(src, rows):
    return lambda rd: rd.read(src, rows=rows)


def _cat_reader(parts):
    return lambda rd: torch.cat([rd.read(s, rows=rows) for s, rows in parts], dim=0)


def _qkv_reader(src, q_rows, kv_rows, groups, per_group, d, qk_scale=1.0):
    def read(rd):
        q, k, v = rd.read(src[0], rows=q_rows), rd.read(src[1], rows=kv_rows), rd.read(src[2], rows=kv_rows)
        if qk_scale != 1:  # YaRN's attention factor (see ModelSpec.rope_qk_scale)
            q, k = q * qk_scale, k * qk_scale
        return interleave_qkv(q, k, v, groups, per_group, d)

    return read


def _vocab_reader(src, rows, vocab):
    def read(rd):
        stop = min(rows.stop, vocab)
        got = rd.read(src, rows=slice(rows.start, stop)) if stop > rows.start else None
        n = rows.stop - rows.start
        if got is not None and got.shape[0] == n:
            return got
        cols = rd.shape(src)[1:]
        pad = torch.zeros(n - (0 if got is None else got.shape[0]), *cols, dtype=rd.infos[src].dtype)
        return pad if got is None else torch.cat([got, pad])

    return read


def check_sources(reader: CheckpointReader, spec: ModelSpec, megatron_names: bool, where: str) -> Callable[[str], str]:
    """Every tensor the model needs is in the checkpoint with its full shape, and nothing
    else is there (retaining heads, rotary buffers and a tied LM head excepted), checked
    from the headers alone.  Returns the name resolver for :func:`shard_recipes`."""
    if megatron_names:
        expected = spec.full_shapes()
        prefix, allowed = "", lambda k: bool(RETAINING_KEY.match(k))
        resolve = lambda n: n  # noqa: E731
    else:
        keys = family_for(spec.model_type).keys
        expected = hf_shapes(spec)
        prefix = keys.bare_prefix
        bare = (keys.embed + ".weight") not in reader and prefix and (keys.embed + ".weight")[len(prefix):] in reader
        head = keys.lm_head + "."

        def resolve(n):
            return n[len(prefix):] if bare and n.startswith(prefix) and not n.startswith(head) else n

        tied_head = keys.lm_head + ".weight"

        def allowed(k):
            return k.endswith("rotary_emb.inv_freq") or (spec.tie_word_embeddings and k == tied_head)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in expected and megatron_names:
            stored = reader.infos.get(name)
            if stored is not None and stored.shape[0] >= spec.vocab_size:  # a padded vocabulary is fine
                expected[name] = stored.shape
    missing, wrong = [], []
    for name, shape in expected.items():
        stored = reader.infos.get(resolve(name))
        if stored is None:
            missing.append(f"{resolve(name)} {tuple(shape)}")
        elif tuple(stored.shape) != tuple(shape):
            wrong.append(f"{resolve(name)} in {stored.file}: got {tuple(stored.shape)}, expected {tuple(shape)}")
    wanted = {resolve(n) for n in expected}
    extra = sorted(k for k in reader.infos if k not in wanted and not allowed(k))
    if missing or wrong or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (name, expected shape): " + "; ".join(missing[:8]))
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape: " + "; ".join(wrong[:8]))
        if extra:
            parts.append(f"{len(extra)} unexpected: " + "; ".join(extra[:8]))
        raise CheckpointError(f"the tensors of {where} do not fit the model: " + " | ".join(parts))
    return resolve


def shard_heads(full_heads: Dict[str, Tensor], spec: ModelSpec, tp_rank: int, tp_size: int) -> Dict[str, Tensor]:
    """This TP rank's shard of full retaining-head tensors (Megatron names), checked."""
    out = {}
    for layer, (fc1, fc2) in retaining_pairs(full_heads, spec).items():
        p = f"decoder.layers.{layer}.self_attention.core_attention.retaining_head."
        out[p + "fc1.weight"], out[p + "fc2.weight"] = shard_retaining_head(
            fc1, fc2, num_heads=spec.num_attention_heads, num_kv_heads=spec.num_query_groups,
            head_dim=spec.kv_channels, tp_rank=tp_rank, tp_size=tp_size,
        )
    return out


def model_tensors(model) -> Dict[str, Tensor]:
    """The model's parameters and buffers under their Megatron names (``_extra_state`` left
    out; Transformer Engine's fused norm names mapped back)."""
    return {
        canonical_name(k): v
        for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, Tensor) and not k.endswith("_extra_state")
    }


class Progress:
    """``loading: 12/291 tensors, 1.3/15.0 GiB this rank`` on one line of stderr, at most every
    ``every`` seconds; silent where ``enabled`` is False (ranks other than 0)."""

    def __init__(self, total_items: int, total_bytes: int, enabled: bool, every: float = 1.0, stream=None,
                 label: str = "loading", unit: str = "this rank"):
        self.total_items, self.total_bytes, self.enabled, self.every = total_items, total_bytes, enabled, every
        self.label, self.unit = label, unit
        self.items = self.bytes = 0
        self.start = self.last = time.monotonic()
        self.stream = stream or sys.stderr

    def update(self, nbytes: int) -> None:
        self.items += 1
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.every or self.items == self.total_items):
            self.last = now
            end = "\n" if self.items == self.total_items else ""
            self.stream.write(
                f"\r{self.label}: {self.items}/{self.total_items} tensors, {self.bytes / 2**30:.2f}/"
                f"{self.total_bytes / 2**30:.2f} GiB {self.unit}, {now - self.start:.0f} s{end}"
            )
            self.stream.flush()


def load_shard(model, reader: CheckpointReader, spec: ModelSpec, tp_rank: int, tp_size: int, *,
               megatron_names: bool = False, where: str = "the checkpoint", extra: Optional[Dict[str, Tensor]] = None,
               progress: bool = False, label: str = "loading", skip: Collection[str] = (),
               on_tensor: Optional[Callable[[str], None]] = None) -> Dict[str, int]:
    """Read this TP rank's shard of every tensor from ``reader`` straight into ``model``.

    ``model``: built for ``spec`` at ``tp_size`` (any dtype and device: each tensor is cast
    and moved by the copy into its parameter, one at a time).  ``extra``: already sharded
    tensors to copy as well (retaining heads).  Names and shapes of the checkpoint and of
    the model are checked before any tensor is read (:class:`CheckpointError` naming
    them).  ``progress``: show ``label: 12/291 tensors, ...`` on stderr.  ``skip``: names
    already in the model (a resumed fill: not read again); ``on_tensor(name)``: called after
    each tensor is copied.  Returns ``{"tensors": n, "bytes_read": bytes this rank read
    from the files}``.
    """
    resolve = check_sources(reader, spec, megatron_names, where)
    recipes = shard_recipes(spec, tp_rank, tp_size, megatron_names, resolve)
    extra = dict(extra or {})
    target = model_tensors(model)
    stored_heads = [k for k in reader.names() if RETAINING_KEY.match(k)]
    if stored_heads and any(RETAINING_KEY.match(k) for k in target) and not any(RETAINING_KEY.match(k) for k in extra):
        extra.update(shard_heads({k: reader.read(k) for k in stored_heads}, spec, tp_rank, tp_size))
    wanted = {k: v[1] for k, v in recipes.items()}
    wanted.update({k: tuple(v.shape) for k, v in extra.items()})
    problems: List[str] = []
    missing = [k for k in target if k not in wanted]
    unexpected = [k for k in wanted if k not in target]
    wrong = [f"{k}: checkpoint shard {wanted[k]}, model {tuple(target[k].shape)}"
             for k in wanted if k in target and tuple(target[k].shape) != tuple(wanted[k])]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches at TP rank {tp_rank}/{tp_size}: " + "; ".join(wrong))
    if missing:
        hint = (" (the model has retaining heads the checkpoint lacks)"
                if any(RETAINING_KEY.match(k) for k in missing) else "")
        problems.append(f"{len(missing)} model tensors missing from the checkpoint{hint}: " + "; ".join(missing))
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors the model does not have: " + "; ".join(unexpected))
    if problems:
        raise CheckpointError(f"cannot load {where}: " + " | ".join(problems))
    total = sum(target[k].numel() * target[k].element_size() for k in wanted)
    bar = Progress(len(wanted), total, progress, label=label)
    start = reader.bytes_read
    with torch.no_grad():
        for name, (read, _) in recipes.items():
            if name not in skip:
                target[name].copy_(read(reader))
                if on_tensor is not None:
                    on_tensor(name)
            bar.update(target[name].numel() * target[name].element_size())
        for name, tensor in extra.items():
            target[name].copy_(tensor)
            bar.update(target[name].numel() * target[name].element_size())
    return {"tensors": len(wanted), "bytes_read": reader.bytes_read - start}
