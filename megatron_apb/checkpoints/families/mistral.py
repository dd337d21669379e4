"""The ``mistral`` family (Mistral, Mistral-Nemo): Llama's tensor names; a
``sliding_window`` shorter than ``max_position_embeddings`` is refused."""

from __future__ import annotations

from .base import ModelFamily, register_family
from .llama import LLAMA_KEYS

MISTRAL = register_family(ModelFamily(name="mistral", keys=LLAMA_KEYS))
