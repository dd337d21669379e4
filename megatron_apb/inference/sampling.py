"""Next-token sampling: greedy, temperature and nucleus (top-p), seeded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch


@dataclass(kw_only=True)
class SamplingConfig:
    """How tokens are drawn.  ``temperature = 0`` is greedy (ties to the lowest id).

    Generation ends at ``max_new_tokens``, at a token of ``stop_ids`` (kept in the output),
    or once ``stop_when(tokens so far)`` is true (e.g. :class:`StopStrings`); every rank
    sees the same tokens, so a deterministic ``stop_when`` stops them all at once.
    ``top_k`` (0: off) keeps the k most likely tokens before ``top_p``.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_new_tokens: int = 64
    stop_ids: Sequence[int] = ()
    stop_when: Optional[Callable[[List[int]], bool]] = None

    def done(self, tokens: List[int]) -> bool:
        """Whether generation ends after ``tokens``."""
        return (len(tokens) >= self.max_new_tokens or tokens[-1] in self.stop_ids
                or (self.stop_when is not None and bool(self.stop_when(tokens))))

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def sample(logits: torch.Tensor, config: SamplingConfig, generator: Optional[torch.Generator] = None) -> int:
    """One token id from float logits [vocab]."""
    logits = logits.float()
    if config.temperature == 0:
        return int(torch.argmax(logits))
    if 0 < config.top_k < logits.numel():
        kth = torch.topk(logits, config.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < config.top_p  # always keeps the top
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class StopStrings:
    """``stop_when`` that ends generation once the decoded text of the generated tokens
    contains one of ``strings`` (the last ``window`` tokens are decoded at each step);
    :meth:`cut` trims a text at the first stop string."""

    def __init__(self, tokenizer, strings: Sequence[str], window: int = 32):
        self.tokenizer, self.strings = tokenizer, [s for s in strings if s]
        if len(self.strings) != len(list(strings)):
            raise ValueError("stop strings must not be empty")
        self.window = window

    def __call__(self, tokens: List[int]) -> bool:
        text = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=True)
        return any(s in text for s in self.strings)

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string (the whole text when there is none)."""
        ends = [text.find(s) for s in self.strings if s in text]
        return text[: min(ends)] if ends else text
