"""Worker functions for the generation-engine tests (gloo, tiny random Megatron models)."""

from __future__ import annotations

import torch

from tests.megatron_workers import VOCAB, _model, _prompt, _setup


def _engine(model, apb_config, pg):
    from megatron_apb.inference import APBEngine

    return APBEngine(model, apb_config, cp_group=pg.cp, tp_group=pg.tp, vocab_size=VOCAB)


def generate_vs_recompute(rank, world, tp, cp, n_doc, n_new, modes, device="cpu"):
    """Engine generation in each mode vs greedy decoding by full recomputation on the
    single-rank model; returns {mode: (tokens, first-step logit error)} and the reference.

    ``device="cuda"``: rank r uses GPU r mod count (several ranks may share one over gloo)."""
    _setup()
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    from megatron_apb import APBConfig
    from megatron_apb.inference import SamplingConfig
    from megatron_apb.megatron import rank_grid_groups

    pg, ref_pg = rank_grid_groups(tp, cp), rank_grid_groups(1, 1)
    doc, query = _prompt(n_doc, 4, seed=3)
    ref = _model(APBConfig(mode="exact"), 1, 1, ref_pg).to(device)
    seq, ref_tokens, first_logits = torch.cat([doc, query]).to(device), [], None
    with torch.no_grad():
        for _ in range(n_new):
            logits = ref(seq[None], None, None)[0, -1]
            first_logits = logits if first_logits is None else first_logits
            ref_tokens.append(int(logits.argmax()))
            seq = torch.cat([seq, torch.tensor([ref_tokens[-1]], device=device)])
    results = {"reference": ref_tokens}
    for name, kwargs in modes:
        apb_config = APBConfig(**kwargs)
        model = _model(apb_config, tp, cp, pg).to(device)
        engine = _engine(model, apb_config, pg)
        cache, _, n, _ = engine.prefill(doc, query)
        logit_err = (engine.step(cache, query, n) - first_logits.float()).abs().max().item()
        out = engine.generate(doc, query, SamplingConfig(max_new_tokens=n_new))
        results[name] = (out.output_ids, logit_err, cache.tokens())
        # phase 2 on each rank alone, after gathering the caches: the same exact attention
        local = engine.generate(doc, query, SamplingConfig(max_new_tokens=n_new), local_decode=True)
        results[name + "/local"] = (local.output_ids, logit_err, cache.tokens())
    return results


def generate_from_hf_checkpoint(rank, world, tp, cp, path, doc, query, n_new):
    """Greedy engine generation in exact mode from an HF checkpoint directory."""
    _setup()
    from megatron_apb import APBConfig
    from megatron_apb.inference import APBEngine, SamplingConfig
    from megatron_apb.megatron import rank_grid_groups
    from megatron_apb.checkpoints import build_model, load_hf_checkpoint, load_into_model

    pg = rank_grid_groups(tp, cp)
    spec, state, _ = load_hf_checkpoint(path)
    apb_config = APBConfig(mode="exact")
    model = build_model(spec, apb_config, pg_collection=pg, parallel_output=False).eval()
    load_into_model(model, state, spec, torch.distributed.get_rank(pg.tp), tp)
    engine = APBEngine(model, apb_config, cp_group=pg.cp, tp_group=pg.tp, vocab_size=spec.vocab_size)
    out = engine.generate(torch.as_tensor(doc), torch.as_tensor(query), SamplingConfig(max_new_tokens=n_new))
    return out.output_ids


def prefill_error(rank, world, n_doc):
    """Prefill a document of ``n_doc`` tokens; returns the error message (None if none)."""
    _setup()
    from megatron_apb import APBConfig
    from megatron_apb.megatron import rank_grid_groups

    pg = rank_grid_groups(1, world)
    apb_config = APBConfig(mode="apb")
    engine = _engine(_model(apb_config, 1, world, pg), apb_config, pg)
    try:
        engine.prefill(torch.arange(1, n_doc + 1), torch.tensor([5, 6]))
    except Exception as exc:
        return str(exc)
    return None


def local_vs_distributed_decode(rank, world, n_doc, n_new, kwargs):
    """Tokens of the distributed phase 2 and of phase 2 on gathered caches, same prefill."""
    _setup()
    from megatron_apb import APBConfig
    from megatron_apb.inference import SamplingConfig
    from megatron_apb.megatron import rank_grid_groups

    pg = rank_grid_groups(1, world)
    apb_config = APBConfig(**kwargs)
    engine = _engine(_model(apb_config, 1, world, pg), apb_config, pg)
    doc, query = _prompt(n_doc, 4, seed=5)
    sampling = SamplingConfig(max_new_tokens=n_new)
    cache, layout, n, _ = engine.prefill(doc, query)
    full = engine.gather_cache(cache, layout, n)
    steps = [(engine.step(cache, query, n), engine.step(full, query, n))]
    return (engine.generate(doc, query, sampling).output_ids,
            engine.generate(doc, query, sampling, local_decode=True).output_ids,
            max((a - b).abs().max().item() for a, b in steps), full.tokens(), cache.tokens())


def dummy_compressor_generate(rank, world, n_doc, n_new):
    """Register a compressor through the registry alone (a copy of ``random``'s scores under
    another name, counting its calls) and generate with it and with ``random``.

    Returns (tokens with the dummy, tokens with random, scorer calls on this rank)."""
    _setup()
    from megatron_apb import APBConfig
    from megatron_apb.compress import Compressor, random_scores, register_compressor
    from megatron_apb.inference import SamplingConfig
    from megatron_apb.megatron import rank_grid_groups

    calls = []

    def score(x):
        calls.append(x.layer_number)
        seed = x.config.seed + 7919 * x.layer_number + 104729 * x.rank
        return random_scores(x.q.shape[0], x.layout.block_len, x.num_kv_heads, seed=seed, device=x.q.device)

    register_compressor(Compressor("dummy_random", score), replace=True)
    pg = rank_grid_groups(1, world)
    doc, query = _prompt(n_doc, 4, seed=7)
    sampling = SamplingConfig(max_new_tokens=n_new)
    out = {}
    for name in ("dummy_random", "random"):
        apb_config = APBConfig(mode="apb", compressor=name, passing_len=4)
        engine = _engine(_model(apb_config, 1, world, pg), apb_config, pg)
        out[name] = engine.generate(doc, query, sampling).output_ids
    return out["dummy_random"], out["random"], len(calls)


def static_vs_dynamic_steps(rank, world, n_doc, n_new, kwargs, device="cpu", graph=False):
    """Decoding steps through :class:`DecodeStep` (static cache, in-place writes, device
    lengths; ``graph``: CUDA-graph replays) against :meth:`APBEngine.step` (growing cache,
    host lengths), from two prefills of one prompt, fed the same greedy tokens.  Returns
    (the largest logit difference, the static path's tokens, the dynamic path's)."""
    _setup()
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        torch.backends.cuda.matmul.allow_tf32 = False
    from megatron_apb import APBConfig
    from megatron_apb.inference.decode import DecodeStep
    from megatron_apb.megatron import rank_grid_groups

    pg = rank_grid_groups(1, world)
    doc, query = _prompt(n_doc, 4, seed=5)
    apb_config = APBConfig(**kwargs)
    engine = _engine(_model(apb_config, 1, world, pg).to(device), apb_config, pg)
    with torch.no_grad():
        static, _, n, _ = engine.prefill(doc, query, reserve=4 + n_new)
        dynamic, _, _, _ = engine.prefill(doc, query, reserve=0)  # grows at every step
        first = engine.step(static, query, n)
        assert torch.equal(first, engine.step(dynamic, query, n))
        runner = DecodeStep(engine, static, last_position=n + 4 + n_new, graph=graph)
        token, position, err, ours, theirs = int(first.argmax()), n + 4, 0.0, [], []
        for _ in range(n_new):
            logits, finite = runner.step(token, position)
            want = engine.step(dynamic, [token], position)
            assert bool(finite)
            err = max(err, (logits - want).abs().max().item())
            ours.append(int(logits.argmax()))
            theirs.append(int(want.argmax()))
            token, position = theirs[-1], position + 1
    return err, ours, theirs, static.tokens(), dynamic.tokens()


def positions_and_room_errors(rank, world):
    """The messages of a too-long generation and of a step beyond the cache's room."""
    _setup()
    from megatron_apb import APBConfig
    from megatron_apb.errors import APBConfigError
    from megatron_apb.inference import SamplingConfig
    from megatron_apb.megatron import rank_grid_groups

    pg = rank_grid_groups(1, 1)
    apb_config = APBConfig(mode="exact")
    engine = _engine(_model(apb_config, 1, 1, pg), apb_config, pg)
    engine.adapter.max_positions = 64
    doc, query = _prompt(40, 4, seed=1)
    messages = []
    try:
        engine.generate(doc, query, SamplingConfig(max_new_tokens=26))
    except APBConfigError as exc:
        messages.append(str(exc))
    cache, _, n, _ = engine.prefill(doc, query, reserve=4)
    engine.step(cache, query, n)
    try:
        cache.set_tokens(cache.tokens() + 1)
    except APBConfigError as exc:
        messages.append(str(exc))
    return messages


def batch_vs_one_by_one(rank, world, tp, cp, n_new, kwargs, device="cpu"):
    """``generate_batch`` on prompts of different lengths vs ``generate`` on each alone
    (greedy); a stop token that ends one sequence early; and the refusals of bad batches.
    Returns (batch tokens, one-by-one tokens, error messages)."""
    _setup()
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        torch.backends.cuda.matmul.allow_tf32 = False
    from megatron_apb import APBConfig
    from megatron_apb.errors import APBConfigError
    from megatron_apb.inference import SamplingConfig
    from megatron_apb.megatron import rank_grid_groups

    pg = rank_grid_groups(tp, cp)
    apb_config = APBConfig(**kwargs)
    engine = _engine(_model(apb_config, tp, cp, pg).to(device), apb_config, pg)
    prompts = [_prompt(n, q, seed=n) for n, q in ((23, 4), (37, 3), (30, 2))]
    sampling = SamplingConfig(max_new_tokens=n_new)
    alone = [engine.generate(doc, query, sampling).output_ids for doc, query in prompts]
    stop = alone[1][2]  # ends the second sequence at its third token
    stopping = SamplingConfig(max_new_tokens=n_new, stop_ids=[stop])
    alone_stop = [engine.generate(doc, query, stopping).output_ids for doc, query in prompts]
    together = [r.output_ids for r in engine.generate_batch(prompts, sampling)]
    together_stop = [r.output_ids for r in engine.generate_batch(prompts, stopping)]
    errors = []
    for bad in ([], [(prompts[0][0], [])], [([], prompts[0][1])], [prompts[0][0]]):
        try:
            engine.generate_batch(bad, sampling)
        except APBConfigError as exc:
            errors.append(str(exc))
    return (together, together_stop), (alone, alone_stop), errors


def sparse_attention_stats(rank, world, tp, cp, n_doc, topk, mode):
    """``generate(attention_stats=True)`` with ``sparse='minference'`` (block-sparse,
    ``topk`` blocks of 16 per query block, sparse from 0 keys): the tokens, the result's
    ``attention`` dict, and this rank's own records (summed here with
    :func:`summarize_stats`, for the test to compare the all-rank summary with)."""
    _setup()
    import os
    import tempfile

    from megatron_apb import APBConfig
    from megatron_apb.inference import SamplingConfig
    from megatron_apb.megatron import rank_grid_groups
    from megatron_apb.ops.sparse import BlockSparse, SparsePlan

    pg = rank_grid_groups(tp, cp)
    doc, query = _prompt(n_doc, 4, seed=5)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"plan{rank}.json")
        SparsePlan(default=BlockSparse(block=16, topk=topk)).save(path)
        config = APBConfig(mode=mode, sparse="minference", sparse_config=path, sparse_dense_below=0,
                           **({} if mode == "exact" else dict(anchor_len=8, passing_len=4, query_prefix_len=0)))
        model = _model(config, tp, cp, pg)
        engine = _engine(model, config, pg)
        out = engine.generate(doc, query, SamplingConfig(max_new_tokens=4), attention_stats=True)
        records = []
        engine.prefill(doc, query, sparse_stats=records)
        plain = engine.generate(doc, query, SamplingConfig(max_new_tokens=4))
    return out.output_ids, out.attention, records, plain.attention, plain.output_ids
