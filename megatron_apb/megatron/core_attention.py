"""APB as Megatron-Core's ``core_attention``.

``APBCoreAttention`` honours Megatron's core-attention contract: q [s, b, heads, d],
k, v [s, b, kv_heads, d] for this TP rank, output [s, b, heads*d].  It receives
**pre-RoPE** q, k, v from :class:`~megatron_apb.megatron.self_attention.APBSelfAttention`
(what the retaining head scores) and applies RoPE itself at each row's true position
(anchor rows 0..a-1, block rows their global positions).

Per-forward state arrives as an argument, a :class:`~megatron_apb.forward.ForwardContext`;
the distributed algorithm is looked up by name in the registry
(:data:`megatron_apb.registry.ALGORITHMS`) and the passing tokens are scored by
:func:`megatron_apb.compress.score_block`.  The CP group (``pg_collection.cp``) carries
the collectives of every mode; the TP group shards heads and sums the retaining head's
row-parallel first layer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule

from ..comm import collective_device, group_rank, group_size, is_emulated
from ..compress import RetainingHead, ScoreInputs, init_retaining_head_, score_block
from ..config import APBConfig, CPLayout
from ..errors import APBConfigError, PeerRankError
from ..forward import ForwardContext
from ..ops.fused import fused_rope, rope_cos_sin
from ..parallel import decode_attention
from ..parallel.snapkv import compress_block_kv
from .rope import apply_rope, rope_positions, table_rows


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
    """Context-parallel core attention running any registered mode (``apb``, ``star``,
    ``exact``, ``ulysses``, ...).

    Built by Megatron through the layer spec (``ModuleSpec(module=APBCoreAttention,
    params={"apb_config": ...})``, see ``get_gpt_layer_apb_spec``).  Each forward takes a
    :class:`ForwardContext`; without one (a plain ``GPTModel.forward``), the layout
    follows from the sequence length, which exact modes and one rank allow.
    """

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
        self.apb_config = apb_config or APBConfig()
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
        self.retaining_head = None
        if self.apb_config.needs_retaining_heads:
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
        *,
        forward_context: Optional[ForwardContext] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
        **unused,
    ):
        """q [s, b, heads, d], k, v [s, b, kv_heads, d] (pre-RoPE) -> [s, b, heads*d].

        ``rotary_pos_emb``: the model's whole rotary table [S, 1, 1, rot_dim] (None: no
        rotary embedding).  ``forward_context``: this forward's state (None: a prefill
        whose layout follows from the sequence length).
        """
        if packed_seq_params is not None:
            raise APBConfigError("APB attention does not support packed (THD) sequences")
        if attention_bias is not None:
            raise APBConfigError("APB attention does not support an attention bias")
        ctx = forward_context or ForwardContext()
        cfg = ctx.config_for(self.apb_config)
        if cfg.needs_retaining_heads and self.retaining_head is None:
            raise APBConfigError(
                "compressor='retaining_head' needs a model built with retaining heads: build "
                "it with that compressor (and load trained heads)",
                field="compressor",
            )
        if ctx.is_decode:
            return self._decode(query, key, value, ctx, cfg, rotary_pos_emb)
        cp_group = ctx.cp_group if ctx.cp_group is not None else self.cp_group
        cp, rank = group_size(cp_group), group_rank(cp_group)
        if cp > 1 and torch.is_grad_enabled() and query.requires_grad:
            raise RuntimeError(
                "APB context-parallel attention is an inference path without gradients; "
                "run the forward under torch.no_grad() or torch.inference_mode()"
            )
        seq = query.shape[0]
        layout = self._checked_layout(ctx, cfg, seq, rank, cp_group, query.device)
        # Megatron's [s, b, h, d] -> flash-style [b, s, h, d]
        q_pre, k_pre, v = (t.transpose(0, 1) for t in (query, key, value))
        q, k = self._rotate(q_pre, k_pre, ctx, rotary_pos_emb, lambda: rope_positions(layout, rank), cp)
        algorithm = cfg.algorithm
        la = layout.anchor_len_on(rank) if algorithm.uses_anchor else 0
        if ctx.kv_cache is not None:
            k_keep, v_keep = k[:, la:], v[:, la:]
            if ctx.kv_plan is not None:  # SnapKV: this block's share, scored by the document's window
                k_keep, v_keep = compress_block_kv(q[:, la:], k_keep, v_keep, ctx.kv_plan, group=cp_group,
                                                   softmax_scale=self.softmax_scale)
            ctx.kv_cache.store_prefill(self.layer_number, k_keep, v_keep)

        def scorer():
            return score_block(ScoreInputs(
                q_pre=q_pre[:, la:], k_pre=k_pre[:, la:], v=v[:, la:], q=q, k=k, layout=layout,
                rank=rank, anchor_len=la, layer_number=self.layer_number,
                num_kv_heads=self.num_kv_heads, softmax_scale=self.softmax_scale, config=cfg,
                retaining_head=self.retaining_head,
            ))

        out = algorithm.attention(
            q, k, v, layout=layout, group=cp_group, scorer=scorer,
            softmax_scale=self.softmax_scale, local_only=ctx.local_only,
            backend=cfg.local_backend(self.layer_number, self.num_heads, self.config.num_layers,
                                      stats=ctx.sparse_stats),
        )
        return out.transpose(0, 1).reshape(seq, out.shape[0], -1)

    def _decode(self, query, key, value, ctx, cfg, table):
        """Decoding: new tokens attend to every rank's cache, merged exactly by LSE."""
        seq = query.shape[0]
        cache, lengths = ctx.kv_cache, None
        if ctx.static:  # no host value read: positions, write row and lengths live on the device
            if seq != 1:
                raise ValueError(f"a static decode forward takes one new token per sequence, got {seq}")
            # [1, b] rows, one position per sequence: rotated as one sequence of b rows
            q, k = (t.transpose(0, 1) for t in self._rotate(query, key, ctx, table, None, 1))
            v = value.transpose(0, 1)
            if cache.owner:
                cache.write(self.layer_number, k, v)
            k_cache, v_cache = cache.buffers(self.layer_number)
            lengths = cache.lengths
        else:
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))
            q, k = self._rotate(q, k, ctx, table, lambda: ctx.positions.cpu(), 1)
            if cache.owner:
                cache.append(self.layer_number, k, v)
            k_cache, v_cache = cache.get(self.layer_number)
        out = decode_attention(
            q, k_cache, v_cache, owner=cache.owner, group=None if cache.complete else self.cp_group,
            softmax_scale=self.softmax_scale, backend=cfg.backend, lengths=lengths,
        )
        return out.transpose(0, 1).reshape(seq, out.shape[0], -1)

    def _rotate(self, q, k, ctx, table, positions, cp):
        """RoPE at ``positions()`` (host positions: checked against the table without a
        device sync; None: ``ctx.positions`` on the device, checked by the caller); the table
        rows are gathered once per forward and kept in its memo."""
        if table is None:  # no rotary embedding (e.g. position_embedding_type='none')
            return q, k
        key = ("rope_rows", id(table), cp, q.shape[1])
        freqs = ctx.memo.get(key)
        if freqs is None and positions is None:
            freqs = ctx.memo[key] = table.reshape(table.shape[0], -1).index_select(0, ctx.positions)
        elif freqs is None:
            freqs = ctx.memo[key] = table_rows(table, positions(), cp, q.shape[1])
        if self.apb_config.fused_rope and not self.rotary_interleaved and freqs.shape[-1] == q.shape[-1]:
            cos_sin = ctx.memo.get(key + ("cos_sin",))
            if cos_sin is None:
                cos_sin = ctx.memo[key + ("cos_sin",)] = rope_cos_sin(freqs, q.device)
            return fused_rope(q, freqs, cos_sin=cos_sin), fused_rope(k, freqs, cos_sin=cos_sin)
        return apply_rope(q, freqs, self.rotary_interleaved), apply_rope(k, freqs, self.rotary_interleaved)

    # ------------------------------------------------------------------ layout
    def _layout(self, ctx, cfg, seq_len: int, cp: int) -> CPLayout:
        """The layout of this forward: the context's, else derived from the length.

        Exact modes, and any mode on one rank, need no layout: every rank holds one block of
        ``seq_len`` rows.  Modes with an anchor across ranks need the prompt's layout, since
        rank 0 holds no anchor and the ranks must agree on the block length.
        """
        if ctx.layout is not None:
            ctx.layout.check_ranks(cp)
            return ctx.layout
        if not cfg.uses_anchor or cp == 1:
            return cfg.layout(seq_len, cp_size=cp)
        raise APBConfigError(
            f"mode={cfg.mode!r} across {cp} context-parallel ranks needs the prompt layout: "
            "shard the prompt with megatron_apb.layout.shard_document(...) and pass "
            "ForwardContext.prefill(layout) to the forward (megatron_apb.megatron.MegatronAdapter)"
        )

    def _checked_layout(self, ctx, cfg, seq, rank, cp_group, device):
        """The layout, after every CP rank agreed that its input fits (no rank is left
        waiting in a collective when another rejects its input).

        The check runs in the first APB layer of each forward; the result is kept on the
        forward's context for the other layers.
        """
        if ctx.checked is not None and ctx.checked[0] == seq:
            return ctx.checked[1]
        error, layout, cp = None, None, group_size(cp_group)
        try:
            layout = self._layout(ctx, cfg, seq, cp)
            expected = layout.local_len(rank) if cfg.uses_anchor else layout.block_len_on(rank)
            if seq != expected:
                error = APBConfigError(
                    f"context-parallel rank {rank} got {seq} rows but the layout expects "
                    f"{expected} (anchor {layout.anchor_len_on(rank) if cfg.uses_anchor else 0} + block "
                    f"{layout.block_len_on(rank)}); shard the prompt with "
                    "megatron_apb.layout.shard_document and use the same layout on every rank"
                )
        except APBConfigError as exc:
            error = exc
        if cp > 1 and not is_emulated(cp_group):
            peer_error = agree_on_layout(layout if error is None else None, cp_group, device)
            if error is None and peer_error:
                error = PeerRankError(f"context-parallel rank {rank}: {peer_error}; see the other ranks' errors")
        if error is not None:
            raise error
        ctx.checked = (seq, layout)
        return layout


def agree_on_layout(layout, group, device) -> Optional[str]:
    """All-reduce over the CP group whether every rank accepted its input and holds the
    same layout.  ``layout`` is None on a rank that rejected its input.  Returns a
    description of the problem, or None when all agree."""
    # per-rank blocks enter as their count and a position-weighted sum (equal blocks: 0, 0)
    fields = (
        [0, layout.block_len, layout.anchor_len, layout.passing_len, layout.query_len,
         len(layout.block_lens), sum((r + 1) * n for r, n in enumerate(layout.block_lens))]
        if layout is not None
        else [1, 0, 0, 0, 0, 0, 0]
    )
    x = torch.tensor(fields + [-f for f in fields], dtype=torch.int64, device=collective_device(group, device))
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=group)
    top, bottom = x[: len(fields)].tolist(), [-v for v in x[len(fields) :].tolist()]
    if top[0]:
        return "another context-parallel rank rejected its input"
    if top != bottom:
        return (
            "context-parallel ranks disagree on the layout (block, anchor, passing, query "
            f"lengths, per-rank blocks range over {bottom[1:]}..{top[1:]}); give every rank the same layout"
        )
    return None
