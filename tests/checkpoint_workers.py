"""Worker functions for the checkpoint tests (run by tests/distributed.py on gloo).

Each worker loads a checkpoint with ``megatron_apb.checkpoints``, builds the Megatron
model for its (TP, CP) place, and compares its contiguous CP block of logits with the
Hugging Face logits computed by the parent from the same checkpoint.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.distributed as dist

from tests.distributed import error_message


def _setup():
    warnings.filterwarnings("ignore")
    from megatron_apb.megatron import init_cpu_megatron

    init_cpu_megatron()


def _places(tp, cp):
    from megatron_apb.megatron import rank_grid_groups

    pg = rank_grid_groups(tp, cp)
    return pg, dist.get_rank(pg.tp), dist.get_rank(pg.cp)


def _build(spec, pg, apb_config=None, **config_overrides):
    from megatron_apb import APBConfig
    from megatron_apb.checkpoints import build_model

    model = build_model(
        spec, apb_config or APBConfig(mode="exact"), pg_collection=pg, parallel_output=False,
        config_overrides=config_overrides or None,
    )
    return model.eval()


def _block_logits(model, tokens, cp, cp_rank):
    """This CP rank's logits [block, padded vocab] of contiguous blocks of ``tokens``."""
    b = tokens.numel() // cp
    with torch.no_grad():
        return model(tokens[cp_rank * b : (cp_rank + 1) * b][None], None, None)[0]


def check_logits(rank, world, tp, cp, cases, error_checks=False):
    """For every case {name, path, tokens, logits, inv_freq}: max abs differences of this
    rank's logits block (``name``), of its padded-vocab logits from 0 (``name:pad``) and of
    the rotary inverse frequencies (``name:inv_freq``) from Hugging Face's.

    The model is loaded by the streaming loader (each rank reads its shard).
    With ``error_checks``, also the outcomes of load_into_model's error paths and of loading
    retaining heads, on the first case (see ``_error_checks``).
    """
    _setup()
    from megatron_apb.checkpoints import load_shard, open_checkpoint

    pg, tp_rank, cp_rank = _places(tp, cp)
    out = {}
    for case in cases:
        name = case["name"]
        ckpt = open_checkpoint(case["path"])  # the streaming load every command uses
        spec = ckpt.spec
        model = _build(spec, pg)
        load_shard(model, ckpt.reader, spec, tp_rank, tp)
        tokens = torch.as_tensor(case["tokens"])
        got = _block_logits(model, tokens, cp, cp_rank)
        b = tokens.numel() // cp
        want = torch.as_tensor(case["logits"])[cp_rank * b : (cp_rank + 1) * b]
        v = spec.vocab_size
        out[name] = (got[:, :v] - want).abs().max().item()
        out[name + ":columns"] = got.shape[1]
        out[name + ":pad"] = got[:, v:].abs().max().item() if got.shape[1] > v else 0.0
        rope = model.rotary_pos_emb  # linear scaling: Megatron divides positions instead
        inv_freq = rope.inv_freq.cpu() / (rope.seq_len_interpolation_factor or 1.0)
        out[name + ":inv_freq"] = (inv_freq - torch.as_tensor(case["inv_freq"])).abs().max().item()
    if error_checks:
        out.update(_error_checks(cases[0]["path"], pg, tp_rank, tp))
    return out



def _error_checks(path, pg, tp_rank, tp):
    """Outcomes of load_into_model on mismatched models and with retaining heads."""
    import dataclasses

    from megatron_apb import APBConfig
    from megatron_apb.compress import shard_retaining_head
    from megatron_apb.checkpoints import load_hf_checkpoint, load_into_model

    spec, state, _ = load_hf_checkpoint(path)
    out = {}
    # the model has a layer the checkpoint lacks
    deeper = dataclasses.replace(spec, num_layers=spec.num_layers + 1)
    model = _build(deeper, pg)
    out["missing_layer"] = error_message(lambda: load_into_model(model, state, spec, tp_rank, tp))
    # the model's MLP is wider than the checkpoint's
    wider = dataclasses.replace(spec, ffn_hidden_size=spec.ffn_hidden_size * 2)
    model = _build(wider, pg)
    out["wider_mlp"] = error_message(lambda: load_into_model(model, state, spec, tp_rank, tp))
    # retaining heads: model has them, checkpoint does not
    apb = APBConfig(mode="apb", compressor="retaining_head", retaining_head_hidden=16)
    model = _build(spec, pg, apb)
    out["heads_missing"] = error_message(lambda: load_into_model(model, state, spec, tp_rank, tp))
    out["heads_missing_allowed"] = error_message(
        lambda: load_into_model(model, state, spec, tp_rank, tp, allow_missing_retaining_heads=True)
    )
    # ... and with full retaining heads in the checkpoint: each rank holds its shard
    g = torch.Generator().manual_seed(5)
    cols = (spec.num_attention_heads + 2 * spec.num_query_groups) * spec.kv_channels
    with_heads = dict(state)
    full_heads = {}
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}.self_attention.core_attention.retaining_head."
        full_heads[i] = (torch.randn(16, cols, generator=g), torch.randn(spec.num_query_groups, 16, generator=g))
        with_heads[p + "fc1.weight"], with_heads[p + "fc2.weight"] = full_heads[i]
    load_into_model(model, with_heads, spec, tp_rank, tp)
    worst = 0.0
    sd = model.state_dict()
    for i, (fc1, fc2) in full_heads.items():
        p = f"decoder.layers.{i}.self_attention.core_attention.retaining_head."
        want1, want2 = shard_retaining_head(
            fc1, fc2, num_heads=spec.num_attention_heads, num_kv_heads=spec.num_query_groups,
            head_dim=spec.kv_channels, tp_rank=tp_rank, tp_size=tp,
        )
        worst = max(worst, (sd[p + "fc1.weight"] - want1).abs().max().item())
        worst = max(worst, (sd[p + "fc2.weight"] - want2).abs().max().item())
    out["heads_loaded_error"] = worst
    # a model without retaining heads skips the checkpoint's
    model = _build(spec, pg)
    report = load_into_model(model, with_heads, spec, tp_rank, tp)
    out["heads_skipped"] = len(report["skipped"])
    return out


def check_gguf(rank, world, prompt, out_dir):
    """SmolLM2 GGUF at CP = 1: Megatron logits vs the transformers GGUF model's, spec fields,
    and the save_converted round trip with the tokenizer.  Returns numbers and timings."""
    _setup()
    from transformers import AutoModelForCausalLM

    from megatron_apb.checkpoints import (
        default_model_path,
        load_hf_checkpoint,
        load_into_model,
        save_converted,
    )

    times = {}
    t = time.perf_counter()
    path = default_model_path()
    spec, state, tokenizer = load_hf_checkpoint(path)
    times["load_hf_checkpoint"] = time.perf_counter() - t
    tokens = torch.as_tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)

    t = time.perf_counter()
    pg, tp_rank, cp_rank = _places(1, 1)
    model = _build(spec, pg, perform_initialization=False)
    load_into_model(model, state, spec, tp_rank, 1)
    got = _block_logits(model, tokens, 1, 0)[:, : spec.vocab_size]
    times["megatron_build_load_forward"] = time.perf_counter() - t
    del model

    t = time.perf_counter()
    import os

    directory, name = os.path.split(path)
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(tokens[None]).logits[0]
    times["hf_gguf_load_forward"] = time.perf_counter() - t
    del hf

    t = time.perf_counter()
    save_converted(out_dir, spec, state, tokenizer)
    spec2, state2, tokenizer2 = load_hf_checkpoint(out_dir)
    times["save_and_reload_converted"] = time.perf_counter() - t
    round_trip = spec2 == spec and state2.keys() == state.keys() and all(
        torch.equal(state[k], state2[k]) and state[k].dtype == state2[k].dtype for k in state
    )
    return {
        "spec": spec.to_dict(),
        "tokens": tokens.numel(),
        "max_abs_error": (got - want).abs().max().item(),
        "max_abs_logit": want.abs().max().item(),
        "argmax_agree": bool((got.argmax(-1) == want.argmax(-1)).all()),
        "round_trip": round_trip,
        "tokenizer_round_trip": tokenizer2 is not None
        and tokenizer2(prompt)["input_ids"] == tokenizer(prompt)["input_ids"],
        "times": times,
    }


# --------------------------------------------------------------- streaming load, instrumented
class _Counted:
    """``safetensors.safe_open`` wrapped to count the bytes of every tensor it hands out."""

    read = 0
    real = None

    def __init__(self, path, framework, device="cpu"):
        self._f = _Counted.real(path, framework=framework, device=device)

    def _count(self, t):
        _Counted.read += t.numel() * t.element_size()
        return t

    def get_tensor(self, name):
        return self._count(self._f.get_tensor(name))

    def get_slice(self, name):
        part, count = self._f.get_slice(name), self._count

        class Slice:
            def __getitem__(self, index):
                return count(part[index])

            def __getattr__(self, attr):
                return getattr(part, attr)

        return Slice()

    def __getattr__(self, attr):
        return getattr(self._f, attr)


def check_streaming_load(rank, world, tp, path):
    """Load ``path`` (a bf16 checkpoint) with the command line's loader at TP ``tp`` x CP
    ``world / tp`` in bf16, with the file reads counted at ``safetensors.safe_open`` and
    every float32 tensor any torch op makes recorded; whole-file readers are disabled.

    Returns {"bytes": bytes this rank read, "names": the model has exactly the reference names,
    "max_f32": the largest float32 tensor made (elements), "dtypes": parameter dtypes,
    "max_diff": the largest difference from ``shard_for_tp`` of the full state}.
    """
    _setup()
    import safetensors
    import safetensors.torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from megatron_apb import APBConfig
    from megatron_apb.checkpoints import load_hf_checkpoint, shard_for_tp
    from megatron_apb.inference.launch import Runtime, load_model

    pg, tp_rank, cp_rank = _places(tp, world // tp)

    class Float32Watch(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in tree_flatten(result)[0]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    Float32Watch.largest = max(Float32Watch.largest, t.numel())
            return result

    def refuse(*args, **kwargs):
        raise AssertionError("a whole-file reader was called during the streaming load")

    saved = safetensors.safe_open, safetensors.torch.load_file, torch.load
    _Counted.real, _Counted.read = saved[0], 0
    safetensors.safe_open, safetensors.torch.load_file, torch.load = _Counted, refuse, refuse
    rt = Runtime(rank=rank, world=world, tp=tp, cp=world // tp, pg=pg, device=torch.device("cpu"), dtype=torch.bfloat16)
    try:
        with Float32Watch():
            model, spec, _, _ = load_model(path, APBConfig(mode="exact"), rt)
    finally:
        safetensors.safe_open, safetensors.torch.load_file, torch.load = saved
    got_bytes = _Counted.read
    # the slow reference: the whole state, sharded afterwards
    _, full, _ = load_hf_checkpoint(path)
    want = shard_for_tp(full, spec, tp_rank, tp)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    worst = max((sd[k].float() - v.float()).abs().max().item() for k, v in want.items())
    return {
        "bytes": got_bytes, "max_f32": Float32Watch.largest, "max_diff": worst,
        "dtypes": sorted({str(v.dtype) for v in sd.values()}), "names": sorted(sd) == sorted(want),
    }


def check_dist_checkpoint(rank, world, dist_dir, iter_dir, hf_dir, tokens, truncated_dir):
    """Loads of distributed checkpoints (``convert --format torch_dist``) on 2 processes:

    * ``tp1``: ``dist_dir`` at TP 1 x CP 2 through ``load_dist`` (each rank its CP block of
      logits), ``tp1_vs_stream``: against the streaming load of ``hf_dir`` on the same grid;
    * ``tp2``: ``iter_dir`` (the same checkpoint in the ``iter_0000007`` layout) at TP 2 x
      CP 1 through the command line's ``load_model`` (full logits, padded vocabulary
      columns separately as ``tp2:pad``), ``tp2_vs_stream`` likewise;
    * ``truncated``: the error of loading ``truncated_dir`` (a shard cut short).
    """
    _setup()
    from megatron_apb.checkpoints import load_shard, open_checkpoint
    from megatron_apb.checkpoints.dist import load_dist
    from megatron_apb.inference.launch import Runtime, load_model

    tokens = torch.as_tensor(tokens)
    out = {}
    pg, tp_rank, cp_rank = _places(1, 2)
    ckpt = open_checkpoint(dist_dir)
    model = _build(ckpt.spec, pg)
    load_dist(model, ckpt.dist_dir, pg, where=dist_dir)
    out["tp1"] = _block_logits(model, tokens, 2, cp_rank)
    source = open_checkpoint(hf_dir)
    ref = _build(source.spec, pg)
    load_shard(ref, source.reader, source.spec, tp_rank, 1)
    out["tp1_vs_stream"] = (out["tp1"] - _block_logits(ref, tokens, 2, cp_rank)).abs().max().item()
    out["truncated"] = error_message(lambda: load_dist(_build(ckpt.spec, pg), open_checkpoint(truncated_dir).dist_dir,
                                                       pg, where=truncated_dir))

    pg, tp_rank, cp_rank = _places(2, 1)
    rt = Runtime(rank=rank, world=world, tp=2, cp=1, pg=pg, device=torch.device("cpu"), dtype=torch.float32)
    from megatron_apb import APBConfig

    model, spec, _, _ = load_model(iter_dir, APBConfig(mode="exact"), rt)
    got = _block_logits(model, tokens, 1, 0)
    out["tp2"], out["tp2:pad"] = got[:, : spec.vocab_size], got[:, spec.vocab_size :].abs().max().item()
    ref = _build(source.spec, pg)
    load_shard(ref, source.reader, source.spec, tp_rank, 2)
    out["tp2_vs_stream"] = (got - _block_logits(ref, tokens, 1, 0)).abs().max().item()
    return out
