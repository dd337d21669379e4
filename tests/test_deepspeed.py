"""``megatron_apb.integrations.deepspeed.init_inference``: DeepSpeed inference with APB context parallelism.

The DeepSpeed path must give the same tokens as our own engine in the same mode, on the
same weights and prompt (gloo, CPU processes):

* Megatron-Core: a GPTModel built with Megatron's *own* layer spec (no APB) gets APB
  swapped in by ``init_inference``; the reference is a GPTModel built with the APB spec.
* Hugging Face: a tiny random Llama (GQA) saved to disk; ``init_inference`` runs on the HF
  model itself (APB attention swapped into its layers, DeepSpeed's AutoTP);
  the reference is our engine on the same checkpoint converted to Megatron.

Logits: the two paths run different code for the projections and MLPs (Megatron's layers
vs Hugging Face's or the same Megatron layers re-wired) in float32, so first-step logits
agree to ~1e-6; the bound 1e-4 leaves room for summation order, tokens must be identical.
"""

import dataclasses
import json

import pytest
import torch

pytest.importorskip("deepspeed")

from megatron_apb import APBConfig, APBConfigError  # noqa: E402
from megatron_apb.integrations.deepspeed import APB_SECTION_KEYS, split_config  # noqa: E402
from tests.deepspeed_workers import hf_ds_vs_engine, megatron_ds_vs_engine  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402

LOGIT_TOL = 1e-4

# query of 4 tokens in a 10-token anchor after a 2-token prefix; 4 tokens passed per rank
APB = dict(mode="apb", anchor_len=10, passing_len=4, query_prefix_len=2)
MEGATRON_CASES = [
    ("apb_query_attention", dict(APB, compressor="query_attention"),
     dict(APB, compressor="query_attention", cp_size=2)),
    ("apb_retaining_head", dict(APB, compressor="retaining_head", retaining_head_hidden=32),
     dict(APB, heads="<written by the worker>")),
    ("star", dict(mode="star", anchor_len=10), dict(mode="star", anchor_len=10)),
    ("exact", dict(mode="exact"), dict(mode="exact", cp_size=2)),
]
BAD_SECTIONS = [dict(mode="apb", cp_size=3)]


def _check(results):
    for rank, res in enumerate(results):
        for name, r in res.items():
            if name == "errors":
                continue
            assert r["cp"] == 2, (rank, name, r)
            assert r["logit_err"] <= LOGIT_TOL, (rank, name, r["logit_err"])
            assert list(r["got"]) == list(r["want"]), (rank, name, r["got"], r["want"])
            assert list(r["got"]) == list(results[0][name]["got"]), (rank, name)


def test_megatron_model_cp2_same_tokens_as_engine(tmp_path):
    results = run_distributed(
        megatron_ds_vs_engine, 2, 1, 2, 40, 8, MEGATRON_CASES, str(tmp_path / "heads.safetensors"),
        BAD_SECTIONS, timeout=400,
    )
    _check(results)
    first = results[0]["apb_query_attention"]
    assert first["kind"] == "megatron" and first["ds_module"] == "InferenceEngine"
    assert first["swapped"] == "APBSelfAttention"
    assert results[0]["apb_retaining_head"]["heads_loaded"] is True
    for res in results:  # models built with the APB spec beforehand give the same tokens
        for name in ("apb_query_attention", "star", "exact"):
            assert list(res[name]["got_prebuilt"]) == list(res[name]["want"]), (name, res[name])
    for res in results:
        (error,) = res["errors"]
        assert error is not None and "cp_size=3" in error and "does not divide the 2 processes" in error, error


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tests.deepspeed_workers import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("ds_llama"))


HF_APB = dict(mode="apb", anchor_len=10, passing_len=4, query_prefix_len=2)
HF_CASES = [
    ("apb_query_attention", dict(HF_APB), dict(HF_APB, cp_size=2)),
    ("apb_retaining_head", dict(HF_APB, compressor="retaining_head"), dict(HF_APB, heads="<fixture>")),
    ("ulysses", dict(mode="ulysses"), dict(mode="ulysses")),
]


def _check_engine_forward(results, ids_len):
    """The engine's forward after generate: the unsharded model's logits (fp32; summation
    order differs under TP, hence LOGIT_TOL); max_out_tokens=256 refuses longer inputs."""
    for res in results:
        r = res["apb_query_attention"]
        assert (r["ds_engine"], r["module"]) == ("InferenceEngine", "LlamaForCausalLM"), r
        assert r["forward_shape"][:2] == [1, ids_len], r
        assert r["forward_err"] <= LOGIT_TOL * max(1.0, r["forward_scale"]), r
        assert "(257 tokens) exceeds the DeepSpeed config's max_out_tokens=256" in r["refused"][0], r
        assert "(258 tokens) exceeds the DeepSpeed config's max_out_tokens=256" in r["refused"][1], r


def test_hf_llama_cp2_same_tokens_as_engine(tiny_llama):
    """init_inference with the "apb" section on 2 ranks (gloo): generate, then the
    returned engine's forward."""
    path, heads, doc, query = tiny_llama
    results = run_distributed(hf_ds_vs_engine, 2, 1, 2, path, doc, query, 10, HF_CASES, heads, timeout=400)
    _check(results)
    r = results[0]["apb_query_attention"]
    assert r["kind"] == "hf" and r["attention"] == "HFAPBAttention"
    _check_engine_forward(results, len(doc) + len(query) + 10)


def test_hf_llama_deepspeed_tp2_cp2(tiny_llama):
    """DeepSpeed's AutoTP (q_proj split by heads, retaining heads sharded by ours) under
    APB over CP: 4 processes, TP groups {0,1}, {2,3}; the engine's forward after generate
    runs the AutoTP-sharded model."""
    path, heads, doc, query = tiny_llama
    results = run_distributed(hf_ds_vs_engine, 4, 2, 2, path, doc, query, 6, HF_CASES[:2], heads, timeout=400)
    _check(results)
    for res in results:
        r = res["apb_query_attention"]
        assert r["q_proj"] == "LinearLayer" and r["q_rows"] == 32  # 8 heads x 8 / TP 2
    _check_engine_forward(results, len(doc) + len(query) + 6)


# ------------------------------------------------------------------ bad "apb" sections
@pytest.mark.parametrize(
    "config,message",
    [
        ({"dtype": "fp32"}, 'no "apb" section'),
        ({"apb": "apb"}, "must be a JSON object"),
        ({"apb": {"mode": "apb", "passing": 4}}, "unknown key(s) ['passing']"),
        ({"apb": {"mode": "ring"}}, "mode must be one of"),
        ({"apb": {"cp_size": 0}}, "cp_size must be a positive integer"),
        ({"apb": {"cp_size": "2"}}, "cp_size must be a positive integer"),
        ({"apb": {"compressor": "retaining_head"}}, 'needs trained heads: add "heads"'),
        ({"apb": {"heads": "/no/such/heads.safetensors"}}, "does not exist"),
        ({"apb": {"mode": "star", "passing_len": 8}}, "passes no blocks"),
        ({"apb": {"mode": "exact", "anchor_len": 8}}, "uses no anchor"),
        ({"apb": {"anchor_ratio": 2.0}}, "anchor_ratio must lie in [0, 1]"),
        ({"apb": {"anchor_len": "4"}}, "'anchor_len': expected int or null, got '4'"),
        ({"apb": {"fused_rope": "no"}}, "'fused_rope': expected bool, got 'no'"),
        ({"apb": {"query_prefix_len": True}}, "'query_prefix_len': expected int, got True"),
        ({"apb": {"heads": 3}}, "heads must be the path of a safetensors file"),
        ({"apb": {}, "replace_with_kernel_inject": True}, "would remove APB"),
        ({"apb": {}, "kernel_inject": True}, "would remove APB"),
        ({"apb": {}, "enable_cuda_graph": True}, "'enable_cuda_graph'=True would capture the module's forward"),
        ({"apb": {}, "use_triton": True}, "'use_triton'=True belongs to DeepSpeed's kernel injection"),
        ({"apb": {}, "quant": {"enabled": True}}, "'quant'={'enabled': True} quantizes"),
        ({"apb": {}, "checkpoint": "/ckpt.json"}, "'checkpoint'='/ckpt.json' is DeepSpeed's checkpoint loading"),
        ({"apb": {}, "moe": True}, "'moe'=True configures DeepSpeed MoE layers"),
        ({"apb": {}, "mp_size": 2}, "use tensor_parallel.tp_size"),
        ({"apb": {}, "max_out_tokens": 0}, "max_out_tokens must be a positive int"),
        ({"apb": {}, "tensor_parallel": {"tp_size": 2, "tp_group": object()}}, "tensor_parallel.tp_group is made"),
        ({"apb": {}, "tensor_parallel": {"size": 2}}, "unknown tensor_parallel key 'size'"),
        ({"apb": {}, "max_new_tokens": 4}, "unknown inference key 'max_new_tokens'"),
    ],
)
def test_bad_apb_section_is_refused_clearly(config, message):
    with pytest.raises(APBConfigError) as info:
        split_config(config)
    assert message in str(info.value), str(info.value)
    if "apb" in config and isinstance(config["apb"], dict) and len(config) == 1:
        assert str(info.value).startswith('DeepSpeed config, "apb" section:')


def test_json_file_and_defaults(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"dtype": "bf16", "tensor_parallel": {"tp_size": 2},
                                "apb": {"mode": "apb", "cp_size": 4, "anchor_len": 64}}))
    section, rest = split_config(str(path))
    assert rest == {"dtype": "bf16", "tensor_parallel": {"tp_size": 2}}
    assert section.cp_size == 4 and section.heads is None
    assert section.apb_config.anchor_len == 64 and section.apb_config.compressor == "query_attention"
    assert set(APB_SECTION_KEYS) >= {"mode", "cp_size", "anchor_len", "passing_len", "compressor", "heads"}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(APBConfigError, match="not valid JSON"):
        split_config(str(tmp_path / "bad.json"))


def test_every_config_field_is_a_section_key():
    """Every APBConfig field is a key of the "apb" section (fused_rope included)."""
    from tests.test_megatron_lm import config_field_samples

    samples = config_field_samples()
    for f in dataclasses.fields(APBConfig):
        assert f.name in APB_SECTION_KEYS, f.name
        section, rest = split_config({"dtype": "fp32", "apb": {f.name: samples[f.name], "cp_size": 2}})
        assert section.apb_config == APBConfig(**{f.name: samples[f.name]}), (f.name, section)
        assert section.cp_size == 2 and rest == {"dtype": "fp32"}
    section, _ = split_config({"apb": {"fused_rope": False, "seed": 3, "smoothing_kernel": 1}})
    cfg = section.apb_config
    assert (cfg.fused_rope, cfg.seed, cfg.smoothing_kernel) == (False, 3, 1)
    assert cfg.anchor_ratio == 0.25
    section, _ = split_config({"apb": {"anchor_ratio": 1}})  # a JSON int where a float belongs
    assert section.apb_config.anchor_ratio == 1.0


def test_unknown_key_is_refused_with_the_valid_keys():
    with pytest.raises(APBConfigError) as info:
        split_config({"apb": {"mode": "apb", "passing": 4, "anchor": 8}})
    message = str(info.value)
    assert message.startswith('DeepSpeed config, "apb" section: unknown key(s) [\'anchor\', \'passing\']'), message
    valid = message.split("valid keys: ", 1)[1].split(", ")
    assert valid == ["cp_size", "heads", "timeout"] + [f.name for f in dataclasses.fields(APBConfig)]


def test_timeout_key_is_checked():
    """"timeout" sets how long a collective waits for a stalled peer (the CLI's --timeout)."""
    section, _ = split_config({"apb": {"timeout": 30}})
    assert section.timeout == 30.0 and split_config({"apb": {}})[0].timeout is None
    for bad in (0, -1, "30", True, float("inf")):
        with pytest.raises(APBConfigError, match="timeout must be a number of seconds > 0"):
            split_config({"apb": {"timeout": bad}})


def test_megatron_model_refuses_deepspeed_tp():
    from megatron_apb.integrations.deepspeed.megatron_model import setup_megatron_model

    section, rest = split_config({"tensor_parallel": {"tp_size": 2}, "apb": {}})
    with pytest.raises(APBConfigError, match="Megatron already splits its layers"):
        setup_megatron_model(object(), section, rest, None, None)


def test_every_deepspeed_inference_key_is_honoured_or_refused():
    """Each field and alias of the installed DeepSpeed's DeepSpeedInferenceConfig is in
    exactly one table (a new DeepSpeed key fails here until it is classified); keys at
    DeepSpeed's defaults pass; honoured keys pass through to DeepSpeed untouched."""
    from deepspeed.inference.config import DeepSpeedInferenceConfig, DeepSpeedTPConfig

    from megatron_apb.integrations.deepspeed.config import DS_HONOURED, DS_REFUSED, DS_TP_KEYS

    def names(model):
        return {n for name, f in model.model_fields.items() for n in (name, f.alias) if n}

    assert names(DeepSpeedInferenceConfig) == set(DS_HONOURED) | set(DS_REFUSED)
    assert not set(DS_HONOURED) & set(DS_REFUSED)
    assert names(DeepSpeedTPConfig) == set(DS_TP_KEYS)
    defaults = DeepSpeedInferenceConfig()
    for key, (allowed, _) in DS_REFUSED.items():
        field = next((n for n, f in DeepSpeedInferenceConfig.model_fields.items() if key in (n, f.alias)))
        default = getattr(defaults, field)
        assert any(a == default or (a == {} and hasattr(default, "model_fields")) for a in allowed), (key, default)
        split_config({"apb": {}, key: allowed[0]})  # at DeepSpeed's default: accepted
    rest = {"dtype": "fp16", "tensor_parallel": {"tp_size": 2, "tp_grain_size": 64}, "keep_module_on_host": True,
            "max_out_tokens": 4096, "replace_with_kernel_inject": False, "enable_cuda_graph": False}
    assert split_config(dict(rest, apb={}))[1] == rest
