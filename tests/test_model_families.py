"""Model families: found by the Hugging Face ``model_type`` through the registry.

* every built-in family is found by its ``model_type``; an unknown one is refused with a
  message naming ``model_type`` and listing the supported ones;
* Yi's original format (``ln1``/``ln2`` norms) converts like the same weights as Llama;
* a family registered through ``MODEL_FAMILIES`` alone (``dummy_llama``, Llama's tensor
  names) loads a tiny random checkpoint written here and gives the same logits, in this
  process on CPU, as the same weights loaded as ``llama`` (and the transformers model's);
* a Yi directory in the original format streams to the logits of transformers' Llama.
(Llama, Llama-3.x, Qwen2, Qwen2.5 with YaRN and Mistral are pinned to transformers'
logits at TP 1 and 2 in tests/test_checkpoint.py.)
"""

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import save_file  # noqa: E402

from megatron_apb import APBConfig  # noqa: E402
from megatron_apb.checkpoints import (  # noqa: E402
    ModelFamily,
    ModelSpec,
    UnsupportedModelError,
    build_model,
    family_for,
    hf_to_megatron,
    load_shard,
    open_checkpoint,
    supported_model_types,
)
from megatron_apb.checkpoints.families.llama import LLAMA_KEYS  # noqa: E402
from megatron_apb.megatron import init_cpu_megatron, rank_grid_groups  # noqa: E402
from megatron_apb.registry import MODEL_FAMILIES  # noqa: E402
from tests.test_checkpoint import TOL, _configs, _hf_model  # noqa: E402

BUILTIN = ("llama", "qwen2", "mistral", "Yi", "yi")
SEQ = 24


def test_builtin_families_found_and_unknown_refused():
    for name in BUILTIN:
        family = family_for(name)
        assert family.name == name and MODEL_FAMILIES.get(name) is family
        assert name in supported_model_types()
    assert family_for("qwen2").qkv_bias and not family_for("llama").qkv_bias
    assert family_for("qwen2").sliding_window_flag == "use_sliding_window"
    for unknown in ("gpt2", "dummy_llama", None):
        with pytest.raises(UnsupportedModelError) as err:
            family_for(unknown)
        msg = str(err.value)
        assert f"model_type={unknown!r}" in msg, msg
        assert all(name in msg for name in BUILTIN), msg
    # the same refusal through the config parser
    config = {**_configs()["llama_tied_v96"].to_dict(), "model_type": "gpt2"}
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'.*supported model types: .*llama"):
        ModelSpec.from_hf_config(config)


def test_yi_original_format_converts_like_llama():
    config = _configs()["llama_untied_v101"]
    hf = dict(_hf_model(config, 3).state_dict())
    llama = ModelSpec.from_hf_config(config.to_dict())
    yi = ModelSpec.from_hf_config({**config.to_dict(), "model_type": "Yi"})
    assert yi.model_type == "Yi" and dataclasses.replace(yi, model_type="llama") == llama
    renamed = {
        k.replace(".input_layernorm.", ".ln1.").replace(".post_attention_layernorm.", ".ln2."): v
        for k, v in hf.items()
    }
    assert any(".ln1." in k for k in renamed)
    want, got = hf_to_megatron(hf, llama), hf_to_megatron(renamed, yi)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# ------------------------------------------------------------------ a registered family
@pytest.fixture
def dummy_family():
    """``dummy_llama``: Llama's tensor names and config class, registered for one test."""
    family = MODEL_FAMILIES.register(ModelFamily(name="dummy_llama", keys=LLAMA_KEYS, hf_config_type="llama"))
    try:
        yield family
    finally:
        MODEL_FAMILIES.unregister("dummy_llama")


@pytest.fixture
def single_rank():
    """A one-rank gloo group in this process and Megatron's CPU shims; its process groups."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        init_cpu_megatron()
        yield rank_grid_groups(1, 1)
    finally:
        if created:
            dist.destroy_process_group()


def _write_checkpoint(directory, config_dict, state):
    """A Hugging Face directory written by hand: config.json and model.safetensors."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2))
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


def _megatron_logits(path, pg, tokens):
    ckpt = open_checkpoint(path)  # the streaming load the commands use
    spec = ckpt.spec
    model = build_model(spec, APBConfig(mode="exact"), pg_collection=pg, parallel_output=False).eval()
    load_shard(model, ckpt.reader, spec, 0, 1)
    with torch.no_grad():
        return spec, model(tokens[None], None, None)[0][:, : spec.vocab_size]


def test_registered_family_loads_end_to_end(tmp_path, dummy_family, single_rank):
    assert "dummy_llama" in supported_model_types() and family_for("dummy_llama") is dummy_family
    config = _configs()["llama_untied_v101"]
    model = _hf_model(config, 7)
    state = model.state_dict()
    config_dict = json.loads(config.to_json_string())
    llama_dir = _write_checkpoint(tmp_path / "llama", config_dict, state)
    dummy_dir = _write_checkpoint(tmp_path / "dummy", {**config_dict, "model_type": "dummy_llama"}, state)
    assert json.loads((dummy_dir / "config.json").read_text())["model_type"] == "dummy_llama"

    tokens = torch.randint(0, config.vocab_size, (SEQ,), generator=torch.Generator().manual_seed(7))
    dummy_spec, dummy_logits = _megatron_logits(dummy_dir, single_rank, tokens)
    llama_spec, llama_logits = _megatron_logits(llama_dir, single_rank, tokens)
    assert dummy_spec.model_type == "dummy_llama" and llama_spec.model_type == "llama"
    assert dataclasses.replace(dummy_spec, model_type="llama") == llama_spec
    assert torch.equal(dummy_logits, llama_logits)
    with torch.no_grad():
        hf_logits = model(tokens[None]).logits[0]
    assert (dummy_logits - hf_logits).abs().max().item() <= TOL


def test_yi_original_format_streams_to_llamas_logits(tmp_path, single_rank):
    """A Yi directory in 01.AI's format (``ln1``/``ln2``) through the streaming loader gives
    the logits of transformers' Llama on the same weights."""
    config = _configs()["llama_untied_v101"]
    model = _hf_model(config, 11)
    renamed = {
        k.replace(".input_layernorm.", ".ln1.").replace(".post_attention_layernorm.", ".ln2."): v
        for k, v in model.state_dict().items()
    }
    yi_dir = _write_checkpoint(tmp_path / "yi", {**json.loads(config.to_json_string()), "model_type": "Yi"}, renamed)
    tokens = torch.randint(0, config.vocab_size, (SEQ,), generator=torch.Generator().manual_seed(11))
    spec, logits = _megatron_logits(yi_dir, single_rank, tokens)
    with torch.no_grad():
        hf_logits = model(tokens[None]).logits[0]
    assert spec.model_type == "Yi" and (logits - hf_logits).abs().max().item() <= TOL
