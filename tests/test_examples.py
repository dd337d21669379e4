"""The launch scripts in examples/ in their CPU form, and the Megatron-LM hooks in patches/.

Each script runs as a user runs it (bash, torchrun, gloo CPU processes) on a tiny random
Llama written by examples/make_tiny_llama.py.  Its answers are noise, so the checks are on
what the run reports (world layout, modes, APB layout, timings) and on agreement: the
DeepSpeed example (HF model, DeepSpeed TP 2 x APB CP 2) must produce the same tokens as
the TP 2 x CP 2 `megatron-apb generate` example (Megatron model, Megatron TP) on the same
checkpoint and prompt.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
HOOKS_DIR = os.path.join(ROOT, "patches", "megatron_lm")
needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")


def _bash(script, *args, env=None, timeout=300):
    full_env = dict(os.environ)
    full_env.pop("CPU", None)
    full_env.update(env or {})
    return subprocess.run(
        ["bash", os.path.join(EXAMPLES, script), *args], capture_output=True, text=True,
        timeout=timeout, env=full_env, cwd=ROOT,
    )


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    return {"TINY_MODEL_DIR": str(tmp_path_factory.mktemp("examples") / "tiny_llama"), "MAX_NEW_TOKENS": "8"}


def _ok(proc):
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


@needs_hf
def test_generate_cp4_cpu(tiny_env, tmp_path):
    out = tmp_path / "cp4.json"
    proc = _bash("generate_cp4.sh", "--cpu", "--output-json", str(out), env=tiny_env)
    _ok(proc)
    result = json.loads(out.read_text())
    assert (result["tp"], result["cp"]) == (1, 4)
    assert [r["mode"] for r in result["runs"]] == ["apb", "exact"]
    apb = result["runs"][0]
    assert apb["layout"]["anchor_len"] > 0 and apb["layout"]["passing_len"] > 0
    assert len(apb["output_ids"]) == 8 and len(apb["document_ids"]) >= 300
    assert "time to first token" in proc.stdout and "TP=1 x CP=4" in proc.stdout


@pytest.fixture(scope="module")
def tp2_cp2_run(tiny_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2cp2") / "gen.json"
    proc = _bash("generate_34b_tp2_cp2.sh", "--cpu", "--output-json", str(out), env=tiny_env)
    _ok(proc)
    return proc, json.loads(out.read_text())


@needs_hf
def test_generate_34b_tp2_cp2_cpu(tp2_cp2_run):
    proc, result = tp2_cp2_run
    assert (result["tp"], result["cp"]) == (2, 2)
    assert "TP=2 x CP=2" in proc.stdout and "[apb] answer:" in proc.stdout


@needs_hf
@needs_deepspeed
def test_deepspeed_example_cpu_matches_megatron_example(tiny_env, tp2_cp2_run, tmp_path):
    out = tmp_path / "ds.json"
    proc = _bash("deepspeed/generate.sh", "--cpu", "--output-json", str(out), env=tiny_env)
    _ok(proc)
    result = json.loads(out.read_text())
    assert (result["tp"], result["cp"]) == (2, 2)
    assert "DeepSpeed TP=2 x APB CP=2" in proc.stdout and "prefill" in proc.stdout
    megatron = tp2_cp2_run[1]["runs"][0]
    assert result["document_ids"] == megatron["document_ids"] and result["query_ids"] == megatron["query_ids"]
    assert result["layout"] == megatron["layout"]
    assert result["output_ids"] == megatron["output_ids"]


def test_scripts_refuse_a_missing_model():
    for script in ("generate_34b_tp2_cp2.sh", "deepspeed/generate.sh"):
        proc = _bash(script, env={"MODEL": "/no/such/model"}, timeout=60)
        assert proc.returncode == 2 and "/no/such/model" in proc.stderr, (script, proc.stderr)
    proc = _bash("generate_cp4.sh", env={"GPUS_PER_NODE": "2", "MODEL": "x"}, timeout=60)
    assert proc.returncode == 2 and "must equal TP x CP" in proc.stderr


def test_deepspeed_config_example_is_valid():
    from megatron_apb.deepspeed import split_config

    section, rest = split_config(os.path.join(EXAMPLES, "deepspeed", "ds_config_apb.json"))
    assert section.cp_size == 2 and rest["tensor_parallel"] == {"tp_size": 2}


# ------------------------------------------------------------- Megatron-LM hooks (patches/)
@pytest.fixture
def hooks(monkeypatch):
    monkeypatch.syspath_prepend(HOOKS_DIR)
    for name in ("APB_MODE", "APB_ANCHOR_LEN", "APB_PASSING_LEN", "APB_COMPRESSOR", "APB_HEADS"):
        monkeypatch.delenv(name, raising=False)
    import apb_megatron_lm

    return apb_megatron_lm


def test_apb_args_and_environment(hooks, monkeypatch):
    import argparse

    parser = hooks.add_apb_args(argparse.ArgumentParser())
    args = parser.parse_args(["--apb-mode", "star", "--apb-anchor-len", "128"])
    assert hooks.apb_config_from_args(args, environ={}).mode == "star"
    assert hooks.apb_config_from_args(args, environ={}).anchor_len == 128
    # flags over environment over defaults
    cfg = hooks.apb_config_from_args(parser.parse_args(["--apb-anchor-len", "128"]),
                                     environ={"APB_MODE": "star", "APB_ANCHOR_LEN": "256"})
    assert (cfg.mode, cfg.anchor_len) == ("star", 128)
    env = {"APB_MODE": "apb", "APB_PASSING_LEN": "64", "APB_ANCHOR_LEN": "256"}
    cfg = hooks.apb_config_from_env(env)
    assert (cfg.mode, cfg.anchor_len, cfg.passing_len, cfg.compressor) == ("apb", 256, 64, "query_attention")
    with pytest.raises(Exception, match="APB_ANCHOR_LEN='x'"):
        hooks.apb_config_from_env({"APB_ANCHOR_LEN": "x"})
    with pytest.raises(Exception, match="mode must be one of"):
        hooks.apb_config_from_env({"APB_MODE": "ring"})
    args = parser.parse_args(["--apb-heads", "h.safetensors"])
    assert hooks.apb_config_from_args(args, environ={}).compressor == "retaining_head"


def test_spec_hook_is_what_megatron_lm_imports(hooks):
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    from megatron_apb.megatron import APBSelfAttention

    spec = import_module(("apb_megatron_lm", "gpt_layer_apb_spec"))  # what --spec does
    assert isinstance(spec, ModuleSpec)
    attention = spec.submodules.self_attention
    assert attention.module is APBSelfAttention
    assert attention.submodules.core_attention is hooks.MegatronLMAPBCoreAttention


def megatron_lm_hooks_worker(rank, world, n_new):
    """Build a GPTModel the way Megatron-LM's gpt_builder does with --spec (settings from
    APB_* env), prepare it as the patch does, and answer a prompt through the server engine;
    compare with our engine on a model built with the same settings directly."""
    os.environ.update(APB_MODE="apb", APB_ANCHOR_LEN="10", APB_PASSING_LEN="4", APB_QUERY_PREFIX_LEN="2")
    sys.path.insert(0, HOOKS_DIR)
    from tests.megatron_workers import VOCAB, _model, _prompt, _setup

    _setup()
    import torch
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import import_module

    from megatron_apb import APBConfig
    from megatron_apb.inference import APBEngine, SamplingConfig
    from megatron_apb.megatron import rank_grid_groups, tiny_transformer_config

    import apb_megatron_lm

    pg = rank_grid_groups(1, 2)
    spec = import_module(("apb_megatron_lm", "gpt_layer_apb_spec"))
    lm_model = GPTModel(tiny_transformer_config(context_parallel_size=2), spec, vocab_size=VOCAB,
                        max_sequence_length=1024, pg_collection=pg, parallel_output=False,
                        position_embedding_type="rope").eval()
    apb_megatron_lm.prepare_megatron_lm_model(lm_model)
    config = APBConfig(mode="apb", anchor_len=10, passing_len=4, query_prefix_len=2)
    ref = _model(config, 1, 2, pg)
    lm_model.load_state_dict(ref.state_dict(), strict=False)

    class Tokenizer:  # Megatron tokenizer interface used by the server: tokenize/detokenize
        eod = None

        def tokenize(self, text):
            return [int(t) for t in text.split()]

        def detokenize(self, ids):
            return " ".join(map(str, ids))

    doc, query = _prompt(40, 4, seed=8)
    server = apb_megatron_lm.APBServerEngine(lm_model, Tokenizer(), lm_model.decoder.layers[0]
                                             .self_attention.core_attention.apb_config,
                                             cp_group=pg.cp, tp_group=pg.tp, vocab_size=VOCAB, query_tokens=4)
    prompt = " ".join(map(str, torch.cat([doc, query]).tolist()))
    (req,) = server.generate(prompts=[prompt], sampling_params=SamplingParams(num_tokens_to_generate=n_new, top_k=1))
    want = APBEngine(ref, config, cp_group=pg.cp, tp_group=pg.tp, vocab_size=VOCAB).generate(
        doc, query, SamplingConfig(max_new_tokens=n_new)).output_ids
    core = lm_model.decoder.layers[0].self_attention.core_attention
    return dict(got=req.generated_tokens.tolist(), text=req.generated_text, want=want,
                mode=core.apb_config.mode, anchor=core.apb_config.anchor_len)


def test_megatron_lm_hooks_build_and_serve_cp2():
    from tests.distributed import run_distributed

    results = run_distributed(megatron_lm_hooks_worker, 2, 6, timeout=300)
    for r in results:
        assert (r["mode"], r["anchor"]) == ("apb", 10)
        assert r["got"] == r["want"] and len(r["got"]) == 6, r
        assert r["text"] == " ".join(map(str, r["want"]))


@needs_hf
def test_train_heads_cpu(tiny_env, tmp_path):
    from megatron_apb.heads import read_retaining_heads

    out = tmp_path / "heads"
    proc = _bash("train_heads.sh", "--cpu", env={**tiny_env, "OUTPUT": str(out)})
    _ok(proc)
    log = json.loads((out / "train_log.json").read_text())
    assert (log["tp"], log["cp"]) == (1, 2) and log["train_samples"] == 4 and log["held_out_samples"] == 2
    assert [r["step"] for r in log["train"]] == [1, 2, 3, 4] and [e["step"] for e in log["eval"]] == [0, 2, 4]
    overlap = log["held_out_overlap"]
    assert overlap["untrained"] == log["eval"][0]["overlap"] and overlap["trained"] == log["eval"][-1]["overlap"]
    assert all(0.0 <= overlap[k] <= 1.0 for k in ("trained", "untrained", "random"))
    heads = read_retaining_heads(str(out / "heads.safetensors"))  # reference layout, full tensors
    assert sorted(heads) == [0, 1] and heads[0][0].shape == (32, (8 + 2 * 2) * 8) and heads[0][1].shape == (2, 32)
    assert "TP=1 x CP=2" in proc.stdout and "held-out top-10% overlap" in proc.stdout
