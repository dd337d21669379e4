"""The Python API (``megatron_apb.LongContextLM``) and what ends generation.

* Two processes (CP 2, exact mode) load a random checkpoint written by
  ``tools/make_random_checkpoint.py`` and answer greedily: every rank returns the same ids
  and text (timings are each rank's own),
  equal to Hugging Face transformers' greedy ids on the same prompt (the reference); a stop
  string ends the answer (text cut before it), an EOS id ends it at that token, a list of
  prompts gives a list, and a request beyond the model's positions is refused naming both
  numbers.
* In process: EOS ids from generation_config.json and config.json (lists too),
  mixture-of-experts configs refused naming the field, the positions message, top-k.
"""

import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

from megatron_apb.checkpoints import ModelSpec, UnsupportedModelError, eos_token_ids  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tests.lm_workers import api_generate  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from make_random_checkpoint import SHAPES, write_checkpoint  # noqa: E402
from make_tiny_llama import make_tokenizer  # noqa: E402

NEW = 8


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    tokenizer = make_tokenizer(300)
    config = {**SHAPES["tiny-llama3"], "vocab_size": len(tokenizer), "max_position_embeddings": 4096,
              "eos_token_id": [10**6], "bos_token_id": tokenizer.bos_token_id}
    config["rope_scaling"] = {**config["rope_scaling"], "original_max_position_embeddings": 512}
    path = tmp_path_factory.mktemp("api") / "llama"
    write_checkpoint(str(path), config, seed=1, shard_gib=0.001, tokenizer=tokenizer, quiet=True)
    return str(path), tokenizer


def test_api_on_two_ranks_matches_transformers(random_llama):
    from transformers import AutoModelForCausalLM

    from megatron_apb.data import tokenize_prompt

    path, tokenizer = random_llama
    prompt = ("The grass is green. The sky is blue. " * 12, "What is the pass key?")
    results = run_distributed(api_generate, 2, path, prompt, NEW)
    timings = [r.pop("timings") for r in results]  # each rank's own clock
    assert results[0] == results[1]
    got = results[0]
    # the reference: transformers' greedy ids on the same ids (no EOS in this vocabulary)
    p = tokenize_prompt(tokenizer, *prompt)
    ids = torch.tensor([list(p.document_ids) + list(p.query_ids)])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = hf.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    assert got["ids"] == want.tolist()
    assert got["prompt_tokens"] == ids.shape[1] and all(t > 0 for t in timings[0])
    assert got["eos_ids"] == [10**6, tokenizer.eos_token_id]  # config/generation_config list, then tokenizer
    assert got["stop"] and len(got["stopped_ids"]) <= 4 and got["stop"] not in got["stopped_text"]
    assert got["stopped_ids"] == got["ids"][: len(got["stopped_ids"])]
    assert got["eos_ids_run"] == got["ids"][:3]
    assert got["batch"] == [got["ids"][:2]] * 2
    msg = got["too_long"]
    assert "UnsupportedModelError" in msg and "max_position_embeddings=4096" in msg and "(4096)" in msg, msg
    assert f"({ids.shape[1]} tokens)" in msg and "llama3 RoPE scaling" in msg, msg


def test_eos_ids_from_generation_config_lists(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 128001}))

    class Tok:
        eos_token_id = 7

    assert eos_token_ids(tmp_path, Tok()) == [128001, 128009, 7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id 'x'"):
        eos_token_ids(tmp_path)


@pytest.mark.parametrize("field", ["num_experts", "num_local_experts"])
def test_moe_config_refused_naming_the_field(field):
    config = {**SHAPES["tiny-qwen2"], field: 8}
    with pytest.raises(UnsupportedModelError, match=f"{field}=8: mixture-of-experts"):
        ModelSpec.from_hf_config(config)


def test_top_k_keeps_the_k_most_likely():
    from megatron_apb.inference.sampling import SamplingConfig, sample

    logits = torch.tensor([0.0, 5.0, 4.9, -1.0, 4.8])
    cfg = SamplingConfig(temperature=100.0, top_k=2, seed=0)
    g = torch.Generator().manual_seed(0)
    drawn = {sample(logits, cfg, g) for _ in range(200)}
    assert drawn == {1, 2}
