"""The makers of the RULER-style task families, and how a prompt is fitted to a budget.

Each maker is ``make(tokenizer, length, budget, rng) -> (document, question, answer_prefix,
answers)``: it draws everything from ``rng`` and grows its filler until the chat-formatted
prompt holds at most ``budget`` tokens (:func:`fit`).  The task table that names them is in
:mod:`megatron_apb.data.tasks`.
"""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from ..errors import APBConfigError
from .material import NOISE, essay_sentences, word_list
from .prompts import tokenize_prompt


class Redraw(Exception):
    """The draw was ambiguous (e.g. a tie for the last answer place): draw again."""


# --------------------------------------------------------------------------- fitting
def _count_tokens(tokenizer, document: str, question: str, answer_prefix: str) -> int:
    p = tokenize_prompt(tokenizer, document, question, answer_prefix=answer_prefix)
    return len(p.document_ids) + len(p.query_ids)


def fit(tokenizer, budget: int, build: Callable[[int], Tuple[str, str, str]], upper: int) -> Tuple[int, Tuple[str, str, str]]:
    """The largest ``n`` <= upper whose ``build(n)`` prompt has at most ``budget`` tokens.

    Token counts grow with ``n``; a linear estimate from two small sizes brackets the answer,
    so only prompts near the budget are tokenized.
    """
    count = lambda n: _count_tokens(tokenizer, *build(n))  # noqa: E731
    base = count(1)
    if base > budget:
        raise APBConfigError(
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
class Niah:
    """A needle-in-a-haystack variant."""

    haystack: str  # noise | essay | needles
    keys: str = "word"  # word | uuid
    values: str = "number"  # number | uuid
    num_needles: int = 1  # facts with different keys in the text
    num_values: int = 1  # values for the queried key
    num_queries: int = 1  # keys asked about


def _needle(key, value, kind):
    return f"The special {kind} for {key} is {value}."


def niah(spec: Niah, tokenizer, length, budget, rng: random.Random):
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
        filler = lambda n: [NOISE] * n  # noqa: E731
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

    _, (document, question, prefix) = fit(tokenizer, budget, build, upper)
    return document, question, prefix, answers


# --------------------------------------------------------------------------- vt
def vt(tokenizer, length, budget, rng: random.Random, hops: int = 4):
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
        units = _insert_at_depths([NOISE] * n, chain, rng)  # the chain keeps its order
        intro = "Memorize the variable assignments hidden in the text below.\n\n"
        return intro + " ".join(units), question, prefix

    _, (document, question, prefix) = fit(tokenizer, budget, build, length)
    return document, question, prefix, tuple(names)


# --------------------------------------------------------------------------- cwe / fwe
def cwe(tokenizer, length, budget, rng: random.Random, num_common=10, freq_rare=3):
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

    _, (document, question, prefix) = fit(tokenizer, budget, build, min(len(rare_pool), length))
    return document, question, prefix, tuple(common)


def fwe(tokenizer, length, budget, rng: random.Random, alpha=2.0, top=3):
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

    n, (document, question, prefix) = fit(tokenizer, budget, build, length)
    counts: Dict[str, int] = {}
    for w in draws(n):
        counts[w] = counts.get(w, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if len(ranked) <= top or ranked[top - 1][1] == ranked[top][1]:
        raise Redraw()
    return document, question, prefix, tuple(w for w, _ in ranked[:top])
