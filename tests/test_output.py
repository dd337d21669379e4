"""Output a user reads: progress from rank 0 only (``--verbose``: every rank), and the
timing spread (median, min, max, runs) that the benchmarks in tools/ report."""

import io
import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from timing_stats import DEFAULT_RUNS, add_spread, spread  # noqa: E402


def test_spread_is_median_min_max():
    assert spread("prefill_s", [3.0, 1.0, 2.0, 10.0]) == {"prefill_s": 2.5, "prefill_s_min": 1.0, "prefill_s_max": 10.0}
    assert spread("t", [4]) == {"t": 4.0, "t_min": 4.0, "t_max": 4.0}
    with pytest.raises(ValueError, match="prefill_s: no timed runs"):
        spread("prefill_s", [])
    assert DEFAULT_RUNS >= 3


def test_add_spread_keeps_the_existing_keys():
    row = dict(mode="apb", prefill_s=2.0, times_s=[2.0, 1.5, 4.0])
    add_spread(row, "prefill_s", "times_s")
    assert row == dict(mode="apb", prefill_s=2.0, times_s=[2.0, 1.5, 4.0], prefill_s_min=1.5, prefill_s_max=4.0, runs=3)
    row = dict(decode_ms_per_token=None, step_ms=[0.002, 0.001, 0.003])  # seconds scaled to ms
    add_spread(row, "decode_ms_per_token", "step_ms", scale=1e3)
    assert (row["decode_ms_per_token_min"], row["decode_ms_per_token_max"]) == (1.0, 3.0)
    assert add_spread(dict(mode="x", oom=True), "prefill_s", "times_s") == dict(mode="x", oom=True)


@pytest.fixture
def restore_hf_output(monkeypatch):
    """Undo what quiet_other_ranks switches off, for the tests after this one."""
    transformers_logging = pytest.importorskip("transformers.utils.logging")
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    transformers_logging.enable_progress_bar()
    level = transformers_logging.get_verbosity()
    yield transformers_logging
    transformers_logging.enable_progress_bar()
    transformers_logging.set_verbosity(level)
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()


@pytest.mark.parametrize("rank, verbose, quiet", [(0, False, False), (1, False, True), (3, True, False)])
def test_progress_from_rank_zero_only(restore_hf_output, rank, verbose, quiet):
    """A Hugging Face loading bar (transformers' tqdm, as from_pretrained and the GGUF
    conversion show) and a warning: shown on rank 0 and with --verbose, not elsewhere."""
    from megatron_apb.inference.launch import quiet_other_ranks

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert quiet_other_ranks(rank, verbose) is quiet
        warnings.warn("a library's warning")
        out = io.StringIO()
        for _ in restore_hf_output.tqdm(range(3), file=out, desc="Loading weights"):
            pass
    assert ("Loading weights" in out.getvalue()) is not quiet, out.getvalue()
    assert (len(caught) == 0) is quiet
    assert (os.environ.get("TQDM_DISABLE") == "1") is quiet
    if quiet:
        assert restore_hf_output.get_verbosity() == restore_hf_output.ERROR


def test_every_launching_command_has_verbose():
    from megatron_apb.cli import build_parser

    parser = build_parser()
    for argv in (["generate"], ["eval", "--samples-file", "s.jsonl", "--output", "o.json"], ["train-heads", "--output", "runs/x"]):
        args, _ = parser.parse_known_args(argv + ["--verbose"])
        assert args.verbose is True, argv
        args, _ = parser.parse_known_args(argv)
        assert args.verbose is False, argv
