"""Streaming, sharded loading (``megatron_apb.checkpoints.stream``).

* Acceptance: a 4-process TP2 x CP2 load of a sharded bf16 checkpoint through the command
  line's loader, with every byte read counted at ``safetensors.safe_open`` (whole-file
  readers disabled) and every float32 tensor made by any torch op recorded: each rank reads
  exactly its shard's bytes (computed here from the shapes), far less than the checkpoint,
  makes no float32 tensor larger than a norm vector, and holds exactly ``shard_for_tp`` of
  the full state (the slow reference).
* A missing or truncated shard is refused when the checkpoint is opened, before any
  tensor is read, naming the file and a tensor it holds.
"""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megatron_apb.checkpoints import CheckpointError, ModelSpec, open_checkpoint  # noqa: E402
from tests.checkpoint_workers import check_streaming_load  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tests.test_checkpoint import TINY, _hf_model  # noqa: E402


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


def test_each_rank_reads_only_its_shard_in_bf16(bf16_sharded):
    spec = open_checkpoint(bf16_sharded).spec
    results = run_distributed(check_streaming_load, 4, 2, str(bf16_sharded))
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
