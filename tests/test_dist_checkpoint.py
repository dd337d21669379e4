"""``megatron-apb convert --format torch_dist``: a Megatron-Core distributed checkpoint in
Megatron-LM's layout, converted once from a tiny random Hugging Face Llama (fp32, untied,
odd vocabulary, so that TP 2 pads it) through the command line, then (one 2-process gloo
run, tests/checkpoint_workers.py ``check_dist_checkpoint``) loaded at TP 1 x CP 2 and at
TP 2 x CP 1: logits equal to the streaming load of the original (fp32, same weights:
within 1e-6) and to Hugging Face transformers' (within ``TOL`` of test_checkpoint, 2e-5).

Also: the layout Megatron-LM's ``--load`` reads (``latest_checkpointed_iteration.txt`` =
``release``, ``release/metadata.json`` of the ``torch_dist`` backend, ``common.pt`` with
``checkpoint_version`` 3 and ``iteration``), an ``iter_0000007`` layout read back, and a
missing or truncated shard refused with an error naming the directory, and a conversion
that fails while saving leaving the earlier checkpoint untouched.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from megatron_apb.checkpoints import CheckpointError, open_checkpoint  # noqa: E402
from tests.checkpoint_workers import check_dist_checkpoint  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tests.test_checkpoint import TINY, TOL, _hf_model, _logits  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(HF directory, its dist checkpoint, the HF logits of ``tokens``, tokens)."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("dist")
    config = LlamaConfig(vocab_size=101, tie_word_embeddings=False, rope_theta=500000.0, **TINY)
    model = _hf_model(config, 7)
    hf = root / "hf"
    model.save_pretrained(hf)
    tokens = torch.randint(0, 101, (16,), generator=torch.Generator().manual_seed(0))
    out = root / "dist"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(
        [sys.executable, "-m", "megatron_apb.cli", "convert", "--model", str(hf), "--output", str(out),
         "--format", "torch_dist"], capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "saving the distributed checkpoint" in run.stdout, run.stdout
    return str(hf), str(out), _logits(model, tokens), tokens


def test_megatron_lm_layout(converted):
    _, out, _, _ = converted
    from megatron.core import dist_checkpointing

    with open(os.path.join(out, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "release"
    release = os.path.join(out, "release")
    assert dist_checkpointing.check_is_distributed_checkpoint(release)
    with open(os.path.join(release, "metadata.json")) as f:
        assert json.load(f)["sharded_backend"] == "torch_dist"
    common = dist_checkpointing.load_common_state_dict(release)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0, common
    assert not [n for n in os.listdir(os.path.dirname(out)) if ".tmp-" in n or ".old-" in n]
    assert not os.path.exists(os.path.join(out, ".scratch"))
    ckpt = open_checkpoint(out)
    assert ckpt.dist_dir == release and ckpt.spec.vocab_size == 101 and not ckpt.spec.tie_word_embeddings
    assert open_checkpoint(release).dist_dir == release  # the inner directory opens too


def test_loads_at_tp1_and_tp2_with_the_same_logits(converted, tmp_path):
    hf, out, want, tokens = converted
    # the same checkpoint as Megatron-LM's training saves lay it out: iter_0000007/, tracker "7"
    iter_dir = tmp_path / "iter_layout"
    shutil.copytree(out, iter_dir)
    os.rename(iter_dir / "release", iter_dir / "iter_0000007")
    (iter_dir / "latest_checkpointed_iteration.txt").write_text("7\n")
    # a shard cut short
    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    shard = max((p for p in (truncated / "release").iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    results = run_distributed(check_dist_checkpoint, 2, out, str(iter_dir), hf, tokens.tolist(), str(truncated))
    for rank, r in enumerate(results):
        block = want[rank * 8 : (rank + 1) * 8]
        assert (torch.as_tensor(r["tp1"])[:, :101] - block).abs().max() <= TOL, rank
        assert r["tp1_vs_stream"] <= 1e-6, (rank, r["tp1_vs_stream"])
        assert (torch.as_tensor(r["tp2"]) - want).abs().max() <= TOL, rank
        assert r["tp2:pad"] == 0.0 and r["tp2_vs_stream"] <= 1e-6, (rank, r["tp2:pad"], r["tp2_vs_stream"])
        assert r["truncated"].startswith("CheckpointError") and str(truncated) in r["truncated"], r["truncated"]


def test_missing_pieces_named(converted, tmp_path):
    _, out, _, _ = converted
    broken = tmp_path / "no_shards"
    shutil.copytree(out, broken)
    for p in (broken / "release").iterdir():
        if p.suffix == ".distcp":
            p.unlink()
    with pytest.raises(CheckpointError, match=r"no_shards.*incomplete.*\.distcp"):
        open_checkpoint(broken)
    (broken / "latest_checkpointed_iteration.txt").write_text("12\n")
    with pytest.raises(CheckpointError, match=r"iter_0000012 is missing"):
        open_checkpoint(broken)
    os.remove(broken / "megatron_apb_checkpoint.json")
    with pytest.raises(CheckpointError, match="Megatron-LM checkpoint without megatron_apb_checkpoint.json"):
        open_checkpoint(broken)


def test_interrupted_convert_leaves_the_old_checkpoint(converted, tmp_path, monkeypatch):
    """A conversion that fails while dist_checkpointing writes leaves the earlier checkpoint
    as it was and nothing beside it (a killed one leaves a ``.tmp-`` sibling that the next
    run removes: tests/test_atomic.py)."""
    import megatron_apb.checkpoints.dist as dist_module

    hf, out, _, _ = converted
    target = tmp_path / "dist"
    shutil.copytree(out, target)
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*"))

    def killed(state, directory):
        with open(os.path.join(directory, "metadata.json"), "w") as f:
            f.write("{}")  # half written
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(dist_module.dist_checkpointing, "save", killed)
    with pytest.raises(RuntimeError, match="killed while saving"):
        dist_module.convert_to_dist(hf, target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == before
    assert sorted(os.listdir(tmp_path)) == ["dist", "dist" + dist_module.PARTIAL_SUFFIX]  # kept to resume
    assert open_checkpoint(target).dist_dir == str(target / "release")
    assert not torch.distributed.is_initialized()


def test_killed_convert_resumes_the_fill(converted, tmp_path, monkeypatch):
    """A conversion stopped after 3 parameters were filled (the fill record then fails, as a
    killed process would stop) keeps its scratch files; the rerun reads only the others
    and writes the same checkpoint as an uninterrupted conversion; the scratch files go."""
    import megatron_apb.checkpoints.dist as dist_module

    hf, out, _, _ = converted
    record = dist_module._record_fill

    def stop_after_three(scratch, key, filled):
        record(scratch, key, filled)
        if len(filled) == 3:
            raise KeyboardInterrupt("killed")

    target = tmp_path / "dist"
    monkeypatch.setattr(dist_module, "_record_fill", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        dist_module.convert_to_dist(hf, target)
    assert not target.exists() and (tmp_path / ("dist" + dist_module.PARTIAL_SUFFIX)).is_dir()
    monkeypatch.setattr(dist_module, "_record_fill", record)
    said = []
    dist_module.convert_to_dist(hf, target, report=said.append)
    assert any("3 tensors already filled" in m for m in said), said
    assert os.listdir(tmp_path) == ["dist"]
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*.distcp"))
    assert files and files == sorted(str(p.relative_to(out)) for p in pathlib.Path(out).rglob("*.distcp"))
    for name in files:
        assert (target / name).read_bytes() == (pathlib.Path(out) / name).read_bytes(), name
    assert not torch.distributed.is_initialized()
