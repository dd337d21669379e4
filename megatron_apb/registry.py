"""Name -> object registries: how distributed algorithms, compressors and model families
are found, so that adding one edits nothing but its own module.

A registry knows which modules hold its built-in entries (``builtins``) and imports them
the first time it is read; a user module registers more with :meth:`Registry.register`::

    from megatron_apb.registry import COMPRESSORS
    COMPRESSORS.register(Compressor(name="mine", score=my_score))

The registries themselves live here, at the bottom of the package, so that the settings
(:mod:`megatron_apb.config`) can validate a name against them without importing the code
that implements it.
"""

from __future__ import annotations

import importlib
import threading
from typing import Dict, Generic, Iterator, Optional, Sequence, Tuple, TypeVar

from .errors import APBConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> entry table of one ``kind`` of thing.

    Args:
        kind: what an entry is, for messages (``"distributed algorithm"``).
        builtins: modules that register the built-in entries when imported.
        field: the configuration field that names an entry (for error messages).
    """

    def __init__(self, kind: str, builtins: Sequence[str] = (), *, field: Optional[str] = None):
        self.kind, self.field = kind, field
        self._builtins = tuple(builtins)
        self._entries: Dict[str, T] = {}
        self._loaded = not self._builtins
        self._lock = threading.RLock()

    def _load(self):
        if self._loaded:
            return
        with self._lock:
            if not self._loaded:
                self._loaded = True  # before importing: the modules register into us
                for module in self._builtins:
                    importlib.import_module(module)

    def register(self, entry: T, *, name: Optional[str] = None, replace: bool = False) -> T:
        """Add ``entry`` under ``name`` (default: ``entry.name``); returns ``entry``.

        Registering a taken name raises unless ``replace=True``.
        """
        name = name or getattr(entry, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        with self._lock:
            if name in self._entries and not replace and self._entries[name] is not entry:
                raise ValueError(f"a {self.kind} named {name!r} is already registered; pass replace=True")
            self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register a temporary entry)."""
        with self._lock:
            self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry named ``name``; an :class:`APBConfigError` listing the names if none."""
        self._load()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            label = self.field or f"a {self.kind}"
            raise APBConfigError(
                f"{label} must be one of {', '.join(map(repr, self.names()))}; got {name!r}",
                field=self.field,
            ) from None

    def names(self) -> Tuple[str, ...]:
        self._load()
        return tuple(self._entries)

    def __contains__(self, name) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


#: distributed attention algorithms (``APBConfig.mode``): :class:`megatron_apb.parallel.CPAlgorithm`
ALGORITHMS: Registry = Registry("distributed algorithm", ["megatron_apb.parallel"], field="mode")
#: passing-token scorers (``APBConfig.compressor``): :class:`megatron_apb.compress.Compressor`
COMPRESSORS: Registry = Registry("compressor", ["megatron_apb.compress"], field="compressor")
#: checkpoint model families by HF ``model_type``: :class:`megatron_apb.checkpoints.ModelFamily`
MODEL_FAMILIES: Registry = Registry("model family", ["megatron_apb.checkpoints.families"], field="model_type")
#: local sparse attention methods (``APBConfig.sparse``): :class:`megatron_apb.ops.sparse.backend.SparseMethod`
SPARSE_METHODS: Registry = Registry("sparse attention method", ["megatron_apb.ops.sparse.backend"], field="sparse")
