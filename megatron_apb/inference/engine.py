"""Distributed generation: APB (or any mode's) prefill, then exact phase-2 decoding.

One request at a time (batch 1), on any model behind the adapter protocol
(:class:`megatron_apb.adapter.ModelAdapter`: a Megatron GPTModel built with the APB layer
spec, or a Hugging Face model with APB attention).  Each forward gets its own
:class:`~megatron_apb.forward.ForwardContext`:

1. **prefill** — the document is split over the CP ranks (``shard_document``); each rank
   runs the model on ``[anchor; block]`` (embedding and decoder only: no logits), keeping
   the K/V of its own block (``CPKVCache``);
2. **phase 2** — the query tokens, then each generated token, run on every rank; attention
   merges all ranks' caches exactly by LSE; only the last rank caches the new K/V;
3. **sampling** on one rank, broadcast to all.

The module runs above 400 lines because it is one class, :class:`APBEngine`, whose prefill,
cache gathering, phase-2 paths and per-prefill reports share its groups and model; batches
(:mod:`.batch`) and the decode step (:mod:`.decode`) live beside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from ..adapter import ModelAdapter
from ..comm import PeerWait, all_gather_async, all_reduce, broadcast, collective_device, group_rank, group_size
from ..config import APBConfig, APBConfigError
from ..errors import NonFiniteError
from ..forward import ForwardContext
from ..layout import shard_document
from ..partition import CostModel
from ..megatron.adapter import MegatronAdapter
from ..ops.snapkv import SnapKVPlan
from ..ops.sparse.backend import stats_sums, summary_from_sums
from .batch import generate_batch
from .cache import CPKVCache
from .decode import NONFINITE_LOGITS, DecodeStep, graphs_possible
from .sampling import SamplingConfig, sample


@dataclass
class GenerationResult:
    """Token ids fed and produced, and timings in seconds (prefill, first token, decode)."""

    document_ids: List[int]
    query_ids: List[int]
    output_ids: List[int]
    prefill_s: float
    time_to_first_token_s: float
    decode_s: float
    decode_tokens: int
    layout: dict = field(default_factory=dict)
    #: what the prefill's attention computed, over every rank (``generate(attention_stats=True)``
    #: with a sparse method: :func:`~megatron_apb.ops.sparse.summarize_stats`'s fields); else empty
    attention: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def valid_rows(layout, rank: int, n_doc: int) -> int:
    """Document tokens (not padding) in ``rank``'s block of ``layout``."""
    return max(0, min(layout.block_len_on(rank), n_doc - layout.block_start(rank)))


def shape_cost_model(config, tp: int = 1) -> Optional[CostModel]:
    """The cost model of a model whose config names its shape (Megatron's
    ``TransformerConfig`` or a Hugging Face config), or None when it does not."""
    def get(*names):
        return next((getattr(config, n) for n in names if getattr(config, n, None)), None)

    hidden, heads = get("hidden_size"), get("num_attention_heads")
    kv_heads = get("num_query_groups", "num_key_value_heads") or heads
    ffn = get("ffn_hidden_size", "intermediate_size")
    if not all(isinstance(x, int) for x in (hidden, heads, kv_heads, ffn)):
        return None
    head_dim = get("kv_channels", "head_dim") or hidden // heads
    return CostModel.from_shape(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, ffn=ffn, tp=tp)


def kv_plan(config: APBConfig, doc_len: int, block_lens, cp_size: int) -> Optional[SnapKVPlan]:
    """What the prefill of a ``doc_len``-token document keeps (None: every token), checked
    against the document before any work, with errors naming the field to change."""
    if not config.compresses_kv:
        return None
    if config.kv_window > doc_len:
        raise APBConfigError(
            f"kv_window ({config.kv_window}) is longer than the document ({doc_len} tokens): lower "
            "kv_window (or give a longer document)", field="kv_window")
    return SnapKVPlan.make(doc_len, block_lens, cp_size, window=config.kv_window,
                           budget=config.kv_budget_for(doc_len), pool=config.kv_pool,
                           kernel=config.kv_pool_kernel)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class APBEngine:
    """Generation over a context-parallel (and optionally tensor-parallel) group.

    Args:
        model: a :class:`~megatron_apb.adapter.ModelAdapter`, or a Megatron ``GPTModel``
            built with the APB spec (``build_gpt_model``), which is wrapped in a
            :class:`~megatron_apb.megatron.adapter.MegatronAdapter`.
        apb_config: the same config the model was built with (mode, lengths, compressor).
        cp_group, tp_group: the model's process groups.
        vocab_size: the tokenizer's vocabulary (logits beyond it, TP padding, are dropped).
        sample_group, sample_src: ranks that take part in a generation and the global rank
            that samples and broadcasts (default: all ranks, rank 0).
        progress: called with a line of text on long work (e.g. ``print``), or None.
        cuda_graphs: decode each generated token with one CUDA-graph launch
            (:class:`~megatron_apb.inference.decode.DecodeStep`); default: on CUDA where the
            step has no collective (one CP rank or ``local_decode``, TP 1).  False: the
            same static step, run eagerly.
        cost_model: what a balanced partition (``APBConfig.partition="balanced"``)
            equalises (:class:`~megatron_apb.partition.CostModel`); default: from the
            model's shape (its config), else the partition module's default.
    """

    def __init__(
        self,
        model,
        apb_config: APBConfig,
        *,
        cp_group,
        tp_group=None,
        vocab_size: int,
        pad_id: int = 0,
        sample_group=None,
        sample_src: int = 0,
        progress: Optional[Callable[[str], None]] = None,
        cuda_graphs: Optional[bool] = None,
        cost_model: Optional[CostModel] = None,
    ):
        if isinstance(model, ModelAdapter):
            self.adapter = model
        else:
            self.adapter = MegatronAdapter(model, vocab_size=vocab_size, tp_group=tp_group)
        self.model, self.config = model, apb_config
        self.cp_group, self.tp_group = cp_group, tp_group
        self.cp_rank, self.cp_size = group_rank(cp_group), group_size(cp_group)
        self.vocab_size, self.pad_id = vocab_size, pad_id
        self.sample_group, self.sample_src = sample_group, sample_src
        self.progress = progress
        self.device = self.adapter.device
        self._table = None  # the rotary table, computed once for many forwards
        self.cuda_graphs = cuda_graphs
        if cost_model is None:
            cost_model = shape_cost_model(getattr(model, "config", None), group_size(tp_group))
        self.cost_model = cost_model

    # Positions added to the rotary table beyond the current need, so that decoding
    # recomputes it once per this many tokens instead of at every step.
    TABLE_SLACK = 1024

    # ----------------------------------------------------------------- pieces
    def _forward(self, ids: torch.Tensor, context: ForwardContext, table_len: int):
        """Embedding + transformer layers + final norm on 1-D ``ids``: [s, 1, hidden]."""
        context.rotary_table = self._rotary_table(table_len)
        return self.adapter.run_layers(self.adapter.embed(ids[None]), context)

    def _rotary_table(self, length: int):
        """A rotary table of at least ``length`` positions (rows are indexed by position, so
        a longer one serves as well), recomputed only when it is too short."""
        if self._table is None or self._table[0] < length:
            rows = length + self.TABLE_SLACK
            self._table = (rows, self.adapter.rotary_table(rows))
        return self._table[1]

    def _logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float logits [vocab] of one hidden state [1, 1, hidden]."""
        logits = self.adapter.logits(hidden_last)[0, : self.vocab_size]
        if not torch.isfinite(logits).all():
            raise NonFiniteError(NONFINITE_LOGITS)
        return logits

    def _pick(self, logits, finite, sampling: SamplingConfig, generator) -> int:
        """The next token from a decode step's logits and its device finiteness flag: for
        greedy decoding one host read carries both."""
        if sampling.temperature == 0:
            token, ok = torch.stack([logits.argmax(), finite.long()]).tolist()
        else:
            ok = bool(finite)
            token = sample(logits, sampling, generator) if ok else None
        if not ok:
            raise NonFiniteError(NONFINITE_LOGITS)
        return token

    def check_positions(self, n_doc: int, n_query: int, max_new_tokens: int) -> None:
        """Refuse a prompt plus answer beyond the model's positions, naming what to shorten."""
        limit = getattr(self.adapter, "max_positions", None)
        need = n_doc + n_query + max_new_tokens
        if limit and need > limit:
            raise APBConfigError(
                f"the document ({n_doc} tokens), the query ({n_query}) and max_new_tokens "
                f"({max_new_tokens}) need {need} positions but the model has {limit}: shorten the "
                "document or lower max_new_tokens (or build the model with a larger max_sequence_length)"
            )

    def _broadcast_token(self, token: int, group=None, src=None) -> int:
        """The token of global rank ``src`` on every rank of ``group`` (default: the
        sampling group and source): one sampler decides, even where logits agree."""
        group, src = (self.sample_group, self.sample_src) if src is None else (group, src)
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return token
        t = torch.tensor([token], dtype=torch.long, device=collective_device(group or dist.group.WORLD, self.device))
        dist.broadcast(t, src=src, group=group)
        return int(t.item())

    def _barrier(self):
        if dist.is_initialized() and group_size(self.cp_group) > 1:
            dist.barrier(group=self.cp_group)

    # --------------------------------------------------------------- the work
    @torch.no_grad()
    def prefill(self, document_ids, query_ids, *, local_only: bool = False, reserve: int = 256,
                sparse_stats: Optional[list] = None):
        """Run the distributed prefill; returns (cache, layout, n_doc, seconds).

        With KV compression in the config (``kv_compress='snapkv'`` or a ``kv_budget``), every layer's cache keeps only the
        tokens of :func:`kv_plan` (the same count for each layer and KV head, at their
        original positions); decoding then reads the compressed cache.

        ``reserve``: phase-2 tokens (query + answer) the last rank's cache makes room for
        at once (decoding beyond it copies the cache to grow it; :class:`DecodeStep`
        refuses).  ``local_only`` (benchmarks only): collectives become local copies, to
        time the prefill without communication; the cache is then wrong.  ``sparse_stats``:
        a list that receives this rank's record of every sparse-backend attention call
        (:attr:`ForwardContext.sparse_stats`)."""
        doc = torch.as_tensor(document_ids, dtype=torch.long).flatten()
        query = torch.as_tensor(query_ids, dtype=torch.long).flatten()
        if query.numel() == 0:
            raise APBConfigError("the query is empty; give a question")
        tokens, layout = shard_document(doc, query, self.config, self.cp_size, pad_id=self.pad_id,
                                        cost=self.cost_model)
        valid = valid_rows(layout, self.cp_rank, doc.numel())
        plan = kv_plan(self.config, doc.numel(), [layout.block_len_on(r) for r in range(self.cp_size)], self.cp_size)
        cache = CPKVCache(valid_len=valid if plan is None else plan.kept[self.cp_rank],
                          owner=self.cp_rank == self.cp_size - 1, reserve=reserve,
                          complete=self.cp_size == 1, prefill_counts=None if plan is None else plan.kept)
        table_len = layout.padded_len(self.cp_size) + layout.anchor_len + 1
        hooks = self._progress_hooks("prefill")
        try:
            self._barrier()
            _sync(self.device)
            start = time.perf_counter()
            context = ForwardContext.prefill(layout, kv_cache=cache, config=self.config, local_only=local_only,
                                             kv_plan=plan, sparse_stats=sparse_stats)
            self._forward(tokens[self.cp_rank], context, table_len)
            _sync(self.device)
            self._barrier()
            seconds = time.perf_counter() - start
        finally:
            for h in hooks:
                h.remove()
        return cache, layout, doc.numel(), seconds

    @torch.no_grad()
    def gather_cache(self, cache: CPKVCache, layout, n_doc: int, *, keep: bool = True,
                     reserve: Optional[int] = None) -> Optional[CPKVCache]:
        """Every rank's block K/V in one ``complete`` cache, with which phase 2 runs on a rank
        alone (no collective per layer and token), with the same exact attention as the
        distributed phase 2.  Costs the whole document's K/V on each rank that keeps it.

        Collective over the CP group.  ``keep=False``: take part without keeping the result
        (returns None), for ranks that will not decode."""
        if self.cp_size == 1:
            return cache
        block = layout.block_len  # the longest block: every rank's travels padded to it
        valid = list(cache.prefill_counts or [valid_rows(layout, r, n_doc) for r in range(self.cp_size)])
        room = cache.reserve if reserve is None else reserve
        full = CPKVCache(valid_len=sum(valid), owner=True, reserve=room, complete=True) if keep else None
        for layer in cache.layers():
            k, v = cache.get(layer)  # [b, valid_r, kv, d]; K and V travel together, padded to the block
            packed = k.new_zeros((2, k.shape[0], block) + tuple(k.shape[2:]))
            packed[0, :, : k.shape[1]], packed[1, :, : v.shape[1]] = k, v
            gathered = all_gather_async(packed, self.cp_group).wait()  # [W, 2, b, block, kv, d]
            if keep:
                k_full, v_full = torch.cat([gathered[r, :, :, : valid[r]] for r in range(self.cp_size)], dim=2)
                full.store_prefill(layer, k_full, v_full)
        return full

    @torch.no_grad()
    def step(self, cache: CPKVCache, ids, start_position: int) -> torch.Tensor:
        """Phase-2 forward of ``ids`` at positions start_position...; logits of the last."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        positions = torch.arange(start_position, start_position + ids.numel())
        context = ForwardContext.decode(positions, cache, config=self.config)
        hidden = self._forward(ids, context, start_position + ids.numel() + 1)
        return self._logits(hidden[-1:])

    def _phase2(self, cache, query, n_doc, sampling, broadcast, progress=None):
        """The query's step, then one step per generated token: (tokens, seconds to the
        first token, decode seconds).  ``broadcast`` makes one rank's sampled token everyone's."""
        gen = torch.Generator().manual_seed(sampling.seed)
        start = time.perf_counter()
        token = broadcast(sample(self.step(cache, query, n_doc), sampling, gen))
        _sync(self.device)
        first_s = time.perf_counter() - start
        out, position = [token], n_doc + query.numel()
        decode_start = time.perf_counter()
        if not sampling.done(out):
            groups = (self.tp_group,) if cache.complete else (self.cp_group, self.tp_group)
            graph = self.cuda_graphs if self.cuda_graphs is not None else graphs_possible(self.device, *groups)
            runner = DecodeStep(self, cache, last_position=position + sampling.max_new_tokens, graph=graph)
        while not sampling.done(out):
            logits, finite = runner.step(token, position)
            token = broadcast(self._pick(logits, finite, sampling, gen))
            out.append(token)
            position += 1
            if progress is not None:
                progress()
        _sync(self.device)
        return out, first_s, time.perf_counter() - decode_start

    def _tp_broadcast_token(self, token: int) -> int:
        """TP rank 0's token on every rank of this rank's TP group."""
        if group_size(self.tp_group) == 1:
            return token
        return self._broadcast_token(token, self.tp_group, dist.get_global_rank(self.tp_group, 0))

    def _tp_broadcast_tokens(self, tokens: List[int]) -> List[int]:
        """TP rank 0's tokens on every rank of this rank's TP group."""
        if group_size(self.tp_group) == 1:
            return tokens
        t = torch.tensor(tokens, dtype=torch.long, device=collective_device(self.tp_group, self.device))
        return broadcast(t, dist.get_global_rank(self.tp_group, 0), self.tp_group).tolist()

    def generate_batch(self, prompts, sampling: SamplingConfig) -> List[GenerationResult]:
        """Answer several ``(document ids, query ids)`` prompts of any lengths, decoding them
        together (:func:`megatron_apb.inference.batch.generate_batch`); one result per
        prompt, equal on every rank, each the tokens :meth:`generate` gives it alone."""
        return generate_batch(self, prompts, sampling)

    def _decode_on_last_rank(self, cache, layout, query, n_doc, sampling):
        """Phase 2 on the last CP rank alone (its TP group), on the gathered caches; the
        others wait for its tokens.  Returns (tokens, seconds to the first token, decode s)."""
        last = self.cp_size - 1
        start = time.perf_counter()
        full = self.gather_cache(cache, layout, n_doc, keep=self.cp_rank == last)
        payload = torch.zeros(sampling.max_new_tokens + 3, dtype=torch.float64)
        # the others wait for the whole generation: longer than one collective may last
        waiter = PeerWait(self.cp_group, dist.get_global_rank(self.cp_group, last), self.device)
        if self.cp_rank == last:
            gather_s = time.perf_counter() - start
            out, first_s, decode_s = self._phase2(full, query, n_doc, sampling, self._tp_broadcast_token,
                                                  progress=waiter.beat)
            payload[:3] = torch.tensor([len(out), gather_s + first_s, decode_s], dtype=torch.float64)
            payload[3 : 3 + len(out)] = torch.tensor(out, dtype=torch.float64)  # exact below 2**53
        del full
        (waiter.done if self.cp_rank == last else waiter.wait)()
        payload = payload.to(collective_device(self.cp_group, self.device))
        payload = broadcast(payload, dist.get_global_rank(self.cp_group, last), self.cp_group).cpu()
        n = int(payload[0])
        return [int(t) for t in payload[3 : 3 + n].tolist()], float(payload[1]), float(payload[2])

    @torch.no_grad()
    def generate(self, document_ids, query_ids, sampling: SamplingConfig, *, local_decode: bool = False,
                 attention_stats: bool = False) -> GenerationResult:
        """Prefill the document, answer the query; every rank returns the same result.

        ``local_decode``: gather the caches on the last CP rank after the prefill
        (:meth:`gather_cache`) and run phase 2 there alone, while the other ranks wait for
        its tokens: the same answer (phase 2 is exact either way), with one collective per
        layer instead of one per layer and token, and one rank's GPU work instead of all.

        ``attention_stats``: with a sparse method (``APBConfig.sparse``), the result's
        ``attention`` says what the prefill's attention computed over all ranks (density;
        one synchronization per sparse call and one small collective).
        """
        query = torch.as_tensor(query_ids, dtype=torch.long).flatten()
        n_doc = torch.as_tensor(document_ids).numel()
        self.check_positions(n_doc, query.numel(), sampling.max_new_tokens)
        room = query.numel() + sampling.max_new_tokens
        stats = [] if attention_stats and self.config.sparse_method != "none" else None
        cache, layout, n_doc, prefill_s = self.prefill(document_ids, query_ids, reserve=room, sparse_stats=stats)
        if local_decode and self.cp_size > 1:
            out, first_s, decode_s = self._decode_on_last_rank(cache, layout, query, n_doc, sampling)
        else:
            out, first_s, decode_s = self._phase2(cache, query, n_doc, sampling, self._broadcast_token)
        return GenerationResult(
            document_ids=torch.as_tensor(document_ids).flatten().tolist(),
            query_ids=query.tolist(),
            output_ids=out,
            prefill_s=prefill_s,
            time_to_first_token_s=prefill_s + first_s,
            decode_s=decode_s,
            decode_tokens=len(out) - 1,
            layout=dict(layout.__dict__),
            attention={} if stats is None else self._attention_summary(stats),
        )

    def _attention_summary(self, stats) -> dict:
        """:func:`~megatron_apb.ops.sparse.summarize_stats` of every rank's records."""
        sums = torch.tensor(stats_sums(stats), dtype=torch.float64)
        for group in (self.cp_group, self.tp_group):
            if dist.is_initialized() and group_size(group) > 1:
                sums = all_reduce(sums.to(collective_device(group, self.device)), group).cpu()
        return summary_from_sums(sums.tolist())

    def _progress_hooks(self, what):
        if self.progress is None:
            return []
        layers = self.adapter.layers()
        hooks = []
        step = max(1, len(layers) // 10)
        for i, layer in enumerate(layers):
            if (i + 1) % step == 0 or i + 1 == len(layers):
                msg = f"{what}: layer {i + 1}/{len(layers)}"
                hooks.append(layer.register_forward_hook(lambda *a, m=msg: self.progress(m)))
        return hooks
