"""Write a Hugging Face checkpoint of a real model's shape with random bf16 weights, to
test real-size loading without a model hub.

    python tools/make_random_checkpoint.py --shape llama3-8b --out /data/llama3-8b-random
    python tools/make_random_checkpoint.py --shape qwen2.5-14b --out /data/qwen2.5-14b-random
    python tools/make_random_checkpoint.py --shape tiny-llama3 --out /tmp/tiny   # for tests

The directory holds ``config.json``, ``generation_config.json``, safetensors shards with
``model.safetensors.index.json`` and a tokenizer (by default the embedded SmolLM2's, whose
ids all fit the vocabularies here; ``--tokenizer DIR`` copies another).  Each shard file is
written tensor by tensor, and each tensor in row blocks of at most ``--block-mib``, so the
memory used stays that small whatever the model's size.  Weights are ``N(0, 0.02)``
(norms 1), from a seed per tensor: the same ``--seed`` gives the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time

#: config.json of each shape (Hugging Face field names)
SHAPES = {
    "llama3-8b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        hidden_act="silu", bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    ),
    "qwen2.5-14b": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=5120, intermediate_size=13824,
        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        use_sliding_window=False, sliding_window=131072, max_window_layers=48, hidden_act="silu",
        bos_token_id=151643, eos_token_id=[151645, 151643],
    ),
    # ~340M parameters (0.63 GiB in bf16): the CPU before/after measurement of the loader
    "small-llama": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, vocab_size=49152,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        hidden_act="silu", bos_token_id=1, eos_token_id=2,
    ),
    "tiny-llama3": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=49152,
        max_position_embeddings=16384, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=2048),
        hidden_act="silu", bos_token_id=1, eos_token_id=[2, 0],
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=49152,
        max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        use_sliding_window=False, hidden_act="silu", bos_token_id=1, eos_token_id=[2],
    ),
}


def _header(entries, metadata):
    """The safetensors header bytes (length prefix included) for ``entries`` [(name, shape)]
    of bf16 tensors laid out in order."""
    header, offset = {"__metadata__": metadata}, 0
    for name, shape in entries:
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f, name, shape, seed, block_bytes):
    import torch

    g = torch.Generator().manual_seed(seed)
    if name.endswith("norm.weight") or ".ln" in name:
        f.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
        return
    row = 1
    for s in shape[1:]:
        row *= s
    rows_per_block = max(1, block_bytes // (2 * row))
    for start in range(0, shape[0], rows_per_block):
        n = min(rows_per_block, shape[0] - start)
        block = torch.empty((n,) + tuple(shape[1:]), dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
        f.write(block.view(torch.uint8).numpy().data)


def write_checkpoint(out: str, config: dict, *, seed: int = 0, shard_gib: float = 4.0, block_mib: int = 256,
                     tokenizer=None, quiet: bool = False) -> dict:
    """Write the checkpoint of ``config`` into ``out`` (created; must be empty or absent).
    Returns {"files": n, "bytes": weight bytes, "seconds": s}."""
    from megatron_apb.checkpoints import ModelSpec, hf_shapes

    spec = ModelSpec.from_hf_config(config)  # refuses what the loader would refuse
    shapes = list(hf_shapes(spec).items())
    os.makedirs(out, exist_ok=True)
    if any(not name.startswith(".") for name in os.listdir(out)):
        raise SystemExit(f"--out {out} is not empty; give a new or empty directory")
    limit = int(shard_gib * 2**30)
    shards, current, size = [], [], 0
    for name, shape in shapes:
        n = 2
        for s in shape:
            n *= s
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, tuple(shape)))
        size += n
    shards.append(current)
    start, total, weight_map = time.monotonic(), 0, {}
    for k, entries in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(os.path.join(out, fname + ".partial"), "wb") as f:
            f.write(_header(entries, {"format": "pt"}))
            for name, shape in entries:
                _write_tensor(f, name, shape, seed * 1_000_003 + len(weight_map), block_mib * 2**20)
                weight_map[name] = fname
        os.replace(os.path.join(out, fname + ".partial"), os.path.join(out, fname))
        total += os.path.getsize(os.path.join(out, fname))
        if not quiet:
            print(f"wrote {fname} ({total / 2**30:.1f} GiB, {time.monotonic() - start:.0f} s)", file=sys.stderr)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**config, "torch_dtype": "bfloat16"}, f, indent=2)
    eos = config.get("eos_token_id")
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos, "do_sample": False}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return {"files": len(shards), "bytes": total, "seconds": time.monotonic() - start}


def _tokenizer(path):
    from megatron_apb.checkpoints import default_checkpoint, load_tokenizer

    tok = load_tokenizer(path or default_checkpoint())
    if tok is None:
        raise SystemExit(f"--tokenizer {path}: no tokenizer there")
    return tok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, help="a new or empty directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gib", type=float, default=4.0, help="largest shard file (default 4 GiB)")
    parser.add_argument("--block-mib", type=int, default=256, help="largest block generated at once (MiB)")
    parser.add_argument("--tokenizer", help="a checkpoint whose tokenizer to copy (default: the embedded SmolLM2's)")
    parser.add_argument("--max-position-embeddings", type=int,
                        help="override the shape's max_position_embeddings (with no RoPE scaling)")
    args = parser.parse_args(argv)
    config = dict(SHAPES[args.shape])
    if args.max_position_embeddings:
        config["max_position_embeddings"] = args.max_position_embeddings
    tok = _tokenizer(args.tokenizer)
    if len(tok) > config["vocab_size"]:
        raise SystemExit(f"the tokenizer has {len(tok)} tokens, more than vocab_size={config['vocab_size']}")
    result = write_checkpoint(args.out, config, seed=args.seed, shard_gib=args.shard_gib,
                              block_mib=args.block_mib, tokenizer=tok)
    print(json.dumps({"shape": args.shape, "out": args.out, **result}))


if __name__ == "__main__":
    main()
