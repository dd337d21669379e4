"""Worker functions for the gloo tests of the Megatron model (run by tests/distributed.py).

Each worker builds, from one seed, the distributed model under test and a single-rank
reference model (TP = CP = 1, on its own singleton process groups), and reports errors.
"""

from __future__ import annotations

import os
import warnings

import torch

VOCAB = 128


def _setup():
    warnings.filterwarnings("ignore")
    from megatron_apb.megatron import init_cpu_megatron

    init_cpu_megatron()


def _model(apb_config, tp, cp, pg, **config_overrides):
    from megatron_apb.megatron import build_gpt_model, tiny_transformer_config

    fields = dict(tensor_model_parallel_size=tp, context_parallel_size=cp)
    fields.update(config_overrides)
    cfg = tiny_transformer_config(**fields)
    torch.manual_seed(0)
    model = build_gpt_model(
        cfg, apb_config, vocab_size=VOCAB, max_sequence_length=1024, pg_collection=pg,
        parallel_output=False,
    )
    return model.eval()


def _shape(model):
    from tests.apb_simulation import ModelShape

    c = model.config
    return ModelShape(c.num_layers, c.num_attention_heads, c.num_query_groups, c.kv_channels, c.layernorm_epsilon)


def _prompt(n_doc, n_query, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n_doc,), generator=g), torch.randint(1, VOCAB, (n_query,), generator=g)


def _run(model, tokens, layout):
    from megatron_apb.forward import ForwardContext
    from megatron_apb.megatron import MegatronAdapter

    with torch.no_grad():
        return MegatronAdapter(model).forward_logits(tokens[None], ForwardContext.prefill(layout))[0].float().cpu()


def check_modes(rank, world, tp, cp, n_doc, cases, device="cpu"):
    """Compare the distributed model with references; returns {case name: max abs error}.

    ``cases``: list of (name, APBConfig kwargs, reference) where reference is ``"full"``
    (the single-rank model on the whole document) or ``"sim"`` (the APB simulation).
    """
    _setup()
    from megatron_apb import APBConfig
    from megatron_apb.layout import shard_document
    from megatron_apb.megatron import rank_grid_groups
    from tests.apb_simulation import simulate_apb

    pg = rank_grid_groups(tp, cp)
    ref_pg = rank_grid_groups(1, 1)
    cp_rank = torch.distributed.get_rank(pg.cp)
    doc, query = _prompt(n_doc, 5)
    errors = {}
    full_logits = None
    for name, kwargs, reference in cases:
        apb_config = APBConfig(**kwargs)
        model = _model(apb_config, tp, cp, pg).to(device)
        tokens, layout = shard_document(doc, query if layout_query(kwargs) else query[:0], apb_config, cp)
        got = _run(model, tokens[cp_rank], layout)
        la = layout.anchor_len_on(cp_rank)
        if full_logits is None:
            ref_model = _model(APBConfig(mode="exact"), 1, 1, ref_pg).to(device)
            with torch.no_grad():
                padded = torch.cat([doc, doc.new_zeros(layout.block_len * cp - n_doc)])
                full_logits = ref_model(padded[None].to(device), None, None)[0].float().cpu()
        b0 = layout.block_start(cp_rank)
        vs_full = (got[la:] - full_logits[b0 : b0 + layout.block_len]).abs().max().item()
        if reference == "full":
            errors[name] = vs_full
        else:
            # how far APB is from exact attention: must be clearly > 0 on later ranks,
            # or agreeing with the simulation would show nothing
            errors[name + ":vs_full"] = vs_full
            ref_model = _model(apb_config, 1, 1, ref_pg)
            weights = {k: v.cpu() for k, v in ref_model.state_dict().items() if isinstance(v, torch.Tensor)}
            sim = simulate_apb(
                weights, _shape(ref_model), tokens,
                anchor_len=layout.anchor_len, block_len=layout.block_len,
                passing_len=layout.passing_len, compressor=apb_config.compressor,
                query_start=layout.query_start, query_len=layout.query_len,
                first_rank_anchor=layout.first_rank_anchor,
                smoothing=apb_config.smoothing_kernel,
            )
            errors[name] = (got - sim[cp_rank]).abs().max().item()
    return errors


def build_error(rank, world, tp, cp, config_overrides, apb_kwargs=None):
    """Build a model that should be refused; returns the error's type and message."""
    _setup()
    from megatron_apb import APBConfig
    from megatron_apb.megatron import rank_grid_groups

    pg = rank_grid_groups(tp, cp)
    try:
        _model(APBConfig(**(apb_kwargs or {})), tp, cp, pg, **config_overrides)
    except Exception as exc:  # the test inspects type and message
        return type(exc).__name__, str(exc)
    return None


def forward_error(rank, world, cp, apb_kwargs, rows, block_len=None):
    """Run a forward with ``rows`` tokens (in a layout of ``block_len`` if given); returns
    the error, if any."""
    _setup()
    from megatron_apb import APBConfig
    from megatron_apb.forward import ForwardContext
    from megatron_apb.megatron import MegatronAdapter, rank_grid_groups

    pg = rank_grid_groups(1, cp)
    apb_config = APBConfig(**apb_kwargs)
    model = _model(apb_config, 1, cp, pg)
    layout = apb_config.layout(block_len, cp_size=cp) if block_len else None
    try:
        with torch.no_grad():
            MegatronAdapter(model).forward_logits(torch.ones(1, rows, dtype=torch.long), ForwardContext.prefill(layout))
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def layout_query(kwargs):
    return kwargs.get("mode", "apb") == "apb" and kwargs.get("query_in_anchor", True)


def check_references(rank, world):
    """At CP = 1: Megatron's own DotProductAttention (explicit causal mask), the APB module
    in every mode, and the plain-torch simulation give the same logits."""
    _setup()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_apb import APBConfig
    from megatron_apb.megatron import rank_grid_groups, tiny_transformer_config
    from tests.apb_simulation import full_attention_logits

    from megatron.core import parallel_state

    parallel_state._set_global_memory_buffer()  # Megatron's own attention needs it
    pg = rank_grid_groups(1, 1)
    doc, _ = _prompt(29, 0)
    torch.manual_seed(0)
    native = GPTModel(
        tiny_transformer_config(), get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB, max_sequence_length=1024, pg_collection=pg,
        position_embedding_type="rope", parallel_output=False,
    ).eval()
    mask = torch.ones(29, 29, dtype=torch.bool).triu(1)[None, None]
    with torch.no_grad():
        want = native(doc[None], None, mask)[0]
    errors = {}
    for mode in ("exact", "ulysses", "apb", "star"):
        model = _model(APBConfig(mode=mode), 1, 1, pg)
        with torch.no_grad():
            errors[mode] = (model(doc[None], None, None)[0] - want).abs().max().item()
    weights = {k: v for k, v in native.state_dict().items() if isinstance(v, torch.Tensor)}
    errors["simulation"] = (full_attention_logits(weights, _shape(native), doc) - want).abs().max().item()
    errors.update(_sparse_model_errors(pg))
    return errors


def _sparse_model_errors(pg):
    """``sparse='minference'`` in the model (one process, every call sparse): a budget that
    covers every key gives the dense logits; one block per query block changes them (the
    sparse path runs), reported as ``sparse_small_budget``."""
    import tempfile

    from megatron_apb import APBConfig
    from megatron_apb.ops.sparse import BlockSparse, SparsePlan

    doc, _ = _prompt(70, 0, seed=2)
    with torch.no_grad():
        dense = _model(APBConfig(mode="exact"), 1, 1, pg)(doc[None], None, None)[0]
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, topk in (("sparse_full_budget", 100), ("sparse_small_budget", 1)):
            path = os.path.join(tmp, name + ".json")
            SparsePlan(default=BlockSparse(block=16, topk=topk)).save(path)
            config = APBConfig(mode="exact", sparse="minference", sparse_config=path, sparse_dense_below=0)
            with torch.no_grad():
                errors[name] = (_model(config, 1, 1, pg)(doc[None], None, None)[0] - dense).abs().max().item()
    return errors


def fused_vs_plain(rank, world, n_doc):
    """Logits of the full forward and tokens of a generation, with the fused RMSNorm and
    RoPE against Megatron's local norm and the unfused rotary chain (same weights)."""
    _setup()
    from megatron_apb import APBConfig
    from megatron_apb.inference import APBEngine, SamplingConfig
    from megatron_apb.megatron import build_gpt_model, rank_grid_groups, tiny_transformer_config
    from megatron_apb.megatron.norms import FusedRMSNorm

    pg = rank_grid_groups(1, world)
    out = {}
    for name, fused in (("plain", False), ("fused", True)):
        cfg = APBConfig(mode="exact", fused_rope=fused)
        torch.manual_seed(0)
        model = build_gpt_model(tiny_transformer_config(context_parallel_size=world), cfg, vocab_size=VOCAB,
                                max_sequence_length=1024, pg_collection=pg, parallel_output=False,
                                fused_norm=fused).eval()
        if fused:
            assert sum(isinstance(m, FusedRMSNorm) for m in model.modules()) == 2 * model.config.num_layers
            params = dict(model.named_parameters())
            assert params.keys() == state.keys()  # the same parameter names
            with torch.no_grad():
                for k, v in state.items():
                    params[k].copy_(v)
        else:
            state = {k: v.detach().clone() for k, v in model.named_parameters()}
        doc, query = _prompt(n_doc, 3, seed=2)
        with torch.no_grad():
            logits = model(torch.cat([doc, query])[None], None, None)[0].float() if world == 1 else None
        engine = APBEngine(model, cfg, cp_group=pg.cp, tp_group=pg.tp, vocab_size=VOCAB)
        tokens = engine.generate(doc, query, SamplingConfig(max_new_tokens=6)).output_ids
        out[name] = (logits, tokens)
    err = None if world > 1 else (out["plain"][0] - out["fused"][0]).abs().max().item()
    return err, out["plain"][1], out["fused"][1]
