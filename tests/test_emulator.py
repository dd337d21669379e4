"""tools/emulate_prefill.py on CPU with a tiny shape: it runs every emulated rank, its FLOP
accounting agrees with what PyTorch's FLOP counter sees in the projections, its
prediction is assembled as documented, and its validation table compares with a measured
file.  Its timings on CPU mean nothing (the figures come from a GPU run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_emulator_runs_each_rank_and_accounts_its_work(tmp_path):
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps(dict(meta={}, results=[
        dict(mode="apb", length=96, world=6, cp=3, tp=2, shape="tiny", prefill_s=2.0, times_s=[2.0]),
        dict(mode="apb", length=96, world=6, cp=3, tp=2, shape="llama3-8b", prefill_s=2.0),  # another shape
    ])))
    out = tmp_path / "emu.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "emulate_prefill.py"), "--shape", "tiny", "--world", "3",
           "--tp", "2", "--lengths", "96", "--query-len", "4", "--modes", "apb", "--warmup", "0",
           "--count-flops", "--validate", str(measured), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["mode"], r["partition"]): r for r in data["results"]}
    assert set(rows) == {("apb", "equal"), ("apb", "balanced")}
    assert rows[("apb", "equal")]["blocks"] == [32, 32, 32]
    for row in rows.values():
        ranks = row["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1, 2] and sum(r["block"] for r in ranks) == 96
        for r in ranks:
            # the model's projections, counted by PyTorch, are the rows times the shape's FLOPs per row
            assert r["counted_projection_flops"] == pytest.approx(r["projection_flops"], rel=1e-12)
            assert r["tp_comm_s"] > 0  # two all-reduces per layer under TP 2
            assert r["total_s"] == pytest.approx(r["compute_s"] + r["unhidden_comm_s"] + r["tp_comm_s"])
        assert row["predicted_prefill_s"] == pytest.approx(max(r["total_s"] for r in ranks))
        assert row["slowest_over_fastest"] == pytest.approx(
            max(r["compute_s"] for r in ranks) / min(r["compute_s"] for r in ranks))
    # the anchor rows run through every matmul on ranks >= 1 (and rank 0: the query-attention scorer)
    apb = rows[("apb", "equal")]
    assert [r["rows"] for r in apb["ranks"]] == [32 + apb["anchor_len"]] * 3
    assert rows[("apb", "balanced")]["cost_model"]["source"] == "fitted"
    balanced = rows[("apb", "balanced")]  # the kept round is the fastest of those tried
    assert balanced["predicted_prefill_s"] == min(r["predicted_prefill_s"] for r in balanced["rounds"])
    (entry,) = data["validation"]
    assert entry["measured_s"] == 2.0 and entry["mode"] == "apb"
    assert entry["error_pct"] == pytest.approx(100 * (rows[("apb", "equal")]["predicted_prefill_s"] / 2.0 - 1))
