"""``init_inference``: ``deepspeed.init_inference`` with APB context parallelism.

DeepSpeed's inference engine offers tensor parallelism (kernel injection, an injection
policy, or AutoTP), dtype conversion and CUDA graphs, but no way to split a long *prompt*
across GPUs.  :func:`init_inference` swaps APB attention into the model over a CP group it
creates (or is given), hands the rest of the config to ``deepspeed.init_inference`` and
returns an :class:`APBInferenceEngine` whose ``generate(document_ids, query_ids,
sampling)`` runs the APB prefill over the CP group and exact distributed decoding.

Two kinds of model:

* **Megatron-Core ``GPTModel``** (built with Megatron's own layer spec, or with
  ``get_gpt_layer_apb_spec``): Megatron does the tensor parallelism, so DeepSpeed's
  ``tensor_parallel.tp_size`` must stay 1; DeepSpeed converts the dtype and places the model.
* **Hugging Face Llama-family ``*ForCausalLM``** (``llama``, ``qwen2``, ``mistral``): the
  attention layers are replaced in place (:mod:`megatron_apb.integrations.hf`); DeepSpeed
  shards the projections and MLPs by its injection policy (``{DecoderLayer:
  ("self_attn.o_proj", "mlp.down_proj")}``, set here when ``tp_size > 1``) over a TP group
  of the ``[cp, tp]`` rank grid.
"""

from __future__ import annotations

from typing import Optional

import deepspeed
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel

from ...comm import DEFAULT_TIMEOUT_S, set_collective_timeout, start_watchdog
from ...config import APBConfig
from ...errors import APBConfigError
from ...heads import read_retaining_heads
from ...inference import APBEngine, SamplingConfig
from ...megatron import prepare_model
from ..hf import HFModelForAPB
from .config import split_config, tp_size_of
from .groups import ModelParallelUnit, init_deepspeed_comm, init_torch_distributed, make_groups
from .megatron_model import setup_megatron_model


class APBInferenceEngine:
    """What :func:`init_inference` returns.

    Attributes:
        module: DeepSpeed's ``InferenceEngine`` (wrapping the model as DeepSpeed left it).
        engine: the :class:`~megatron_apb.inference.APBEngine` that runs generation.
        apb_config, cp_group, tp_group, kind (``"megatron"`` or ``"hf"``), vocab_size.
    """

    def __init__(self, module, engine, *, kind: str, cp_group, tp_group, vocab_size: int):
        self.module, self.engine, self.kind = module, engine, kind
        self.cp_group, self.tp_group, self.vocab_size = cp_group, tp_group, vocab_size

    @property
    def apb_config(self) -> APBConfig:
        return self.engine.config

    @property
    def cp_size(self) -> int:
        return dist.get_world_size(self.cp_group)

    def generate(self, document_ids, query_ids, sampling=None, **sampling_kwargs):
        """APB prefill of ``document_ids`` over the CP group, then the query and the answer
        decoded exactly; every rank returns the same
        :class:`~megatron_apb.inference.GenerationResult`.  ``sampling`` is a
        :class:`~megatron_apb.inference.SamplingConfig`, or give its fields as keywords."""
        if sampling is None:
            sampling = SamplingConfig(**sampling_kwargs)
        elif sampling_kwargs:
            raise TypeError("give either a SamplingConfig or its fields as keywords, not both")
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
                              vocab_size=vocab_size)


def _init_hf(model, section, ds_config, cp_group, tp_group, vocab_size, pad_id, progress):
    tp_size = tp_size_of(ds_config)
    cp_group, tp_group = make_groups(tp_size, section.cp_size, cp_group, tp_group)
    heads = None if section.heads is None else read_retaining_heads(section.heads)
    tensor_parallel = dict(ds_config.get("tensor_parallel") or {})
    if tp_size > 1:
        # DeepSpeed would otherwise make its TP group of ranks 0..tp-1, wrong once CP > 1
        tensor_parallel.update(tp_size=tp_size, tp_group=tp_group, mpu=ModelParallelUnit(tp_group))
        if not ds_config.get("injection_policy"):
            layer_cls = type(model.model.layers[0])
            ds_config["injection_policy"] = {layer_cls: ("self_attn.o_proj", "mlp.down_proj")}
    ds_config["tensor_parallel"] = tensor_parallel
    _setdefault_dtype(ds_config, model)
    ds_engine = deepspeed.init_inference(model, config=ds_config)
    # APB attention goes in after DeepSpeed has sharded the projections, so that its
    # injection policy leaves the retaining heads (whole per TP rank's heads) alone
    view = HFModelForAPB(model, section.apb_config, cp_group=cp_group, tp_group=tp_group, heads=heads)
    vocab_size = vocab_size or view.vocab_size
    engine = APBEngine(
        view, view.apb_config, cp_group=cp_group, tp_group=tp_group,
        vocab_size=vocab_size, pad_id=pad_id, progress=progress,
    )
    return APBInferenceEngine(ds_engine, engine, kind="hf", cp_group=cp_group, tp_group=tp_group,
                              vocab_size=vocab_size)
