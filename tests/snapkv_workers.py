"""Worker functions for the SnapKV and chunked-prefill tests (gloo, tiny random Megatron models)."""

from __future__ import annotations

import torch

from tests.engine_workers import _engine
from tests.megatron_workers import _model, _prompt, _setup


def _rows_of(small, full):
    """For each KV head, the rows of ``full`` [1, n, kv, d] that ``small`` [1, m, kv, d]
    holds (each must be one of them), as lists."""
    found = []
    for h in range(full.shape[2]):
        eq = (small[0, :, h, None, :] == full[0, None, :, h, :]).all(-1)  # [m, n]
        assert bool(eq.any(1).all()), "a kept key is not one of the prefill's keys"
        found.append(eq.float().argmax(1).tolist())
    return found


def snapkv_generation(rank, world, n_doc, n_new):
    """Greedy generation with SnapKV against the uncompressed engine, on ``world`` CP ranks
    (and with one rank, :func:`chunked_prefill`).

    Returns a dict: tokens without compression, with a budget covering the document
    (distributed and local decoding), and for small budgets the tokens, the cache sizes
    per layer, the plan's share of this rank, and which rows of the uncompressed cache
    each head kept."""
    _setup()
    from megatron_apb import APBConfig
    from megatron_apb.inference import SamplingConfig
    from megatron_apb.inference.engine import kv_plan
    from megatron_apb.megatron import rank_grid_groups

    pg = rank_grid_groups(1, world)
    out = {"chunked": chunked_prefill(pg, 23, 5) if world == 1 else None}
    doc, query = _prompt(n_doc, 4, seed=7)
    base = APBConfig(mode="exact")
    model = _model(base, 1, world, pg)
    sampling = SamplingConfig(max_new_tokens=n_new)
    out["plain"] = _engine(model, base, pg).generate(doc, query, sampling).output_ids
    full_cache, layout, _, _ = _engine(model, base, pg).prefill(doc, query)
    everything = base.replace(kv_compress="snapkv", kv_budget=n_doc + 50, kv_window=4)
    engine = _engine(model, everything, pg)
    out["all"] = engine.generate(doc, query, sampling).output_ids
    out["all/local"] = engine.generate(doc, query, sampling, local_decode=True).output_ids
    for window, budget in ((4, 12), (n_doc // 2 + 3, n_doc // 2 + 9)):  # the second spans both blocks at CP 2
        cfg = base.replace(kv_compress="snapkv", kv_budget=budget, kv_window=window, kv_pool_kernel=3)
        engine = _engine(model, cfg, pg)
        cache, _, _, _ = engine.prefill(doc, query, reserve=4 + n_new)
        plan = kv_plan(cfg, n_doc, layout.block_len, world)
        kept = {layer: _rows_of(cache.get(layer)[0], full_cache.get(layer)[0]) for layer in cache.layers()}
        res = engine.generate(doc, query, sampling)
        local = engine.generate(doc, query, sampling, local_decode=True)
        batch = engine.generate_batch([(doc, query), (doc[:-3], query)], sampling)  # ragged compressed caches
        alone = engine.generate(doc[:-3], query, sampling).output_ids
        out[(window, budget)] = dict(
            tokens=res.output_ids, local=local.output_ids, batch=[r.output_ids for r in batch],
            alone=[res.output_ids, alone], sizes=[cache.get(l)[0].shape[1] for l in cache.layers()],
            share=plan.kept[rank], total=sum(plan.kept), kept=kept, valid=plan.valid(rank),
            window_rows=max(0, min(plan.valid(rank), n_doc - rank * layout.block_len)
                            - max(0, plan.window_start - rank * layout.block_len)))
    if world == 1:
        out["vs_reference"] = one_rank_selection_vs_reference(model, base, pg, doc, query)
    try:
        _engine(model, base.replace(kv_compress="snapkv", kv_budget=n_doc + 50, kv_window=n_doc + 1), pg).prefill(doc, query)
    except Exception as exc:
        out["long_window"] = (type(exc).__name__, getattr(exc, "field", None), str(exc))
    return out


def chunked_prefill(pg, n_doc, chunk):
    """The model's rows through the layers with the norm, projections and MLP chunked
    (``chunk`` rows) vs unchunked, same weights, one rank: (largest difference, reference
    magnitude, calls per module chunked, unchunked)."""
    from megatron_apb import APBConfig
    from megatron_apb.forward import ForwardContext
    from megatron_apb.megatron.adapter import MegatronAdapter

    doc, _ = _prompt(n_doc, 4, seed=9)
    results = []
    for cfg in (APBConfig(mode="exact", prefill_chunk=chunk), APBConfig(mode="exact", prefill_chunk=0)):
        model = _model(cfg, 1, 1, pg)
        calls = {"mlp": 0, "qkv": 0, "norm": 0, "proj": 0}

        def count(name):
            def hook(*args):
                calls[name] += 1
            return hook

        for layer in model.decoder.layers:
            layer.mlp.register_forward_hook(count("mlp"))
            layer.self_attention.linear_qkv.register_forward_hook(count("qkv"))
            layer.self_attention.linear_proj.register_forward_hook(count("proj"))
            layer.input_layernorm.register_forward_hook(count("norm"))
        with torch.no_grad():
            logits = MegatronAdapter(model).forward_logits(doc[None], ForwardContext.prefill())
        results.append((logits, calls))
    (a, calls_a), (b, calls_b) = results
    return (a - b).abs().max().item(), b.abs().max().item(), calls_a, calls_b


def one_rank_selection_vs_reference(model, base, pg, doc, query):
    """With one rank, the K/V each layer keeps equal the ops reference's selection
    (:func:`megatron_apb.ops.snapkv.snapkv_rows`) on that layer's own q and k: the number
    of layers checked."""
    from unittest import mock

    from megatron_apb.megatron import core_attention
    from megatron_apb.ops.snapkv import gather_tokens, snapkv_rows

    cfg = base.replace(kv_budget=11, kv_window=5, kv_pool="max", kv_pool_kernel=3)
    real, checked = core_attention.compress_block_kv, []

    def spy(q, k, v, plan, **kw):
        k_kept, v_kept = real(q, k, v, plan, **kw)
        rows = snapkv_rows(q[:, -5:], k, budget=11, pool="max", kernel=3, softmax_scale=kw["softmax_scale"])
        checked.append(torch.equal(k_kept, gather_tokens(k, rows)) and torch.equal(v_kept, gather_tokens(v, rows)))
        return k_kept, v_kept

    with mock.patch.object(core_attention, "compress_block_kv", spy):
        _engine(model, cfg, pg).prefill(doc, query)
    assert all(checked), checked
    return len(checked)
