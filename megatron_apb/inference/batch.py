"""Several prompts answered together: one prefill each, then their decoding in one batch.

:func:`generate_batch` (``APBEngine.generate_batch``) prefills each prompt as
:meth:`APBEngine.generate <megatron_apb.inference.APBEngine.generate>` does (every CP rank,
its own layout), gathers each prompt's cache on the last CP rank (with one rank it already
holds everything), runs each query there, then decodes all sequences together: one step
reads the weights once for the whole batch and every sequence's cache up to its own length
(:class:`~megatron_apb.inference.cache.BatchedKVCache`, the split-KV kernel's ragged
lengths), replayed from a CUDA graph where the step has no collective.  Each sequence
stops at its own stop token or ``max_new_tokens``; the step runs until all have stopped.
Every rank returns the same results: the last CP rank broadcasts the tokens.
"""

from __future__ import annotations

import time
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

from ..comm import PeerWait, broadcast, collective_device, group_size
from ..errors import APBConfigError, NonFiniteError
from .cache import BatchedKVCache
from .decode import NONFINITE_LOGITS, DecodeStep, graphs_possible
from .sampling import SamplingConfig, sample


def _prompts(prompts) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``[(document ids, query ids), ...]`` as 1-D long tensors, refused when empty."""
    out = []
    if not prompts:
        raise APBConfigError("generate_batch needs at least one (document, query) prompt")
    for i, pair in enumerate(prompts):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise APBConfigError(f"prompt {i}: give a (document ids, query ids) pair, got {type(pair).__name__}")
        doc, query = (torch.as_tensor(x, dtype=torch.long).flatten() for x in pair)
        if doc.numel() == 0:
            raise APBConfigError(f"prompt {i}: the document is empty; give at least one token per rank")
        if query.numel() == 0:
            raise APBConfigError(f"prompt {i}: the query is empty; give a question")
        out.append((doc, query))
    return out


def _pick_rows(engine, logits, finite, sampling: SamplingConfig, generator) -> List[int]:
    """One token per row of logits [batch, vocab]; greedy reads tokens and the NaN check at once."""
    logits = logits.reshape(-1, logits.shape[-1])  # one sequence: [vocab]
    if sampling.temperature == 0:
        values = torch.cat([logits.argmax(-1), finite.long().reshape(1)]).tolist()
        tokens, ok = values[:-1], values[-1]
    else:
        ok = bool(finite)
        tokens = [sample(row, sampling, generator) for row in logits] if ok else []
    if not ok:
        raise NonFiniteError(NONFINITE_LOGITS)
    return tokens


def _decode_together(engine, caches, first_tokens, positions, sampling, generator, progress):
    """Batched decoding from each sequence's first token: the token lists."""
    outs = [[t] for t in first_tokens]
    done = [sampling.done(o) for o in outs]
    if all(done):
        return outs
    batch = BatchedKVCache(caches, room=sampling.max_new_tokens)
    caches.clear()  # the batch took their storage over
    groups = (engine.tp_group,)
    graph = engine.cuda_graphs if engine.cuda_graphs is not None else graphs_possible(engine.device, *groups)
    runner = DecodeStep(engine, batch, last_position=max(positions) + sampling.max_new_tokens, graph=graph,
                        batch=len(outs))
    tokens = list(first_tokens)
    while not all(done):
        logits, finite = runner.step(tokens, positions)
        tokens = engine._tp_broadcast_tokens(_pick_rows(engine, logits, finite, sampling, generator))
        positions = [p + 1 for p in positions]
        for i, token in enumerate(tokens):
            if not done[i]:
                outs[i].append(token)
                done[i] = sampling.done(outs[i])
        progress()
    return outs


@torch.no_grad()
def generate_batch(engine, prompts: Sequence, sampling: SamplingConfig):
    """Answer each ``(document ids, query ids)`` of ``prompts``; returns one
    :class:`~megatron_apb.inference.engine.GenerationResult` per prompt, equal on every rank.

    ``decode_s`` is the batch's shared decoding time; ``time_to_first_token_s`` counts every
    prefill before it (the prompts are prefilled one after another)."""
    from .engine import GenerationResult  # local: the engine imports this module for generate_batch

    pairs = _prompts(prompts)
    for doc, query in pairs:
        engine.check_positions(doc.numel(), query.numel(), sampling.max_new_tokens)
    last = engine.cp_size - 1
    decoding = engine.cp_rank == last
    caches, layouts, prefill_s, first_s, positions, first_tokens = [], [], [], [], [], []
    generator = torch.Generator().manual_seed(sampling.seed)
    for doc, query in pairs:
        cache, layout, n_doc, seconds = engine.prefill(doc, query, reserve=query.numel() + sampling.max_new_tokens)
        full = engine.gather_cache(cache, layout, n_doc, keep=decoding)
        del cache
        prefill_s.append(seconds)
        layouts.append(dict(layout.__dict__))
        if decoding:
            start = time.perf_counter()
            token = engine._tp_broadcast_token(sample(engine.step(full, query, n_doc), sampling, generator))
            first_s.append(time.perf_counter() - start)
            caches.append(full)
            first_tokens.append(token)
            positions.append(n_doc + query.numel())
    payload_len = 2 + len(pairs) * (1 + sampling.max_new_tokens) + len(pairs)
    payload = torch.zeros(payload_len, dtype=torch.float64)
    # the other ranks wait for the whole batch's decoding: longer than one collective may last
    waiter = PeerWait(engine.cp_group, dist.get_global_rank(engine.cp_group, last) if engine.cp_size > 1 else 0,
                      engine.device)
    if decoding:
        start = time.perf_counter()
        outs = _decode_together(engine, caches, first_tokens, positions, sampling, generator, waiter.beat)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        payload[0] = time.perf_counter() - start
        payload[1] = len(pairs)
        at = 2
        for i, out in enumerate(outs):
            payload[at] = len(out)
            payload[at + 1 : at + 1 + len(out)] = torch.tensor(out, dtype=torch.float64)  # exact below 2**53
            at += 1 + sampling.max_new_tokens
        payload[at : at + len(pairs)] = torch.tensor(first_s, dtype=torch.float64)
    (waiter.done if decoding else waiter.wait)()
    if group_size(engine.cp_group) > 1:
        wire = payload.to(collective_device(engine.cp_group, engine.device))
        payload = broadcast(wire, dist.get_global_rank(engine.cp_group, last), engine.cp_group).cpu()
    decode_s, at, results = float(payload[0]), 2, []
    firsts = payload[2 + len(pairs) * (1 + sampling.max_new_tokens):].tolist()
    for i, (doc, query) in enumerate(pairs):
        n = int(payload[at])
        out = [int(t) for t in payload[at + 1 : at + 1 + n].tolist()]
        at += 1 + sampling.max_new_tokens
        results.append(GenerationResult(
            document_ids=doc.tolist(), query_ids=query.tolist(), output_ids=out,
            prefill_s=prefill_s[i], time_to_first_token_s=sum(prefill_s[: i + 1]) + firsts[i],
            decode_s=decode_s, decode_tokens=max(0, n - 1), layout=layouts[i],
        ))
    return results
