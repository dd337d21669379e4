"""Worker functions for the gloo tests of the collectives and the parallel algorithms."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _inputs(seed, b, s, h, kvh, d):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, s, h, d, generator=g),
        torch.randn(b, s, kvh, d, generator=g),
        torch.randn(b, s, kvh, d, generator=g),
    )


def collectives(rank, world):
    """all_gather_async and all_to_all_heads against what each rank can compute alone."""
    from megatron_apb.comm import all_gather_async, all_to_all_heads

    errors = {}
    x = torch.full((2, 3), float(rank))
    pending = all_gather_async(x, None if world == 1 else dist.group.WORLD)
    got = pending.wait()
    errors["gather"] = (got - torch.arange(world).float().view(world, 1, 1).expand(world, 2, 3)).abs().max().item()
    try:
        pending.wait()
        errors["double_wait_raises"] = False
    except RuntimeError:
        errors["double_wait_raises"] = True
    # all-to-all: the whole sequence (all ranks' blocks) for this rank's head slice
    full = torch.arange(world * 3 * 4 * world * 2, dtype=torch.float32).view(1, world * 3, 4 * world, 2)
    local = full[:, rank * 3 : (rank + 1) * 3]
    heads = all_to_all_heads(local, dist.group.WORLD, scatter_heads=True)
    errors["scatter"] = (heads - full[:, :, rank * 4 : (rank + 1) * 4]).abs().max().item()
    back = all_to_all_heads(heads, dist.group.WORLD, scatter_heads=False)
    errors["roundtrip"] = (back - local).abs().max().item()
    return errors


def exact_algorithms(rank, world, heads, kv_heads, block):
    """exact_context_attention and ulysses_attention vs one-process causal attention."""
    from megatron_apb.ops.reference import causal_mask, reference_attention
    from megatron_apb.parallel import exact_context_attention, ulysses_attention

    q, k, v = _inputs(0, 2, world * block, heads, kv_heads, 16)
    want, _ = reference_attention(q, k, v, causal_mask(q.shape[1], q.shape[1]))
    sl = slice(rank * block, (rank + 1) * block)
    group = dist.group.WORLD
    got_exact = exact_context_attention(q[:, sl], k[:, sl], v[:, sl], group=group)
    got_ulysses = ulysses_attention(q[:, sl], k[:, sl], v[:, sl], group=group)
    return {
        "exact": (got_exact - want[:, sl]).abs().max().item(),
        "ulysses": (got_ulysses - want[:, sl]).abs().max().item(),
    }


def apb_algorithm(rank, world, anchor, block, passing):
    """apb_context_attention vs the dense APB reference with this rank's passing block
    rebuilt by hand from every rank's inputs (random scores, shared seed)."""
    from megatron_apb.config import CPLayout
    from megatron_apb.ops.reference import apb_reference_attention
    from megatron_apb.parallel import apb_context_attention

    layout = CPLayout(mode="apb", block_len=block, anchor_len=anchor, passing_len=passing)
    h, kvh, d = 6, 2, 8
    qa, ka, va = _inputs(100, 1, anchor, h, kvh, d)  # the anchor, identical on all ranks
    blocks = [_inputs(200 + r, 1, block, h, kvh, d) for r in range(world)]
    scores = [torch.rand(1, block, kvh, generator=torch.Generator().manual_seed(300 + r)) for r in range(world)]

    def rows(r):
        la = layout.anchor_len_on(r)
        return [torch.cat([a[:, :la], x], 1) for a, x in zip((qa, ka, va), blocks[r])]

    q, k, v = rows(rank)
    got = apb_context_attention(
        q, k, v, layout=layout, group=dist.group.WORLD, scorer=lambda: scores[rank]
    )
    # passing block by hand: per KV head the `passing` best-scored tokens, in order
    pk, pv = [], []
    for r in range(rank):
        kk, vv = blocks[r][1], blocks[r][2]
        sel_k = torch.empty(1, passing, kvh, d)
        sel_v = torch.empty(1, passing, kvh, d)
        for g in range(kvh):
            idx = torch.argsort(scores[r][0, :, g], descending=True, stable=True)[:passing].sort().values
            sel_k[0, :, g], sel_v[0, :, g] = kk[0, idx, g], vv[0, idx, g]
        pk.append(sel_k), pv.append(sel_v)
    la = layout.anchor_len_on(rank)
    want, _ = apb_reference_attention(
        q, k, v, anchor_len=la,
        passing_k=torch.cat(pk, 1) if pk else None, passing_v=torch.cat(pv, 1) if pv else None,
    )
    return (got - want).abs().max().item(), _sparse_apb(rank, world)


def _sparse_apb(rank, world):
    """The ``minference`` backend as the local attention of APB ranks (no passing block:
    Star Attention): anchor and own block sparse, merged with the dense anchor part by LSE,
    against a reference assembled from the sparse and dense references."""
    from megatron_apb.config import CPLayout
    from megatron_apb.ops.merge import merge_attention
    from megatron_apb.ops.reference import reference_attention
    from megatron_apb.ops.sparse import (BlockSparse, SparseAttention, VerticalSlash, build_index,
                                         sparse_reference_attention)
    from megatron_apb.parallel import apb_context_attention

    block, anchor, h, kvh, d = 45, 20, 4, 2, 8
    layout = CPLayout(mode="star", block_len=block, anchor_len=anchor, passing_len=0)
    patterns = (BlockSparse(block=16, topk=1), VerticalSlash(block=16, vertical_topk=3, slash_topk=16, last_q=8)) * 2
    qa, ka, va = _inputs(100, 1, anchor, h, kvh, d)
    la = layout.anchor_len_on(rank)
    q, k, v = (torch.cat([a[:, :la], x], 1) for a, x in zip((qa, ka, va), _inputs(200 + rank, 1, block, h, kvh, d)))
    got = apb_context_attention(q, k, v, layout=layout, group=dist.group.WORLD,
                                backend=SparseAttention(patterns, dense_below=0))

    def sparse(q, k, v):
        return sparse_reference_attention(q, k, v, build_index(q, k, patterns, d ** -0.5))

    own = sparse(q[:, la:], k[:, la:], v[:, la:])
    if la == 0:
        return (got - own[0]).abs().max().item()
    ctx = reference_attention(q[:, la:], k[:, :la], v[:, :la])
    want = torch.cat([sparse(q[:, :la], k[:, :la], v[:, :la])[0],
                      merge_attention([own[0], ctx[0]], [own[1], ctx[1]])[0]], 1)
    return (got - want).abs().max().item()


def retaining_head_tp(rank, world):
    """A TP-sharded retaining head (row-parallel fc1, summed over TP) equals the full head."""
    from megatron_apb.compress import RetainingHead, init_retaining_head_

    h, kvh, d = 6, 2, 8
    full = init_retaining_head_(RetainingHead(h, kvh, d, hidden=32), seed=5, num_heads=h, num_kv_heads=kvh, tp_rank=0, tp_size=1)
    part = init_retaining_head_(
        RetainingHead(h // world, kvh // world, d, hidden=32, tp_group=dist.group.WORLD),
        seed=5, num_heads=h, num_kv_heads=kvh, tp_rank=rank, tp_size=world,
    )
    q, k, v = _inputs(7, 1, 9, h, kvh, d)
    hs, ks = h // world, kvh // world
    with torch.no_grad():
        want = full(q, k, v)[..., rank * ks : (rank + 1) * ks]
        got = part(q[:, :, rank * hs : (rank + 1) * hs], k[:, :, rank * ks : (rank + 1) * ks], v[:, :, rank * ks : (rank + 1) * ks])
    return (got - want).abs().max().item()


def decode_merge(rank, world, lengths, new):
    """decode_attention over ranks holding ``lengths[r]`` cached tokens (0 = all padding),
    the last rank also holding the ``new`` tokens, vs one causal attention over everything."""
    from megatron_apb.ops.reference import causal_mask, reference_attention
    from megatron_apb.parallel import decode_attention

    h, kvh, d = 6, 3, 8
    total = sum(lengths) + new
    q_all, k_all, v_all = _inputs(11, 1, total, h, kvh, d)
    want, _ = reference_attention(q_all[:, -new:], k_all, v_all, causal_mask(new, total))
    start = sum(lengths[:rank])
    stop = start + lengths[rank] + (new if rank == world - 1 else 0)
    got = decode_attention(
        q_all[:, -new:], k_all[:, start:stop], v_all[:, start:stop],
        owner=rank == world - 1, group=dist.group.WORLD,
    )
    return (got - want).abs().max().item()


def peer_wait(rank, world, beats):
    """Rank 1 works 3 s (calling ``beat`` every 0.1 s when ``beats``) under a 1 s collective
    timeout while rank 0 waits: with beats the wait ends when rank 1 is done; without, rank 0
    gets ``CollectiveTimeout``.  Returns (what happened on this rank, broadcasts seen)."""
    import time

    import torch.distributed as dist

    from megatron_apb import comm
    from megatron_apb.errors import CollectiveTimeout

    comm.set_collective_timeout(1.0)
    waiter = comm.PeerWait(dist.group.WORLD, 1, torch.device("cpu"))
    if rank == 1:
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            time.sleep(0.1)
            if beats:
                waiter.beat()
        waiter.done()  # late without beats: rank 0 gave up, its broadcast still pending takes it
        return "worked", None
    try:
        start = time.monotonic()
        waiter.wait()
        return "waited", time.monotonic() - start
    except CollectiveTimeout as exc:
        return str(exc), None
