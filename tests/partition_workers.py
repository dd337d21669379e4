"""Worker for the gloo tests of unequal (balanced) blocks: one spawn runs every check."""

from __future__ import annotations

import torch

from tests.megatron_workers import VOCAB, _model, _prompt, _run, _setup, _shape

#: an attention-heavy cost model: the balanced blocks of a short document differ a lot
STEEP = dict(row_s=1.0, pair_s=0.25)


def unequal_blocks(rank, world, n_doc, n_new):
    """Balanced partitions on ``world`` ranks against single-process references.

    Returns a dict: the blocks of each layout; ``exact``: the distributed exact forward vs
    the single-rank model on the whole document (max abs logit error); ``apb``/``star``:
    the distributed forward vs the APB simulation of the same partition, and ``*:vs_full``
    how far they are from exact attention; ``tokens``: greedy answers after an equal and
    after a balanced exact prefill (distributed phase 2 and phase 2 on the gathered
    caches), and after a balanced APB prefill (both phase-2 paths); ``step``: the largest
    first-step logit difference between the equal and the balanced exact prefill.
    """
    _setup()
    from megatron_apb import APBConfig
    from megatron_apb.inference import APBEngine, SamplingConfig
    from megatron_apb.layout import shard_document
    from megatron_apb.megatron import rank_grid_groups
    from megatron_apb.partition import CostModel
    from tests.apb_simulation import simulate_apb

    pg, ref_pg = rank_grid_groups(1, world), rank_grid_groups(1, 1)
    doc, query = _prompt(n_doc, 4, seed=11)
    cost = CostModel(**STEEP)
    out = {"blocks": {}}

    ref = _model(APBConfig(mode="exact"), 1, 1, ref_pg)
    with torch.no_grad():
        full = ref(doc[None], None, None)[0].float()
    weights = {k: v for k, v in ref.state_dict().items() if isinstance(v, torch.Tensor)}

    # the forward of each rank against its reference
    cases = [
        ("exact", dict(mode="exact"), "full"),
        ("apb", dict(mode="apb", compressor="query_attention", anchor_len=6, passing_len=3, query_prefix_len=2), "sim"),
        ("star", dict(mode="star"), "sim"),
    ]
    for name, kwargs, reference in cases:
        config = APBConfig(partition="balanced", **kwargs)
        model = _model(config, 1, world, pg)
        tokens, layout = shard_document(doc, query if config.passes_blocks else query[:0], config, world, cost=cost)
        out["blocks"][name] = layout.block_lens
        got = _run(model, tokens[rank], layout)
        la = layout.anchor_len_on(rank) if config.uses_anchor else 0
        b0, n = layout.block_start(rank), layout.block_len_on(rank)
        vs_full = (got[la:] - full[b0 : b0 + n]).abs().max().item()
        if reference == "full":
            out[name] = vs_full
            continue
        sim = simulate_apb(
            weights, _shape(ref), tokens, anchor_len=layout.anchor_len, block_len=layout.block_len,
            block_lens=layout.block_lens, passing_len=layout.passing_len, compressor=config.compressor,
            query_start=layout.query_start, query_len=layout.query_len,
            first_rank_anchor=layout.first_rank_anchor, smoothing=config.smoothing_kernel,
        )
        out[name] = (got - sim[rank]).abs().max().item()
        out[name + ":vs_full"] = vs_full

    # decoding after a balanced prefill: exact gives the equal prefill's tokens
    sampling = SamplingConfig(max_new_tokens=n_new)
    tokens, steps = {}, []
    for name, kwargs in (("exact/equal", dict(mode="exact")), ("exact/balanced", dict(mode="exact", partition="balanced")),
                         ("apb/balanced", dict(mode="apb", partition="balanced", anchor_len=6, passing_len=3,
                                               query_prefix_len=2))):
        config = APBConfig(**kwargs)
        engine = APBEngine(_model(config, 1, world, pg), config, cp_group=pg.cp, tp_group=pg.tp,
                           vocab_size=VOCAB, cost_model=cost)
        cache, layout, n, _ = engine.prefill(doc, query)
        out["blocks"][name] = layout.block_lens
        if name.startswith("exact"):
            steps.append(engine.step(cache, query, n))
        tokens[name] = engine.generate(doc, query, sampling).output_ids
        tokens[name + "/local"] = engine.generate(doc, query, sampling, local_decode=True).output_ids
    out["tokens"] = tokens
    out["step"] = (steps[0] - steps[1]).abs().max().item()
    out["snapkv"] = snapkv_after_balanced_prefill(pg, cost, doc, query, n_new)
    return out


def snapkv_after_balanced_prefill(pg, cost, doc, query, n_new):
    """SnapKV on balanced blocks (exact and APB): for a budget covering the document and a
    small one, the blocks, this rank's cache rows per layer, its share of the plan made
    from the unequal blocks, and the tokens of distributed and local phase 2."""
    from megatron_apb import APBConfig
    from megatron_apb.inference import APBEngine, SamplingConfig
    from megatron_apb.inference.engine import kv_plan

    world, rank = pg.cp.size(), pg.cp.rank()
    sampling = SamplingConfig(max_new_tokens=n_new)
    out = {}
    for name, kwargs in (("exact", dict(mode="exact")),
                         ("apb", dict(mode="apb", anchor_len=6, passing_len=3, query_prefix_len=2))):
        for budget in (len(doc) + 50, 12):
            config = APBConfig(partition="balanced", kv_compress="snapkv", kv_budget=budget, kv_window=4, **kwargs)
            engine = APBEngine(_model(config, 1, world, pg), config, cp_group=pg.cp, tp_group=pg.tp,
                               vocab_size=VOCAB, cost_model=cost)
            cache, layout, n, _ = engine.prefill(doc, query, reserve=len(query) + n_new)
            lens = [layout.block_len_on(r) for r in range(world)]
            plan = kv_plan(config, n, lens, world)
            out[(name, budget)] = dict(
                blocks=lens, rows=[cache.get(layer)[0].shape[1] for layer in cache.layers()],
                share=plan.kept[rank], total=sum(plan.kept),
                tokens=engine.generate(doc, query, sampling).output_ids,
                local=engine.generate(doc, query, sampling, local_decode=True).output_ids)
    return out
