"""The Python API: :class:`LongContextLM`, loaded and called as Hugging Face models are.

    from megatron_apb import LongContextLM

    lm = LongContextLM.from_pretrained("/models/Llama-3.1-8B-Instruct", cp_mode="apb", tp=1)
    out = lm.generate((document, "Who wrote the letter?"), max_new_tokens=64, stop=["\\n\\n"])
    print(out.text, out.prefill_s)

The same script runs in one process or under ``torchrun`` (TP x CP = the processes; every
rank calls the same methods with the same arguments and gets the same results; progress
prints on rank 0 only).  The command line's ``generate`` is a layer over this class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

from ..config import APBConfig
from ..data import tokenize_prompt
from ..errors import APBConfigError
from .. import inference  # lazy package: APBEngine (Megatron-Core) loads on first use
from .launch import init_runtime, load_model, load_tokenizer
from .sampling import SamplingConfig, StopStrings

Prompt = Union[str, Tuple[str, str]]


@dataclass
class Generation:
    """One prompt's answer: ``text`` (cut at the first stop string), its token ``ids``, the
    prompt's token counts and the timings (seconds; decode speed in tokens per second)."""

    text: str
    ids: List[int]
    prompt_tokens: int
    prefill_s: float
    time_to_first_token_s: float
    decode_tokens_per_s: float
    layout: dict = field(default_factory=dict)


def eos_ids(path: Optional[str], tokenizer) -> List[int]:
    """The ids that end generation: the checkpoint's (generation_config.json, config.json,
    lists included) and the tokenizer's."""
    if path is None:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    from ..checkpoints import eos_token_ids  # local: the checkpoints package imports Megatron-Core

    return eos_token_ids(path, tokenizer)


class LongContextLM:
    """A checkpoint loaded for long-context generation over TP x CP processes.

    Make one with :meth:`from_pretrained`; answer with :meth:`generate`.  Attributes:
    ``tokenizer``, ``spec`` (:class:`~megatron_apb.checkpoints.ModelSpec`), ``config``
    (:class:`~megatron_apb.config.APBConfig`), ``runtime`` (ranks, groups, device, dtype),
    ``engine`` (:class:`~megatron_apb.inference.APBEngine`), ``eos_ids``.
    """

    def __init__(self, engine, tokenizer, spec, runtime, eos_ids: Sequence[int], path: Optional[str]):
        self.engine, self.tokenizer, self.spec, self.runtime = engine, tokenizer, spec, runtime
        self.eos_ids, self.path = list(eos_ids), path

    @property
    def config(self) -> APBConfig:
        return self.engine.config

    @classmethod
    def from_pretrained(cls, path: Optional[str] = None, *, cp_mode: str = "apb", tp: int = 1,
                        dtype: Optional[str] = None, heads: Optional[str] = None, timeout_s: Optional[float] = None,
                        apb_config: Optional[APBConfig] = None, verbose: bool = False,
                        **apb_options) -> "LongContextLM":
        """Load checkpoint ``path`` (Hugging Face directory, ``.gguf`` file or converted
        directory; None: the embedded SmolLM2-135M-Instruct) on this process's shard.

        ``cp_mode``: ``apb`` or another registered context-parallel algorithm; ``tp``: the
        tensor-parallel size (CP = processes / TP); ``dtype``: ``bf16`` / ``fp16`` /
        ``fp32`` (default bf16 on GPU, fp32 on CPU); ``heads``: trained retaining heads
        (then the compressor is ``retaining_head``); ``verbose``: every rank prints its
        libraries' progress and warnings (default: rank 0 only); ``apb_options``: other
        :class:`~megatron_apb.config.APBConfig` fields (or a whole ``apb_config``).
        Under ``torchrun`` every rank calls this; alone, it makes a one-process group.
        """
        if apb_config is None:
            apb_options.setdefault("compressor", "retaining_head" if heads else "query_attention")
            apb_config = APBConfig(mode=cp_mode, **apb_options)
        elif apb_options:
            apb_config = apb_config.replace(**apb_options)
        tokenizer = load_tokenizer(path)
        rt = init_runtime(tp, dtype, timeout_s=timeout_s, verbose=verbose)
        model, spec, _, apb_config = load_model(path, apb_config, rt, heads=heads)
        say = (lambda msg: print(msg, flush=True)) if rt.is_main else None
        engine = inference.APBEngine(model, apb_config, cp_group=rt.pg.cp, tp_group=rt.pg.tp,
                                     vocab_size=spec.vocab_size, pad_id=tokenizer.pad_token_id or 0, progress=say)
        return cls(engine, tokenizer, spec, rt, eos_ids(path, tokenizer), path)

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt, query_tokens: int = 32):
        """(document ids, query ids) of a prompt: a ``(document, question)`` pair goes
        through the chat template (the question is the query); a plain string is encoded
        as is and its last ``query_tokens`` tokens (at most half) are the query."""
        if isinstance(prompt, tuple):
            if len(prompt) != 2:
                raise APBConfigError("a prompt tuple is (document, question)")
            p = tokenize_prompt(self.tokenizer, *prompt)
            return list(p.document_ids), list(p.query_ids)
        if not isinstance(prompt, str) or not prompt.strip():
            raise APBConfigError("a prompt is a non-empty string or a (document, question) pair")
        ids = self.tokenizer(prompt)["input_ids"]
        q = max(1, min(query_tokens, len(ids) // 2))
        return ids[:-q], ids[-q:]

    def sampling(self, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] = (), seed: int = 0) -> SamplingConfig:
        """The :class:`SamplingConfig` of :meth:`generate`'s arguments (EOS ids from the
        checkpoint's ``generation_config.json``, ``config.json`` and tokenizer)."""
        if isinstance(stop, str):
            stop = [stop]
        return SamplingConfig(
            temperature=temperature if do_sample else 0.0, top_k=top_k if do_sample else 0,
            top_p=top_p if do_sample else 1.0, seed=seed, max_new_tokens=max_new_tokens, stop_ids=self.eos_ids,
            stop_when=StopStrings(self.tokenizer, stop) if stop else None,
        )

    # ---------------------------------------------------------------- generation
    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] = (),
                 seed: int = 0) -> Union[Generation, List[Generation]]:
        """Answer one prompt (a string or a ``(document, question)`` pair; returns a
        :class:`Generation`) or a list of them (returns a list).

        Greedy unless ``do_sample`` (then ``temperature``, ``top_k``, ``top_p``, ``seed``).
        Ends at ``max_new_tokens``, an EOS id of the checkpoint, or a ``stop`` string (the
        text is cut before it).  A prompt plus ``max_new_tokens`` beyond the model's
        positions is refused before any work, naming both numbers."""
        single = isinstance(prompts, (str, tuple))
        items = [prompts] if single else list(prompts)
        encoded = [self.encode(p) for p in items]
        for doc, query in encoded:
            self.spec.check_positions(len(doc) + len(query), max_new_tokens)
        sampling = self.sampling(max_new_tokens, do_sample, temperature, top_k, top_p, stop, seed)
        out = [self.generate_ids(doc, query, sampling) for doc, query in encoded]
        return out[0] if single else out

    def generate_ids(self, document_ids, query_ids, sampling: SamplingConfig, *,
                     config: Optional[APBConfig] = None) -> Generation:
        """:meth:`generate` on token ids, with a :class:`SamplingConfig`; ``config`` runs
        another context-parallel mode's config for this call."""
        saved = self.engine.config
        if config is not None:
            self.engine.config = config
        try:
            result = self.engine.generate(document_ids, query_ids, sampling)
        finally:
            self.engine.config = saved
        text = self.tokenizer.decode(result.output_ids, skip_special_tokens=True)
        if isinstance(sampling.stop_when, StopStrings):
            text = sampling.stop_when.cut(text)
        return Generation(
            text=text.strip(), ids=list(result.output_ids), prompt_tokens=len(result.document_ids) + len(result.query_ids),
            prefill_s=result.prefill_s, time_to_first_token_s=result.time_to_first_token_s,
            decode_tokens_per_s=result.decode_tokens_per_s, layout=result.layout,
        )
