"""Training data for retaining heads: prompt/answer records turned into token ids.

A record is a user prompt and the assistant's answer.  With the model's chat template the
prompt tokens are the template up to the start of the assistant turn (what a host would
prefill and score) and the answer tokens are the rest of the assistant turn (they give the
labels); without a template, ``bos + prompt + "\\n"`` and ``answer + eos``.

Sources: a JSONL file of ``{"prompt": ..., "answer": ...}`` lines (:func:`read_jsonl`), or
built-in offline prompts (:func:`builtin_records`): a mix of the RULER-style tasks of
:mod:`megatron_apb.data` (retrieval, multi-key retrieval, variable tracking,
aggregation) or the pass-key prompt.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence

from ..data import TASKS, generate_samples, passkey_prompt
from ..errors import APBConfigError

# retrieval, multi-key retrieval, variable tracking, aggregation
TASK_MIX = ("niah_single_2", "niah_multikey_1", "vt", "cwe")
# built-in training prompts come from seeds far from the eval suite's (small seeds), so a
# model is never trained on the prompts it is scored on
TRAIN_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class Record:
    """A prompt/answer pair and where it came from (``file:line`` or ``builtin:task#i``)."""

    prompt: str
    answer: str
    source: str


@dataclass(frozen=True)
class TokenizedSample:
    """Token ids of one record: ``prompt_ids`` are scored, ``answer_ids`` give labels."""

    prompt_ids: List[int]
    answer_ids: List[int]
    source: str
    truncated: bool = False

    def __len__(self):
        return len(self.prompt_ids) + len(self.answer_ids)


def read_jsonl(path: str) -> List[Record]:
    """Records of a JSONL file; blank lines are skipped.

    Raises ``ValueError`` naming the line for invalid JSON, a line that is not an object,
    a missing ``prompt`` or ``answer`` key, or a field that is not a non-empty string.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise APBConfigError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise APBConfigError(f"{where}: expected an object with 'prompt' and 'answer', got {type(obj).__name__}")
            for key in ("prompt", "answer"):
                if key not in obj:
                    raise APBConfigError(f"{where}: missing key {key!r} (each line needs 'prompt' and 'answer')")
                if not isinstance(obj[key], str) or not obj[key].strip():
                    raise APBConfigError(f"{where}: {key!r} must be a non-empty string, got {obj[key]!r:.40}")
            records.append(Record(obj["prompt"], obj["answer"], where))
    if not records:
        raise APBConfigError(f"{path}: no records (expected JSON lines with 'prompt' and 'answer')")
    return records


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_chat(tokenizer, prompt: str, answer: str):
    """``(prompt_text, answer_text)``: the chat-formatted conversation split at the start
    of the assistant's answer (trailing whitespace after the end-of-turn dropped)."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        if full.startswith(head) and answer in full[len(head) :]:
            return head, full[len(head) :].rstrip()
        return head, answer + (tokenizer.eos_token or "")
    return (tokenizer.bos_token or "") + prompt + "\n", answer + (tokenizer.eos_token or "")


def tokenize_record(tokenizer, record: Record, *, max_length: int, overflow: str = "truncate") -> Optional[TokenizedSample]:
    """Token ids of ``record``, at most ``max_length`` in all.

    Answers are cut to a quarter of ``max_length``.  A longer prompt loses its middle
    (``overflow="truncate"``: the head, with the template and the document's start, and
    the tail, with the question and the assistant header, are kept) or the record is
    dropped (``overflow="skip"``: returns None).
    """
    if overflow not in ("truncate", "skip"):
        raise APBConfigError(f"overflow must be 'truncate' or 'skip', got {overflow!r}")
    head, tail = split_chat(tokenizer, record.prompt, record.answer)
    prompt_ids, answer_ids = _encode(tokenizer, head), _encode(tokenizer, tail)
    if not answer_ids:
        raise APBConfigError(f"{record.source}: the answer has no tokens")
    answer_ids = answer_ids[: max(1, max_length // 4)]
    budget = max_length - len(answer_ids)
    truncated = len(prompt_ids) > budget
    if truncated:
        if overflow == "skip":
            return None
        keep_head = budget // 2
        prompt_ids = prompt_ids[:keep_head] + prompt_ids[len(prompt_ids) - (budget - keep_head) :]
    return TokenizedSample(prompt_ids, answer_ids, record.source, truncated)


def tokenize_records(tokenizer, records: Sequence[Record], *, max_length: int, overflow: str = "truncate", min_prompt_tokens: int = 8) -> List[TokenizedSample]:
    """:func:`tokenize_record` over ``records``, dropping prompts under ``min_prompt_tokens``.

    Raises ``ValueError`` when nothing is left (naming ``max_length`` / the sources).
    """
    if max_length < 16:
        raise APBConfigError(f"max_length must be >= 16 tokens, got {max_length}")
    out = []
    for record in records:
        sample = tokenize_record(tokenizer, record, max_length=max_length, overflow=overflow)
        if sample is not None and len(sample.prompt_ids) >= min_prompt_tokens:
            out.append(sample)
    if not out:
        first = records[0].source if records else "(no records)"
        raise APBConfigError(
            f"no usable samples among {len(records)} records (first: {first}): prompts need at "
            f">= {min_prompt_tokens} tokens and, with overflow='skip', must fit max_length={max_length}"
        )
    return out


def builtin_records(tokenizer, *, num_samples: int, length: int, seed: int, kind: str = "tasks", tasks: Optional[Sequence[str]] = None) -> List[Record]:
    """``num_samples`` offline prompts of about ``length`` tokens.

    ``kind="tasks"``: round-robin over ``tasks`` (default :data:`TASK_MIX`: one retrieval,
    one multi-key retrieval, one variable-tracking and one aggregation task of
    :mod:`megatron_apb.data`), each sample's answer the task's answer prefix and answers,
    drawn from ``TRAIN_SEED_OFFSET + seed`` (never the eval suite's prompts).
    ``kind="passkey"``: the pass-key prompt of :func:`megatron_apb.data.passkey_prompt` at
    a random depth.
    """
    if num_samples < 1:
        raise APBConfigError(f"the number of samples must be >= 1, got {num_samples}")
    if length < 32:
        raise APBConfigError(f"the built-in prompt length must be >= 32 tokens, got {length}")
    if kind == "passkey":
        rng = random.Random(seed)
        out = []
        for i in range(num_samples):
            document, question, key = passkey_prompt(
                tokenizer, length, depth=rng.random(), seed=TRAIN_SEED_OFFSET + seed * 100003 + i
            )
            out.append(Record(document + "\n\n" + question, key, f"builtin:passkey#{i}"))
        return out
    if kind != "tasks":
        raise APBConfigError(f"built-in data kind must be 'tasks' or 'passkey', got {kind!r}")
    names = list(tasks) if tasks else list(TASK_MIX)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise APBConfigError(f"unknown tasks {unknown}; available: {sorted(TASKS)}")
    counts = [num_samples // len(names) + (i < num_samples % len(names)) for i in range(len(names))]
    per_task = {
        t: generate_samples(tokenizer, t, length, c, TRAIN_SEED_OFFSET + seed) if c else []
        for t, c in zip(names, counts)
    }
    out = []
    for i in range(num_samples):
        task = names[i % len(names)]
        sample = per_task[task][i // len(names)]
        out.append(Record(sample.prompt_text, sample.answer_text, f"builtin:{task}#{i // len(names)}"))
    return out
