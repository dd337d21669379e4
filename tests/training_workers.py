"""Worker functions for the retaining-head training tests (run by tests/distributed.py on gloo).

Every model here is a tiny Llama-shaped ``ModelSpec`` loaded from one full (TP = 1) state,
so models on different TP x CP places hold the same weights as the float64 reference.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from tests.distributed import error_message

VOCAB = 128


def _setup():
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from megatron_apb.megatron import init_cpu_megatron

    init_cpu_megatron()


def _spec():
    from megatron_apb.checkpoints import ModelSpec

    return ModelSpec(
        model_type="llama", num_layers=2, hidden_size=96, num_attention_heads=12, num_query_groups=4,
        ffn_hidden_size=192, kv_channels=8, vocab_size=VOCAB, norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=1024,
    )


def _model(spec, pg, full_state=None, seed=0):
    """A GPTModel (APB spec, exact mode) on ``pg``; with ``full_state`` loaded for its TP rank."""
    from megatron_apb import APBConfig
    from megatron_apb.checkpoints import build_model, load_into_model

    torch.manual_seed(seed)
    model = build_model(spec, APBConfig(mode="exact"), pg_collection=pg, parallel_output=False,
                        config_overrides=dict(init_method_std=0.1))
    if full_state is not None:
        load_into_model(model, full_state, spec, dist.get_rank(pg.tp), dist.get_world_size(pg.tp))
    return model.eval()


def _full_state(spec, pg1):
    """The full state of a randomly initialised TP = 1 model (the same on every rank)."""
    model = _model(spec, pg1)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}, model


def _samples(count, prompt_len, answer_len, seed):
    from megatron_apb.training.data import TokenizedSample

    g = torch.Generator().manual_seed(seed)
    return [
        TokenizedSample(torch.randint(1, VOCAB, (prompt_len,), generator=g).tolist(),
                        torch.randint(1, VOCAB, (answer_len,), generator=g).tolist(), f"random#{i}")
        for i in range(count)
    ]


def _heads_close(a, b):
    return max(max((a[i][0] - b[i][0]).abs().max().item(), (a[i][1] - b[i][1]).abs().max().item()) for i in a)


def _heads_equal(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]) for i in a)


# ------------------------------------------------------------------------------ labels
LABEL_CASES = {  # (prompt, answer): the answer within the last block / spanning both blocks at CP 2
    "tail_answer": (37, 6),
    "split_answer": (10, 20),
}


def check_labels(places):
    """Max abs errors of captured labels and pre-RoPE q, k, v against ``reference_labels``
    at CP 1, CP 2 and TP 2, per case, with the reference's largest |label| and this rank's
    token range."""
    from megatron_apb.training.labels import reference_labels, sample_features

    spec = _spec()
    full, ref_model = _full_state(spec, places["cp1"])
    inv_freq = ref_model.rotary_pos_emb.inv_freq
    out = {}
    for case, (P, A) in LABEL_CASES.items():
        (sample,) = _samples(1, P, A, seed=len(case))
        want, q, k, v = reference_labels(full, ref_model.config, sample.prompt_ids, sample.answer_ids, inv_freq=inv_freq)
        out[f"{case}:scale"] = want.abs().max().item()
        for place, pg in places.items():
            model = _model(spec, pg, full)
            f = sample_features(model, sample.prompt_ids, sample.answer_ids, chunk_size=5)
            tp_rank, tp = dist.get_rank(pg.tp), dist.get_world_size(pg.tp)
            kvl, hl = spec.num_query_groups // tp, spec.num_attention_heads // tp
            rows, kvs, hs = slice(f.start, f.start + f.num_tokens), slice(tp_rank * kvl, (tp_rank + 1) * kvl), slice(tp_rank * hl, (tp_rank + 1) * hl)
            errs = [(f.labels.double() - want[:, rows, kvs]).abs().max().item() if f.num_tokens else 0.0]
            for i in range(spec.num_layers):
                for got, ref in ((f.q[i], q[i][rows, hs]), (f.k[i], k[i][rows, kvs]), (f.v[i], v[i][rows, kvs])):
                    errs.append((got[0].double() - ref).abs().max().item() if f.num_tokens else 0.0)
            out[f"{case}:{place}"] = dict(labels=errs[0], inputs=max(errs[1:]), start=f.start, tokens=f.num_tokens,
                                          kv_heads=f.labels.shape[2])
    return out


# --------------------------------------------------------------- TP / CP training, formats
def check_parallel_training(places, out_dir):
    """Train 3 of 5 steps at CP 1, CP 2 and TP 2 from the same heads; save the TP 2 run, load it
    at TP 1 and TP 2, and resume it at TP 1 for 2 more steps next to a 5-step TP 1 run."""
    from megatron_apb.training import RetainingHeadTrainer, TrainConfig
    from megatron_apb.training.checkpoint import build_retaining_heads, gather_retaining_heads, load_retaining_heads

    spec = _spec()
    full, _ = _full_state(spec, places["cp1"])
    train = _samples(3, 29, 5, seed=3)
    config = TrainConfig(steps=5, hidden=16, lr=1e-2, warmup_steps=1, eval_every=0, log_every=0)
    models = {place: _model(spec, pg, full) for place, pg in places.items()}
    out, runs = {}, {}
    for place, model in models.items():
        trainer = RetainingHeadTrainer(model, config)
        trainer.fit(train, until=3)
        runs[place] = trainer
        out[place + ":losses"] = [r["loss"] for r in trainer.history["train"]]
        out[place + ":overlaps"] = [r["overlap"] for r in trainer.history["train"]]
    gathered = {place: gather_retaining_heads(t.heads) for place, t in runs.items()}
    out["cp2_vs_cp1_heads"] = _heads_close(gathered["cp2"], gathered["cp1"])
    out["tp2_vs_cp1_heads"] = _heads_close(gathered["tp2"], gathered["cp1"])
    # every rank of a CP group holds the same heads
    out["cp2_heads_replicated"] = True
    for fc1, fc2 in gathered["cp2"].values():
        for t in (fc1, fc2):
            other = t.clone()
            dist.broadcast(other, src=0)
            out["cp2_heads_replicated"] &= torch.equal(other, t)

    # save at TP 2; load at TP 1 and TP 2 (fresh heads from another seed first)
    runs["tp2"].save(out_dir)
    path = os.path.join(out_dir, "heads.safetensors")
    for place in ("cp1", "tp2"):
        heads = build_retaining_heads(models[place], hidden=16, seed=99)
        load_retaining_heads(heads, path)
        out[f"load_at_{place}_bitwise"] = _heads_equal(gather_retaining_heads(heads), gathered["tp2"])
        if place == "tp2":
            out["tp2_shards_bitwise"] = all(
                torch.equal(a.fc1.weight, b.fc1.weight) and torch.equal(a.fc2.weight, b.fc2.weight)
                for a, b in zip(heads, runs["tp2"].heads)
            )
    # the TP 2 checkpoint resumed at TP 1, against an uninterrupted TP 1 run
    straight = RetainingHeadTrainer(models["cp1"], config)
    straight.fit(train)
    resumed = RetainingHeadTrainer(models["cp1"], config)
    out["resumed_from_step"] = resumed.resume(out_dir)
    resumed.fit(train)
    out["straight_losses"] = [r["loss"] for r in straight.history["train"]]
    out["resumed_losses"] = [r["loss"] for r in resumed.history["train"]]
    return out


# -------------------------------------------------------------- one-process training runs
def check_training(pg, out_dir):
    """Learning on held-out prompts, resume identity, and error messages (one rank)."""
    from megatron_apb.heads import read_retaining_heads, save_retaining_heads
    from megatron_apb.training import RetainingHeadTrainer, TrainConfig
    from megatron_apb.training.checkpoint import build_retaining_heads, load_retaining_heads

    spec = _spec()
    model = _model(spec, pg)
    train, held_out = _samples(16, 96, 8, seed=1), _samples(4, 96, 8, seed=2)
    out = {}

    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    trainer = RetainingHeadTrainer(model, TrainConfig(steps=40, hidden=64, lr=1e-2, warmup_steps=4, eval_every=20, log_every=0))
    out["random"] = trainer.evaluate(held_out, scorer="random")
    trainer.fit(train, held_out)
    out["backbone_frozen"] = not any(p.requires_grad for p in model.parameters())
    out["backbone_unchanged"] = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    out["heads_trainable"] = all(p.requires_grad for p in trainer.parameters()) and len(trainer.parameters()) == 4
    out["eval"] = trainer.history["eval"]
    out["train_losses"] = [r["loss"] for r in trainer.history["train"]]

    # resume: 3 steps, save, a fresh trainer resumes to 6 == 6 steps in one go
    config = TrainConfig(steps=6, hidden=32, lr=1e-2, warmup_steps=2, eval_every=0, log_every=0)
    straight = RetainingHeadTrainer(model, config)
    straight.fit(train)
    first = RetainingHeadTrainer(model, config)
    first.fit(train, output_dir=os.path.join(out_dir, "part"), until=3)  # interrupted after step 3
    second = RetainingHeadTrainer(model, config)
    out["resumed_at"] = second.resume(os.path.join(out_dir, "part"))
    second.fit(train, output_dir=os.path.join(out_dir, "resumed"))
    out["straight_losses"] = [r["loss"] for r in straight.history["train"]]
    out["resumed_losses"] = [r["loss"] for r in second.history["train"]]
    out["resumed_heads_bitwise"] = all(
        torch.equal(a.fc1.weight, b.fc1.weight) and torch.equal(a.fc2.weight, b.fc2.weight)
        for a, b in zip(straight.heads, second.heads)
    )

    # errors: a heads file without layer 1, a width that does not fit, resuming at another width
    full = read_retaining_heads(os.path.join(out_dir, "resumed", "heads.safetensors"))
    no_layer = os.path.join(out_dir, "no_layer1.safetensors")
    save_retaining_heads(no_layer, {0: full[0]})
    out["missing_layer"] = error_message(lambda: load_retaining_heads(build_retaining_heads(model, hidden=32), no_layer))
    out["hidden_mismatch"] = error_message(
        lambda: load_retaining_heads(build_retaining_heads(model, hidden=16), os.path.join(out_dir, "resumed", "heads.safetensors")))
    out["resume_hidden_mismatch"] = error_message(
        lambda: RetainingHeadTrainer(model, TrainConfig(steps=8, hidden=16)).resume(os.path.join(out_dir, "resumed")))
    out["resume_missing"] = error_message(lambda: RetainingHeadTrainer(model, config).resume(os.path.join(out_dir, "nowhere")))
    return out


def suite_worker(rank, world, out_dir):
    """Everything the tests need from one 2-process run (process start-up dominates the
    cost on a small machine): ``labels`` and ``parallel`` from both ranks, ``training``
    (one-rank runs on singleton groups) from rank 0 only."""
    _setup()
    from megatron_apb.megatron import rank_grid_groups

    places = {"cp1": rank_grid_groups(1, 1), "cp2": rank_grid_groups(1, 2), "tp2": rank_grid_groups(2, 1)}
    out = {"labels": check_labels(places), "parallel": check_parallel_training(places, os.path.join(out_dir, "tp2"))}
    if rank == 0:
        out["training"] = check_training(places["cp1"], os.path.join(out_dir, "one"))
    return out
