"""Retaining-head training: labels against a float64 reference, learning, TP / CP training,
checkpoint formats, resume, and input errors.

The model-dependent checks share one 2-process gloo run (``suite``; see
``tests/training_workers.py``): starting and importing a process costs more than the
work on a tiny model.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tokenizers = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None or importlib.util.find_spec("transformers") is None,
    reason="needs transformers and tokenizers",
)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from tests.training_workers import suite_worker

    return run_distributed(suite_worker, 2, str(tmp_path_factory.mktemp("train_heads")), timeout=400)


# --------------------------------------------------------------------------------- labels
def test_labels_and_inputs_match_float64_reference_at_cp1_cp2_tp2(suite):
    from tests.training_workers import LABEL_CASES

    for rank, result in enumerate(suite):
        labels = result["labels"]
        for case, (prompt_len, _) in LABEL_CASES.items():
            # the model runs in fp32 (2 layers, tiny widths): errors against float64 are
            # ~1e-6 of the logits' scale; 1e-5 of it leaves a margin yet fails on a RoPE
            # position off by one, a wrong head group or a missing 1/sqrt(d) (errors of the
            # order of the labels themselves)
            tol = 1e-5 * max(1.0, labels[f"{case}:scale"])
            assert labels[f"{case}:scale"] > 1.0, "labels this small would hide errors"
            for place in ("cp1", "cp2", "tp2"):
                got = labels[f"{case}:{place}"]
                assert got["labels"] < tol and got["inputs"] < tol, (case, place, rank, got)
                assert got["kv_heads"] == (2 if place == "tp2" else 4)
                if place != "cp2":
                    assert (got["start"], got["tokens"]) == (0, prompt_len)
    # CP 2 splits the prompt between the ranks: rank 0 holds the first block only
    assert (suite[0]["labels"]["tail_answer:cp2"]["start"], suite[0]["labels"]["tail_answer:cp2"]["tokens"]) == (0, 22)
    assert (suite[1]["labels"]["tail_answer:cp2"]["start"], suite[1]["labels"]["tail_answer:cp2"]["tokens"]) == (22, 15)
    # an answer spanning both blocks: rank 1 holds no prompt token, rank 0 all of them
    assert suite[1]["labels"]["split_answer:cp2"]["tokens"] == 0
    assert suite[0]["labels"]["split_answer:cp2"]["tokens"] == 10


# ---------------------------------------------------------------------- TP / CP training
def test_tp2_and_cp2_training_follow_the_one_rank_run(suite):
    for result in suite:
        par = result["parallel"]
        one = par["cp1:losses"]
        assert len(one) == 3 and len(set(one)) == 3
        for place in ("cp2", "tp2"):
            # same math in another summation order: fp32 rounding only
            assert par[place + ":losses"] == pytest.approx(one, rel=1e-5), place
            assert par[place + ":overlaps"] == par["cp1:overlaps"], place
        # a lost gradient sum (over CP) or all-reduce (over TP) moves weights by ~lr = 1e-2
        # in one step; fp32 rounding amplified by Adam stays far below 1e-3
        assert par["cp2_vs_cp1_heads"] < 1e-3 and par["tp2_vs_cp1_heads"] < 1e-3
        assert par["cp2_heads_replicated"]


def test_heads_saved_at_tp2_load_bitwise_at_tp1_and_tp2(suite):
    for result in suite:
        par = result["parallel"]
        assert par["load_at_cp1_bitwise"] and par["load_at_tp2_bitwise"] and par["tp2_shards_bitwise"]


def test_tp2_checkpoint_resumes_at_tp1(suite):
    for result in suite:
        par = result["parallel"]
        assert par["resumed_from_step"] == 3
        # steps 1-3 come from the TP 2 history, 4-5 are trained at TP 1 from the
        # re-sharded optimizer moments: the 5-step TP 1 run up to fp32 rounding
        assert par["resumed_losses"] == pytest.approx(par["straight_losses"], rel=1e-5)


# -------------------------------------------------------------------- one-rank training
def test_training_lowers_held_out_loss_and_raises_top10_overlap(suite):
    training = suite[0]["training"]
    evals = training["eval"]
    assert [e["step"] for e in evals] == [0, 20, 40]
    start, end = evals[0], evals[-1]
    assert end["loss"] < 0.9 * start["loss"], evals
    # untrained heads and random scores sit near chance (0.1); trained heads well above
    assert end["overlap"] > start["overlap"] + 0.1, evals
    assert end["overlap"] > training["random"]["overlap"] + 0.1
    losses = training["train_losses"]
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10])
    assert training["backbone_frozen"] and training["backbone_unchanged"] and training["heads_trainable"]


def test_resume_repeats_the_uninterrupted_run_exactly(suite):
    training = suite[0]["training"]
    assert training["resumed_at"] == 3
    assert training["resumed_losses"] == training["straight_losses"]  # bitwise, same process
    assert len(set(training["straight_losses"])) == 6
    assert training["resumed_heads_bitwise"]


def test_bad_heads_files_and_resume_errors(suite):
    training = suite[0]["training"]
    assert training["missing_layer"].startswith("ValueError") and "lacks layers [1]" in training["missing_layer"]
    assert "32 wide but 16" in training["hidden_mismatch"] and "--hidden 32" in training["hidden_mismatch"]
    assert "--hidden 32" in training["resume_hidden_mismatch"]
    assert training["resume_missing"].startswith("FileNotFoundError") and "trainer_state.json" in training["resume_missing"]


# ------------------------------------------------------------------ formats, no model
def test_reference_and_megatron_layouts_convert_and_unshard(tmp_path):
    from megatron_apb.compress import shard_retaining_head
    from megatron_apb.heads import (
        convert_retaining_heads,
        heads_to_megatron,
        megatron_to_heads,
        read_retaining_heads,
        save_retaining_heads,
        unshard_retaining_head,
    )

    g = torch.Generator().manual_seed(0)
    heads_n, kv, d, hidden = 8, 4, 4, 6
    full = {i: (torch.randn(hidden, (heads_n + 2 * kv) * d, generator=g), torch.randn(kv, hidden, generator=g)) for i in range(3)}
    ref = save_retaining_heads(str(tmp_path / "ref.safetensors"), full)
    from safetensors.torch import load_file

    assert sorted(load_file(ref))[:2] == ["model.layers.0.self_attn.fc1.weight", "model.layers.0.self_attn.fc2.weight"]
    meg = str(tmp_path / "meg.safetensors")
    assert convert_retaining_heads(ref, meg, to="megatron") == {"layers": 3, "hidden": hidden}
    assert "decoder.layers.2.self_attention.core_attention.retaining_head.fc2.weight" in load_file(meg)
    back = str(tmp_path / "back.safetensors")
    convert_retaining_heads(meg, back, to="reference")
    for path in (meg, back):
        again = read_retaining_heads(path)
        assert all(torch.equal(again[i][0], full[i][0]) and torch.equal(again[i][1], full[i][1]) for i in full)
    state = heads_to_megatron(full, num_layers=3, num_heads=heads_n, num_kv_heads=kv, head_dim=d)
    assert all(torch.equal(megatron_to_heads(state)[i][0], full[i][0]) for i in full)
    for tp in (1, 2, 4):
        shards = [shard_retaining_head(*full[0], num_heads=heads_n, num_kv_heads=kv, head_dim=d, tp_rank=r, tp_size=tp)
                  for r in range(tp)]
        fc1, fc2 = unshard_retaining_head([s[0] for s in shards], [s[1] for s in shards], num_heads=heads_n, num_kv_heads=kv, head_dim=d)
        assert torch.equal(fc1, full[0][0]) and torch.equal(fc2, full[0][1]), tp
    with pytest.raises(ValueError, match="layout must be one of"):
        save_retaining_heads(str(tmp_path / "x.safetensors"), full, layout="hf")


def test_train_config_errors_name_the_fix():
    from megatron_apb.training import TrainConfig

    assert TrainConfig().lr == 5e-4 and TrainConfig().betas == (0.9, 0.95) and TrainConfig().clip_norm == 0.5
    for kwargs, message in [
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(lr=-1.0), "lr must be a positive number"),
        (dict(schedule="linear"), "schedule must be 'cosine' or 'constant'"),
        (dict(label_norm="minmax"), "label_norm must be"),
        (dict(top_fraction=0.0), r"top_fraction must lie in \(0, 1\]"),
        (dict(clip_norm=-1), "0 disables clipping"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kwargs)
    with pytest.raises(TypeError):
        TrainConfig(3000)  # keyword-only
    cfg = TrainConfig(steps=10, warmup_steps=2, lr=1.0)
    assert [round(cfg.lr_at(s), 4) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 0.0]
    assert TrainConfig(steps=10, schedule="constant", lr=1.0).lr_at(9) == 1.0


# ---------------------------------------------------------------------------------- data
def test_jsonl_errors_name_the_line(tmp_path):
    from megatron_apb.training.data import read_jsonl

    def write(lines):
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(path)

    good = '{"prompt": "a long document", "answer": "42"}'
    assert [r.source.rsplit(":", 1)[1] for r in read_jsonl(write([good, "", good]))] == ["1", "3"]
    for lines, message in [
        ([good, '{"prompt": "p"}'], r"data.jsonl:2: missing key 'answer'"),
        ([good, good, '{"prompt": "p", "answer": "  "}'], r"data.jsonl:3: 'answer' must be a non-empty string"),
        (['{"prompt": 3, "answer": "x"}'], r"data.jsonl:1: 'prompt' must be a non-empty string"),
        (["{not json"], r"data.jsonl:1: not valid JSON"),
        (['["prompt", "answer"]'], r"data.jsonl:1: expected an object"),
        ([""], "no records"),
    ]:
        with pytest.raises(ValueError, match=message):
            read_jsonl(write(lines))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    spec = importlib.util.spec_from_file_location("make_tiny_llama", os.path.join(ROOT, "examples", "make_tiny_llama.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tokenizer(400)


@needs_tokenizers
def test_chat_split_and_middle_truncation(tiny_tokenizer):
    from megatron_apb.training.data import Record, split_chat, tokenize_record, tokenize_records

    tok = tiny_tokenizer
    assert split_chat(tok, "doc", "42") == ("<s>doc\n", "42</s>")  # no chat template
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    try:
        head, tail = split_chat(tok, "The grass is green.", "12345")
        assert head == "<s>user\nThe grass is green.</s>\n<s>assistant\n" and tail == "12345</s>"
        prompt = "The pass key is 12345. " + "The grass is green. " * 40 + "What is the pass key?"
        full = tokenize_record(tok, Record(prompt, "12345", "t:1"), max_length=10_000)
        cut = tokenize_record(tok, Record(prompt, "12345", "t:1"), max_length=60)
        assert not full.truncated and cut.truncated and len(cut) == 60
        assert cut.answer_ids == full.answer_ids
        half = (60 - len(cut.answer_ids)) // 2
        assert cut.prompt_ids[:half] == full.prompt_ids[:half]  # template and document start
        assert cut.prompt_ids[half:] == full.prompt_ids[-(len(cut.prompt_ids) - half):]  # question, header
        assert tokenize_record(tok, Record(prompt, "12345", "t:1"), max_length=60, overflow="skip") is None
        with pytest.raises(ValueError, match="no usable samples.*t:1"):
            tokenize_records(tok, [Record(prompt, "12345", "t:1")], max_length=60, overflow="skip")
    finally:
        tok.chat_template = None


@needs_tokenizers
def test_builtin_prompts_mix_tasks_and_differ_from_eval_prompts(tiny_tokenizer):
    from megatron_apb.training.data import TASK_MIX, builtin_records

    from megatron_apb.data import generate_samples

    records = builtin_records(tiny_tokenizer, num_samples=5, length=900, seed=0)
    assert [r.source for r in records] == [f"builtin:{t}#0" for t in TASK_MIX] + [f"builtin:{TASK_MIX[0]}#1"]
    eval_sample = generate_samples(tiny_tokenizer, TASK_MIX[0], 900, 1, seed=0)[0]
    assert records[0].prompt != eval_sample.prompt_text
    for r in records:
        assert r.answer.split()[-1].rstrip(".") in r.prompt or r.source.startswith("builtin:cwe")
    keys = builtin_records(tiny_tokenizer, num_samples=2, length=200, seed=0, kind="passkey")
    assert all(r.answer in r.prompt and r.answer.isdigit() for r in keys) and keys[0].answer != keys[1].answer


def test_cli_rejects_bad_input_with_exit_2_before_loading_a_model(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "answer": "a"}\n{"answer": "a"}\n', encoding="utf-8")
    out = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_apb.cli", "train-heads", "--data", str(bad), "--model", "/no/such/model",
         "--output", out], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode == 2 and "bad.jsonl:2: missing key 'prompt'" in proc.stderr, proc.stderr[-2000:]

    from megatron_apb.cli import main

    for extra, message in [
        (["--data", str(bad), "--builtin-data"], "--data FILE.jsonl or --builtin-data"),
        (["--builtin-data", "--steps", "0"], "steps must be an int >= 1"),
        (["--builtin-data", "--resume", str(tmp_path)], "no trainer_state.json"),
        (["--data", str(tmp_path / "none.jsonl")], "does not exist"),
    ]:
        assert main(["train-heads", "--output", out, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not os.path.exists(out)


def test_convert_heads_command(tmp_path, capsys):
    from megatron_apb.cli import main
    from megatron_apb.heads import read_retaining_heads, save_retaining_heads

    full = {i: (torch.randn(4, 12), torch.randn(2, 4)) for i in range(2)}
    src, meg, ref = (str(tmp_path / n) for n in ("src.safetensors", "meg.safetensors", "ref.safetensors"))
    save_retaining_heads(src, full)
    assert main(["convert-heads", src, "--output", meg, "--to", "megatron"]) == 0
    assert "2 layers, 4 wide, megatron names" in capsys.readouterr().out
    assert main(["convert-heads", meg, "--output", ref]) == 0
    back = read_retaining_heads(ref)
    assert all(torch.equal(back[i][0], full[i][0]) and torch.equal(back[i][1], full[i][1]) for i in full)
    assert main(["convert-heads", str(tmp_path / "none.safetensors"), "--output", ref]) == 2
    assert "does not exist" in capsys.readouterr().err
