"""APB as Megatron-Core's ``core_attention``, and the thin ``SelfAttention`` that feeds it.

``APBSelfAttention`` is Megatron's ``SelfAttention`` except that it hands the rotary table
to the core attention instead of applying it, so ``APBCoreAttention`` receives **pre-RoPE**
q, k, v (what the retaining head scores) and applies RoPE itself at each row's true
position (anchor rows 0..a-1, block rows their global positions).

``APBCoreAttention`` honours Megatron's core-attention contract: q [s, b, heads, d],
k, v [s, b, kv_heads, d] for this TP rank, output [s, b, heads*d].  The CP group
(``pg_collection.cp``) carries the collectives of every mode; the TP group shards heads
and sums the retaining head's row-parallel first layer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule

from ..comm import collective_device, group_rank, group_size
from ..compress import (
    RetainingHead,
    init_retaining_head_,
    query_attention_scores,
    random_scores,
    smooth_scores,
)
from ..config import APBConfig, APBConfigError, CPLayout
from ..ops.fused import fused_rope
from ..parallel import (
    apb_context_attention,
    decode_attention,
    exact_context_attention,
    ulysses_attention,
)
from .rope import apply_rope, rope_positions, table_rows

# Rows of the block's end used as the observation window when no query rows are known.
_FALLBACK_WINDOW = 16


def check_heads(num_heads: int, num_kv_heads: int, tp_size: int):
    """Raise an error naming the fix when heads cannot be split as configured."""
    if num_heads % num_kv_heads != 0:
        raise APBConfigError(
            f"num_query_groups ({num_kv_heads}) must divide num_attention_heads ({num_heads}) "
            "for grouped-query attention"
        )
    if num_heads % tp_size != 0 or num_kv_heads % tp_size != 0:
        raise APBConfigError(
            f"tensor parallel size {tp_size} must divide both num_attention_heads "
            f"({num_heads}) and num_query_groups ({num_kv_heads}); pick a TP size among "
            f"{[d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0 and num_heads % d == 0]}"
        )


class APBCoreAttention(MegatronModule):
    """Context-parallel core attention running ``apb``, ``star``, ``exact`` or ``ulysses``.

    Built by Megatron through the layer spec (see ``get_gpt_layer_apb_spec``); the
    ``apb_config`` comes from the spec.  The per-prompt :class:`CPLayout` is set with
    ``megatron_apb.megatron.apb_layout``; without one, the layout follows from the
    sequence length and ``apb_config`` (``anchor_len`` must then be set for ``apb``).
    """

    apb_config: Optional[APBConfig] = None  # bound by the spec

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        cp_comm_type: Optional[str] = None,
        softmax_scale: Optional[float] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        apb_config: Optional[APBConfig] = None,
        **unused,
    ):
        super().__init__(config=config)
        self.apb_config = apb_config or type(self).apb_config or APBConfig()
        if attention_type != "self":
            raise APBConfigError("APB attention supports self-attention only")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group, self.tp_group = pg_collection.cp, pg_collection.tp
        self.layer_number = layer_number
        tp, cp = group_size(self.tp_group), group_size(self.cp_group)
        if getattr(config, "context_parallel_size", 1) != cp:
            raise APBConfigError(
                f"TransformerConfig.context_parallel_size={config.context_parallel_size} but the "
                f"context-parallel group has {cp} ranks; set context_parallel_size={cp} "
                "(Megatron sizes the rotary table from it)"
            )
        check_heads(config.num_attention_heads, config.num_query_groups, tp)
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.rotary_interleaved = config.rotary_interleaved
        self.layout: Optional[CPLayout] = None
        self.kv_cache = None  # a CPKVCache: prefill stores the block's K/V, decode reads it
        self.decode_positions: Optional[torch.Tensor] = None  # set for phase-2 forwards
        self.rotary_table: Optional[torch.Tensor] = None  # set by APBSelfAttention per call
        self.retaining_head = None
        if self.apb_config.mode == "apb" and self.apb_config.compressor == "retaining_head":
            self.retaining_head = RetainingHead(
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                hidden=self.apb_config.retaining_head_hidden,
                tp_group=self.tp_group,
                dtype=config.params_dtype,
            )
            init_retaining_head_(
                self.retaining_head,
                seed=self.apb_config.seed + layer_number,
                num_heads=config.num_attention_heads,
                num_kv_heads=config.num_query_groups,
                tp_rank=group_rank(self.tp_group),
                tp_size=tp,
            )

    # ------------------------------------------------------------------ layout
    def current_layout(self, seq_len: int) -> CPLayout:
        """The layout of this forward: the one set by ``apb_layout``, else derived.

        Exact modes, and any mode on one rank, need no layout: every rank holds one block of
        ``seq_len`` rows.  ``apb`` and ``star`` across ranks need the prompt's layout, since
        rank 0 holds no anchor and the ranks must agree on the block length.
        """
        if self.layout is not None:
            return self.layout
        cfg, cp = self.apb_config, group_size(self.cp_group)
        if not cfg.uses_anchor or cp == 1:
            return cfg.layout(seq_len, cp_size=cp)
        raise APBConfigError(
            f"mode={cfg.mode!r} across {cp} context-parallel ranks needs the prompt layout: "
            "shard the prompt with megatron_apb.layout.shard_document(...) and run the forward "
            "inside megatron_apb.megatron.apb_layout(model, layout)"
        )

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        **unused,
    ):
        """q [s, b, heads, d], k, v [s, b, kv_heads, d] (pre-RoPE) -> [s, b, heads*d]."""
        if packed_seq_params is not None:
            raise APBConfigError("APB attention does not support packed (THD) sequences")
        if attention_bias is not None:
            raise APBConfigError("APB attention does not support an attention bias")
        cp, rank = group_size(self.cp_group), group_rank(self.cp_group)
        if self.decode_positions is not None:
            return self._decode(query, key, value, cp)
        if cp > 1 and torch.is_grad_enabled() and query.requires_grad:
            raise RuntimeError(
                "APB context-parallel attention is an inference path without gradients; "
                "run the forward under torch.no_grad() or torch.inference_mode()"
            )
        seq = query.shape[0]
        layout = self._checked_layout(seq, rank, cp, query.device)
        # Megatron's [s, b, h, d] -> flash-style [b, s, h, d]
        q_pre, k_pre, v = (t.transpose(0, 1) for t in (query, key, value))
        q, k = self._rotate(q_pre, k_pre, layout, rank, cp)
        if self.kv_cache is not None:
            la = layout.anchor_len_on(rank) if layout.mode in ("apb", "star") else 0
            self.kv_cache.store_prefill(self.layer_number, k[:, la:], v[:, la:])
        kw = dict(softmax_scale=self.softmax_scale, backend=self.apb_config.backend)
        if layout.mode == "exact":
            out = exact_context_attention(q, k, v, group=self.cp_group, **kw)
        elif layout.mode == "ulysses":
            out = ulysses_attention(q, k, v, group=self.cp_group, **kw)
        else:
            scorer = lambda: self._scores(q_pre, k_pre, v, q, k, layout, rank)  # noqa: E731
            out = apb_context_attention(
                q, k, v, layout=layout, group=self.cp_group, scorer=scorer, **kw
            )
        return out.transpose(0, 1).reshape(seq, out.shape[0], -1)

    def _decode(self, query, key, value, cp):
        """Phase 2: new tokens attend to every rank's cache, merged exactly by LSE."""
        if self.kv_cache is None:
            raise RuntimeError("a phase-2 forward needs the KV cache of a prefill")
        seq = query.shape[0]
        positions = self.decode_positions.to(query.device)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        if self.rotary_table is not None:
            freqs = table_rows(self.rotary_table, positions, 1, seq)
            q, k = self._rope(q, freqs), self._rope(k, freqs)
        cache = self.kv_cache
        if cache.owner:
            cache.append(self.layer_number, k, v)
        k_cache, v_cache = cache.get(self.layer_number)
        out = decode_attention(
            q, k_cache, v_cache, owner=cache.owner, group=None if cache.complete else self.cp_group,
            softmax_scale=self.softmax_scale, backend=self.apb_config.backend,
        )
        return out.transpose(0, 1).reshape(seq, out.shape[0], -1)

    def _checked_layout(self, seq, rank, cp, device):
        """The layout, after every CP rank agreed that its input fits (no rank is left
        waiting in a collective when another rejects its input).

        The check runs in the first APB layer of each forward (see ``forward_guard``), or in
        every layer of a model that was not prepared with ``prepare_model``.
        """
        guard = self.forward_guard
        if guard is not None and guard.checked_rows == seq:
            return guard.layout
        error, layout = None, None
        try:
            layout = self.current_layout(seq)
            expected = layout.local_len(rank) if layout.mode in ("apb", "star") else layout.block_len
            if seq != expected:
                error = APBConfigError(
                    f"context-parallel rank {rank} got {seq} rows but the layout expects "
                    f"{expected} (anchor {layout.anchor_len_on(rank)} + block "
                    f"{layout.block_len}); shard the prompt with "
                    "megatron_apb.layout.shard_document and use the same layout on every rank"
                )
        except APBConfigError as exc:
            error = exc
        if cp > 1:
            peer_error = agree_on_layout(layout if error is None else None, self.cp_group, device)
            if error is None and peer_error:
                error = APBConfigError(
                    f"context-parallel rank {rank}: {peer_error}; see the other ranks' errors"
                )
        if error is not None:
            raise error
        if guard is not None:
            guard.checked_rows, guard.layout = seq, layout
        return layout

    forward_guard = None  # a ForwardGuard shared by the model's APB layers (prepare_model)

    def _rotate(self, q, k, layout, rank, cp):
        if self.rotary_table is None:  # no rotary embedding (e.g. position_embedding_type='none')
            return q, k
        positions = rope_positions(layout, rank, device=q.device)
        freqs = table_rows(self.rotary_table, positions, cp, q.shape[1])
        return self._rope(q, freqs), self._rope(k, freqs)

    def _rope(self, x, freqs):
        if self.apb_config.fused_rope and not self.rotary_interleaved and freqs.shape[-1] == x.shape[-1]:
            return fused_rope(x, freqs)
        return apply_rope(x, freqs, self.rotary_interleaved)

    def _scores(self, q_pre, k_pre, v, q, k, layout, rank):
        """Smoothed float32 scores [b, block, kv_heads] of this rank's block rows."""
        cfg, la = self.apb_config, layout.anchor_len_on(rank)
        if cfg.compressor == "retaining_head":
            scores = self.retaining_head(q_pre[:, la:], k_pre[:, la:], v[:, la:])
        elif cfg.compressor == "random":
            seed = cfg.seed + 7919 * self.layer_number + 104729 * rank
            scores = random_scores(q.shape[0], layout.block_len, self.num_kv_heads, seed=seed, device=q.device)
        else:
            if layout.query_len > 0:
                rows = q[:, layout.query_start : layout.query_start + layout.query_len]
            elif la > 0:
                rows = q[:, :la]
            else:  # no anchor: the end of the block observes the rest (SnapKV's window)
                rows = q[:, -min(_FALLBACK_WINDOW, layout.block_len) :]
            scores = query_attention_scores(rows, k[:, la:], self.softmax_scale)
        return smooth_scores(scores, cfg.smoothing_kernel)


class ForwardGuard:
    """Per-forward state shared by a model's APB layers: the layout checked this forward."""

    def __init__(self):
        self.reset()

    def reset(self, *unused):
        self.checked_rows, self.layout = None, None


def agree_on_layout(layout, group, device) -> Optional[str]:
    """All-reduce over the CP group whether every rank accepted its input and holds the
    same layout.  ``layout`` is None on a rank that rejected its input.  Returns a
    description of the problem, or None when all agree."""
    fields = (
        [0, layout.block_len, layout.anchor_len, layout.passing_len, layout.query_len]
        if layout is not None
        else [1, 0, 0, 0, 0]
    )
    x = torch.tensor(fields + [-f for f in fields], dtype=torch.int64, device=collective_device(group, device))
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=group)
    top, bottom = x[: len(fields)].tolist(), [-v for v in x[len(fields) :].tolist()]
    if top[0]:
        return "another context-parallel rank rejected its input"
    if top != bottom:
        return (
            "context-parallel ranks disagree on the layout (block, anchor, passing, query "
            f"lengths range over {bottom[1:]}..{top[1:]}); give every rank the same layout"
        )
    return None


class APBSelfAttention(SelfAttention):
    """Megatron's ``SelfAttention`` that leaves RoPE to :class:`APBCoreAttention`.

    It checks the head split before Megatron does (with an error naming the fix) and, on
    every call, passes the rotary table to the core attention and ``None`` to Megatron's
    own RoPE so the core attention gets pre-RoPE q, k, v.
    """

    def __init__(self, config, submodules, layer_number, attn_mask_type, *args, **kwargs):
        pg_collection = kwargs.get("pg_collection")
        tp_group = pg_collection.tp if pg_collection is not None else None
        if tp_group is None:
            from megatron.core import parallel_state

            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        else:
            tp_size = group_size(tp_group)
        check_heads(config.num_attention_heads, config.num_query_groups or config.num_attention_heads, tp_size)
        super().__init__(config, submodules, layer_number, attn_mask_type, *args, **kwargs)

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        args = list(args)
        if len(args) > 1 and args[1] is not None or kwargs.get("inference_context") is not None:
            raise APBConfigError(
                "Megatron's inference_context is not used with APB attention; prefill through "
                "the APB forward and decode with megatron_apb's engine"
            )
        if len(args) > 2:  # (key_value_states, inference_context, rotary_pos_emb, ...)
            table, args[2] = args[2], None
        else:
            table = kwargs.pop("rotary_pos_emb", None)
        if isinstance(table, tuple):
            table = table[0]
        self.core_attention.rotary_table = table
        try:
            if len(args) > 2:
                return super().forward(hidden_states, attention_mask, *args, **kwargs)
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self.core_attention.rotary_table = None
