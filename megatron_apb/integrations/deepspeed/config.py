"""The ``"apb"`` section of a DeepSpeed inference config.

Its keys are every :class:`~megatron_apb.config.APBConfig` field (read by
:func:`megatron_apb.configargs.config_from_mapping`, so a new field is a new key at once)
plus three of the integration's own: ``cp_size`` (context-parallel ranks; default world /
TP), ``heads`` (a retaining-head checkpoint; alone, it selects
``"compressor": "retaining_head"``) and ``timeout``.  Unknown keys are refused with the
list of valid ones.

The rest of the config goes to ``deepspeed.init_inference``.  Each of its keys is either
honoured (:data:`DS_HONOURED`) or refused with the reason (:data:`DS_REFUSED`, unless set
to DeepSpeed's default, which changes nothing); a key in neither table is refused as
unknown.  ``tests/test_deepspeed.py`` checks that the two tables cover every field (and
alias) of the installed DeepSpeed's ``DeepSpeedInferenceConfig``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from ...config import APBConfig
from ...configargs import config_from_mapping, option_names
from ...errors import APBConfigError

#: where errors about the section say they come from
SECTION = 'DeepSpeed config, "apb" section'
#: keys of the ``"apb"`` section that go to :class:`~megatron_apb.config.APBConfig`
APB_CONFIG_KEYS = option_names()
#: the section's own keys (not APBConfig fields)
EXTRA_KEYS = ("cp_size", "heads", "timeout")
#: every key of the ``"apb"`` section
APB_SECTION_KEYS = EXTRA_KEYS + APB_CONFIG_KEYS


@dataclass(frozen=True)
class APBSection:
    """The validated ``"apb"`` section: APB settings, CP size (None: world / TP) and the
    retaining-head checkpoint (None: none); ``timeout``: seconds a collective may wait for
    the other ranks before it fails naming the operation (the command line's ``--timeout``;
    None: ``comm.DEFAULT_TIMEOUT_S``)."""

    apb_config: APBConfig
    cp_size: Optional[int] = None
    heads: Optional[str] = None
    timeout: Optional[float] = None


#: DeepSpeed inference keys that take effect (aliases beside their names)
DS_HONOURED = {
    "dtype": "the model's dtype (default here: the model's own, not DeepSpeed's fp16)",
    "tensor_parallel": "tp_size: DeepSpeed's AutoTP (or the injection_policy given) over this rank's TP "
                       "group of the [dp, cp, tp] rank grid; tp_grain_size: AutoTP's shard granularity",
    "tp": "alias of tensor_parallel",
    "injection_policy": "DeepSpeed's TP by this policy instead of AutoTP (Hugging Face models)",
    "injection_dict": "alias of injection_policy",
    "keep_module_on_host": "the model stays in host memory",
    "max_out_tokens": "prompt + generated tokens (generate) and input tokens (forward) are refused above it",
    "max_tokens": "alias of max_out_tokens",
    "replace_with_kernel_inject": "false only (kernel injection replaces the attention APB runs in)",
    "kernel_inject": "alias of replace_with_kernel_inject",
}
_KERNELS = ("belongs to DeepSpeed's kernel injection, which would replace the attention APB runs in; "
            "remove it")
_CHECKPOINT = ("is DeepSpeed's checkpoint loading for kernel injection and meta-device models; load the "
               "weights into the model (from_pretrained, megatron-apb convert) before init_inference")
_MOE = "configures DeepSpeed MoE layers; the models APB serves (dense GPT, Llama, Qwen2, Mistral) have none"
#: DeepSpeed inference keys refused unless at DeepSpeed's default: key -> (defaults, why)
DS_REFUSED = {
    "enable_cuda_graph": ((False,), "would capture the module's forward in one CUDA graph; APB's prefill "
                          "runs collectives over the CP group and its decoder replays CUDA graphs of its "
                          "own where a step has none; set it to false"),
    "use_triton": ((False,), _KERNELS),
    "triton_autotune": ((False,), _KERNELS),
    "triangular_masking": ((True,), _KERNELS),
    "tm": ((True,), _KERNELS),
    "min_out_tokens": ((1,), _KERNELS),
    "min_tokens": ((1,), _KERNELS),
    "transposed_mode": ((False,), _KERNELS),
    "return_tuple": ((True,), _KERNELS),
    "replace_method": (("auto", ""), _KERNELS),
    "config": ((None,), _KERNELS),
    "args": ((None,), _KERNELS),
    "injection_policy_tuple": ((None,), "is set by DeepSpeed itself; give injection_policy"),
    "quant": (({}, {"enabled": False}), "quantizes through DeepSpeed's injected kernels, which would "
              "replace the attention APB runs in; remove it"),
    "zero": (({},), "ZeRO-Inference offload is not combined with APB; remove it"),
    "checkpoint": ((None,), _CHECKPOINT),
    "base_dir": (("",), _CHECKPOINT),
    "checkpoint_config": (({},), _CHECKPOINT),
    "ckpt_config": (({},), _CHECKPOINT),
    "save_mp_checkpoint_path": ((None,), _CHECKPOINT),
    "training_mp_size": ((1,), _CHECKPOINT),
    "set_empty_params": ((False,), _CHECKPOINT),
    "moe": (({}, False), _MOE),
    "ep_size": ((1,), _MOE),
    "ep_group": ((None,), _MOE),
    "expert_group": ((None,), _MOE),
    "ep_mp_group": ((None,), _MOE),
    "moe_experts": (([1],), _MOE),
    "expert_mp_group": ((None,), _MOE),
    "moe_type": (("standard",), _MOE),
    "mp_size": ((1,), "is deprecated in DeepSpeed; use tensor_parallel.tp_size"),
    "mpu": ((None,), "is deprecated in DeepSpeed; pass the TP group as init_inference(..., tp_group=...)"),
}
#: keys of ``tensor_parallel`` and what becomes of them
DS_TP_KEYS = {
    "enabled": "true only: APB's TP group is DeepSpeed's",
    "tp_size": "honoured (AutoTP)",
    "tp_grain_size": "honoured (AutoTP)",
    "mpu": "refused: pass the group as init_inference(..., tp_group=...)",
    "tp_group": "refused: pass the group as init_inference(..., tp_group=...)",
}


def check_deepspeed_keys(ds_config: Mapping[str, Any]) -> None:
    """Refuse, naming the key and the fix, every DeepSpeed inference key that this
    integration would not honour (see :data:`DS_HONOURED`, :data:`DS_REFUSED`)."""
    for key, value in ds_config.items():
        if key in DS_HONOURED:
            continue
        if key in DS_REFUSED:
            defaults, why = DS_REFUSED[key]
            if not any(value == d and type(value) is type(d) for d in defaults):
                raise APBConfigError(f"DeepSpeed config: {key!r}={value!r} {why}")
            continue
        raise APBConfigError(
            f"DeepSpeed config: unknown inference key {key!r}; keys taken: "
            f"{', '.join(sorted(DS_HONOURED))} (and {', '.join(sorted(DS_REFUSED))} at DeepSpeed's defaults)"
        )
    if ds_config.get("replace_with_kernel_inject") or ds_config.get("kernel_inject"):
        raise APBConfigError(
            'DeepSpeed config: "replace_with_kernel_inject": true replaces the attention with '
            "DeepSpeed's fused kernels, which would remove APB; set it to false (DeepSpeed's "
            "tensor parallelism still applies through tensor_parallel.tp_size)"
        )
    tp = ds_config.get("tensor_parallel", ds_config.get("tp"))
    if isinstance(tp, Mapping):
        for key, value in tp.items():
            if key not in DS_TP_KEYS:
                raise APBConfigError(f"DeepSpeed config: unknown tensor_parallel key {key!r}; "
                                     f"valid: {', '.join(DS_TP_KEYS)}")
            if key in ("mpu", "tp_group") and value is not None:
                raise APBConfigError(f"DeepSpeed config: tensor_parallel.{key} is made from APB's [dp, cp, tp] "
                                     "rank grid; pass a TP group of your own as init_inference(..., tp_group=...)")
            if key == "enabled" and value is not True:
                raise APBConfigError("DeepSpeed config: tensor_parallel.enabled must stay true (set tp_size 1 "
                                     "for no tensor parallelism)")
    max_out = ds_config.get("max_out_tokens", ds_config.get("max_tokens"))
    if max_out is not None and (isinstance(max_out, bool) or not isinstance(max_out, int) or max_out < 1):
        raise APBConfigError(f"DeepSpeed config: max_out_tokens must be a positive int, got {max_out!r}")


def max_out_tokens_of(ds_config) -> Optional[int]:
    """``max_out_tokens`` (or its alias ``max_tokens``) when the config sets it, else None."""
    return ds_config.get("max_out_tokens", ds_config.get("max_tokens"))


def section_error(message: str) -> APBConfigError:
    return APBConfigError(f"{SECTION}: {message}")


def _load(config) -> Dict[str, Any]:
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
    return dict(config)


def read_section(section) -> APBSection:
    """The :class:`APBSection` of an ``"apb"`` mapping (see the module docstring)."""
    if not isinstance(section, Mapping):
        raise section_error(f"must be a JSON object, got {section!r}")
    unknown = sorted(set(section) - set(APB_SECTION_KEYS))
    if unknown:
        raise section_error(f"unknown key(s) {unknown}; valid keys: {', '.join(APB_SECTION_KEYS)}")
    cp_size = section.get("cp_size")
    if cp_size is not None and (isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1):
        raise section_error(f"cp_size must be a positive integer (context-parallel ranks), got {cp_size!r}")
    heads = section.get("heads")
    if heads is not None and not isinstance(heads, (str, os.PathLike)):
        raise section_error(f"heads must be the path of a safetensors file, got {heads!r}")
    timeout = section.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < float("inf")):
        raise section_error(f"timeout must be a number of seconds > 0, got {timeout!r}")
    fields = {k: v for k, v in section.items() if k not in EXTRA_KEYS}
    if heads is not None:
        fields.setdefault("compressor", "retaining_head")
    apb_config = config_from_mapping(fields, where=SECTION)
    if apb_config.needs_retaining_heads and heads is None:
        raise section_error(
            'compressor "retaining_head" needs trained heads: add "heads": '
            '"/path/to/heads.safetensors", or use "compressor": "query_attention"'
        )
    if heads is not None and not os.path.isfile(os.fspath(heads)):
        raise section_error(f"heads file {os.fspath(heads)!r} does not exist")
    return APBSection(apb_config, cp_size, None if heads is None else os.fspath(heads),
                      None if timeout is None else float(timeout))


def split_config(config) -> Tuple[APBSection, Dict[str, Any]]:
    """Read a DeepSpeed inference config (dict or path to a JSON file) with an ``"apb"``
    section; returns ``(apb_section, the rest of the DeepSpeed config)``.

    Raises :class:`~megatron_apb.errors.APBConfigError` naming the key and the fix for a
    missing or malformed section, unknown keys (listing the valid ones), bad values, and
    DeepSpeed settings this integration would not honour (:func:`check_deepspeed_keys`).
    """
    ds_config = _load(config)
    if "apb" not in ds_config:
        raise APBConfigError(
            'the DeepSpeed config has no "apb" section; add one, e.g. '
            '"apb": {"mode": "apb", "cp_size": 2}'
        )
    section = read_section(ds_config.pop("apb"))
    check_deepspeed_keys(ds_config)
    return section, ds_config


def tp_size_of(ds_config) -> int:
    """DeepSpeed's ``tensor_parallel.tp_size`` (1 when unset)."""
    tp = ds_config.get("tensor_parallel", ds_config.get("tp")) or {}
    if not isinstance(tp, Mapping):  # a DeepSpeedTPConfig object
        tp = {"tp_size": getattr(tp, "tp_size", 1)}
    size = tp.get("tp_size", 1) or 1
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise APBConfigError(f"DeepSpeed config: tensor_parallel.tp_size must be a positive int, got {size!r}")
    return size
