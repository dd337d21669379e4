"""The package's exception types: callers branch on the type, never on message text.

Every error raised for bad input or a bad setting is an :class:`APBError` whose message
says what to change.  The subclasses keep ``ValueError`` as a base so that code written
against earlier releases (``except ValueError``) still catches them.
"""

from __future__ import annotations

from typing import Optional


class APBError(Exception):
    """Base of every error megatron_apb raises on purpose."""


class APBConfigError(APBError, ValueError):
    """A configuration or input that cannot run; the message says what to change.

    ``field`` names the :class:`~megatron_apb.config.APBConfig` field at fault when there
    is one, so a front-end can name its own flag or key instead (``--apb-anchor-len``,
    ``"anchor_len"``, ``APB_ANCHOR_LEN``).
    """

    def __init__(self, message: str, *, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


class InputError(APBError, ValueError):
    """A tensor argument that cannot be used: wrong dtype, device, layout or shape.

    Raised at the boundary of the public attention ops (``megatron_apb.ops.validation``)
    from metadata alone (no data is read); the message names the op and the tensor and
    says what to change (``cast k and v to q's dtype (torch.bfloat16)``).
    """


class PeerRankError(APBConfigError):
    """Another rank of a collective rejected its input; that rank's error says why.

    Raised on the ranks whose own input was fine, so that no rank waits forever in a
    collective.  Front-ends print it on one rank only (the others print the cause).
    """


class CheckpointError(APBError, ValueError):
    """A checkpoint that cannot be read or does not fit the model (names the file/key)."""


class UnsupportedModelError(APBError, ValueError):
    """A model whose configuration this package cannot serve (names the config field)."""


class CollectiveError(APBError, RuntimeError):
    """A collective that another rank made fail: it crashed, was killed or closed its
    connection.  The message names this rank, the operation, its call site and the group;
    the cause is in the other rank's log."""


class CollectiveTimeout(CollectiveError):
    """A collective that did not finish within the timeout (``--timeout``): another rank is
    stopped, hung or dead.  Raised instead of waiting forever; names what :class:`CollectiveError` names."""


class NonFiniteError(APBError, FloatingPointError):
    """NaN or infinite values where a result was expected (names the likely cause)."""
