"""The launch scripts in examples/ in their CPU form (the Megatron-LM hooks: test_megatron_lm.py).

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

import pytest

from megatron_apb.eval.records import read_generation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")


def _bash(script, *args, env=None, timeout=300):
    full_env = dict(os.environ)
    full_env.pop("CPU", None)
    full_env["PYTHONFAULTHANDLER"] = "1"  # a process killed by a signal prints every thread's stack
    full_env.update(env or {})
    return subprocess.run(
        ["bash", os.path.join(EXAMPLES, script), *args], capture_output=True, text=True,
        timeout=timeout, env=full_env, cwd=ROOT,
    )


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    return {"TINY_MODEL_DIR": str(tmp_path_factory.mktemp("examples") / "tiny_llama"), "MAX_NEW_TOKENS": "8"}


def _ok(proc):
    if proc.returncode != 0:  # the whole output, in the report's captured-output section
        print(f"exit status {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


@needs_hf
def test_generate_cp4_cpu(tiny_env, tmp_path):
    out = tmp_path / "cp4.json"
    proc = _bash("generate_cp4.sh", "--cpu", "--output-json", str(out), env=tiny_env)
    _ok(proc)
    result = read_generation(str(out))  # the CLI's record file (JSON Lines)
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
    return proc, read_generation(str(out))


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
    from megatron_apb.integrations.deepspeed import split_config

    section, rest = split_config(os.path.join(EXAMPLES, "deepspeed", "ds_config_apb.json"))
    assert section.cp_size == 2 and rest["tensor_parallel"] == {"tp_size": 2}


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
