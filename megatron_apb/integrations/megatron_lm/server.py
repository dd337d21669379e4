"""Megatron-LM's text generation server answering through megatron_apb's engine.

Megatron's static inference engine decodes through its own KV-cache context, which APB
attention does not use; ``patches/megatron_lm`` makes the server's ``get_inference_engine``
return :func:`get_apb_inference_engine` for a model built with the APB spec.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.inference.inference_request import InferenceRequest

from ...config import APBConfig
from ...errors import APBConfigError
from ...inference import APBEngine, SamplingConfig
from ...megatron import apb_modules
from .prepare import prepare_megatron_lm_model, unwrap
from .spec import SPEC_ARGS


class APBServerEngine:
    """The part of Megatron's static inference engine that Megatron-LM's text generation
    server uses (``generate(inference_requests=...)`` from ``run_mcore_engine`` on every
    rank, ``generate(prompts=..., sampling_params=...)`` for its warm-up), answering with
    megatron_apb's engine: APB prefill of the prompt's document part over the CP group,
    exact decoding.

    The server sends plain prompts; the last ``query_tokens`` tokens of each are taken as
    the query (embedded in the anchor, run in phase 2), the rest as the document.
    Log-probabilities are not computed (empty lists); prompts are answered one at a time.
    """

    def __init__(self, model, tokenizer, apb_config: APBConfig, *, cp_group, tp_group, vocab_size,
                 query_tokens: int = 64):
        self.engine = APBEngine(unwrap(model), apb_config, cp_group=cp_group, tp_group=tp_group,
                                vocab_size=vocab_size)
        self.query_tokens = query_tokens
        self._next_id = 0
        self.controller = type("Controller", (), {})()  # what run_mcore_engine reads
        self.controller.tokenizer = tokenizer
        self.controller.sampling_rng = torch.Generator()

    def get_new_request_id(self) -> str:
        """A new request id (a counter, as Megatron's engine)."""
        self._next_id += 1
        return str(self._next_id)

    def _split(self, tokens):
        if len(tokens) < 2:
            raise APBConfigError("the prompt needs at least two tokens (document and query)")
        q = max(1, min(self.query_tokens, len(tokens) // 2))
        return tokens[:-q], tokens[-q:]

    def generate_tokens(self, prompt_tokens, *, num_tokens_to_generate, temperature=0.0, top_p=1.0, seed=0,
                        stop_ids=()):
        """Generated token ids for one tokenized prompt (every rank returns the same)."""
        doc, query = self._split(list(prompt_tokens))
        sampling = SamplingConfig(
            temperature=temperature, top_p=top_p if 0 < top_p <= 1 else 1.0, seed=seed,
            max_new_tokens=num_tokens_to_generate, stop_ids=list(stop_ids),
        )
        return self.engine.generate(doc, query, sampling).output_ids

    def generate(self, prompts=None, sampling_params=None, inference_requests=None, **unused):
        """Megatron's engine contract: returns one request object per prompt with
        ``prompt``, ``prompt_tokens``, ``generated_text``, ``generated_tokens`` (a tensor),
        empty ``prompt_log_probs``/``generated_log_probs`` and ``segments``."""
        tok = self.controller.tokenizer
        if inference_requests is None:
            inference_requests = [
                InferenceRequest(prompt=p, prompt_tokens=tok.tokenize(p), sampling_params=sampling_params,
                                 request_id=self.get_new_request_id())
                for p in prompts
            ]
        eod = getattr(tok, "eod", None)
        for req in inference_requests:
            params = req.sampling_params
            temperature = 0.0 if (params.top_k == 1 or params.temperature == 0) else params.temperature
            out = self.generate_tokens(
                req.prompt_tokens, num_tokens_to_generate=params.num_tokens_to_generate,
                temperature=temperature, top_p=params.top_p, stop_ids=[eod] if eod is not None else [],
            )
            req.generated_tokens = torch.tensor(out, dtype=torch.long)
            req.generated_length = len(out)
            req.generated_text = tok.detokenize(out)
            req.prompt_log_probs, req.generated_log_probs = [], []
            req.segments = []
        return inference_requests


def get_apb_inference_engine(args, model, tokenizer) -> APBServerEngine:
    """The text generation server's engine for a model built with the APB spec (see
    ``patches/megatron_lm``): prepares the model (after the server loaded its checkpoint)
    and wraps megatron_apb's engine over Megatron's parallel-state CP and TP groups."""
    cores = apb_modules(model)
    if not cores:
        raise APBConfigError(
            "the APB server engine needs the APB layer spec: add --spec " + " ".join(SPEC_ARGS)
        )
    prepare_megatron_lm_model(model, args)
    return APBServerEngine(
        model, tokenizer, cores[0].apb_config, cp_group=parallel_state.get_context_parallel_group(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        vocab_size=getattr(tokenizer, "vocab_size", None) or unwrap(model).vocab_size,
        query_tokens=getattr(args, "apb_query_tokens", 64),
    )
