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

Material comes from offline packages only (:mod:`.material`); the makers are in
:mod:`.generators`.  Lengths are counted with the model's tokenizer: a sample's
chat-formatted prompt plus its generation budget fits in ``length`` tokens.  Everything is
drawn from ``random.Random(seed, task, length, index)``, so a sample is the same on every
machine and every rank.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from ..errors import APBConfigError
from .generators import Niah, Redraw, cwe, fwe, niah, vt


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
        raise APBConfigError("a sample needs at least one expected answer")
    text = prediction.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class TaskSpec:
    """A task: its family (for tables), what it tests, its generation budget and maker."""

    family: str
    description: str
    max_new_tokens: int
    make: Callable


def _niah_task(spec: Niah, description: str, family: str, max_new_tokens=48):
    return TaskSpec(family, description, max_new_tokens,
                    lambda tok, length, budget, rng: niah(spec, tok, length, budget, rng))


TASKS: Dict[str, TaskSpec] = {
    "niah_single_1": _niah_task(Niah("noise"), "one number in repeated noise sentences", "niah_single"),
    "niah_single_2": _niah_task(Niah("essay"), "one number in essays", "niah_single"),
    "niah_single_3": _niah_task(Niah("essay", values="uuid"), "one UUID in essays", "niah_single"),
    "niah_multikey_1": _niah_task(Niah("essay", num_needles=4), "one of four keyed numbers in essays", "niah_multikey"),
    "niah_multikey_2": _niah_task(Niah("needles"), "one number in a haystack of keyed numbers", "niah_multikey"),
    "niah_multikey_3": _niah_task(Niah("needles", keys="uuid", values="uuid"),
                                  "one UUID in a haystack of UUID-keyed UUIDs", "niah_multikey"),
    "niah_multivalue": _niah_task(Niah("essay", num_values=4), "all four numbers of one key in essays",
                                  "niah_multivalue", 64),
    "niah_multiquery": _niah_task(Niah("essay", num_needles=4, num_queries=4),
                                  "the numbers of four keys in essays", "niah_multiquery", 64),
    "vt": TaskSpec("vt", "every variable of a 4-hop assignment chain in noise", 32, vt),
    "cwe": TaskSpec("cwe", "the 10 most common words of a numbered word list", 96, cwe),
    "fwe": TaskSpec("fwe", "the 3 most frequent words of Zipf-distributed coded text", 32, fwe),
}


def _sample_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}/{task}/{length}/{index}".encode()))


def generate_samples(tokenizer, task: str, length: int, num_samples: int, seed: int = 0) -> List[TaskSample]:
    """``num_samples`` prompts of ``task`` that fit ``length`` tokens with the answer budget.

    ``tokenizer``: a Hugging Face tokenizer (its chat template, if any, is counted).
    """
    if task not in TASKS:
        raise APBConfigError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if num_samples < 1:
        raise APBConfigError(f"num_samples must be >= 1, got {num_samples}")
    spec = TASKS[task]
    budget = length - spec.max_new_tokens
    if budget < 64:
        raise APBConfigError(f"length {length} is too short for {task}; use at least {spec.max_new_tokens + 64}")
    samples = []
    for index in range(num_samples):
        for attempt in range(20):
            rng = _sample_rng(seed + 1000 * attempt, task, length, index)
            try:
                document, question, prefix, answers = spec.make(tokenizer, length, budget, rng)
                break
            except Redraw:
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
            raise APBConfigError(f"unknown task {part!r}; choose from all, {', '.join(TASKS)} or a family")
    if not names:
        raise APBConfigError("no task given")
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
                    raise APBConfigError(f"{path}:{lineno}: not a task sample ({exc})") from exc
    if not out:
        raise APBConfigError(f"{path}: no samples")
    return out
