"""Registries: algorithms, compressors (and model families, in test_model_families.py)
are found by name; a new one plugs in through the registry alone."""

from __future__ import annotations

import pytest
import torch

from megatron_apb import APBConfig
from megatron_apb.compress import Compressor, register_compressor
from megatron_apb.errors import APBConfigError
from megatron_apb.registry import ALGORITHMS, COMPRESSORS, Registry
from tests.distributed import run_distributed
from tests.engine_workers import dummy_compressor_generate


def test_builtin_names_and_traits():
    assert set(ALGORITHMS.names()) >= {"apb", "star", "exact", "ulysses"}
    assert set(COMPRESSORS.names()) >= {"retaining_head", "query_attention", "random"}
    apb, star, exact = (ALGORITHMS.get(n) for n in ("apb", "star", "exact"))
    assert (apb.uses_anchor, apb.passes_blocks, apb.exact) == (True, True, False)
    assert (star.uses_anchor, star.passes_blocks) == (True, False)
    assert (exact.uses_anchor, exact.exact) == (False, True)
    # the one place that says "APB with retaining heads"
    assert APBConfig(compressor="retaining_head").needs_retaining_heads
    assert not APBConfig(mode="star", compressor="retaining_head").needs_retaining_heads
    assert not APBConfig(compressor="query_attention").needs_retaining_heads


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(APBConfigError, match="mode must be one of 'apb', 'star'") as info:
        APBConfig(mode="ring")
    assert info.value.field == "mode"
    with pytest.raises(APBConfigError, match="compressor must be one of"):
        APBConfig(compressor="nope")


def test_registry_refuses_a_taken_name_and_empty_names():
    reg = Registry("thing")
    reg.register(Compressor("a", lambda x: x))
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Compressor("a", lambda x: None))
    with pytest.raises(ValueError, match="non-empty"):
        reg.register(object())


def test_a_registered_compressor_is_a_valid_config_value():
    register_compressor(Compressor("in_process_dummy", lambda x: torch.zeros(1)), replace=True)
    try:
        assert APBConfig(compressor="in_process_dummy").compressor_entry.name == "in_process_dummy"
    finally:
        COMPRESSORS.unregister("in_process_dummy")
    with pytest.raises(APBConfigError):
        APBConfig(compressor="in_process_dummy")


def test_dummy_compressor_end_to_end():
    """A compressor added through the registry alone drives APB generation on 2 ranks; as
    a copy of ``random``'s scores it gives exactly ``random``'s tokens."""
    results = run_distributed(dummy_compressor_generate, 2, 64, 4)
    for dummy, rand, calls in results:
        assert dummy == rand and len(dummy) == 4
    # rank 0 scores its block in every layer of the prefill; the last rank passes nothing
    assert results[0][2] > 0 and results[1][2] == 0
