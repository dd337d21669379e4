"""Streaming, sharded loading (``megatron_apb.checkpoints.stream``) and the Python API,
in one 4-process spawn (TP2 x CP2):

* Acceptance: a 4-process TP2 x CP2 load of a sharded bf16 checkpoint through the command
  line's loader, with every byte read counted at ``safetensors.safe_open`` (whole-file
  readers disabled) and every float32 tensor made by any torch op recorded: each rank reads
  exactly its shard's bytes (computed here from the shapes), far less than the checkpoint,
  makes no float32 tensor larger than a norm vector, and holds exactly ``shard_for_tp`` of
  the full state (the slow reference).
* The API (``LongContextLM``, exact mode, fp32) on a random checkpoint written by
  ``tools/make_random_checkpoint.py``: every rank returns the same ids and text (timings
  are each rank's own), equal to Hugging Face transformers' greedy ids on the same prompt
  (the reference); a stop string ends the answer (text cut before it), an EOS id ends it
  at that token, a list of prompts gives a list, and a request beyond the model's
  positions is refused naming both numbers.
* A missing or truncated shard is refused when the checkpoint is opened, before any
  tensor is read, naming the file and a tensor it holds.
"""

import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megatron_apb.checkpoints import CheckpointError, ModelSpec, open_checkpoint  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tests.lm_workers import stream_then_generate  # noqa: E402
from tests.test_checkpoint import TINY, _hf_model  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from make_random_checkpoint import SHAPES, write_checkpoint  # noqa: E402
from make_tiny_llama import make_tokenizer  # noqa: E402

PROMPT = ("The grass is green. The sky is blue. " * 12, "What is the pass key?")


@pytest.fixture(scope="module")
def bf16_sharded(tmp_path_factory):
    """A Qwen2-shaped (q/k/v biases, untied, odd vocabulary) bf16 checkpoint in 5+ shards."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=101, tie_word_embeddings=False, **TINY)
    model = _hf_model(config, 3).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("stream") / "qwen2_bf16"
    model.save_pretrained(path, max_shard_size="30KB")
    assert os.path.exists(path / "model.safetensors.index.json")
    return path


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


@pytest.fixture(scope="module")
def four_ranks(bf16_sharded, random_llama):
    """The results of the one 4-process run (TP2 x CP2)."""
    return run_distributed(stream_then_generate, 4, 2, str(bf16_sharded), random_llama[0], PROMPT, NEW)


def _shard_bytes(spec: ModelSpec, r: int, t: int, itemsize: int = 2) -> int:
    """Bytes TP rank r of t must read: its rows/columns of every matrix, the norms whole,
    its real (unpadded) vocabulary rows."""
    h, d, f = spec.hidden_size, spec.kv_channels, spec.ffn_hidden_size
    qkv = (spec.num_attention_heads + 2 * spec.num_query_groups) * d
    per_rank = -(-spec.vocab_size // t)
    rows = max(0, min((r + 1) * per_rank, spec.vocab_size) - r * per_rank)
    n = rows * h * (1 if spec.tie_word_embeddings else 2) + h
    layer = 2 * h + qkv * h // t + h * spec.num_attention_heads * d // t + 3 * f * h // t
    if spec.qkv_bias:
        layer += qkv // t
    return (n + spec.num_layers * layer) * itemsize


def test_each_rank_reads_only_its_shard_in_bf16(bf16_sharded, four_ranks):
    spec = open_checkpoint(bf16_sharded).spec
    results = [r["stream"] for r in four_ranks]
    full_bytes = sum(2 * torch.Size(i.shape).numel() for i in open_checkpoint(bf16_sharded).reader.infos.values())
    for rank, got in enumerate(results):
        tp_rank = rank % 2
        assert got["names"], rank
        assert got["max_diff"] == 0.0, (rank, got["max_diff"])
        assert got["dtypes"] == ["torch.bfloat16"], (rank, got["dtypes"])
        assert got["bytes"] == _shard_bytes(spec, tp_rank, 2), (rank, got["bytes"], _shard_bytes(spec, tp_rank, 2))
        assert got["bytes"] < 0.6 * full_bytes, (rank, got["bytes"], full_bytes)
        # nothing float32 of a weight's size: only vectors (rotary frequencies, norm-sized)
        assert got["max_f32"] <= spec.hidden_size, (rank, got["max_f32"])
    # the two TP ranks together read the checkpoint once, the norms twice
    norms = (2 * spec.num_layers + 1) * spec.hidden_size * 2
    assert results[0]["bytes"] + results[1]["bytes"] == full_bytes + norms


def test_api_on_four_ranks_matches_transformers(four_ranks, random_llama):
    from transformers import AutoModelForCausalLM

    from megatron_apb.data import tokenize_prompt

    path, tokenizer = random_llama
    prompt = PROMPT
    results = [dict(r["api"]) for r in four_ranks]
    timings = [r.pop("timings") for r in results]  # each rank's own clock
    assert all(r == results[0] for r in results)
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


def test_missing_and_truncated_shards_named_before_reading(bf16_sharded, tmp_path):
    index = json.loads((bf16_sharded / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    victim = files[1]
    held = sorted(k for k, v in index.items() if v == victim)
    # missing: the file and a tensor it should hold are named
    missing = tmp_path / "missing"
    missing.mkdir()
    for name in os.listdir(bf16_sharded):
        if name != victim:
            (missing / name).write_bytes((bf16_sharded / name).read_bytes())
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(missing)
    assert victim in str(err.value) and held[0] in str(err.value) and "missing" in str(err.value)
    # truncated: the file and the first tensor cut off are named
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in os.listdir(bf16_sharded):
        data = (bf16_sharded / name).read_bytes()
        (cut / name).write_bytes(data[: len(data) - 100] if name == victim else data)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(cut)
    msg = str(err.value)
    assert victim in msg and "truncated" in msg and any(k in msg for k in held), msg
