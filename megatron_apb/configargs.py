"""Every configuration front-end, generated from ``dataclasses.fields(APBConfig)``.

* command-line flags (:func:`add_config_arguments` / :func:`config_from_namespace`), with
  a prefix (Megatron-LM's ``--apb-*``) and renames (the CLI's ``--cp-mode`` for ``mode``);
* mappings (:func:`config_from_mapping`), e.g. the DeepSpeed JSON ``"apb"`` section: unknown
  keys are refused with the list of valid ones, deprecated names warn;
* environment variables (:func:`config_from_env`): ``APB_<FIELD>`` for every field.

A field added to :class:`~megatron_apb.config.APBConfig` (with its help text) appears in all
of them; errors name the front-end's own spelling of the field (flag, key or variable).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from .config import APBConfig
from .errors import APBConfigError


@dataclass(frozen=True)
class ConfigOption:
    """One APBConfig field as a front-end sees it."""

    name: str
    type: type  # int, float, bool or str
    optional: bool  # None is a valid value (e.g. anchor_len: derived)
    default: Any
    help: str
    choices_source: Any = None  # a tuple, or a registry read when the front-end is built

    def choices(self) -> Optional[Tuple[str, ...]]:
        if self.choices_source is None:
            return None
        src = self.choices_source
        return tuple(src.names()) if hasattr(src, "names") else tuple(src)

    def parse(self, value, *, where: str, from_text: bool = True):
        """``value`` (a string from a flag/variable, or a JSON value) as this field's type.
        ``from_text=False`` (JSON values): a string is not read as a number or a bool."""
        if value is None:
            if self.optional:
                return None
            raise APBConfigError(f"{where}: may not be null (default {self.default!r})", field=self.name)
        if isinstance(value, str) and self.type is not str and from_text:
            text = value.strip()
            if self.optional and text.lower() in ("none", "null", ""):
                return None
            if self.type is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise APBConfigError(f"{where}: expected true or false, got {value!r}", field=self.name)
            try:
                return self.type(text)
            except ValueError:
                raise APBConfigError(f"{where}: expected {self.type.__name__}, got {value!r}", field=self.name) from None
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        ok = isinstance(value, self.type) and (self.type is bool or not isinstance(value, bool))
        if not ok:
            raise APBConfigError(
                f"{where}: expected {self.type.__name__}{' or null' if self.optional else ''}, got {value!r}",
                field=self.name,
            )
        return value


def config_options() -> Tuple[ConfigOption, ...]:
    """The fields of :class:`APBConfig` with their types, defaults and help."""
    hints = typing.get_type_hints(APBConfig)
    out = []
    for f in dataclasses.fields(APBConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        out.append(ConfigOption(
            name=f.name, type=base, optional=optional, default=f.default,
            help=f.metadata.get("help", ""), choices_source=f.metadata.get("choices"),
        ))
    return tuple(out)


def option_names() -> Tuple[str, ...]:
    return tuple(o.name for o in config_options())


# ------------------------------------------------------------------------ flags
def flag_name(field: str, *, prefix: str = "", rename: Optional[Mapping[str, str]] = None) -> str:
    """``anchor_len`` -> ``--{prefix}anchor-len`` (or the renamed flag)."""
    if rename and field in rename:
        return rename[field]
    return "--" + prefix + field.replace("_", "-")


def _dest(field: str, prefix: str, rename) -> str:
    return flag_name(field, prefix=prefix, rename=rename).lstrip("-").replace("-", "_")


def add_config_arguments(
    parser,
    *,
    prefix: str = "",
    rename: Optional[Mapping[str, str]] = None,
    exclude: Iterable[str] = (),
    defaults: Optional[Mapping[str, Any]] = None,
    validate: bool = True,
):
    """Add one flag per APBConfig field to ``parser`` (an ArgumentParser or group).

    Unset flags are ``None`` (so :func:`config_from_namespace` keeps the config's
    default) unless ``defaults`` gives the flag a default.  ``validate``: after parsing,
    the combination of flags is checked by building the config, and a bad one ends in
    argparse's usage error naming the flags (exit status 2).  Returns ``parser``.
    """
    skip, defaults = set(exclude), dict(defaults or {})
    for opt in config_options():
        if opt.name in skip:
            continue
        flag = flag_name(opt.name, prefix=prefix, rename=rename)
        kwargs: Dict[str, Any] = dict(dest=_dest(opt.name, prefix, rename), default=defaults.get(opt.name))
        default_text = "derived" if opt.default is None else opt.default
        # a help text that already says its default (e.g. how it is derived) keeps it
        kwargs["help"] = opt.help if "default:" in opt.help else f"{opt.help} (default: {default_text})"
        if opt.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _arg_type(opt)
            if opt.choices() is not None:
                kwargs["choices"] = opt.choices()
        parser.add_argument(flag, **kwargs)
    if validate:
        root = getattr(parser, "_apb_root_parser", None) or _root_parser(parser)
        _check_after_parsing(root, prefix=prefix, rename=rename, exclude=skip)
    return parser


def _root_parser(parser):
    # an argument group keeps its parser in _parser (private, stable across 3.10-3.13)
    return getattr(parser, "_parser", parser) if not isinstance(parser, argparse.ArgumentParser) else parser


def _arg_type(opt: ConfigOption):
    def parse(text: str):
        try:
            return opt.parse(text, where=opt.name)
        except APBConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None

    parse.__name__ = opt.type.__name__
    return parse


def config_from_namespace(
    args,
    *,
    prefix: str = "",
    rename: Optional[Mapping[str, str]] = None,
    base: Optional[APBConfig] = None,
    **overrides,
) -> APBConfig:
    """The APBConfig of parsed flags: set flags over ``overrides`` over ``base`` (default
    ``APBConfig()``).  Missing attributes count as unset.  An invalid combination raises
    :class:`APBConfigError` with the field written as its flag."""
    changes = dict(overrides)
    for opt in config_options():
        value = getattr(args, _dest(opt.name, prefix, rename), None)
        if value is not None:
            changes[opt.name] = value
    try:
        return (base or APBConfig()).replace(**changes) if changes else (base or APBConfig())
    except APBConfigError as exc:
        raise _renamed(exc, lambda f: flag_name(f, prefix=prefix, rename=rename)) from None


def _check_after_parsing(parser, *, prefix, rename, exclude):
    """Make ``parser`` reject a bad combination of config flags with a usage error."""
    if getattr(parser, "_apb_config_checked", False):
        return
    parse_known_args = parser.parse_known_args  # parse_args calls it too

    def checked(*a, **kw):
        namespace, extras = parse_known_args(*a, **kw)
        dests = [_dest(o.name, prefix, rename) for o in config_options() if o.name not in exclude]
        if any(getattr(namespace, d, None) is not None for d in dests):
            try:
                config_from_namespace(namespace, prefix=prefix, rename=rename)
            except APBConfigError as exc:
                parser.error(str(exc))
        return namespace, extras

    parser.parse_known_args = checked
    parser._apb_config_checked = True


def _renamed(exc: APBConfigError, spell) -> APBConfigError:
    """``exc`` with every config field name written as ``spell(field)``."""
    message = str(exc)
    for name in option_names():
        message = re.sub(rf"(?<![-\w]){name}\b", spell(name), message)
    return type(exc)(message, field=exc.field)


# --------------------------------------------------------------------- mappings
def config_from_mapping(
    mapping: Mapping[str, Any],
    *,
    where: str = "the config",
    deprecated: Optional[Mapping[str, str]] = None,
    base: Optional[APBConfig] = None,
) -> APBConfig:
    """An APBConfig from ``{field: value}`` (e.g. a JSON section).

    Unknown keys are refused with the list of valid ones; ``deprecated`` maps old key
    names to fields (they still work, with a ``DeprecationWarning``).  Values are checked
    by type (``"4"`` is not an int here) and then by :class:`APBConfig`'s validation.
    """
    options = {o.name: o for o in config_options()}
    deprecated = dict(deprecated or {})
    changes: Dict[str, Any] = {}
    unknown = []
    for key, value in mapping.items():
        name = key
        if key in deprecated:
            name = deprecated[key]
            warnings.warn(f"{where}: key {key!r} is deprecated; use {name!r}", DeprecationWarning, stacklevel=2)
        if name not in options:
            unknown.append(key)
            continue
        changes[name] = options[name].parse(value, where=f"{where}: {key!r}", from_text=False)
    if unknown:
        raise APBConfigError(
            f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {', '.join(options)}"
        )
    try:
        return (base or APBConfig()).replace(**changes)
    except APBConfigError as exc:
        raise APBConfigError(f"{where}: {exc}", field=exc.field) from None


def config_to_mapping(config: APBConfig) -> Dict[str, Any]:
    """``{field: value}`` of ``config`` (JSON-serialisable)."""
    return {o.name: getattr(config, o.name) for o in config_options()}


# ---------------------------------------------------------------- environment
def env_var(field: str, prefix: str = "APB_") -> str:
    return prefix + field.upper()


def config_from_env(
    environ: Mapping[str, str],
    *,
    prefix: str = "APB_",
    base: Optional[APBConfig] = None,
    exclude: Sequence[str] = (),
) -> APBConfig:
    """The APBConfig that ``{prefix}<FIELD>`` variables describe (unset or empty: default).
    A malformed value raises :class:`APBConfigError` naming the variable."""
    changes = {}
    for opt in config_options():
        if opt.name in exclude:
            continue
        name = env_var(opt.name, prefix)
        value = environ.get(name)
        if value in (None, ""):
            continue
        changes[opt.name] = opt.parse(value, where=f"{name}={value!r}")
    try:
        return (base or APBConfig()).replace(**changes) if changes else (base or APBConfig())
    except APBConfigError as exc:
        raise _renamed(exc, lambda f: env_var(f, prefix)) from None
