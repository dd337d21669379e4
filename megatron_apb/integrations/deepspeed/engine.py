"""``init_inference``: ``deepspeed.init_inference`` with APB context parallelism.

DeepSpeed's inference engine offers tensor parallelism (AutoTP, an injection policy or
kernel injection), dtype conversion and placement, but no way to split a long *prompt*
across GPUs.  :func:`init_inference` calls ``deepspeed.init_inference`` with the rest of
the config (every key honoured or refused: :mod:`.config`), puts APB attention into the
model DeepSpeed returns, over a CP group beside DeepSpeed's TP group, and returns an
:class:`APBInferenceEngine`: DeepSpeed's engine (its ``module``, its ``forward``, any
other attribute) plus ``generate(document_ids, query_ids, sampling)``, which runs the APB
prefill over the CP group and exact distributed decoding.  The engine stays usable after
``generate``: its ``forward`` is DeepSpeed's (the model's exact attention, TP as
DeepSpeed set it up).

Two kinds of model:

* **Megatron-Core ``GPTModel``** (built with Megatron's own layer spec, or with
  ``get_gpt_layer_apb_spec``): Megatron does the tensor parallelism, so DeepSpeed's
  ``tensor_parallel.tp_size`` must stay 1; DeepSpeed converts the dtype and places the
  model.  Its plain ``forward`` runs the exact modes (and any mode at CP = 1).
* **Hugging Face Llama-family ``*ForCausalLM``** (``llama``, ``qwen2``, ``mistral``):
  DeepSpeed shards it by AutoTP when ``tensor_parallel.tp_size > 1`` (or by the
  ``injection_policy`` given) over the TP group of the ``[dp, cp, tp]`` rank grid, handed
  to DeepSpeed through its public ``tensor_parallel.tp_group``/``mpu``; then the
  attention layers gain APB (:mod:`megatron_apb.integrations.hf`), which they run when
  ``generate`` passes them a forward context and skip otherwise.
"""

from __future__ import annotations

from typing import Optional

import deepspeed
import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel

from ...comm import DEFAULT_TIMEOUT_S, set_collective_timeout, start_watchdog
from ...config import APBConfig
from ...errors import APBConfigError
from ...heads import read_retaining_heads
from ...inference import APBEngine, SamplingConfig
from ...megatron import prepare_model
from ..hf import HFModelForAPB
from .config import check_deepspeed_keys, max_out_tokens_of, split_config, tp_size_of
from .groups import ModelParallelUnit, init_deepspeed_comm, init_torch_distributed, make_groups
from .megatron_model import setup_megatron_model


class APBInferenceEngine:
    """What :func:`init_inference` returns: DeepSpeed's ``InferenceEngine`` with APB
    generation.

    Attributes:
        ds_engine: DeepSpeed's ``InferenceEngine``; every attribute not listed here is
            looked up on it (``module``: the model as DeepSpeed left it, ...).
        engine: the :class:`~megatron_apb.inference.APBEngine` that runs ``generate``.
        apb_config, cp_group, tp_group, kind (``"megatron"`` or ``"hf"``), vocab_size,
        max_out_tokens (DeepSpeed's ``max_out_tokens`` when the config set it).
    """

    def __init__(self, ds_engine, engine, *, kind: str, cp_group, tp_group, vocab_size: int,
                 max_out_tokens: Optional[int] = None):
        self.ds_engine, self.engine, self.kind = ds_engine, engine, kind
        self.cp_group, self.tp_group, self.vocab_size = cp_group, tp_group, vocab_size
        self.max_out_tokens = max_out_tokens

    def __getattr__(self, name):  # only for names not set on this object: DeepSpeed's engine
        if name == "ds_engine":
            raise AttributeError(name)
        return getattr(self.ds_engine, name)

    @property
    def apb_config(self) -> APBConfig:
        return self.engine.config

    @property
    def cp_size(self) -> int:
        return dist.get_world_size(self.cp_group)

    def _check_length(self, n: int, what: str):
        if self.max_out_tokens is not None and n > self.max_out_tokens:
            raise ValueError(f"{what} ({n} tokens) exceeds the DeepSpeed config's max_out_tokens="
                             f"{self.max_out_tokens}; raise max_out_tokens or shorten the input")

    def forward(self, *inputs, **kwargs):
        """DeepSpeed's ``InferenceEngine.forward``: the model's own forward on every rank
        (exact attention, no CP; TP as DeepSpeed set it up)."""
        ids = inputs[0] if inputs else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            self._check_length(int(ids.shape[-1]), "the input")
        return self.ds_engine(*inputs, **kwargs)

    __call__ = forward

    def generate(self, document_ids, query_ids, sampling=None, **sampling_kwargs):
        """APB prefill of ``document_ids`` over the CP group, then the query and the answer
        decoded exactly; every rank returns the same
        :class:`~megatron_apb.inference.GenerationResult`.  ``sampling`` is a
        :class:`~megatron_apb.inference.SamplingConfig`, or give its fields as keywords."""
        if sampling is None:
            sampling = SamplingConfig(**sampling_kwargs)
        elif sampling_kwargs:
            raise TypeError("give either a SamplingConfig or its fields as keywords, not both")
        self._check_length(len(document_ids) + len(query_ids) + sampling.max_new_tokens,
                           "the prompt plus max_new_tokens")
        return self.engine.generate(document_ids, query_ids, sampling)


def _is_hf_causal_lm(model) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type") and hasattr(model, "get_output_embeddings")


def _setdefault_dtype(ds_config, model):
    """DeepSpeed's default dtype is fp16; keep the model's own unless the config says."""
    if "dtype" not in ds_config:
        ds_config["dtype"] = next(model.parameters()).dtype


def init_inference(
    model,
    config=None,
    *,
    cp_group=None,
    tp_group=None,
    vocab_size: Optional[int] = None,
    pad_id: int = 0,
    progress=None,
    **ds_kwargs,
) -> APBInferenceEngine:
    """``deepspeed.init_inference`` with APB context parallelism.

    Args:
        model: a Megatron-Core ``GPTModel`` (tensor-parallel already, any layer spec with
            Megatron's ``SelfAttention``), or a Hugging Face Llama/Qwen2/Mistral
            ``*ForCausalLM`` (unsharded; DeepSpeed shards it).
        config: DeepSpeed inference config (dict or JSON path) with an ``"apb"`` section
            (keys: ``APB_SECTION_KEYS``: every APBConfig field, ``cp_size``, ``heads``).
        cp_group, tp_group: process groups to use; by default a ``[dp, cp, tp]`` rank
            grid is made (TP: the Megatron model's own group, or DeepSpeed's ``tp_size``).
        vocab_size: the tokenizer's vocabulary (default: the model's, unpadded for HF).
        pad_id, progress: as :class:`~megatron_apb.inference.APBEngine`.
        ds_kwargs: more DeepSpeed config entries, merged as ``deepspeed.init_inference``
            merges its keyword arguments.
    Returns:
        an :class:`APBInferenceEngine`.
    """
    section, ds_config = split_config({} if config is None else config)
    for key, value in ds_kwargs.items():
        if key in ds_config and ds_config[key] != value:
            raise APBConfigError(
                f"conflicting DeepSpeed setting {key!r}: config {ds_config[key]!r}, keyword {value!r}"
            )
        ds_config[key] = value
    check_deepspeed_keys(ds_config)  # the keywords too
    # a stalled peer fails our collectives naming them; with "timeout" set, the watchdog also
    # ends the process when any other torch.distributed call stalls that long
    set_collective_timeout(DEFAULT_TIMEOUT_S if section.timeout is None else section.timeout)
    if section.timeout is not None:
        start_watchdog(section.timeout)
    init_torch_distributed()
    init_deepspeed_comm()
    if isinstance(model, GPTModel):
        return _init_megatron(model, section, ds_config, cp_group, tp_group, vocab_size, pad_id, progress)
    if _is_hf_causal_lm(model):
        return _init_hf(model, section, ds_config, cp_group, tp_group, vocab_size, pad_id, progress)
    raise APBConfigError(
        f"init_inference takes a Megatron-Core GPTModel or a Hugging Face Llama-family "
        f"*ForCausalLM, got {type(model).__name__}"
    )


def _init_megatron(model, section, ds_config, cp_group, tp_group, vocab_size, pad_id, progress):
    engine_config, cp_group, tp_group = setup_megatron_model(model, section, ds_config, cp_group, tp_group)
    prepare_model(model)
    _setdefault_dtype(ds_config, model)
    ds_engine = deepspeed.init_inference(model, config=ds_config)
    vocab_size = vocab_size or model.vocab_size
    engine = APBEngine(
        ds_engine.module, engine_config, cp_group=cp_group, tp_group=tp_group,
        vocab_size=vocab_size, pad_id=pad_id, progress=progress,
    )
    return APBInferenceEngine(ds_engine, engine, kind="megatron", cp_group=cp_group, tp_group=tp_group,
                              vocab_size=vocab_size, max_out_tokens=max_out_tokens_of(ds_config))


def _init_hf(model, section, ds_config, cp_group, tp_group, vocab_size, pad_id, progress):
    tp_size = tp_size_of(ds_config)
    cp_group, tp_group = make_groups(tp_size, section.cp_size, cp_group, tp_group)
    heads = None if section.heads is None else read_retaining_heads(section.heads)
    tensor_parallel = dict(ds_config.pop("tensor_parallel", None) or ds_config.pop("tp", None) or {})
    if tp_size > 1:
        # DeepSpeed's public TP settings: our TP group (its own default would be ranks
        # 0..tp-1, wrong once CP > 1); no injection_policy given -> DeepSpeed's AutoTP
        tensor_parallel.update(tp_size=tp_size, tp_group=tp_group, mpu=ModelParallelUnit(tp_group))
    ds_config["tensor_parallel"] = tensor_parallel
    _setdefault_dtype(ds_config, model)
    ds_engine = deepspeed.init_inference(model, config=ds_config)
    # APB attention goes in after DeepSpeed has sharded the projections, so that AutoTP
    # leaves the retaining heads (whole per TP rank's heads) alone
    view = HFModelForAPB(model, section.apb_config, cp_group=cp_group, tp_group=tp_group, heads=heads)
    vocab_size = vocab_size or view.vocab_size
    engine = APBEngine(
        view, view.apb_config, cp_group=cp_group, tp_group=tp_group,
        vocab_size=vocab_size, pad_id=pad_id, progress=progress,
    )
    return APBInferenceEngine(ds_engine, engine, kind="hf", cp_group=cp_group, tp_group=tp_group,
                              vocab_size=vocab_size, max_out_tokens=max_out_tokens_of(ds_config))
