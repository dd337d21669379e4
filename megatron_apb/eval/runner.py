"""Run task samples through the generation engine in several attention methods.

A *method* is a name and an :class:`~megatron_apb.config.APBConfig`: ``exact``, ``star``,
``apb-<compressor>`` (and ``ulysses``) across the CP ranks of the run; on one process every
mode computes full causal attention, so a one-process run is the ``full`` reference.  With
``--sparse minference`` every method's local attention is sparse and its name says so
(``minference`` on one process, ``star+minference``, ``apb-<compressor>+minference``), and
with SnapKV (``--kv-compress snapkv``) in ``+snapkv``, with ``--partition balanced`` the methods
that use it in ``+balanced``.  Every
method runs on the same model, weights and prompts; each record holds the prediction, its
RULER score and timings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, List, Optional, Sequence, Tuple

from ..config import APBConfig
from ..data import TaskSample, score_answer, tokenize_prompt
from ..errors import APBConfigError
from ..inference.sampling import SamplingConfig
from ..layout import plan_layout
from ..registry import ALGORITHMS, COMPRESSORS


@dataclass(frozen=True)
class EvalMethod:
    """A named attention configuration to evaluate."""

    name: str
    config: APBConfig


def eval_methods(base: APBConfig, modes: Sequence[str], compressors: Sequence[str], cp_size: int) -> List[EvalMethod]:
    """The methods to run: ``full`` alone on one rank, otherwise each mode (``apb`` once per
    compressor).  ``base`` carries the lengths, backend and seed shared by all of them."""
    if cp_size == 1:  # with --sparse (or SnapKV) the one-process reference becomes that method
        parts = [base.sparse_method] if base.sparse_method != "none" else []
        parts += ["snapkv"] if base.compresses_kv else []
        name = "+".join(parts) or "full"
        return [EvalMethod(name, base.replace(mode="exact", anchor_len=None, passing_len=None))]
    methods = []
    for mode in modes:
        if mode not in ALGORITHMS:
            raise APBConfigError(f"unknown mode {mode!r}; choose from {', '.join(ALGORITHMS)}")
        if ALGORITHMS.get(mode).passes_blocks:  # apb: once per compressor
            if not compressors:
                raise APBConfigError(f"mode {mode} needs at least one compressor")
            for c in compressors:
                if c not in COMPRESSORS:
                    raise APBConfigError(f"unknown compressor {c!r}; choose from {', '.join(COMPRESSORS)}")
                methods.append(EvalMethod(f"{mode}-{c}", base.replace(mode=mode, compressor=c)))
        else:
            methods.append(EvalMethod(mode, base.replace(mode=mode, anchor_len=None, passing_len=None)))
    if base.sparse_method != "none":  # every rank's local attention is sparse: say so in the names
        methods = [EvalMethod(f"{m.name}+{base.sparse_method}", m.config) for m in methods]
    if base.compresses_kv:  # a compressed cache for decoding: say so
        methods = [EvalMethod(f"{m.name}+snapkv", m.config) for m in methods]
    if base.partition != "equal":  # blocks other than the reference's equal ones: say so too
        methods = [m if ALGORITHMS.get(m.config.mode).equal_blocks else EvalMethod(f"{m.name}+{base.partition}", m.config)
                   for m in methods]
    return methods


def _method_config(method: EvalMethod, prompt, header_len_as_prefix: bool) -> APBConfig:
    """The config ``method`` runs a prompt with (the query after the chat header, unless
    told otherwise)."""
    config = method.config
    return config.replace(query_prefix_len=prompt.header_len) if header_len_as_prefix else config


def check_samples(tokenizer, samples: Iterable[TaskSample], methods: Sequence[EvalMethod], cp_size: int, *,
                  header_len_as_prefix: bool = True, where: str = "") -> None:
    """Refuse, before any model loads, a sample :func:`evaluate` could not run or score: no
    expected answer, no answer budget, or a prompt that no layout of a method on
    ``cp_size`` ranks fits (the error says what length would).  ``where``: the file named
    in the errors."""
    for s in samples:
        name = f"{where + ': ' if where else ''}sample {s.task} L={s.length} #{s.index}"
        if not s.answers or not all(isinstance(a, str) and a for a in s.answers):
            raise APBConfigError(f"{name} has no expected answer to score against (answers={list(s.answers)!r})")
        if isinstance(s.max_new_tokens, bool) or not isinstance(s.max_new_tokens, int) or s.max_new_tokens < 1:
            raise APBConfigError(f"{name}: max_new_tokens must be an int >= 1, got {s.max_new_tokens!r}")
        prompt = tokenize_prompt(tokenizer, s.document, s.question, answer_prefix=s.answer_prefix)
        for method in methods:
            try:
                plan_layout(len(prompt.document_ids), len(prompt.query_ids),
                            _method_config(method, prompt, header_len_as_prefix), cp_size)
            except APBConfigError as exc:
                raise APBConfigError(f"{name}, method {method.name}: {exc}", field=exc.field) from None


def evaluate(
    engine,
    tokenizer,
    samples: Iterable[TaskSample],
    methods: Sequence[EvalMethod],
    *,
    header_len_as_prefix: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    on_sample: Optional[Callable[[List[dict]], None]] = None,
    on_record: Optional[Callable[[dict], None]] = None,
    skip: Collection[Tuple[str, int, int, str]] = (),
    local_decode: bool = True,
) -> List[dict]:
    """Greedy answers of every sample under every method; one record per (sample, method).

    ``engine``: an :class:`~megatron_apb.inference.APBEngine` over the run's CP group; its
    config is swapped per method.  ``header_len_as_prefix``: embed the query in the anchor
    right after the chat header (APB's placement), unless the method sets its own prefix.
    ``on_record``: called with each record as it finishes (e.g. to append it to a file, so
    that an interrupted run keeps what it finished); ``on_sample``: with all records so far
    after each sample.  ``skip``: ``(task, length, index, method)`` already answered (e.g.
    by an earlier, interrupted run); they are not run again.
    ``local_decode``: after each distributed prefill, gather the caches and decode on every
    rank alone (exact either way; it saves a collective per layer and token, see
    :meth:`~megatron_apb.inference.APBEngine.gather_cache`).
    """
    samples = list(samples)
    stops = [t for t in (tokenizer.eos_token_id,) if t is not None]
    records = []
    start = time.perf_counter()
    for i, sample in enumerate(samples):
        prompt = tokenize_prompt(tokenizer, sample.document, sample.question, answer_prefix=sample.answer_prefix)
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=sample.max_new_tokens, stop_ids=stops)
        todo = [m for m in methods if (sample.task, sample.length, sample.index, m.name) not in skip]
        for method in todo:
            config = _method_config(method, prompt, header_len_as_prefix)
            engine.config = config
            result = engine.generate(prompt.document_ids, prompt.query_ids, sampling, local_decode=local_decode,
                                     attention_stats=True)  # the density of sparse runs (others: none)
            prediction = tokenizer.decode(result.output_ids, skip_special_tokens=True).strip()
            records.append(dict(
                task=sample.task, length=sample.length, index=sample.index, method=method.name,
                ranks=engine.cp_size, mode=config.mode, decode="local" if local_decode else "distributed",
                compressor=config.compressor if config.mode == "apb" else None,
                prediction=prediction, answers=list(sample.answers),
                score=100.0 * score_answer(prediction, sample.answers),
                output_ids=result.output_ids,
                prompt_tokens=len(prompt.document_ids) + len(prompt.query_ids),
                anchor_len=result.layout.get("anchor_len"), passing_len=result.layout.get("passing_len"),
                prefill_s=result.prefill_s, time_to_first_token_s=result.time_to_first_token_s,
                sparse=config.sparse_method,
                attention_density=result.attention.get("attention_density"),
                sparse_density=result.attention.get("sparse_density"),
            ))
            if on_record is not None:
                on_record(records[-1])
        if on_sample is not None:
            on_sample(records)
        if progress is not None:
            done = i + 1
            eta = (time.perf_counter() - start) / done * (len(samples) - done)
            last = records[-len(todo):] if todo else []
            scores = " ".join(f"{r['method']}={r['score']:.0f}" for r in last)
            progress(f"[{done}/{len(samples)}] {sample.task} L={sample.length} #{sample.index}: {scores} (eta {eta:.0f} s)")
    return records
