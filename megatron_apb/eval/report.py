"""Tables from evaluation records: scores per task and method, averages with their spread,
and how often exact context parallelism reproduces the single-process answers."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

from ..config import PARTITIONS
from ..data import TASKS
from ..errors import APBConfigError
from .records import EVAL_FIELDS, read_records

#: methods that compute full attention (every other one approximates it: star, apb-*, sparse ones)
EXACT_METHODS = ("full", "exact", "ulysses")


def is_exact(method: str) -> bool:
    """Whether a method's name says it computes full attention: one of :data:`EXACT_METHODS`,
    with any partition suffix (``exact+balanced``) but no sparse one (``exact+minference``)."""
    base, *suffixes = method.split("+")
    return base in EXACT_METHODS and all(s in PARTITIONS for s in suffixes)


_METHOD_ORDER = ("full", "exact", "ulysses", "star", "apb-retaining_head", "apb-query_attention", "apb-random")


def load_records(paths: Sequence[str]) -> List[dict]:
    """Records of every evaluation file in ``paths``, in file order: JSON Lines as written by
    ``megatron-apb eval`` (:mod:`.records`), or the older one-document JSON
    (``{"meta": ..., "records": [...]}``).  Nothing is dropped here: see
    :func:`clean_records`."""
    out = read_records(paths, required=EVAL_FIELDS)
    if not out:
        raise APBConfigError(f"{', '.join(paths)}: no evaluation records")
    return out


def record_key(r) -> Tuple:
    """What a record answers: (task, length, index, method, ranks); a report counts each once."""
    return (r["task"], r["length"], r["index"], r["method"], 1 if r["method"] == "full" else r["ranks"])


def clean_records(records: Iterable[dict]) -> Tuple[List[dict], List[str]]:
    """``(records, notes)``: the records a report scores, and a line for each kind left out.

    Records of a task the suite does not know (not in :data:`megatron_apb.data.TASKS`) are
    left out (they would move the averages over tasks); of records with the same key
    (:func:`record_key`, e.g. a sample answered again after a resume) the last one is kept.
    """
    records = list(records)
    unknown = defaultdict(int)
    for r in records:
        if r["task"] not in TASKS:
            unknown[r["task"]] += 1
    notes = []
    if unknown:
        listed = ", ".join(f"{t!r} ({n})" for t, n in sorted(unknown.items()))
        notes.append(f"left out {sum(unknown.values())} record(s) of unknown task(s) {listed}; "
                     f"the tasks are {', '.join(TASKS)}")
    last = {}
    for i, r in enumerate(records):
        if r["task"] in TASKS:
            last[record_key(r)] = i
    kept_n = sum(1 for r in records if r["task"] in TASKS)
    if len(last) < kept_n:
        notes.append(f"{kept_n - len(last)} duplicate record(s) (same task, length, index, method and ranks): "
                     "the last of each is kept")
    return [records[i] for i in sorted(last.values())], notes


def _column(r) -> Tuple[int, str]:
    return (1 if r["method"] == "full" else r["ranks"], r["method"])


def _column_key(col):
    ranks, method = col
    order = _METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER)
    return (method != "full", ranks, order, method)


def _mean_se(values: List[float]) -> Tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def common_samples(records: Iterable[dict]) -> List[dict]:
    """The records of the samples that every column (method x ranks) of their length
    answered, so that the columns of a table compare the same prompts."""
    records = list(records)
    seen = defaultdict(lambda: defaultdict(set))  # length -> column -> {(task, index)}
    for r in records:
        seen[r["length"]][_column(r)].add((r["task"], r["index"]))
    keep = {length: set.intersection(*cols.values()) for length, cols in seen.items()}
    return [r for r in records if (r["task"], r["index"]) in keep[r["length"]]]


def summarize(records: Iterable[dict]) -> Dict:
    """``{length: {column: {"tasks": {task: (mean, se, n)}, "average": (mean, se)}}}``.

    The average is over tasks (each task weighs the same); its standard error combines the
    per-task standard errors.
    """
    scores = defaultdict(list)
    for r in records:
        scores[(r["length"], _column(r), r["task"])].append(r["score"])
    out: Dict = defaultdict(dict)
    for (length, col, task), vals in scores.items():
        out[length].setdefault(col, {"tasks": {}})["tasks"][task] = (*_mean_se(vals), len(vals))
    for length, cols in out.items():
        for col, d in cols.items():
            d["average"] = _over_tasks([(m, s) for m, s, _ in d["tasks"].values()])
    return out


def _over_tasks(stats: List[Tuple[float, float]]) -> Tuple[float, float]:
    """Mean over tasks (equal weights) of per-task (mean, s.e.), and its standard error
    (a task with one sample, s.e. NaN, adds none)."""
    mean = sum(m for m, _ in stats) / len(stats)
    se = math.sqrt(sum((s if s == s else 0.0) ** 2 for _, s in stats)) / len(stats)
    return mean, se


def exact_agreement(records: Iterable[dict]) -> Dict[Tuple[int, int, str], Tuple[int, int, int]]:
    """For each (length, ranks, exact method): (samples compared, identical output tokens,
    identical score) against the ``full`` run of the same sample."""
    records = list(records)
    full = {(r["length"], r["task"], r["index"]): r for r in records if r["method"] == "full"}
    out: Dict = defaultdict(lambda: [0, 0, 0])
    for r in records:
        if r["method"] != "full" and is_exact(r["method"]) and (r["length"], r["task"], r["index"]) in full:
            ref = full[(r["length"], r["task"], r["index"])]
            c = out[(r["length"], r["ranks"], r["method"])]
            c[0] += 1
            c[1] += r["output_ids"] == ref["output_ids"]
            c[2] += r["score"] == ref["score"]
    return {k: tuple(v) for k, v in out.items()}


def _task_average(per_task: Dict[str, List[float]]) -> Tuple[float, float, int]:
    """:func:`_over_tasks` of per-task values, and the number of samples."""
    mean, se = _over_tasks([_mean_se(v) for v in per_task.values()])
    return mean, se, sum(len(v) for v in per_task.values())


TASK_GROUPS = {"all tasks": None, "multi-key": ("niah_multikey_1", "niah_multikey_2", "niah_multikey_3"), "vt": ("vt",)}


def paired_differences(records: Iterable[dict], tasks: Sequence[str] = None) -> Dict:
    """Score differences on the same samples: ``{(length, ranks, method): {"full": (mean,
    se, n), "star": (mean, se, n)}}`` for every approximate method (any but
    :data:`EXACT_METHODS`: ``star``, ``apb-*``, the sparse ones),
    against the single-process ``full`` run and against ``star`` at the same rank count.

    Each task's mean difference over the samples both answered, averaged over tasks with
    equal weights; the standard error is that of the paired differences (much smaller than
    the spread of either column when both fail and succeed on the same prompts).  ``tasks``:
    only these tasks (e.g. the multi-key ones)."""
    by_key = {}
    for r in records:
        if tasks is None or r["task"] in tasks:
            by_key[(r["length"], 1 if r["method"] == "full" else r["ranks"], r["method"], r["task"], r["index"])] = r["score"]
    diffs = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for (length, ranks, method, task, index), score in by_key.items():
        if is_exact(method):
            continue
        for base, base_key in (("full", (length, 1, "full")), ("star", (length, ranks, "star"))):
            other = by_key.get(base_key + (task, index))
            if other is not None and base != method:
                diffs[(length, ranks, method)][base][task].append(score - other)
    return {key: {base: _task_average(per_task) for base, per_task in bases.items()}
            for key, bases in diffs.items()}


def _differences_table(records) -> List[str]:
    groups = {name: paired_differences(records, tasks) for name, tasks in TASK_GROUPS.items()}
    keys = sorted(groups["all tasks"], key=lambda k: (k[0], k[1], _column_key((k[1], k[2]))))
    if not keys:
        return []
    lines = ["Differences in points on the same samples (± s.e. of the paired difference):\n"]
    head = [f"vs {base} ({group})" for group in TASK_GROUPS for base in ("full", "star")]
    lines.append("| length | ranks | method | " + " | ".join(head) + " |")
    lines.append("| ---: | ---: | --- |" + " ---: |" * len(head))
    for key in keys:
        cells = []
        for group in TASK_GROUPS:
            for base in ("full", "star"):
                stat = groups[group].get(key, {}).get(base)
                cells.append("" if stat is None else f"{stat[0]:+.1f} ± {stat[1]:.1f}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def attention_density(records: Iterable[dict]) -> Dict[Tuple[int, int, str], Tuple[float, float, int]]:
    """For each (length, ranks, method) whose records carry the attention density of a
    sparse prefill: (mean ``attention_density``, mean ``sparse_density``, records)."""
    found = defaultdict(lambda: ([], []))
    for r in records:
        if r.get("attention_density") is not None:
            whole, sparse = found[(r["length"], 1 if r["method"] == "full" else r["ranks"], r["method"])]
            whole.append(r["attention_density"])
            if r.get("sparse_density") is not None:
                sparse.append(r["sparse_density"])
    return {key: (sum(w) / len(w), sum(s) / len(s) if s else float("nan"), len(w))
            for key, (w, s) in found.items()}


def _density_table(records) -> List[str]:
    density = attention_density(records)
    if not density:
        return []
    lines = ["Attention computed by the sparse prefills (share of the query-key pairs dense attention "
             "computes; mean over records):\n",
             "| length | ranks | method | all attention calls | the calls that ran sparse | records |",
             "| ---: | ---: | --- | ---: | ---: | ---: |"]
    for (length, ranks, method), (whole, sparse, n) in sorted(density.items()):
        lines.append(f"| {length} | {ranks} | {method} | {whole:.3f} | "
                     f"{'' if sparse != sparse else f'{sparse:.3f}'} | {n} |")
    lines.append("")
    return lines


def markdown_report(records: Sequence[dict], *, common_only: bool = True, notes: Sequence[str] = ()) -> str:
    """Markdown: one table per length (tasks x methods), the paired differences of the
    approximate methods against full attention and Star (:func:`paired_differences`), the
    attention density of sparse methods (:func:`attention_density`), then exact-vs-full
    agreement.

    ``common_only``: score only the samples every column of a length answered (runs cut
    short by a time limit then still compare like with like).  Records of unknown tasks and
    repeated keys are left out (:func:`clean_records`); ``notes`` (e.g. from an earlier
    :func:`clean_records`) and this one's head the report."""
    records, more = clean_records(records)
    notes = list(notes) + more
    all_records = records
    if common_only:
        records = common_samples(records)
    summary = summarize(records)
    lines = [f"> note: {n}" for n in notes] + ([""] if notes else [])
    for length in sorted(summary):
        cols = sorted(summary[length], key=_column_key)
        header = [f"{m}" if m == "full" else f"{m} ×{r}" for r, m in cols]
        tasks = [t for t in TASKS if any(t in summary[length][c]["tasks"] for c in cols)]
        counts = sorted({summary[length][c]["tasks"][t][2] for c in cols for t in tasks if t in summary[length][c]["tasks"]})
        scope = "answered by every column" if common_only else "per column"
        lines.append(f"### {length} tokens (samples per task, {scope}: {', '.join(map(str, counts))})\n")
        lines.append("| task | " + " | ".join(header) + " |")
        lines.append("| --- |" + " ---: |" * len(cols))
        for t in tasks:
            cells = []
            for c in cols:
                stat = summary[length][c]["tasks"].get(t)
                cells.append("" if stat is None else f"{stat[0]:.1f}")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        avg = [summary[length][c]["average"] for c in cols]
        lines.append("| **average** (± s.e.) | " + " | ".join(f"**{m:.1f}** ± {s:.1f}" for m, s in avg) + " |")
        lines.append("")
    lines += _differences_table(records)
    lines += _density_table(records)
    agree = exact_agreement(all_records)
    if agree:
        lines.append("Exact context parallelism against the single-process run (same samples):\n")
        lines.append("| length | ranks | method | samples | same tokens | same score |")
        lines.append("| ---: | ---: | --- | ---: | ---: | ---: |")
        for (length, ranks, method), (n, same_ids, same_score) in sorted(agree.items()):
            lines.append(f"| {length} | {ranks} | {method} | {n} | {same_ids} ({100 * same_ids / n:.1f}%) "
                         f"| {same_score} ({100 * same_score / n:.1f}%) |")
        lines.append("")
    return "\n".join(lines)
