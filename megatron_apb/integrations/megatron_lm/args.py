"""The ``--apb-*`` flags and ``APB_*`` environment variables of the Megatron-LM hooks.

Both are generated from :class:`~megatron_apb.config.APBConfig`'s fields
(:mod:`megatron_apb.configargs`): the field ``anchor_len`` is ``--apb-anchor-len`` and
``APB_ANCHOR_LEN``, and a new field gets its flag and variable at once.  Two more belong to
this integration: ``--apb-heads`` / ``APB_HEADS`` (trained retaining heads; alone they select
``compressor='retaining_head'``) and ``--apb-query-tokens`` (text generation server).
Precedence: flags over variables over ``APBConfig``'s defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Optional

from ...config import APBConfig
from ...configargs import (
    add_config_arguments,
    config_from_env,
    config_from_namespace,
    config_options,
    env_var,
)
from ...errors import APBConfigError

#: flag prefix: APBConfig field ``anchor_len`` -> ``--apb-anchor-len`` (attribute ``apb_anchor_len``)
FLAG_PREFIX = "apb-"
#: variable prefix: ``anchor_len`` -> ``APB_ANCHOR_LEN``
ENV_PREFIX = "APB_"
#: environment variable -> (APBConfig field, type), one per field
ENV_VARS = {env_var(o.name, ENV_PREFIX): (o.name, o.type) for o in config_options()}
#: ``--apb-*`` argument (its ``args`` attribute) -> APBConfig field, one per field
ARG_FIELDS = {"apb_" + o.name: o.name for o in config_options()}
#: the variable of ``--apb-heads``
HEADS_ENV = "APB_HEADS"


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _heads_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r} (trained retaining heads, safetensors)")
    return text


def add_apb_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: the ``--apb-*`` flags.  Returns ``parser``.

    One flag per APBConfig field (``--apb-mode``, ``--apb-anchor-len``, ...; booleans as
    ``--apb-X`` / ``--no-apb-X``), plus ``--apb-heads`` and ``--apb-query-tokens``.  Each
    flag is checked on its own when parsed (type, choices, an existing ``--apb-heads``
    file); the combination, with the ``APB_*`` variables under it (e.g.
    ``--apb-passing-len`` with ``--apb-mode star``), right after parsing, so a bad
    command line stops with argparse's usage message and exit status 2 naming the
    flags, before anything is built.
    """
    group = parser.add_argument_group(title="APB (megatron_apb)")
    add_config_arguments(group, prefix=FLAG_PREFIX, validate=False)
    group.add_argument("--apb-heads", type=_heads_file, default=None,
                       help="trained retaining heads (safetensors, reference layout); selects "
                            "--apb-compressor retaining_head unless it is given")
    group.add_argument("--apb-query-tokens", type=_int_at_least(1), default=64,
                       help="text generation server: the last N prompt tokens are the query "
                            "(phase 2, embedded in the anchor); the rest is the document")
    _check_after_parsing(parser)
    return parser


def _check_after_parsing(parser: argparse.ArgumentParser):
    """Make ``parser`` (this instance only) reject a bad combination of ``--apb-*`` flags."""
    if getattr(parser, "_apb_checked", False):
        return
    parse_known_args = parser.parse_known_args  # parse_args calls it too

    def checked(*a, **kw):
        namespace, extras = parse_known_args(*a, **kw)
        if any(getattr(namespace, name, None) is not None for name in (*ARG_FIELDS, "apb_heads")):
            try:
                apb_config_from_args(namespace)
            except APBConfigError as exc:
                parser.error(str(exc))
        return namespace, extras

    parser.parse_known_args = checked
    parser._apb_checked = True


def apb_config_from_env(environ: Optional[Mapping[str, str]] = None) -> APBConfig:
    """The APBConfig that the ``APB_<FIELD>`` environment variables describe (unset or
    empty: defaults).

    ``APB_HEADS`` alone selects ``compressor='retaining_head'``.  Raises
    :class:`APBConfigError` naming the variable for a malformed or invalid value.
    """
    environ = os.environ if environ is None else environ
    base = None
    if environ.get(HEADS_ENV) and not environ.get(env_var("compressor", ENV_PREFIX)):
        base = APBConfig(compressor="retaining_head")
    return config_from_env(environ, prefix=ENV_PREFIX, base=base)


def apb_config_from_args(args, environ: Optional[Mapping[str, str]] = None) -> APBConfig:
    """``--apb-*`` arguments over the ``APB_*`` environment variables over the defaults.

    ``args`` is any object with (some of) the attributes :func:`add_apb_args` defines;
    missing attributes count as unset.  Errors name the fields as flags.
    """
    config = apb_config_from_env(environ)
    overrides = {}
    if getattr(args, "apb_heads", None) and getattr(args, "apb_compressor", None) is None:
        overrides["compressor"] = "retaining_head"
    return config_from_namespace(args, prefix=FLAG_PREFIX, base=config, **overrides)


def megatron_lm_args():
    """Megatron-LM's parsed arguments, or None outside Megatron-LM or before they are set.

    Looks only at an already imported ``megatron.training``; never imports it.
    """
    global_vars = sys.modules.get("megatron.training.global_vars")
    if global_vars is None:
        return None
    try:
        return global_vars.get_args()
    except Exception:  # not set yet
        return None


def current_apb_config(args=None) -> APBConfig:
    """The APB settings a layer is built with: ``args`` (default: Megatron-LM's parsed
    arguments, when set) over the environment, else the environment alone."""
    args = megatron_lm_args() if args is None else args
    return apb_config_from_env() if args is None else apb_config_from_args(args)
