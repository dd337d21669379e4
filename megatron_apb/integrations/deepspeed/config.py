"""The ``"apb"`` section of a DeepSpeed inference config.

Its keys are every :class:`~megatron_apb.config.APBConfig` field (read by
:func:`megatron_apb.configargs.config_from_mapping`, so a new field is a new key at once)
plus two of the integration's own: ``cp_size`` (context-parallel ranks; default world /
TP) and ``heads`` (a retaining-head checkpoint; alone, it selects
``"compressor": "retaining_head"``).  Unknown keys are refused with the list of valid ones.
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
    DeepSpeed settings that would remove APB (``replace_with_kernel_inject``).
    """
    ds_config = _load(config)
    if "apb" not in ds_config:
        raise APBConfigError(
            'the DeepSpeed config has no "apb" section; add one, e.g. '
            '"apb": {"mode": "apb", "cp_size": 2}'
        )
    section = read_section(ds_config.pop("apb"))
    if ds_config.get("replace_with_kernel_inject"):
        raise APBConfigError(
            'DeepSpeed config: "replace_with_kernel_inject": true replaces the attention with '
            "DeepSpeed's fused kernels, which would remove APB; set it to false (DeepSpeed's "
            "tensor parallelism still applies through tensor_parallel.tp_size)"
        )
    return section, ds_config


def tp_size_of(ds_config) -> int:
    """DeepSpeed's ``tensor_parallel.tp_size`` (1 when unset)."""
    tp = ds_config.get("tensor_parallel") or {}
    if not isinstance(tp, Mapping):  # a DeepSpeedTPConfig object
        tp = {"tp_size": getattr(tp, "tp_size", 1)}
    size = tp.get("tp_size", 1) or 1
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise APBConfigError(f"DeepSpeed config: tensor_parallel.tp_size must be a positive int, got {size!r}")
    return size
