"""The commands check their input before the expensive work, and keep every finished record.

Fast: the model, the process group and the engine are replaced by fakes (the commands run
in this process), so these tests check the order of the work and the files written, not
the answers.  The end-to-end runs are in test_cli.py and test_eval.py.
"""

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

import megatron_apb.inference as inference
from megatron_apb import cli
from megatron_apb.inference import lm as lm_module
from megatron_apb.config import APBConfig
from megatron_apb.data import TaskSample, write_samples
from megatron_apb.errors import APBConfigError
from megatron_apb.eval import commands, records, report
from megatron_apb.layout import shard_document

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeTokenizer:
    """One token per whitespace-separated word; no chat template."""

    bos_token = None
    chat_template = None
    eos_token_id = None
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


class FakeEngine:
    """Answers "42" to everything; ``fail_on``: the call (1-based) that raises instead."""

    calls = []
    fail_on = None

    def __init__(self, model, config, *, cp_group=None, tp_group=None, vocab_size=None, pad_id=0, progress=None):
        self.config = config
        self.cp_size = int(os.environ.get("WORLD_SIZE", "1"))

    def generate(self, document_ids, query_ids, sampling, local_decode=False, attention_stats=False):
        FakeEngine.calls.append(self.config.mode)
        if len(FakeEngine.calls) == FakeEngine.fail_on:
            raise RuntimeError("the machine went away")
        return SimpleNamespace(
            document_ids=list(document_ids), query_ids=list(query_ids), output_ids=["42"],
            prefill_s=0.1, time_to_first_token_s=0.2, decode_tokens_per_s=10.0,
            layout=dict(anchor_len=3, passing_len=1), attention={},
        )


def _runtime(tp=1, dtype=None, **kwargs):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return SimpleNamespace(rank=0, world=world, tp=tp, cp=world // tp, pg=SimpleNamespace(cp=None, tp=None),
                           device=torch.device("cpu"), dtype=torch.float32, is_main=True)


def _no_model(*args, **kwargs):
    raise AssertionError("the model (or the process group) was loaded before the input was checked")


@pytest.fixture
def fake_run(monkeypatch):
    """The commands run in this process on 2 fake ranks: fake runtime, model and engine."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    FakeEngine.calls, FakeEngine.fail_on = [], None
    model = lambda path, config, rt, heads=None: (None, SimpleNamespace(vocab_size=100), FakeTokenizer(), config)  # noqa: E731
    dist = SimpleNamespace(get_backend=lambda: "gloo", destroy_process_group=lambda: None)
    for module in (cli, commands, lm_module):
        monkeypatch.setattr(module, "init_runtime", _runtime, raising=False)
        monkeypatch.setattr(module, "load_model", model, raising=False)
        monkeypatch.setattr(module, "load_tokenizer", lambda path: FakeTokenizer(), raising=False)
        monkeypatch.setattr(module, "dist", dist, raising=False)
    monkeypatch.setattr(cli, "checkpoint_spec", lambda path: SimpleNamespace(check_positions=lambda *a: None))
    monkeypatch.setattr(lm_module, "eos_ids", lambda path, tokenizer: [])
    monkeypatch.setitem(vars(inference), "APBEngine", FakeEngine)  # without importing the real one
    return FakeEngine


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model or joining a process group fails the test: the checks come first."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for module in (cli, commands, lm_module):
        monkeypatch.setattr(module, "init_runtime", _no_model, raising=False)
        monkeypatch.setattr(module, "load_model", _no_model, raising=False)
        monkeypatch.setattr(module, "load_tokenizer", lambda path: FakeTokenizer(), raising=False)
    monkeypatch.setattr(cli, "checkpoint_spec", lambda path: SimpleNamespace(check_positions=lambda *a: None))


def _samples_file(tmp_path, n=2, words=200, answers=("42",), name="s.jsonl"):
    path = tmp_path / name
    write_samples(str(path), [
        TaskSample("niah_single_1", 256, i, "word " * words, "What is the number?", "The number is", answers, 8)
        for i in range(n)
    ])
    return str(path)


def _main(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# --------------------------------------------------------------------------------------
# record files: JSON Lines, appended as records finish; the old JSON documents still read
# --------------------------------------------------------------------------------------


def test_record_writer_appends_one_line_per_record_and_syncs(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = str(tmp_path / "r.jsonl")
    with records.RecordWriter(path, dict(command="eval", cp=2)) as w:
        w.write(dict(task="vt", index=0))
        lines = open(path).read().splitlines()  # on disk before the writer closes
        assert [json.loads(x) for x in lines] == [{"meta": {"command": "eval", "cp": 2}}, {"task": "vt", "index": 0}]
        w.write(dict(task="vt", index=1))
    assert len(synced) >= 2
    with records.RecordWriter(path, dict(command="eval", cp=4)) as w:  # a second run appends
        w.write(dict(task="cwe", index=0))
    f = records.read_record_file(path)
    assert [s.meta["cp"] for s in f.sessions] == [2, 4]
    assert [(r["task"], r["index"]) for r in f.records] == [("vt", 0), ("vt", 1), ("cwe", 0)]


def test_old_json_files_still_read_and_are_kept_when_appended_to(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps(dict(meta=dict(cp=2), records=[dict(task="vt", index=0)]), indent=1))
    assert [r["task"] for r in records.read_record_file(str(old)).records] == ["vt"]
    with records.RecordWriter(str(old), dict(cp=2)) as w:
        w.write(dict(task="cwe", index=0))
    assert [r["task"] for r in records.read_record_file(str(old)).records] == ["vt", "cwe"]
    # the committed results (one JSON document) still load for eval-report
    recs = report.load_records([os.path.join(ROOT, "results", "eval_smollm2", "records.json")])
    assert len(recs) == 3920
    # an old `generate --output-json` document reads as one session of runs
    gen = tmp_path / "gen.json"
    gen.write_text(json.dumps(dict(model="m", tp=1, cp=2, expected_answer="1", runs=[dict(mode="apb")]), indent=1))
    assert records.read_generation(str(gen))["runs"] == [dict(mode="apb")]


def test_a_line_cut_short_is_dropped_and_the_next_run_appends_after_it(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"meta": {"cp": 2}}\n{"task": "vt", "index": 0}\n{"task": "vt", "ind')
    f = records.read_record_file(str(path))
    assert [r["index"] for r in f.records] == [0] and f.truncated
    with records.RecordWriter(str(path), dict(cp=2)) as w:
        w.write(dict(task="vt", index=1))
    assert [r["index"] for r in records.read_record_file(str(path)).records] == [0, 1]
    path.write_text('{"task": "vt"}\nnot json\n{"task": "cwe"}\n')  # damage inside the file is an error
    with pytest.raises(APBConfigError, match=r"r.jsonl:2"):
        records.read_record_file(str(path))


# --------------------------------------------------------------------------------------
# eval: resuming into its own output keeps the records there
# --------------------------------------------------------------------------------------

EVAL = ["eval", "--modes", "exact,apb", "--compressors", "random"]


def _keys(path):
    return sorted((r["index"], r["method"]) for r in report.load_records([str(path)]))


def test_eval_resumes_into_its_own_output(tmp_path, fake_run, capsys):
    samples, out = _samples_file(tmp_path), tmp_path / "out.json"
    rc, _, err = _main([*EVAL, "--samples-file", samples, "--samples", "1", "--output", str(out)], capsys)
    assert rc == 0, err
    assert _keys(out) == [(0, "apb-random"), (0, "exact")]
    fake_run.calls.clear()
    rc, _, err = _main([*EVAL, "--samples-file", samples, "--skip-from", str(out), "--output", str(out)], capsys)
    assert rc == 0, err
    assert len(fake_run.calls) == 2  # only sample 1 ran
    assert _keys(out) == [(0, "apb-random"), (0, "exact"), (1, "apb-random"), (1, "exact")]
    # the output itself is resumed from, with or without --skip-from
    fake_run.calls.clear()
    rc, _, err = _main([*EVAL, "--samples-file", samples, "--output", str(out)], capsys)
    assert rc == 0 and fake_run.calls == [] and len(_keys(out)) == 4


def test_eval_interrupted_keeps_each_finished_record(tmp_path, fake_run, capsys):
    samples, out = _samples_file(tmp_path), tmp_path / "out.json"
    fake_run.fail_on = 2  # the second method of the first sample
    with pytest.raises(RuntimeError, match="went away"):
        cli.main([*EVAL, "--samples-file", samples, "--output", str(out)])
    assert _keys(out) == [(0, "exact")]


def test_eval_resumes_an_old_format_output(tmp_path, fake_run, capsys):
    samples, out = _samples_file(tmp_path), tmp_path / "out.json"
    old = dict(task="niah_single_1", length=256, index=0, method="exact", ranks=2, score=100.0, output_ids=[1])
    out.write_text(json.dumps(dict(meta=dict(cp=2), records=[old]), indent=1))
    rc, _, err = _main([*EVAL, "--samples-file", samples, "--samples", "1", "--skip-from", str(out),
                        "--output", str(out)], capsys)
    assert rc == 0, err
    assert fake_run.calls == ["apb"] and _keys(out) == [(0, "apb-random"), (0, "exact")]


# --------------------------------------------------------------------------------------
# generate --output-json: each run is written as it finishes; a second run appends
# --------------------------------------------------------------------------------------


def test_generate_writes_each_run_as_it_finishes(tmp_path, fake_run, capsys):
    doc, out = tmp_path / "doc.txt", tmp_path / "gen.json"
    doc.write_text("word " * 300)
    args = ["generate", "--document-file", str(doc), "--question", "Why?", "--compare", "exact",
            "--max-new-tokens", "4", "--output-json", str(out)]
    fake_run.fail_on = 2
    with pytest.raises(RuntimeError, match="went away"):
        cli.main(args)
    first = records.read_generation(str(out))
    assert [r["mode"] for r in first["runs"]] == ["apb"] and first["cp"] == 2
    fake_run.calls.clear()
    fake_run.fail_on = None
    rc, _, err = _main(args, capsys)
    assert rc == 0, err
    assert [r["mode"] for r in records.read_generation(str(out))["runs"]] == ["apb", "exact"]
    assert [r["mode"] for r in records.read_record_file(str(out)).records] == ["apb", "apb", "exact"]


# --------------------------------------------------------------------------------------
# every argument and path is checked before the model loads
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    "doc_is_dir", "doc_missing", "doc_binary", "doc_empty", "no_question", "max_new_tokens", "tp",
    "out_dir_missing", "out_is_dir", "out_not_records", "heads_missing", "top_p",
])
def test_generate_checks_before_loading(tmp_path, no_model, capsys, case):
    doc = tmp_path / "doc.txt"
    doc.write_text("word " * 300)
    args = ["--document-file", str(doc), "--question", "Why?"]
    expect = {
        "doc_is_dir": (["--document-file", str(tmp_path), "--question", "Why?"], [str(tmp_path), "directory"]),
        "doc_missing": (["--document-file", str(tmp_path / "nope.txt"), "--question", "Why?"], [str(tmp_path / "nope.txt")]),
        "doc_binary": (["--document-file", str(tmp_path / "bin.txt"), "--question", "Why?"], [str(tmp_path / "bin.txt"), "UTF-8"]),
        "doc_empty": (["--document-file", str(tmp_path / "empty.txt"), "--question", "Why?"], ["document is empty"]),
        "no_question": (["--document-file", str(doc)], ["--question"]),
        "max_new_tokens": ([*args, "--max-new-tokens", "0"], ["--max-new-tokens"]),
        "tp": ([*args, "--tp", "3"], ["--tp 3 must divide"]),
        "out_dir_missing": ([*args, "--output-json", str(tmp_path / "no" / "gen.json")], [str(tmp_path / "no"), "does not exist"]),
        "out_is_dir": ([*args, "--output-json", str(tmp_path)], [str(tmp_path), "directory"]),
        "out_not_records": ([*args, "--output-json", str(doc)], [str(doc), "record"]),
        "heads_missing": ([*args, "--heads", str(tmp_path / "h.safetensors")], [str(tmp_path / "h.safetensors")]),
        "top_p": ([*args, "--top-p", "0"], ["--top-p"]),
    }[case]
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
    (tmp_path / "empty.txt").write_text(" \n\n")
    rc, _, err = _main(["generate", *expect[0]], capsys)
    assert rc == 2, err
    for text in expect[1]:
        assert text in err, err


def test_generate_document_too_short_fails_before_loading(tmp_path, no_model, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    doc = tmp_path / "doc.txt"
    doc.write_text("word " * 40)
    question = "Which word is repeated in the text above, and how many times does it appear there?"
    rc, _, err = _main(["generate", "--document-file", str(doc), "--question", question], capsys)
    assert rc == 2 and re.search(r"at least \d+ tokens for 4 ranks", err), err


@pytest.mark.parametrize("case", [
    "out_dir_missing", "out_is_dir", "out_not_records", "samples_is_dir", "samples_missing", "skip_missing",
    "samples_zero", "shard", "modes", "compressors", "tp", "no_answers", "too_short", "heads_missing",
])
def test_eval_checks_before_loading(tmp_path, no_model, capsys, monkeypatch, case):
    samples = _samples_file(tmp_path)
    out = str(tmp_path / "out.json")
    base = ["eval", "--samples-file", samples, "--modes", "exact,apb", "--compressors", "random"]
    args, expect = {
        "out_dir_missing": ([*base, "--output", str(tmp_path / "no" / "o.json")], [str(tmp_path / "no"), "does not exist"]),
        "out_is_dir": ([*base, "--output", str(tmp_path)], [str(tmp_path), "directory"]),
        "out_not_records": ([*base, "--output", samples], [samples, "record"]),
        "samples_is_dir": (["eval", "--samples-file", str(tmp_path), "--output", out], [str(tmp_path), "directory"]),
        "samples_missing": (["eval", "--samples-file", str(tmp_path / "x.jsonl"), "--output", out], [str(tmp_path / "x.jsonl")]),
        "skip_missing": ([*base, "--skip-from", str(tmp_path / "old.json"), "--output", out], [str(tmp_path / "old.json")]),
        "samples_zero": ([*base, "--samples", "0", "--output", out], ["--samples"]),
        "shard": ([*base, "--shard", "2/2", "--output", out], ["--shard"]),
        "modes": (["eval", "--samples-file", samples, "--modes", "exact,ring", "--output", out], ["ring"]),
        "compressors": ([*base[:-1], "snapkv", "--output", out], ["snapkv"]),
        "tp": ([*base, "--tp", "3", "--output", out], ["--tp 3 must divide"]),
        "no_answers": (["eval", "--samples-file", _samples_file(tmp_path, answers=(), name="a.jsonl"),
                        "--output", out], ["answer"]),
        "too_short": (["eval", "--samples-file", _samples_file(tmp_path, words=20, name="b.jsonl"),
                       "--output", out], ["at least"]),
        "heads_missing": ([*base, "--heads", str(tmp_path / "h.st"), "--output", out], [str(tmp_path / "h.st")]),
    }[case]
    if case == "too_short":
        monkeypatch.setenv("WORLD_SIZE", "4")
    rc, _, err = _main(args, capsys)
    assert rc == 2, err
    for text in expect:
        assert text in err, err
    assert not os.path.exists(out)


def test_tasks_and_report_check_their_paths(tmp_path, no_model, capsys):
    rc, _, err = _main(["tasks", "--output", str(tmp_path / "no" / "s.jsonl")], capsys)
    assert rc == 2 and str(tmp_path / "no") in err, err
    rc, _, err = _main(["tasks", "--samples", "0", "--output", str(tmp_path / "s.jsonl")], capsys)
    assert rc == 2 and "--samples" in err, err
    rc, _, err = _main(["eval-report", str(tmp_path / "none.json")], capsys)
    assert rc == 2 and str(tmp_path / "none.json") in err, err
    rc, _, err = _main(["eval-report", str(tmp_path), "--output", str(tmp_path / "r.md")], capsys)
    assert rc == 2 and "directory" in err, err


# --------------------------------------------------------------------------------------
# eval-report: unknown tasks are excluded with a warning, duplicate keys count once
# --------------------------------------------------------------------------------------


def _rec(method, ranks, task, index, score):
    return dict(length=512, method=method, ranks=ranks, task=task, index=index, score=score, output_ids=[index])


def test_report_excludes_unknown_tasks_and_counts_each_key_once(tmp_path, capsys):
    recs = [_rec("full", 1, "vt", 0, 100.0), _rec("full", 1, "vt", 1, 100.0),
            _rec("exact", 2, "vt", 0, 0.0), _rec("exact", 2, "vt", 1, 100.0),
            _rec("exact", 2, "vt", 0, 100.0),  # the same key again: the last one wins
            _rec("exact", 2, "qa_bogus", 0, 0.0), _rec("full", 1, "qa_bogus", 0, 0.0)]
    kept, notes = report.clean_records(recs)
    assert len(kept) == 4 and {r["task"] for r in kept} == {"vt"}
    assert [r["score"] for r in kept if r["method"] == "exact" and r["index"] == 0] == [100.0]
    assert any("qa_bogus" in n for n in notes) and any("duplicate" in n for n in notes)
    path = tmp_path / "r.json"
    with records.RecordWriter(str(path), {}) as w:
        for r in recs:
            w.write(r)
    rc, out, err = _main(["eval-report", str(path)], capsys)
    assert rc == 0, err
    assert "| **average** (± s.e.) | **100.0** ± 0.0 | **100.0** ± 0.0 |" in out, out
    assert "warning" in err and "qa_bogus" in err and "duplicate" in err, err
    # markdown_report on its own also leaves them out of the averages, and says so
    text = report.markdown_report(recs)
    assert "**100.0** ± 0.0 | **100.0** ± 0.0" in text and "qa_bogus" in text


# --------------------------------------------------------------------------------------
# a document too short for the ranks: the advice, followed, works
# --------------------------------------------------------------------------------------


def _advised_lengths(message):
    return [int(n) for n in re.findall(r"at least (\d+) tokens", message)]


@pytest.mark.parametrize("config,num_tokens,cp,query_len", [
    (APBConfig(), 100, 4, 30),  # derived anchor: a block minus one cannot hold prefix + query
    (APBConfig(), 150, 4, 30),
    (APBConfig(query_prefix_len=24), 400, 8, 60),
    (APBConfig(anchor_len=100000), 200, 2, 10),  # the CLI test's --anchor-len
    (APBConfig(mode="star", anchor_len=300), 400, 4, 10),
    (APBConfig(), 3, 4, 0),  # fewer tokens than ranks
    (APBConfig(), 0, 2, 5),  # empty
])
def test_too_short_advice_followed_works(config, num_tokens, cp, query_len):
    with pytest.raises(APBConfigError) as info:
        config.layout_for(num_tokens, cp, query_len=query_len)
    message = str(info.value)
    assert f"for {cp} ranks" in message, message
    (need,) = _advised_lengths(message.split(" or ")[0])  # the first advice: a longer document
    layout = config.layout_for(need, cp, query_len=query_len)  # followed: it works
    assert layout.block_len * cp >= need
    if need > cp:  # and it is the shortest that does
        with pytest.raises(APBConfigError):
            config.layout_for(need - 1, cp, query_len=query_len)
    # the other advice works too
    for anchor, n in re.findall(r"anchor_len=(\d+) with a document of at least (\d+) tokens", message):
        config.replace(anchor_len=int(anchor)).layout_for(int(n), cp, query_len=query_len)
    for anchor in re.findall(r"or anchor_len=(\d+)\b(?! with)", message):
        config.replace(anchor_len=int(anchor)).layout_for(num_tokens, cp, query_len=query_len)
    for ranks in re.findall(r"; or (\d+) ranks?\b", message):
        if num_tokens:
            config.layout_for(num_tokens, int(ranks), query_len=query_len)
    if re.search(r"leave anchor_len unset(?! with)", message):
        config.replace(anchor_len=None).layout_for(num_tokens, cp, query_len=query_len)
    for n in re.findall(r"leave anchor_len unset with a document of at least (\d+) tokens", message):
        config.replace(anchor_len=None).layout_for(int(n), cp, query_len=query_len)


def test_derived_anchor_advice_does_not_loop():
    """The reported loop: 'raise anchor_len' -> 'anchor_len must be smaller than the block'
    -> 'leave anchor_len unset' -> the first error again."""
    with pytest.raises(APBConfigError) as info:
        APBConfig().layout_for(100, 4, query_len=30)
    message = str(info.value)
    assert "raise anchor_len" not in message
    assert "at least 185 tokens for 4 ranks" in message and "46" in message, message
    APBConfig().layout_for(185, 4, query_len=30)


def test_shard_document_gives_the_same_advice():
    with pytest.raises(APBConfigError, match="document is empty") as info:
        shard_document([], [1, 2, 3], APBConfig(), 4)
    (need,) = _advised_lengths(str(info.value).split(" or ")[0])
    with pytest.raises(APBConfigError) as info:
        shard_document(list(range(100)), list(range(30)), APBConfig(), 4)
    (need,) = _advised_lengths(str(info.value).split(" or ")[0])
    tokens, layout = shard_document(list(range(need)), list(range(30)), APBConfig(), 4)
    assert len(tokens) == 4 and layout.query_len == 30
