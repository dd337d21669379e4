"""Greedy generation across ranks equals Hugging Face ``generate`` on the same weights.

Tiny random Llama (GQA) and Qwen2 (q/k/v biases) checkpoints are made and saved here; the
engine loads them through the checkpoint converter and decodes 32 tokens in ``exact`` mode
on 4 CPU ranks (CP = 4, and TP2 x CP2).  Tokens must be identical.
"""

import pytest
import torch

pytest.importorskip("transformers")

from tests.distributed import run_distributed  # noqa: E402
from tests.engine_workers import generate_from_hf_checkpoint  # noqa: E402
from tests.test_checkpoint import _configs, _hf_model  # noqa: E402

N_NEW = 32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfgen")
    cases = []
    for seed, name in enumerate(["llama_untied_v101", "qwen2_tied_v101"]):
        config = _configs()[name]
        model = _hf_model(config, 10 + seed)
        model.save_pretrained(root / name)
        g = torch.Generator().manual_seed(seed)
        doc = torch.randint(0, config.vocab_size, (41,), generator=g)
        query = torch.randint(0, config.vocab_size, (6,), generator=g)
        with torch.no_grad():
            out = model.generate(
                torch.cat([doc, query])[None], max_new_tokens=N_NEW, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )
        cases.append((name, str(root / name), doc.tolist(), query.tolist(), out[0, 47:].tolist()))
    return cases


@pytest.mark.parametrize("tp,cp", [(1, 4), (2, 2)])
def test_exact_generation_equals_hf_generate(checkpoints, tp, cp):
    for name, path, doc, query, want in checkpoints:
        assert len(want) == N_NEW
        for rank, tokens in enumerate(
            run_distributed(generate_from_hf_checkpoint, tp * cp, tp, cp, path, doc, query, N_NEW)
        ):
            assert list(tokens) == want, (name, rank)
