"""DeepSpeed inference with APB context parallelism.

DeepSpeed's inference engine (``deepspeed.init_inference``) offers tensor parallelism
(kernel injection, an injection policy, or AutoTP), dtype conversion and CUDA graphs, but
no way to split a long *prompt* across GPUs: its sequence parallelism (Ulysses) is a
training feature.  :func:`init_inference` adds that: it takes a DeepSpeed inference config
(a dict or a JSON file) with one extra section, ``"apb"``::

    {
      "dtype": "bf16",
      "tensor_parallel": {"tp_size": 2},
      "apb": {
        "mode": "apb",              # apb | star | exact | ulysses
        "cp_size": 2,               # context-parallel ranks (default: world / tp_size)
        "anchor_len": 4096,         # optional; default block/4
        "passing_len": 2048,        # optional; default block/8
        "compressor": "query_attention",   # retaining_head | query_attention | random
        "heads": "/ckpt/retaining_heads.safetensors"   # needed by retaining_head
      }
    }

It swaps APB attention into the model over a CP group it creates (or is given), hands the
rest of the config to ``deepspeed.init_inference`` and returns an
:class:`APBInferenceEngine` whose ``generate(document_ids, query_ids, sampling)`` runs the
APB prefill over the CP group and exact distributed decoding.

Two kinds of model:

* **Megatron-Core ``GPTModel``** (built with Megatron's own layer spec, or with
  ``get_gpt_layer_apb_spec``): Megatron does the tensor parallelism, so DeepSpeed's
  ``tensor_parallel.tp_size`` must stay 1; DeepSpeed converts the dtype and places the model.
* **Hugging Face Llama-family ``*ForCausalLM``** (``llama``, ``qwen2``, ``mistral``): the
  attention layers are replaced in place (:mod:`megatron_apb.hf_model`); DeepSpeed shards
  the projections and MLPs by its injection policy (``{DecoderLayer: ("self_attn.o_proj",
  "mlp.down_proj")}``, set here when ``tp_size > 1``) over a TP group of the ``[cp, tp]``
  rank grid.

Ranks are laid out as ``arange(world).view(dp, cp, tp)`` (TP fastest, as Megatron).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from .config import APBConfig, APBConfigError

#: keys of the ``"apb"`` section that go to :class:`~megatron_apb.config.APBConfig`
APB_CONFIG_KEYS = (
    "mode", "anchor_len", "passing_len", "anchor_ratio", "passing_ratio", "query_in_anchor",
    "query_prefix_len", "compressor", "retaining_head_hidden", "smoothing_kernel", "backend", "seed",
)
#: the other keys of the ``"apb"`` section
APB_SECTION_KEYS = ("cp_size", "heads") + APB_CONFIG_KEYS


@dataclass(frozen=True)
class APBSection:
    """The validated ``"apb"`` section: APB settings, CP size (None: world / TP) and the
    retaining-head checkpoint (None: none)."""

    apb_config: APBConfig
    cp_size: Optional[int] = None
    heads: Optional[str] = None


def _section_error(message: str) -> APBConfigError:
    return APBConfigError(f'DeepSpeed config, "apb" section: {message}')


def split_config(config) -> Tuple[APBSection, Dict[str, Any]]:
    """Read a DeepSpeed inference config (dict or path to a JSON file) with an ``"apb"``
    section; returns ``(apb_section, the rest of the DeepSpeed config)``.

    Raises :class:`~megatron_apb.config.APBConfigError` naming the key and the fix for a
    missing or malformed section, unknown keys, bad values, and DeepSpeed settings that
    would remove APB (``replace_with_kernel_inject``).
    """
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DeepSpeed config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as exc:
                raise APBConfigError(f"DeepSpeed config {path!r} is not valid JSON: {exc}") from None
    if not isinstance(config, Mapping):
        raise APBConfigError(
            f"the DeepSpeed config must be a dict or the path of a JSON file, got {type(config).__name__}"
        )
    ds_config = dict(config)
    if "apb" not in ds_config:
        raise APBConfigError(
            'the DeepSpeed config has no "apb" section; add one, e.g. '
            '"apb": {"mode": "apb", "cp_size": 2}'
        )
    section = ds_config.pop("apb")
    if not isinstance(section, Mapping):
        raise _section_error(f"must be a JSON object, got {section!r}")
    unknown = sorted(set(section) - set(APB_SECTION_KEYS))
    if unknown:
        raise _section_error(f"unknown key(s) {unknown}; known keys: {', '.join(APB_SECTION_KEYS)}")
    cp_size = section.get("cp_size")
    if cp_size is not None and (isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1):
        raise _section_error(f"cp_size must be a positive integer (context-parallel ranks), got {cp_size!r}")
    heads = section.get("heads")
    if heads is not None and not isinstance(heads, (str, os.PathLike)):
        raise _section_error(f"heads must be the path of a safetensors file, got {heads!r}")
    fields = {k: section[k] for k in APB_CONFIG_KEYS if k in section}
    if heads is not None and "compressor" not in fields:
        fields["compressor"] = "retaining_head"
    try:
        apb_config = APBConfig(**fields)
    except APBConfigError as exc:
        raise _section_error(str(exc)) from None
    except TypeError as exc:  # e.g. a string where a number belongs
        raise _section_error(f"bad value: {exc}") from None
    if apb_config.mode == "apb" and apb_config.compressor == "retaining_head":
        if heads is None:
            raise _section_error(
                'compressor "retaining_head" needs trained heads: add "heads": '
                '"/path/to/heads.safetensors", or use "compressor": "query_attention"'
            )
    if heads is not None and not os.path.isfile(os.fspath(heads)):
        raise _section_error(f"heads file {os.fspath(heads)!r} does not exist")
    if ds_config.get("replace_with_kernel_inject"):
        raise APBConfigError(
            'DeepSpeed config: "replace_with_kernel_inject": true replaces the attention with '
            "DeepSpeed's fused kernels, which would remove APB; set it to false (DeepSpeed's "
            "tensor parallelism still applies through tensor_parallel.tp_size)"
        )
    return APBSection(apb_config, cp_size, None if heads is None else os.fspath(heads)), ds_config


def _tp_size_of(ds_config) -> int:
    tp = ds_config.get("tensor_parallel") or {}
    if not isinstance(tp, Mapping):  # a DeepSpeedTPConfig object
        tp = {"tp_size": getattr(tp, "tp_size", 1)}
    size = tp.get("tp_size", 1) or 1
    if not isinstance(size, int) or size < 1:
        raise APBConfigError(f"DeepSpeed config: tensor_parallel.tp_size must be a positive int, got {size!r}")
    return size


# ---------------------------------------------------------------------------------- groups
def _ranks(group):
    return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))


def _groups(tp: int, cp: Optional[int], cp_group, tp_group):
    """(cp_group, tp_group) of this rank: the given ones (checked), else a ``[dp, cp, tp]``
    rank grid (created collectively: every rank calls this)."""
    from .comm import group_size
    from .megatron.models import rank_grid_groups

    world = dist.get_world_size()
    if cp_group is not None:
        if cp is not None and group_size(cp_group) != cp:
            raise _section_error(
                f"cp_size={cp} but the cp_group given has {group_size(cp_group)} ranks; "
                "make them agree or leave cp_size out"
            )
        if tp_group is not None and group_size(tp_group) != tp:
            raise APBConfigError(
                f"the tp_group given has {group_size(tp_group)} ranks but the model's tensor "
                f"parallelism is {tp}"
            )
        if tp_group is None and tp > 1:
            raise APBConfigError("a cp_group was given for a tensor-parallel model: give its tp_group too")
        return cp_group, tp_group
    if cp is None:
        if world % tp:
            raise APBConfigError(f"the world size {world} is not a multiple of the TP size {tp}")
        cp = world // tp
    if world % (tp * cp):
        raise _section_error(
            f"cp_size={cp} x TP {tp} = {cp * tp} does not divide the {world} processes; "
            f"launch a multiple of {cp * tp} processes or pick cp_size among "
            f"{[c for c in range(1, world // tp + 1) if (world // tp) % c == 0] if world % tp == 0 else []}"
        )
    pg = rank_grid_groups(tp, cp)
    if tp_group is not None and _ranks(tp_group) != _ranks(pg.tp):
        raise APBConfigError(
            f"the model's TP group holds ranks {_ranks(tp_group)} but the [dp, cp, tp] rank grid "
            f"puts this rank's TP peers at {_ranks(pg.tp)}; lay the model's TP groups out with TP "
            "fastest (as Megatron) or pass cp_group explicitly"
        )
    return pg.cp, (tp_group if tp_group is not None else pg.tp)


@contextlib.contextmanager
def _no_shm_allreduce():
    """Build DeepSpeed's communication backend without its CPU shared-memory all-reduce.

    On CPU, DeepSpeed routes the all-reduce of its tensor-parallel layers to a shared-memory
    op that reduces over *every* process, whatever group it is given (wrong as soon as
    CP > 1); on our CI machine it also crashed.  Without it, DeepSpeed falls back to
    ``torch.distributed.all_reduce`` on the TP group.
    """
    module = sys.modules.get("deepspeed.comm.torch")
    original = getattr(module, "build_shm_op", None)
    if original is not None:
        module.build_shm_op = lambda: None
    try:
        yield
    finally:
        if original is not None:
            module.build_shm_op = original


def _init_deepspeed_comm():
    """Initialise ``deepspeed.comm`` over the existing ``torch.distributed`` world."""
    import deepspeed
    import deepspeed.comm as ds_dist
    import deepspeed.comm.torch  # noqa: F401  (so the shm builder can be switched off)
    from deepspeed.accelerator import get_accelerator

    cpu = get_accelerator().device_name() == "cpu"
    if not ds_dist.is_initialized():
        backend = "gloo" if cpu else None  # DeepSpeed's CPU default, oneCCL, is optional
        with _no_shm_allreduce() if cpu else contextlib.nullcontext():
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
    backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
    if cpu and backend is not None and getattr(backend, "shm_vector_kernel_level", 0):
        backend.shm_vector_kernel_level = 0  # built by someone else: do not use it (see above)


def _init_torch_distributed():
    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


class _ModelParallelUnit:
    """The ``mpu`` DeepSpeed asks for: our TP group (and the CP x DP ranks as 'data')."""

    def __init__(self, tp_group):
        self.tp_group = tp_group

    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_rank(self):
        return dist.get_rank(self.tp_group)

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.tp_group)

    def get_data_parallel_group(self):
        return None

    def get_data_parallel_rank(self):
        return 0

    def get_data_parallel_world_size(self):
        return 1


# ---------------------------------------------------------------------------------- engine
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
        from .inference import SamplingConfig

        if sampling is None:
            sampling = SamplingConfig(**sampling_kwargs)
        elif sampling_kwargs:
            raise TypeError("give either a SamplingConfig or its fields as keywords, not both")
        return self.engine.generate(document_ids, query_ids, sampling)


def _is_megatron_gpt(model) -> bool:
    try:
        from megatron.core.models.gpt import GPTModel
    except ImportError:
        return False
    return isinstance(model, GPTModel)


def _is_hf_causal_lm(model) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type") and hasattr(model, "get_output_embeddings")


def _read_heads(path):
    if path is None:
        return None
    from .heads import read_retaining_heads

    return read_retaining_heads(path)


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
            (see the module docstring; keys: ``APB_SECTION_KEYS``).
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
            raise ValueError(f"conflicting DeepSpeed setting {key!r}: config {ds_config[key]!r}, keyword {value!r}")
        ds_config[key] = value
    import deepspeed

    _init_torch_distributed()
    _init_deepspeed_comm()
    if _is_megatron_gpt(model):
        return _init_megatron(deepspeed, model, section, ds_config, cp_group, tp_group, vocab_size, pad_id, progress)
    if _is_hf_causal_lm(model):
        return _init_hf(deepspeed, model, section, ds_config, cp_group, tp_group, vocab_size, pad_id, progress)
    raise APBConfigError(
        f"init_inference takes a Megatron-Core GPTModel or a Hugging Face Llama-family "
        f"*ForCausalLM, got {type(model).__name__}"
    )


def _init_megatron(deepspeed, model, section, ds_config, cp_group, tp_group, vocab_size, pad_id, progress):
    from .comm import group_size
    from .inference import APBEngine
    from .megatron import apb_modules, prepare_model

    tp_size = _tp_size_of(ds_config)
    if tp_size != 1 or ds_config.get("injection_policy"):
        raise APBConfigError(
            f"DeepSpeed config: tensor_parallel.tp_size={tp_size}"
            + (" and an injection_policy" if ds_config.get("injection_policy") else "")
            + " for a Megatron-Core model: Megatron already splits its layers over its TP group "
            "(build the model with tensor_model_parallel_size=N); set tp_size to 1 and drop "
            "injection_policy"
        )
    model_tp = tp_group if tp_group is not None else model.pg_collection.tp
    existing = apb_modules(model)
    if existing and cp_group is None:
        cp_group = existing[0].cp_group
    cp_group, model_tp = _groups(group_size(model_tp), section.cp_size, cp_group, model_tp)
    cp = group_size(cp_group)
    if existing:
        _check_existing(existing, cp_group, model_tp, section)
        engine_config = section.apb_config
        if section.heads is not None:
            engine_config = _load_megatron_heads(model, existing, section, model_tp)
    else:
        engine_config = _swap_megatron(model, section, cp_group, model_tp)
    prepare_model(model)
    _setdefault_dtype(ds_config, model)
    ds_engine = deepspeed.init_inference(model, config=ds_config)
    module = ds_engine.module
    engine = APBEngine(
        module, engine_config, cp_group=cp_group, tp_group=model_tp,
        vocab_size=vocab_size or model.vocab_size, pad_id=pad_id, progress=progress,
    )
    assert cp == engine.cp_size
    return APBInferenceEngine(ds_engine, engine, kind="megatron", cp_group=cp_group, tp_group=model_tp,
                              vocab_size=vocab_size or model.vocab_size)


def _check_existing(modules, cp_group, tp_group, section):
    from .comm import group_size

    core = modules[0]
    if _ranks(core.cp_group) != _ranks(cp_group):
        raise APBConfigError(
            f"the model's APB attention runs over CP ranks {_ranks(core.cp_group)}, not "
            f"{_ranks(cp_group)}: build it with the CP group you pass, or pass none"
        )
    if section.cp_size is not None and group_size(core.cp_group) != section.cp_size:
        raise _section_error(
            f"cp_size={section.cp_size} but the model was built with APB over "
            f"{group_size(core.cp_group)} CP ranks"
        )
    cfg = section.apb_config
    if cfg.mode == "apb" and cfg.compressor == "retaining_head" and core.retaining_head is None:
        raise _section_error(
            'compressor "retaining_head" but the model was built without retaining heads; '
            "build it with APBConfig(compressor='retaining_head') or use query_attention"
        )


def _heads_for_megatron(model, section, tp_group):
    """This TP rank's shards of the heads file, per layer, checked against the model."""
    from .comm import group_rank, group_size
    from .compress import shard_retaining_head

    heads = _read_heads(section.heads)
    c = model.config
    layers = list(model.decoder.layers)
    missing = sorted(set(range(len(layers))) - set(heads))
    if missing:
        raise _section_error(f"the retaining-head checkpoint {section.heads} lacks layers {missing}")
    shards = {}
    for i in range(len(layers)):
        try:
            shards[i] = shard_retaining_head(
                *heads[i], num_heads=c.num_attention_heads, num_kv_heads=c.num_query_groups,
                head_dim=c.kv_channels, tp_rank=group_rank(tp_group), tp_size=group_size(tp_group),
            )
        except ValueError as exc:
            raise _section_error(f"heads file {section.heads}, layer {i}: {exc}") from None
    return shards


def _copy_heads(cores, shards, section):
    with torch.no_grad():
        for i, core in enumerate(cores):
            fc1, fc2 = shards[i]
            if core.retaining_head.fc1.weight.shape != fc1.shape:
                raise _section_error(
                    f"heads file {section.heads}: layer {i} fc1 shard {tuple(fc1.shape)} does not "
                    f"fit the model's retaining head {tuple(core.retaining_head.fc1.weight.shape)} "
                    "(hidden width differs)"
                )
            core.retaining_head.fc1.weight.copy_(fc1)
            core.retaining_head.fc2.weight.copy_(fc2)


def _load_megatron_heads(model, cores, section, tp_group):
    if any(c.retaining_head is None for c in cores):
        raise _section_error(
            f"heads {section.heads} given but the model was built without retaining heads; build it "
            "with APBConfig(compressor='retaining_head', retaining_head_hidden=<the file's width>)"
        )
    _copy_heads(cores, _heads_for_megatron(model, section, tp_group), section)
    return section.apb_config.replace(retaining_head_hidden=cores[0].retaining_head.fc1.weight.shape[0])


def _swap_megatron(model, section, cp_group, tp_group) -> APBConfig:
    """Put APB attention into every layer of a GPTModel built with Megatron's own spec."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.attention import SelfAttention

    from .comm import group_size
    from .megatron.core_attention import APBSelfAttention
    from .megatron.spec import bind_core_attention

    apb_config = section.apb_config
    shards = None
    if apb_config.mode == "apb" and apb_config.compressor == "retaining_head":
        shards = _heads_for_megatron(model, section, tp_group)
        apb_config = apb_config.replace(retaining_head_hidden=int(shards[0][0].shape[0]))
    layers = list(model.decoder.layers)
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attention", None)
        if type(attn) is not SelfAttention:
            raise APBConfigError(
                f"layer {i}: cannot swap APB attention into {type(attn).__name__}; init_inference "
                "takes GPTModels whose layers use Megatron's SelfAttention (or built with "
                "megatron_apb.get_gpt_layer_apb_spec)"
            )
    # Megatron sizes rotary tables and checks from context_parallel_size; the config object
    # is shared by every module of the model
    model.config.context_parallel_size = group_size(cp_group)
    core_cls = bind_core_attention(apb_config)
    pg = ProcessGroupCollection(tp=tp_group, cp=cp_group)
    cores = []
    for layer in layers:
        attn = layer.self_attention
        device = next(attn.parameters()).device
        core = core_cls(
            config=attn.config, layer_number=attn.layer_number, attn_mask_type=attn.attn_mask_type,
            attention_type="self", pg_collection=pg,
        ).to(device)
        attn.core_attention = core
        attn.__class__ = APBSelfAttention  # a SelfAttention that hands RoPE to the core
        cores.append(core)
    if shards is not None:
        _copy_heads(cores, shards, section)
    return apb_config


def _init_hf(deepspeed, model, section, ds_config, cp_group, tp_group, vocab_size, pad_id, progress):
    from .hf_model import HFModelForAPB
    from .inference import APBEngine

    tp_size = _tp_size_of(ds_config)
    cp_group, tp_group = _groups(tp_size, section.cp_size, cp_group, tp_group)
    heads = _read_heads(section.heads)
    tensor_parallel = dict(ds_config.get("tensor_parallel") or {})
    if tp_size > 1:
        # DeepSpeed would otherwise make its TP group of ranks 0..tp-1, wrong once CP > 1
        tensor_parallel.update(tp_size=tp_size, tp_group=tp_group, mpu=_ModelParallelUnit(tp_group))
        if not ds_config.get("injection_policy"):
            layer_cls = type(model.model.layers[0])
            ds_config["injection_policy"] = {layer_cls: ("self_attn.o_proj", "mlp.down_proj")}
    ds_config["tensor_parallel"] = tensor_parallel
    _setdefault_dtype(ds_config, model)
    ds_engine = deepspeed.init_inference(model, config=ds_config)
    # APB attention goes in after DeepSpeed has sharded the projections, so that its
    # injection policy leaves the retaining heads (whole per TP rank's heads) alone
    view = HFModelForAPB(model, section.apb_config, cp_group=cp_group, tp_group=tp_group, heads=heads)
    engine = APBEngine(
        view, view.apb_config, cp_group=cp_group, tp_group=tp_group,
        vocab_size=vocab_size or view.vocab_size, pad_id=pad_id, progress=progress,
    )
    return APBInferenceEngine(ds_engine, engine, kind="hf", cp_group=cp_group, tp_group=tp_group,
                              vocab_size=vocab_size or view.vocab_size)
