"""Prompts: splitting ``document ‖ query`` into token ids, and a built-in long prompt.

The split follows APB: the *document* is everything before the question (chat-template
header included), the *query* is the question plus the template's tail (up to the start of
the assistant's answer).  ``header_len`` is the number of template tokens before the
document text: APB embeds the query in the anchor right after them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List

from ..errors import APBConfigError
from .material import NOISE

_SPLIT = "\u2063APB-SPLIT\u2063"


@dataclass
class TokenizedPrompt:
    document_ids: List[int]
    query_ids: List[int]
    header_len: int


def tokenize_prompt(tokenizer, document: str, question: str, *, answer_prefix: str = "") -> TokenizedPrompt:
    """Token ids of the document part and of the query part of a chat-formatted prompt.

    ``answer_prefix``: the start of the assistant's answer, appended to the query (after the
    template's generation prompt), so the model continues it.
    """
    if not document.strip():
        raise APBConfigError("the document is empty; give a non-empty --document-file")
    if not question.strip():
        raise APBConfigError("the question is empty")
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
    if answer_prefix:
        tail = tail + (answer_prefix if tail.endswith(("\n", " ")) else " " + answer_prefix)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return TokenizedPrompt(encode(head), encode(tail), len(encode(header)) if header else 0)


_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n\n"
)
PASSKEY_QUESTION = "What is the pass key? Answer with the number only."


def passkey_prompt(tokenizer, target_tokens: int = 6000, depth: float = 0.5, seed: int = 0):
    """The classic pass-key retrieval prompt of about ``target_tokens`` document tokens.

    A five-digit pass key (drawn from ``seed``) sits at ``depth`` (0 = start, 1 = end) of
    repeated filler sentences.  Returns ``(document, question, answer)``.
    """
    if target_tokens < 32:
        raise APBConfigError(f"target_tokens must be >= 32, got {target_tokens}")
    if not 0 <= depth <= 1:
        raise APBConfigError(f"depth must lie in [0, 1], got {depth}")
    key = str(random.Random(seed).randrange(10000, 100000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    per_noise = len(tokenizer(" " + NOISE, add_special_tokens=False)["input_ids"])
    budget = target_tokens - len(tokenizer(_INTRO + needle, add_special_tokens=False)["input_ids"])
    fillers = [NOISE] * max(1, budget // per_noise)
    fillers.insert(int(round(depth * len(fillers))), needle)
    return _INTRO + " ".join(fillers), PASSKEY_QUESTION, key
