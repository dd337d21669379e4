"""The Megatron-LM hooks (megatron_apb.integrations.megatron_lm) and patches (patches/megatron_lm).

Without a Megatron-LM checkout (megatron-core alone): the ``--apb-*`` argument group, the
``--spec`` object, and a GPTModel built from a Megatron-LM-shaped Namespace (world 1,
against Megatron's own attention; CP 2, served through the server adapter).

With Megatron-LM's sources (``MEGATRON_LM_DIR``: a clone, bare or not, holding the
release tags, or a folder of per-tag trees ``<dir>/core_v0.19.0/``, ...): each supported
tag's patch series (``patches/megatron_lm/<tag>/``) passes ``git apply --check`` against
that tag's tree.

With a checkout (``MEGATRON_LM_PATH=/path/to/Megatron-LM``, tag core_v0.16.1; Megatron-LM's
``megatron.training`` also imports ``triton`` and ``six``, the ``megatron-lm`` extra):
Megatron-LM's own code runs on CPU under torchrun (tests/megatron_lm_worker.py): its
argument parser with our flags, ``gpt_builder`` resolving ``--spec`` to our hook, a
forward, and the patched text generation server's engine at CP = 2.
"""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import typing

import pytest

from megatron_apb.config import APBConfig
from megatron_apb.errors import APBConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES = os.path.join(ROOT, "patches", "megatron_lm")
#: the supported Megatron-LM release tags: one patch series each (patches/megatron_lm/<tag>/)
TAGS = ("core_v0.16.1", "core_v0.19.0")
PINNED = "core_v0.16.1 (55ac7082517c3878ae653c07c09c534b8aed49f6)"


def patch_series(tag):
    """The patch files of ``tag``'s series, in the order they apply."""
    folder = os.path.join(PATCHES, tag)
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".patch")]


def patched_files(patch):
    """The paths a patch touches (its ``diff --git a/X b/X`` lines)."""
    with open(patch, encoding="utf-8") as f:
        return sorted(set(re.findall(r"^diff --git a/(\S+) b/", f.read(), flags=re.M)))


def check_series(series, read_file, workdir):
    """``git apply --check`` of each patch of ``series``, in order, against the files
    ``read_file(path)`` returns (bytes, None when absent) copied into ``workdir`` (a git
    repository of its own, so the paths are taken from its root); the patches before it
    are applied first.  Returns (patch, git's message) of the first that fails, else None."""
    subprocess.run(["git", "init", "-q", str(workdir)], check=True, capture_output=True, timeout=60)
    for patch in series:
        for path in patched_files(patch):
            target = os.path.join(workdir, path)
            if not os.path.exists(target):
                data = read_file(path)
                if data is not None:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "wb") as f:
                        f.write(data)
        for args in (["--check"], []):
            proc = subprocess.run(["git", "apply", *args, patch], cwd=workdir, capture_output=True, text=True,
                                  timeout=60)
            if proc.returncode:
                return os.path.basename(patch), proc.stderr
    return None
SPEC_MODULE = "megatron_apb.integrations.megatron_lm"


def config_field_samples():
    """{field: a valid value other than its default} for every APBConfig field, each valid
    alone over the defaults and needing no retaining-head file (shared with
    tests/test_deepspeed.py: every field must be accepted by every front-end)."""
    hints = typing.get_type_hints(APBConfig)
    samples = {}
    for f in dataclasses.fields(APBConfig):
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        choices = f.metadata.get("choices")
        if choices is not None:
            candidates = [c for c in (choices.names() if hasattr(choices, "names") else choices) if c != f.default]
        elif kind is bool:
            candidates = [not f.default]
        elif kind is int:
            candidates = [8, 64] if f.default is None else [f.default + 2, f.default + 1]
        elif kind is float:
            candidates = [0.5] if f.default is None else [f.default / 2]
        else:  # free text; a field naming a file takes a name that resolves without one
            candidates = ["embedded"] if f.name == "sparse_config" else ["x"]
        for value in candidates:
            try:
                config = APBConfig(**{f.name: value})
            except ValueError:
                continue
            if not config.needs_retaining_heads:
                samples[f.name] = value
                break
        assert f.name in samples, f"no sample value for APBConfig.{f.name}: extend config_field_samples"
    return samples


@pytest.fixture
def hooks(monkeypatch):
    for name in list(os.environ):
        if name.startswith("APB_"):
            monkeypatch.delenv(name)
    from megatron_apb.integrations import megatron_lm

    return megatron_lm


# ----------------------------------------------------------- no checkout needed
def test_apb_args_and_environment(hooks):
    parser = hooks.add_apb_args(argparse.ArgumentParser())
    args = parser.parse_args(["--apb-mode", "star", "--apb-anchor-len", "128"])
    cfg = hooks.apb_config_from_args(args, environ={})
    assert (cfg.mode, cfg.anchor_len, args.apb_query_tokens) == ("star", 128, 64)
    # flags over environment over defaults
    cfg = hooks.apb_config_from_args(parser.parse_args(["--apb-anchor-len", "128"]),
                                     environ={"APB_MODE": "star", "APB_ANCHOR_LEN": "256"})
    assert (cfg.mode, cfg.anchor_len) == ("star", 128)
    cfg = hooks.apb_config_from_env({"APB_MODE": "apb", "APB_PASSING_LEN": "64", "APB_ANCHOR_LEN": "256"})
    assert (cfg.mode, cfg.anchor_len, cfg.passing_len, cfg.compressor) == ("apb", 256, 64, "query_attention")
    assert hooks.apb_config_from_args(argparse.Namespace(), environ={}) == APBConfig()
    with pytest.raises(APBConfigError, match="APB_ANCHOR_LEN='x'"):
        hooks.apb_config_from_env({"APB_ANCHOR_LEN": "x"})
    with pytest.raises(APBConfigError, match="APB_MODE must be one of"):
        hooks.apb_config_from_env({"APB_MODE": "ring"})
    with pytest.raises(APBConfigError, match="APB_MODE='star' passes no blocks, but APB_PASSING_LEN=8"):
        hooks.apb_config_from_env({"APB_MODE": "star", "APB_PASSING_LEN": "8"})


def test_every_config_field_is_a_flag_and_a_variable(hooks):
    """Every APBConfig field has an --apb-<field> flag and an APB_<FIELD> variable."""
    parser = hooks.add_apb_args(argparse.ArgumentParser())
    samples = config_field_samples()
    for f in dataclasses.fields(APBConfig):
        value, flag = samples[f.name], "--apb-" + f.name.replace("_", "-")
        argv = [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
        cfg = hooks.apb_config_from_args(parser.parse_args(argv), environ={})
        assert getattr(cfg, f.name) == value, (argv, cfg)
        assert cfg == APBConfig(**{f.name: value})
        variable = "APB_" + f.name.upper()
        cfg = hooks.apb_config_from_env({variable: str(value)})
        assert getattr(cfg, f.name) == value and cfg == APBConfig(**{f.name: value}), (variable, cfg)
        assert hooks.ENV_VARS[variable][0] == f.name and hooks.ARG_FIELDS["apb_" + f.name] == f.name
    # the flags Megatron-LM scripts and the server patch already use
    for flag in ("--apb-mode", "--apb-anchor-len", "--apb-passing-len", "--apb-compressor", "--apb-heads",
                 "--apb-query-prefix-len", "--apb-retaining-head-hidden", "--apb-backend", "--apb-query-tokens"):
        assert flag in parser.format_help(), flag


def test_unknown_apb_flag_is_refused(hooks, capsys):
    parser = hooks.add_apb_args(argparse.ArgumentParser(prog="pretrain_gpt.py", allow_abbrev=False))
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--apb-passing", "4"])
    assert exc.value.code == 2 and "unrecognized arguments: --apb-passing" in capsys.readouterr().err


def test_apb_args_with_heads(hooks, tmp_path):
    heads = tmp_path / "heads.safetensors"
    heads.write_bytes(b"")  # only its existence is checked when parsing
    args = hooks.add_apb_args(argparse.ArgumentParser()).parse_args(["--apb-heads", str(heads)])
    assert hooks.apb_config_from_args(args, environ={}).compressor == "retaining_head"


@pytest.mark.parametrize("flags, message", [
    (["--apb-mode", "ring"], "argument --apb-mode: invalid choice: 'ring'"),
    (["--apb-compressor", "topk"], "argument --apb-compressor: invalid choice: 'topk'"),
    (["--apb-anchor-len", "-1"], "--apb-anchor-len must be a non-negative int or None, got -1"),
    (["--apb-passing-len", "many"], "argument --apb-passing-len: expected int, got 'many'"),
    (["--apb-query-tokens", "0"], "argument --apb-query-tokens: must be >= 1, got 0"),
    (["--apb-retaining-head-hidden", "0"], "--apb-retaining-head-hidden must be >= 1, got 0"),
    (["--apb-smoothing-kernel", "4"], "--apb-smoothing-kernel must be an odd int >= 1"),
    (["--apb-query-in-anchor", "yes"], "unrecognized arguments: yes"),
    (["--apb-heads", "/no/such/heads.safetensors"], "argument --apb-heads: no such file: '/no/such/heads.safetensors'"),
    (["--apb-mode", "star", "--apb-passing-len", "8"],
     "--apb-mode='star' passes no blocks, but --apb-passing-len=8"),
    (["--apb-mode", "exact", "--apb-anchor-len", "8"], "--apb-mode='exact' is exact and uses no anchor"),
])
def test_apb_args_reject_bad_flags(hooks, capsys, flags, message):
    parser = hooks.add_apb_args(argparse.ArgumentParser(prog="pretrain_gpt.py"))
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "pretrain_gpt.py: error: " in err and message in err, err


def test_apb_args_check_the_environment_too(hooks, monkeypatch, capsys):
    monkeypatch.setenv("APB_MODE", "star")
    parser = hooks.add_apb_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_known_args(["--apb-passing-len", "8"])  # what ignore_unknown_args uses
    assert "--apb-passing-len=8" in capsys.readouterr().err
    assert parser.parse_args([]).apb_mode is None  # nothing given on the command line


def test_spec_hook_is_what_megatron_lm_imports(hooks):
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    spec = import_module(hooks.SPEC_ARGS)  # what gpt_builder does with --spec MODULE NAME
    assert spec is hooks.gpt_layer_apb_spec and isinstance(spec, ModuleSpec)
    assert spec.module is hooks.MegatronLMAPBTransformerLayer
    assert hooks.SPEC_ARGS == (SPEC_MODULE, "gpt_layer_apb_spec")


def megatron_lm_args(**overrides):
    """A Namespace shaped like Megatron-LM's parsed arguments (the names it uses)."""
    import torch

    fields = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, group_query_attention=True, num_query_groups=2,
        ffn_hidden_size=128, kv_channels=16, max_position_embeddings=256, padded_vocab_size=128,
        transformer_impl="local", normalization="RMSNorm", position_embedding_type="rope", rotary_base=500000,
        rotary_percent=1.0, use_rope_scaling=False, swiglu=True, add_bias_linear=False, bias_swiglu_fusion=False,
        untie_embeddings_and_output_weights=True, attention_dropout=0.0, hidden_dropout=0.0,
        init_method_std=0.2, use_cpu_initialization=True, params_dtype=torch.float32, no_persist_layer_norm=True,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=1, context_parallel_size=1, spec=[SPEC_MODULE, "gpt_layer_apb_spec"],
        apb_mode=None, apb_anchor_len=None, apb_passing_len=None, apb_compressor=None, apb_heads=None,
        apb_query_prefix_len=None, apb_retaining_head_hidden=None, apb_backend=None, apb_query_tokens=64,
    )
    fields.update(overrides)
    return argparse.Namespace(**fields)


def builder_worker(rank, world):
    """World 1: apb_gpt_builder on Megatron-LM-shaped args, against Megatron's local spec
    (plain attention) on the same weights; the lazy --spec object with settings from env."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_apb.integrations import megatron_lm as hooks
    from megatron_apb.megatron import APBCoreAttention, APBSelfAttention, init_cpu_megatron

    init_cpu_megatron()
    parallel_state.initialize_model_parallel(1, 1)  # as Megatron-LM does (Megatron's attention
    # takes its buffer from there)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    args = megatron_lm_args(apb_mode="exact")
    model = hooks.apb_gpt_builder(args, pg_collection=pg).eval()
    c = model.config
    layer = model.decoder.layers[0]
    out = dict(
        config=(c.normalization, c.gated_linear_unit, c.num_query_groups, c.persist_layer_norm),
        apb=all(isinstance(x.self_attention, APBSelfAttention) for x in model.decoder.layers),
        mode=layer.self_attention.core_attention.apb_config.mode,
        norm=type(layer.input_layernorm).__name__,
    )
    plain = GPTModel(c, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=128, max_sequence_length=256,
                     position_embedding_type="rope", rotary_base=500000, share_embeddings_and_output_weights=False,
                     pg_collection=pg).eval()
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.triu(torch.ones(40, 40, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        got, want = model(tokens, None, mask), plain(tokens, None, mask)
    out["err"] = float((got - want).abs().max())
    out["scale"] = float(want.abs().max())

    # the --spec object: each layer picks its parts from its TransformerConfig and the
    # APB settings current when it is built (here APB_* env, no Megatron-LM args)
    os.environ.update(APB_MODE="star", APB_ANCHOR_LEN="6")
    layer_norm = hooks.transformer_config_from_args(megatron_lm_args(normalization="LayerNorm"))
    lazy = GPTModel(layer_norm, hooks.gpt_layer_apb_spec, vocab_size=128, max_sequence_length=256,
                    position_embedding_type="rope", pg_collection=pg)
    core = lazy.decoder.layers[1].self_attention.core_attention
    out["lazy"] = (type(lazy.decoder.layers[1]).__name__, isinstance(core, APBCoreAttention),
                   core.apb_config.mode, core.apb_config.anchor_len, lazy.config.normalization,
                   type(lazy.decoder.layers[1].input_layernorm).__name__)
    return out


def test_apb_gpt_builder_from_megatron_lm_args():
    from tests.distributed import run_distributed

    (r,) = run_distributed(builder_worker, 1, timeout=300)
    assert r["config"] == ("RMSNorm", True, 2, False)
    assert r["apb"] and r["mode"] == "exact" and r["norm"] == "FusedRMSNorm"  # the spec default fuses RMSNorm
    assert r["err"] < 1e-5 * max(1.0, r["scale"]), r  # CP = 1: APB 'exact' is plain causal attention
    assert r["lazy"] == ("MegatronLMAPBTransformerLayer", True, "star", 6, "LayerNorm", "LayerNorm")


def serve_worker(rank, world, n_new):
    """CP 2: apb_gpt_builder (prepared) on Megatron-LM-shaped args with --apb-* values,
    answering a prompt through the server adapter; against megatron_apb's engine on a
    model built directly with the same settings and weights."""
    import torch
    from megatron.core.inference.sampling_params import SamplingParams

    from megatron_apb import APBConfig
    from megatron_apb.inference import APBEngine, SamplingConfig
    from megatron_apb.integrations import megatron_lm as hooks
    from megatron_apb.megatron import rank_grid_groups
    from tests.megatron_workers import VOCAB, _model, _prompt, _setup

    _setup()
    pg = rank_grid_groups(1, 2)
    args = megatron_lm_args(context_parallel_size=2, apb_mode="apb", apb_anchor_len=10, apb_passing_len=4,
                            apb_query_prefix_len=2, apb_query_tokens=4, num_attention_heads=12, num_query_groups=4,
                            hidden_size=96, ffn_hidden_size=192, kv_channels=8, padded_vocab_size=VOCAB,
                            rotary_base=10000, normalization="RMSNorm", init_method_std=0.02)
    lm_model = hooks.apb_gpt_builder(args, pg_collection=pg).eval()
    config = APBConfig(mode="apb", anchor_len=10, passing_len=4, query_prefix_len=2)
    ref = _model(config, 1, 2, pg)
    lm_model.load_state_dict(ref.state_dict())

    class Tokenizer:  # the tokenizer interface the server uses: tokenize/detokenize/eod
        eod = None

        def tokenize(self, text):
            return [int(t) for t in text.split()]

        def detokenize(self, ids):
            return " ".join(map(str, ids))

    doc, query = _prompt(40, 4, seed=8)
    core = lm_model.decoder.layers[0].self_attention.core_attention
    server = hooks.APBServerEngine(lm_model, Tokenizer(), core.apb_config, cp_group=pg.cp, tp_group=pg.tp,
                                      vocab_size=VOCAB, query_tokens=args.apb_query_tokens)
    prompt = " ".join(map(str, torch.cat([doc, query]).tolist()))
    (req,) = server.generate(prompts=[prompt], sampling_params=SamplingParams(num_tokens_to_generate=n_new, top_k=1))
    want = APBEngine(ref, config, cp_group=pg.cp, tp_group=pg.tp, vocab_size=VOCAB).generate(
        doc, query, SamplingConfig(max_new_tokens=n_new)).output_ids
    return dict(got=req.generated_tokens.tolist(), text=req.generated_text, want=want,
                mode=core.apb_config.mode, anchor=core.apb_config.anchor_len,
                rotary_unsliced=lm_model.rotary_pos_emb.cp_group is None)


def test_apb_gpt_builder_serves_cp2():
    from tests.distributed import run_distributed

    for r in run_distributed(serve_worker, 2, 6, timeout=300):
        assert (r["mode"], r["anchor"], r["rotary_unsliced"]) == ("apb", 10, True)
        assert r["got"] == r["want"] and len(r["got"]) == 6, r
        assert r["text"] == " ".join(map(str, r["want"]))


# ------------------------------------------------------- with a Megatron-LM checkout
@pytest.fixture(scope="module")
def megatron_lm():
    """The Megatron-LM checkout of MEGATRON_LM_PATH and the PYTHONPATH that runs it."""
    path = os.environ.get("MEGATRON_LM_PATH")
    if not path:
        pytest.skip(f"set MEGATRON_LM_PATH to a Megatron-LM checkout (tag {PINNED}) to run")
    if not os.path.isfile(os.path.join(path, "gpt_builders.py")):
        pytest.skip(f"MEGATRON_LM_PATH={path} has no gpt_builders.py: not a Megatron-LM checkout of that layout")
    return path


def _pythonpath(*paths):
    rest = os.environ.get("PYTHONPATH")
    return os.pathsep.join([ROOT, *paths] + ([rest] if rest else []))


@pytest.fixture(scope="module")
def megatron_training(megatron_lm):
    """Skip when Megatron-LM's megatron.training cannot be imported here, naming what is missing."""
    env = dict(os.environ, PYTHONPATH=_pythonpath(megatron_lm))
    probe = ("import sys\n"
             "try:\n    import megatron.training.initialize, gpt_builders, model_provider\n"
             "except ModuleNotFoundError as e:\n    print('MISSING', e.name); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", probe], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    if proc.returncode == 3:
        name = proc.stdout.split("MISSING", 1)[1].strip()
        why = (" (megatron/training/initialize.py -> megatron/core/transformer/custom_layers/"
               "batch_invariant_kernels.py imports it, also without a GPU)") if name == "triton" else ""
        pytest.skip(f"Megatron-LM's megatron.training needs {name!r}, which is not installed: "
                    f"pip install {name}{why}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return megatron_lm


def _torchrun(nproc, scenario, pythonpath, tmp_path, **env_vars):
    out = tmp_path / f"{scenario}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(ROOT, "tests", "megatron_lm_worker.py"), scenario, str(out)]
    env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONWARNINGS="ignore", **env_vars)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=480)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    return json.loads(out.read_text())


def test_patch_series_are_laid_out_per_tag():
    """One folder per supported tag, each with its series; no stray patch outside them."""
    assert sorted(d for d in os.listdir(PATCHES) if os.path.isdir(os.path.join(PATCHES, d))) == sorted(TAGS)
    assert not [f for f in os.listdir(PATCHES) if f.endswith(".patch")]
    for tag in TAGS:
        series = patch_series(tag)
        assert series and all(patched_files(p) for p in series), tag


def _megatron_lm_sources(tag):
    """read_file(path) for ``tag``'s tree under MEGATRON_LM_DIR (skips without it)."""
    root = os.environ.get("MEGATRON_LM_DIR")
    if not root:
        pytest.skip("set MEGATRON_LM_DIR to a Megatron-LM clone (with its release tags) or a folder of "
                    f"per-tag trees ({', '.join(TAGS)}) to check the patch series")
    tree = os.path.join(root, tag)
    if os.path.isdir(tree):
        def read_tree(path):
            full = os.path.join(tree, path)
            if not os.path.isfile(full):
                return None
            with open(full, "rb") as f:
                return f.read()
        return read_tree
    proc = subprocess.run(["git", "-C", root, "rev-parse", "--verify", "--quiet", f"{tag}^{{commit}}"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode:
        pytest.skip(f"MEGATRON_LM_DIR={root} is neither a git clone holding tag {tag} nor a folder with {tag}/ "
                    f"in it (git fetch --tags, or extract that tag's tree there)")

    def read_git(path):
        shown = subprocess.run(["git", "-C", root, "show", f"{tag}:{path}"], capture_output=True, timeout=60)
        return shown.stdout if shown.returncode == 0 else None
    return read_git


@pytest.mark.parametrize("tag", TAGS)
def test_patch_series_applies_to_its_tag(tag, tmp_path):
    failed = check_series(patch_series(tag), _megatron_lm_sources(tag), tmp_path)
    assert failed is None, f"patches/megatron_lm/{tag}/{failed[0]} does not apply to Megatron-LM {tag}: {failed[1]}"


def series_for_checkout(path, tmp_path):
    """The supported tag whose series applies to the checkout at ``path``."""
    def read(rel):
        full = os.path.join(path, rel)
        return open(full, "rb").read() if os.path.isfile(full) else None

    for tag in TAGS:
        if check_series(patch_series(tag), read, tmp_path / tag) is None:
            return tag
    return None


def test_a_patch_series_applies_to_checkout(megatron_lm, tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=megatron_lm, capture_output=True, text=True).stdout
    assert series_for_checkout(megatron_lm, tmp_path), (
        f"no series of patches/megatron_lm ({', '.join(TAGS)}) applies to {head.strip() or megatron_lm}")


def test_megatron_lm_spec_path_cpu(megatron_training, tmp_path):
    r = _torchrun(1, "spec", _pythonpath(megatron_training), tmp_path)
    # Megatron-LM's own parser with add_apb_args: bad flags stop it with argparse's exit 2
    assert r["star_with_passing"] == [2, "pretrain_gpt.py: error: --apb-mode='star' passes no blocks, but "
                                         "--apb-passing-len=8; use --apb-mode='apb' for passing blocks or leave "
                                         "--apb-passing-len unset"]
    assert r["negative_anchor"] == [2, "pretrain_gpt.py: error: --apb-anchor-len must be a non-negative int or None, "
                                       "got -1"]
    assert r["unknown_mode"][0] == 2 and "argument --apb-mode: invalid choice: 'ring'" in r["unknown_mode"][1]
    assert r["missing_heads"][0] == 2 and "argument --apb-heads: no such file" in r["missing_heads"][1]
    assert r["args"] == {"spec": [SPEC_MODULE, "gpt_layer_apb_spec"], "apb_mode": "exact",
                         "apb_query_tokens": 64}
    # gpt_builder -> import_module(args.spec) -> our object; the layers it built
    assert r["spec_is_hook"] and r["layer"] == "MegatronLMAPBTransformerLayer" and r["apb_layers"]
    assert (r["mode"], r["norm"], r["linear_qkv"]) == ("exact", "FusedRMSNorm", "ColumnParallelLinear")
    assert r["logits_shape"] == [48, 256] and r["finite"]
    # CP = 1: the same logits as Megatron-LM's default (local) spec with Megatron's attention
    assert r["plain_core_attention"] == "DotProductAttention"
    assert r["err_vs_megatron_attention"] < 1e-5 * max(1.0, r["logits_scale"]), r
    assert r["err_apb_gpt_builder"] == 0.0


def test_megatron_lm_text_generation_server_cp2(megatron_training, tmp_path):
    tag = series_for_checkout(megatron_training, tmp_path / "check")
    assert tag, f"no series of patches/megatron_lm applies to {megatron_training}"
    patched = tmp_path / "patched"

    def read(rel):
        return open(os.path.join(megatron_training, rel), "rb").read()

    assert check_series(patch_series(tag), read, patched) is None  # leaves the patched files in `patched`
    pythonpath = _pythonpath(str(patched), str(patched / "tools"), megatron_training)
    ranks = _torchrun(2, "server", pythonpath, tmp_path)["ranks"]
    assert [r["cp_rank"] for r in ranks] == [0, 1] and all(r["cp"] == 2 for r in ranks)
    for r in ranks:
        assert r["server_file"].startswith(str(patched)) and r["builder_file"].startswith(megatron_training)
        assert r["rotary_sliced_after_build"] and r["rotary_unsliced_after_engine"]
        assert r["engine"] == "APBServerEngine"
        assert r["got"] == r["want"] == ranks[0]["got"] and len(r["got"]) == 6, r
        assert r["text"] == " ".join(map(str, r["got"]))


def test_megatron_lm_loads_converted_dist_checkpoint(megatron_training, tmp_path):
    """``convert --format torch_dist`` of a tiny random HF Llama shaped as the worker's
    MODEL_FLAGS, then Megatron-LM's own ``load_checkpoint`` (``--load DIR --ckpt-format
    torch_dist``, TP 2, its local layer spec): logits equal to transformers' (fp32, within
    2e-5; the vocabulary Megatron-LM pads to 256 gives zero logits)."""
    import torch
    from transformers import LlamaConfig

    from tests.test_checkpoint import _hf_model, _logits

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = _hf_model(config, 11)
    model.save_pretrained(tmp_path / "hf")
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    proc = subprocess.run([sys.executable, "-m", "megatron_apb.cli", "convert", "--model", str(tmp_path / "hf"),
                           "--output", str(tmp_path / "dist"), "--format", "torch_dist"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(2))
    r = _torchrun(2, "load", _pythonpath(megatron_training), tmp_path, LOAD_DIR=str(tmp_path / "dist"),
                  LOAD_TOKENS=",".join(map(str, tokens.tolist())))
    got = torch.tensor(r["logits"])
    assert r["iteration"] == 0 and r["ckpt_format"] == "torch_dist" and got.shape == (24, 256), r["iteration"]
    assert (got[:, :128] - _logits(model, tokens)).abs().max() <= 2e-5
    assert got[:, 128:].abs().max() == 0
