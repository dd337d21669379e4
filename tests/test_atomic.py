"""Crash-safe checkpoints and clear errors for damaged ones.

* A save killed at any moment leaves the old complete checkpoint or the new complete one,
  never a mix, and the next start cleans up (and reports) what the killed save left.  The
  kill tests run a child process that saves in a loop; the child wraps the writer
  (``safetensors.torch.save_file``, ``os.rename``) so that the N-th save stops at a chosen
  point and waits there, is SIGKILLed there, and this process then loads what is on disk.
* Truncated or garbage safetensors / GGUF files, missing shards, broken JSON and
  non-finite retaining heads raise :class:`CheckpointError` naming the file (and tensor).
"""

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------ the killed child
#: run first in every child: the writers stall inside save number KILL_STEP, at WHERE:
#: "write:<file prefix>" (that file half written, as a kill inside the write leaves it),
#: "swap" (the old checkpoint renamed aside, the new one not yet in place) or "swapped"
#: (the new one in place, the old one not yet deleted)
CHILD_PRELUDE = r'''
import os, sys, time
import safetensors.torch as st

OUT, KILL_STEP, WHERE = sys.argv[1], int(sys.argv[2]), sys.argv[3]
current = {"step": 0}

def stall(what):
    print("STALLED", current["step"], what, flush=True)
    time.sleep(600)

_save_file = st.save_file
def save_file(tensors, filename, metadata=None):
    _save_file(tensors, filename, metadata=metadata)
    if current["step"] == KILL_STEP and WHERE.startswith("write:") and os.path.basename(filename).startswith(WHERE[6:]):
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        stall(filename)
st.save_file = save_file  # before the package binds the name

_rename = os.rename
def rename(src, dst, **kwargs):
    _rename(src, dst, **kwargs)
    if current["step"] == KILL_STEP:
        if WHERE == "swap" and ".old-" in os.fspath(dst):
            stall(dst)
        if WHERE == "swapped" and ".tmp-" in os.fspath(src):
            stall(dst)
os.rename = rename
'''

TRAINER_CHILD = CHILD_PRELUDE + r'''
import torch
from megatron_apb.compress import RetainingHead
from megatron_apb.training.checkpoint import save_training_state

heads = torch.nn.ModuleList([RetainingHead(4, 2, 4, hidden=8, dtype=torch.float32) for _ in range(2)])
params = [p for h in heads for p in (h.fc1.weight, h.fc2.weight)]
optimizer = torch.optim.AdamW(params)
for step in range(1, 100):
    current["step"] = step
    with torch.no_grad():
        for p in params:
            p.fill_(float(step))
            optimizer.state[p] = {"step": torch.tensor(float(step)), "exp_avg": torch.full_like(p, step),
                                  "exp_avg_sq": torch.full_like(p, 2 * step)}
    history = {"train": [{"step": s} for s in range(1, step + 1)], "eval": []}
    save_training_state(OUT, heads, optimizer, step=step, config={"seed": 0}, history=history, write=True)
    print("SAVED", step, flush=True)
'''

CONVERTED_CHILD = CHILD_PRELUDE + r'''
import torch
from megatron_apb.checkpoints import ModelSpec, save_converted

for step in range(1, 100):
    current["step"] = step
    # the step is in the weights and in the spec (marker file): a mix would show
    spec = ModelSpec(model_type="llama", num_layers=1, hidden_size=16, num_attention_heads=2, num_query_groups=1,
                     ffn_hidden_size=32, kv_channels=8, vocab_size=32, norm_eps=1e-5, rope_theta=1000.0 * step,
                     max_position_embeddings=64)
    save_converted(OUT, spec, {k: torch.full(s, float(step)) for k, s in spec.full_shapes().items()})
    print("SAVED", step, flush=True)
'''

HEADS_CHILD = CHILD_PRELUDE + r'''
import torch
from megatron_apb.heads import save_retaining_heads

for step in range(1, 100):
    current["step"] = step
    save_retaining_heads(OUT, {i: (torch.full((8, 32), float(step)), torch.full((2, 8), float(step))) for i in range(2)})
    print("SAVED", step, flush=True)
'''


def kill_inside_save(script, out, kill_step, where, timeout=240):
    """Run ``script`` until it stalls inside save ``kill_step`` at ``where``; SIGKILL it there."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-c", script, str(out), str(kill_step), where], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen = []
    try:
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"the child did not stall at {where} of save {kill_step} in {timeout} s:\n" + "".join(seen[-30:]))
            if line is None:
                pytest.fail(f"the child ended without stalling at {where}:\n" + "".join(seen[-30:]))
            seen.append(line)
            if line.startswith("STALLED"):
                assert line.split()[1] == str(kill_step)
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()  # reaped: its process id is free, as after a real kill
    assert f"SAVED {kill_step - 1}\n" in seen
    return seen


def _reports(fn):
    """(fn's result, the warnings it raised as text)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


def _leftovers(parent, keep):
    return sorted(e for e in os.listdir(parent) if e != keep)


def _tiny_heads():
    from megatron_apb.compress import RetainingHead

    heads = torch.nn.ModuleList([RetainingHead(4, 2, 4, hidden=8, dtype=torch.float32) for _ in range(2)])
    params = [p for h in heads for p in (h.fc1.weight, h.fc2.weight)]
    return heads, params, torch.optim.AdamW(params)


def _load_trainer(out):
    from megatron_apb.training.checkpoint import load_training_state

    heads, params, optimizer = _tiny_heads()
    meta = load_training_state(str(out), heads, optimizer)
    return meta, params, optimizer


# ------------------------------------------------------------------------ kill tests
@pytest.mark.parametrize("where, loaded", [("write:optimizer", 2), ("swap", 3), ("swapped", 3)])
def test_trainer_state_killed_inside_a_save_loads_one_whole_step(tmp_path, where, loaded):
    out = tmp_path / "run"
    kill_inside_save(TRAINER_CHILD, out, 3, where)
    left = _leftovers(tmp_path, "run")
    assert left, "a killed save leaves its temporary directory"
    (meta, params, optimizer), reports = _reports(lambda: _load_trainer(out))
    # one whole step: heads, optimizer moments and trainer state agree
    assert meta["step"] == loaded and len(meta["history"]["train"]) == loaded
    for p in params:
        assert torch.equal(p, torch.full_like(p, loaded))
        assert torch.equal(optimizer.state[p]["exp_avg"], torch.full_like(p, loaded))
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], torch.full_like(p, 2 * loaded))
    # the leftovers are gone, and each was reported by name
    assert _leftovers(tmp_path, "run") == []
    for name in left:
        assert any(name in r for r in reports), (name, reports)
    # and the next save and load work
    from megatron_apb.training.checkpoint import save_training_state

    heads, params, optimizer = _tiny_heads()
    with torch.no_grad():  # RetainingHead skips init (its weights come from a file): give them values
        for p in params:
            p.fill_(7.0)
    save_training_state(str(out), heads, optimizer, step=7, config={}, history={"train": [], "eval": []}, write=True)
    assert _load_trainer(out)[0]["step"] == 7 and _leftovers(tmp_path, "run") == []


def test_converted_checkpoint_killed_while_writing_weights_keeps_the_old_one(tmp_path):
    from megatron_apb.checkpoints import load_hf_checkpoint

    out = tmp_path / "converted"
    kill_inside_save(CONVERTED_CHILD, out, 3, "write:model")
    left = _leftovers(tmp_path, "converted")
    assert left
    (spec, state, _), reports = _reports(lambda: load_hf_checkpoint(out))
    assert spec.rope_theta == 2000.0  # the spec of step 2 ...
    assert all(torch.equal(t, torch.full_like(t, 2.0)) for t in state.values())  # ... and its weights
    assert _leftovers(tmp_path, "converted") == [] and all(any(n in r for r in reports) for n in left), reports


def test_heads_file_killed_while_writing_keeps_the_old_one(tmp_path):
    from megatron_apb.heads import read_retaining_heads

    out = tmp_path / "heads.safetensors"
    kill_inside_save(HEADS_CHILD, out, 4, "write:heads")
    left = _leftovers(tmp_path, "heads.safetensors")
    assert left
    heads, reports = _reports(lambda: read_retaining_heads(str(out)))
    assert all(torch.equal(t, torch.full_like(t, 3.0)) for pair in heads.values() for t in pair)
    assert _leftovers(tmp_path, "heads.safetensors") == [] and all(any(n in r for r in reports) for n in left), reports


# ---------------------------------------------------------------- the atomic machinery
def test_atomic_directory_replaces_whole_keeps_other_files_and_survives_errors(tmp_path):
    from megatron_apb.atomic import atomic_directory

    target = tmp_path / "ckpt"
    with atomic_directory(target) as staging:
        assert os.path.dirname(staging) == str(tmp_path) and not target.exists()
        (open(os.path.join(staging, "a.bin"), "w")).write("1")
        os.mkdir(os.path.join(staging, "sub"))
        (open(os.path.join(staging, "sub", "b"), "w")).write("1")
    assert sorted(os.listdir(target)) == ["a.bin", "sub"] and os.listdir(tmp_path) == ["ckpt"]
    (target / "train_log.json").write_text("{}")
    # a saver that fails leaves the old directory as it was, and no temporary
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(target) as staging:
            (open(os.path.join(staging, "a.bin"), "w")).write("2")
            raise RuntimeError("disk full")
    assert (target / "a.bin").read_text() == "1" and os.listdir(tmp_path) == ["ckpt"]
    # replace: what the saver wrote; others' files carried over only when asked
    with atomic_directory(target, keep_others=True) as staging:
        (open(os.path.join(staging, "a.bin"), "w")).write("3")
    assert sorted(os.listdir(target)) == ["a.bin", "sub", "train_log.json"] and (target / "a.bin").read_text() == "3"
    with atomic_directory(target) as staging:
        (open(os.path.join(staging, "c.bin"), "w")).write("4")
    assert os.listdir(target) == ["c.bin"] and os.listdir(tmp_path) == ["ckpt"]


def test_leftovers_of_running_or_foreign_saves_are_reported_not_touched(tmp_path):
    from megatron_apb.atomic import recover, temporary_path

    target = tmp_path / "ckpt"
    target.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = temporary_path(target, "tmp", pid=sleeper.pid)
        foreign = temporary_path(target, "tmp", pid=1, host="otherhost")
        os.mkdir(running)
        os.mkdir(foreign)
        messages = recover(target, report=lambda m: None)
        assert os.path.isdir(running) and os.path.isdir(foreign)
        assert any(os.path.basename(running) in m and "still" in m for m in messages), messages
        assert any(os.path.basename(foreign) in m and "otherhost" in m for m in messages), messages
    finally:
        sleeper.kill()
        sleeper.wait()
    # once its owner is gone, the next look removes it
    messages = recover(target, report=lambda m: None)
    assert not os.path.exists(running) and os.path.isdir(foreign)
    assert any(os.path.basename(running) in m and "removed" in m for m in messages)


def test_save_converted_refuses_a_directory_of_other_files(tmp_path):
    from megatron_apb.checkpoints import CheckpointError, ModelSpec, save_converted

    spec = ModelSpec(model_type="llama", num_layers=1, hidden_size=16, num_attention_heads=2, num_query_groups=1,
                     ffn_hidden_size=32, kv_channels=8, vocab_size=32, norm_eps=1e-5, rope_theta=1e4,
                     max_position_embeddings=64)
    state = {k: torch.zeros(s) for k, s in spec.full_shapes().items()}
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        save_converted(tmp_path, spec, state)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    save_converted(tmp_path / "out", spec, state)
    save_converted(tmp_path / "out", spec, state)  # an earlier converted checkpoint is replaced


# ------------------------------------------------------------------ damaged checkpoints
def _trainer_checkpoint(directory, step):
    from megatron_apb.training.checkpoint import save_training_state

    heads, params, optimizer = _tiny_heads()
    with torch.no_grad():
        for p in params:
            p.fill_(float(step))
    save_training_state(str(directory), heads, optimizer, step=step, config={}, history={"train": [], "eval": []}, write=True)
    return str(directory)


def test_resume_refuses_parts_of_different_steps(tmp_path):
    from megatron_apb.errors import CheckpointError

    one, two = _trainer_checkpoint(tmp_path / "one", 1), _trainer_checkpoint(tmp_path / "two", 2)
    shutil.copy(os.path.join(two, "heads.safetensors"), os.path.join(one, "heads.safetensors"))
    with pytest.raises(CheckpointError) as err:
        _load_trainer(one)
    msg = str(err.value)
    assert "heads.safetensors" in msg and "step 2" in msg and "trainer_state.json" in msg and "step 1" in msg, msg


def test_damaged_trainer_state_files_are_named(tmp_path):
    from megatron_apb.errors import CheckpointError

    good = _trainer_checkpoint(tmp_path / "good", 1)
    for name, damage, message in [
        ("trainer_state.json", lambda p: open(p, "w").write("{not json"), "trainer_state.json"),
        ("optimizer.safetensors", lambda p: os.truncate(p, os.path.getsize(p) // 2), "optimizer.safetensors"),
        ("heads.safetensors", lambda p: open(p, "wb").write(os.urandom(300)), "heads.safetensors"),
        ("optimizer.safetensors", os.remove, "optimizer.safetensors"),
    ]:
        bad = str(tmp_path / "bad")
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(good, bad)
        damage(os.path.join(bad, name))
        with pytest.raises(CheckpointError, match=message) as err:
            _load_trainer(bad)
        assert bad in str(err.value), err.value


def test_corrupt_safetensors_name_file_tensor_and_remedy(tmp_path):
    from megatron_apb.errors import CheckpointError
    from megatron_apb.heads import read_retaining_heads, save_retaining_heads

    path = str(tmp_path / "heads.safetensors")
    save_retaining_heads(path, {i: (torch.randn(8, 32), torch.randn(2, 8)) for i in range(3)})
    size = os.path.getsize(path)
    os.truncate(path, size - 40)  # the last tensor loses its end
    with pytest.raises(CheckpointError) as err:
        read_retaining_heads(path)
    msg = str(err.value)
    assert path in msg and "truncated" in msg and "model.layers.2.self_attn.fc2.weight" in msg, msg
    with open(path, "wb") as f:
        f.write(os.urandom(1000))
    with pytest.raises(CheckpointError, match="heads.safetensors") as err:
        read_retaining_heads(path)
    assert "re-" in str(err.value)


def test_non_finite_retaining_heads_are_refused(tmp_path):
    from megatron_apb.compress import RetainingHead
    from megatron_apb.errors import CheckpointError
    from megatron_apb.heads import load_into_retaining_heads, read_retaining_heads, save_retaining_heads

    heads = {i: (torch.randn(8, 32), torch.randn(2, 8)) for i in range(2)}
    heads[1][1][0, 3] = float("nan")
    path = str(tmp_path / "nan.safetensors")
    save_retaining_heads(path, heads)
    with pytest.raises(CheckpointError, match=r"layer 1.*model\.layers\.1\.self_attn\.fc2\.weight.*NaN"):
        read_retaining_heads(path)
    heads[1][1][0, 3] = 0.0
    heads[0][0][2, 2] = float("inf")
    modules = [RetainingHead(4, 2, 4, hidden=8, dtype=torch.float32) for _ in range(2)]
    with pytest.raises(CheckpointError, match=r"layer 0.*fc1.*inf"):
        load_into_retaining_heads(modules, heads, num_heads=4, num_kv_heads=2)


def test_converted_checkpoint_damage_is_named(tmp_path):
    from megatron_apb.checkpoints import CheckpointError, ModelSpec, load_hf_checkpoint, save_converted

    spec = ModelSpec(model_type="llama", num_layers=1, hidden_size=16, num_attention_heads=2, num_query_groups=1,
                     ffn_hidden_size=32, kv_channels=8, vocab_size=32, norm_eps=1e-5, rope_theta=1e4,
                     max_position_embeddings=64)
    out = save_converted(tmp_path / "c", spec, {k: torch.zeros(s) for k, s in spec.full_shapes().items()})
    weights = os.path.join(out, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) - 100)
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(out)
    assert weights in str(err.value) and "output_layer.weight" in str(err.value) and "convert" in str(err.value)
    with open(os.path.join(out, "megatron_apb_checkpoint.json"), "w") as f:
        f.write("{")
    with pytest.raises(CheckpointError, match="megatron_apb_checkpoint.json"):
        load_hf_checkpoint(out)


def test_hf_shards_missing_or_truncated_are_named(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megatron_apb.checkpoints import CheckpointError, load_hf_checkpoint

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = tmp_path / "hf"
    model.save_pretrained(path, max_shard_size="20KB")
    index = path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) > 1
    os.truncate(path / shards[-1], os.path.getsize(path / shards[-1]) - 10)
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(path)
    assert str(path / shards[-1]) in str(err.value) and "re-download" in str(err.value), err.value
    os.remove(path / shards[0])
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(path)
    assert shards[0] in str(err.value) and "model.safetensors.index.json" in str(err.value), err.value


def test_gguf_garbage_and_truncated_are_named(tmp_path):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    import numpy as np

    from megatron_apb.checkpoints import CheckpointError, load_hf_checkpoint

    good = str(tmp_path / "tiny.gguf")
    writer = gguf.GGUFWriter(good, "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.ones((32, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = open(good, "rb").read()
    for name, content in [("garbage.gguf", os.urandom(3000)), ("header.gguf", data[:100]), ("tail.gguf", data[:-100])]:
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(CheckpointError) as err:
            load_hf_checkpoint(path)
        assert path in str(err.value) and "re-download" in str(err.value), (name, err.value)
