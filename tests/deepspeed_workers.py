"""Worker functions for the DeepSpeed tests (gloo, tiny models; see tests/test_deepspeed.py).

Each worker runs generation twice on the same weights and prompt: through our own engine
(a Megatron model built with the APB spec) and through ``megatron_apb.integrations.deepspeed``
(``init_inference`` on a model without APB attention), and returns both token lists, the
first-step logits of both, and any error message as plain data.
"""

from __future__ import annotations

import torch

from tests.megatron_workers import VOCAB, _model, _prompt, _setup


def _first_logits(engine, doc, query):
    cache, _, n, _ = engine.prefill(doc, query)
    return engine.step(cache, query, n)


def _plain_megatron_model(tp, pg):
    """A GPTModel with Megatron's own local layer spec (no APB), built for CP = 1."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_apb.megatron import tiny_transformer_config

    config = tiny_transformer_config(tensor_model_parallel_size=tp, context_parallel_size=1)
    model = GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB,
        max_sequence_length=1024, pg_collection=pg, parallel_output=False, position_embedding_type="rope",
    )
    return model.eval()


def _copy_weights(src, dst):
    state = {k: v for k, v in src.state_dict().items() if "retaining_head" not in k and not k.endswith("_extra_state")}
    result = dst.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)


def _randomize_heads(model, seed):
    from megatron_apb.megatron import apb_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for core in apb_modules(model):
            for p in core.retaining_head.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def _save_heads(model, path):
    """The model's (TP = 1) retaining heads in the reference layout."""
    from safetensors.torch import save_file

    from megatron_apb.megatron import apb_modules

    tensors = {}
    for i, core in enumerate(apb_modules(model)):
        tensors[f"model.layers.{i}.self_attn.fc1.weight"] = core.retaining_head.fc1.weight.detach().clone()
        tensors[f"model.layers.{i}.self_attn.fc2.weight"] = core.retaining_head.fc2.weight.detach().clone()
    save_file(tensors, path)


def megatron_ds_vs_engine(rank, world, tp, cp, n_doc, n_new, cases, heads_path=None, bad_sections=()):
    """Megatron-Core path. ``cases``: (name, APBConfig kwargs, "apb" section); a section
    with ``"heads"`` gets ``heads_path``, written from the reference model's heads (TP = 1).
    ``bad_sections``: sections expected to fail; their error messages are returned."""
    _setup()
    import torch.distributed as dist

    from megatron_apb import APBConfig
    from megatron_apb.integrations.deepspeed import init_inference
    from megatron_apb.inference import APBEngine, SamplingConfig
    from megatron_apb.megatron import rank_grid_groups

    pg, plain_pg = rank_grid_groups(tp, cp), rank_grid_groups(tp, 1)
    doc, query = _prompt(n_doc, 4, seed=5)
    sampling = SamplingConfig(max_new_tokens=n_new)
    results = {}
    for name, apb_kwargs, section in cases:
        apb_config = APBConfig(**apb_kwargs)
        ref = _model(apb_config, tp, cp, pg)
        if "heads" in section:  # heads unlike the default initialisation the swap would give
            _randomize_heads(ref, seed=11)
        ref_engine = APBEngine(ref, apb_config, cp_group=pg.cp, tp_group=pg.tp, vocab_size=VOCAB)
        want_logits = _first_logits(ref_engine, doc, query)
        want = ref_engine.generate(doc, query, sampling).output_ids
        section = dict(section)
        if "heads" in section:
            if dist.get_rank() == 0:
                _save_heads(ref, heads_path)
            dist.barrier()
            section["heads"] = heads_path
        plain = _plain_megatron_model(tp, plain_pg)
        _copy_weights(ref, plain)
        ds = init_inference(plain, {"dtype": "fp32", "apb": section})
        got_logits = _first_logits(ds.engine, doc, query)
        got = ds.generate(doc, query, sampling).output_ids
        heads_loaded = None
        if "heads" in section:
            from megatron_apb.megatron import apb_modules

            heads_loaded = all(
                torch.equal(a.retaining_head.fc1.weight, b.retaining_head.fc1.weight)
                and torch.equal(a.retaining_head.fc2.weight, b.retaining_head.fc2.weight)
                for a, b in zip(apb_modules(ref), apb_modules(plain))
            )
        got_prebuilt = None
        if "heads" not in section:  # a model built with the APB spec is used as it is (no dtype: kept)
            prebuilt = _model(apb_config, tp, cp, pg)
            ds_prebuilt = init_inference(prebuilt, {"apb": section})
            got_prebuilt = ds_prebuilt.generate(doc, query, sampling).output_ids
            assert next(prebuilt.parameters()).dtype == torch.float32
        results[name] = dict(
            want=want, got=got, logit_err=float((got_logits - want_logits).abs().max()), got_prebuilt=got_prebuilt,
            cp=ds.cp_size, kind=ds.kind, ds_module=type(ds.ds_engine).__name__, heads_loaded=heads_loaded,
            swapped=type(plain.decoder.layers[0].self_attention).__name__,
        )
    errors = []
    for section in bad_sections:
        try:
            init_inference(_plain_megatron_model(tp, plain_pg), {"apb": section})
            errors.append(None)
        except Exception as exc:  # the message is what the test checks
            errors.append(f"{type(exc).__name__}: {exc}")
    results["errors"] = errors
    return results


def write_tiny_llama(root):
    """A tiny random Llama (8 heads, 2 KV heads, head_dim 8, 2 layers) saved under
    ``root/model``, retaining heads for it, and a prompt: ``(model dir, heads file, doc, query)``."""
    from safetensors.torch import save_file

    from tests.test_checkpoint import _configs, _hf_model

    config = _configs()["llama_untied_v101"]
    _hf_model(config, 21).save_pretrained(root / "model")
    g = torch.Generator().manual_seed(4)
    width = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    heads = {}
    for i in range(config.num_hidden_layers):
        heads[f"model.layers.{i}.self_attn.fc1.weight"] = 0.2 * torch.randn(48, width, generator=g)
        heads[f"model.layers.{i}.self_attn.fc2.weight"] = 0.2 * torch.randn(config.num_key_value_heads, 48, generator=g)
    save_file(heads, str(root / "heads.safetensors"))
    doc = torch.randint(0, config.vocab_size, (44,), generator=g).tolist()
    query = torch.randint(0, config.vocab_size, (5,), generator=g).tolist()
    return str(root / "model"), str(root / "heads.safetensors"), doc, query


def hf_ds_vs_engine(rank, world, tp, cp, path, doc, query, n_new, cases, heads_path=None, device="cpu"):
    """HF path: our engine on the converted Megatron model vs ``init_inference`` on the
    Hugging Face model itself (DeepSpeed TP = ``tp`` by AutoTP).  ``device="cuda"``: every
    rank on GPU ``rank % count`` (several may share one; collectives over gloo), fp32
    with TF32 off."""
    _setup()
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    from transformers import AutoModelForCausalLM

    from megatron_apb import APBConfig
    from megatron_apb.integrations.deepspeed import init_inference
    from megatron_apb.heads import heads_to_megatron, read_retaining_heads
    from megatron_apb.inference import APBEngine, SamplingConfig
    from megatron_apb.megatron import rank_grid_groups
    from megatron_apb.checkpoints import build_model, load_hf_checkpoint, load_into_model

    pg = rank_grid_groups(tp, cp)
    tp_rank = torch.distributed.get_rank(pg.tp)
    doc, query = torch.as_tensor(doc), torch.as_tensor(query)
    spec, state, _ = load_hf_checkpoint(path)
    sampling = SamplingConfig(max_new_tokens=n_new)
    results = {}
    for name, apb_kwargs, section in cases:
        apb_config = APBConfig(**apb_kwargs)
        full = dict(state)
        section = dict(section)
        if "heads" in section:
            section["heads"] = heads_path
            full.update(heads_to_megatron(
                read_retaining_heads(heads_path), num_layers=spec.num_layers,
                num_heads=spec.num_attention_heads, num_kv_heads=spec.num_query_groups, head_dim=spec.kv_channels,
            ))
            width = next(v for k, v in full.items() if k.endswith("retaining_head.fc1.weight")).shape[0]
            apb_config = apb_config.replace(retaining_head_hidden=width)
        model = build_model(spec, apb_config, pg_collection=pg, parallel_output=False).eval()
        load_into_model(model, full, spec, tp_rank, tp)
        model.to(device)
        ref_engine = APBEngine(model, apb_config, cp_group=pg.cp, tp_group=pg.tp, vocab_size=spec.vocab_size)
        want_logits = _first_logits(ref_engine, doc, query)
        want = ref_engine.generate(doc, query, sampling).output_ids

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ds = init_inference(hf, {"dtype": "fp32", "tensor_parallel": {"tp_size": tp}, "max_out_tokens": 256,
                                 "apb": section})
        got_logits = _first_logits(ds.engine, doc, query)
        got = ds.generate(doc, query, sampling).output_ids
        q_proj = hf.model.layers[0].self_attn.q_proj
        results[name] = dict(
            want=want, got=got, logit_err=float((got_logits - want_logits).abs().max()),
            cp=ds.cp_size, kind=ds.kind, q_proj=type(q_proj).__name__, q_rows=int(q_proj.weight.shape[0]),
            attention=type(hf.model.layers[0].self_attn).__name__,
        )
        if name == cases[0][0]:
            results[name].update(_engine_forward_after_generate(
                ds, path, torch.cat([doc, query, torch.as_tensor(got)]).to(device)))
            results[name]["device"] = str(next(hf.parameters()).device.type)
    return results


def _engine_forward_after_generate(ds, path, ids):
    """The returned engine's forward (DeepSpeed's: the model's own exact attention, TP as
    DeepSpeed split it) after ``generate``, against the unsharded Hugging Face model from
    the same checkpoint; and max_out_tokens honoured by forward and generate."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        out = ds(ids[None])  # DeepSpeed's InferenceEngine.forward
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(ids.device)
        want = plain(ids[None]).logits
    got = out.logits if hasattr(out, "logits") else out[0]
    refused = []
    for call in (lambda: ds(torch.zeros(1, 257, dtype=torch.long, device=ids.device)),
                 lambda: ds.generate(torch.ones(200, dtype=torch.long), torch.ones(50, dtype=torch.long), max_new_tokens=8)):
        try:
            call()
            refused.append(None)
        except ValueError as exc:
            refused.append(str(exc))
    return dict(forward_err=float((got[..., : want.shape[-1]] - want).abs().max()),
                forward_scale=float(want.abs().max()), forward_shape=list(got.shape),
                ds_engine=type(ds.ds_engine).__name__, module=type(ds.module).__name__, refused=refused)
