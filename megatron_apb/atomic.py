"""Crash-safe checkpoint writing: a save appears whole, or not at all.

Every saver (retaining heads, trainer state, converted models) writes through
:func:`atomic_directory` or :func:`atomic_file`.  The protocol, for a target ``DIR/NAME``:

1. everything is written into a sibling ``DIR/NAME.tmp-<host>-<pid>-<random>`` (beside the
   target, so that renames stay on one file system), never into the target itself;
2. every file and directory in it is fsync'ed, then ``DIR``;
3. a file target is published with one ``os.replace``; a directory target with two
   renames: the old directory (if any) to ``DIR/NAME.old-<same token>``, the new one to
   ``DIR/NAME``, ``DIR`` fsync'ed after each; then the old one is deleted.

A kill at any moment leaves ``DIR/NAME`` as it was or whole and new, plus at most some
of those siblings, which :func:`recover` resolves on the next save or load of that
target and reports: a ``.tmp-`` sibling is an unfinished save (deleted), unless its
token's ``.old-`` sibling exists and ``DIR/NAME`` does not (the kill came between the two
renames: the ``.tmp-`` one is complete and is moved into place); an ``.old-`` sibling is
the previous version (deleted, or put back when nothing newer exists).  Siblings of a
process that may still run (same host, process alive; or another host) are reported and
left alone.

One target has one writer at a time (as a training run writes its own directory).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional

from .errors import CheckpointError

Report = Optional[Callable[[str], None]]

#: tokens of the saves running in this process (their siblings are not leftovers)
_ACTIVE = set()
_SIBLING = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_]{1,32})-(?P<pid>\d+)-(?P<rand>[0-9a-f]{8})$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def _target(path) -> str:
    """The absolute target path, symlinks resolved (a link to a checkpoint keeps pointing
    at the replaced checkpoint's name)."""
    return os.path.realpath(os.fspath(path))


def temporary_path(path, kind: str = "tmp", *, pid: Optional[int] = None, host: Optional[str] = None,
                   rand: Optional[str] = None) -> str:
    """The sibling of ``path`` a save uses: ``kind`` ``"tmp"`` (being written) or ``"old"``
    (the previous version, moved aside) of the save by process ``pid`` on ``host``."""
    if kind not in ("tmp", "old"):
        raise ValueError(f"kind must be 'tmp' or 'old', got {kind!r}")
    path = _target(path)
    host = re.sub(r"[^A-Za-z0-9_]", "_", host)[:32] if host else _host()
    token = f"{host}-{os.getpid() if pid is None else pid}-{rand or secrets.token_hex(4)}"
    return f"{path}.{kind}-{token}"


# ------------------------------------------------------------------------------ fsync
def fsync_file(path) -> None:
    """Flush one file's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path) -> None:
    """Flush a directory's entries (creations, renames) to the disk, where the platform
    can (not on Windows, where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # file systems that do not sync directories
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EROFS):
            raise
    finally:
        os.close(fd)


def fsync_tree(path) -> None:
    """fsync every regular file and directory under ``path`` (itself included), deepest
    first; a file ``path`` is synced alone."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        fsync_file(path)
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            full = os.path.join(root, name)
            if os.path.isfile(full) and not os.path.islink(full):
                fsync_file(full)
        fsync_dir(root)


# --------------------------------------------------------------------------- recovery
@dataclass
class _Sibling:
    path: str
    kind: str
    host: str
    pid: int
    token: str
    alive: Optional[bool]  # None: cannot tell (another host, or no way to ask)


def _pid_alive(pid: int) -> Optional[bool]:
    if os.name == "nt":  # os.kill(pid, 0) would end the process there
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return None
    try:  # a killed process its parent has not reaped yet is dead for us
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _siblings(path: str) -> List[_Sibling]:
    parent, name = os.path.split(path)
    try:
        entries = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        m = _SIBLING.match(entry)
        if not m or m["name"] != name:
            continue
        pid, host = int(m["pid"]), m["host"]
        token = f"{host}-{pid}-{m['rand']}"
        if host != _host():
            alive = None
        elif pid == os.getpid():
            alive = token in _ACTIVE
        else:
            alive = _pid_alive(pid)
        found.append(_Sibling(os.path.join(parent, entry), m["kind"], host, pid, token, alive))
    return found


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def recover(path, *, report: Report = None) -> List[str]:
    """Resolve what interrupted saves left beside ``path`` (see the module docstring) and
    report each action: ``report(message)`` (default: a ``RuntimeWarning``).  Returns the
    messages.  Safe to call from several processes at once; a no-op when nothing is left."""
    path = _target(path)
    found = _siblings(path)
    if not found:
        return []
    say = report or _warn
    messages: List[str] = []
    dead = [s for s in found if s.alive is False]
    if not os.path.lexists(path):
        # killed between "old aside" and "new in": finish that save, else put the old one back
        olds = sorted((s for s in dead if s.kind == "old"), key=lambda s: _mtime(s.path), reverse=True)
        for old in olds:
            new = next((s.path for s in dead if s.kind == "tmp" and s.token == old.token), None)
            source = new if new is not None else old.path
            try:
                os.rename(source, path)
            except FileNotFoundError:  # another process recovered it first
                if os.path.lexists(path):
                    break
                continue
            fsync_dir(os.path.dirname(path))
            messages.append(
                f"{path}: a save was killed while moving it into place; completed it from {source}"
                if new is not None else
                f"{path}: a save was killed while moving it into place; restored the previous version from {source}"
            )
            break
    for s in found:
        if not os.path.lexists(s.path):
            continue
        if s.alive is False:
            _remove(s.path)
            what = "unfinished save" if s.kind == "tmp" else "previous version"
            messages.append(f"removed {s.path}: the {what} left by a save (process {s.pid}) that was killed or crashed")
        elif s.alive:
            messages.append(
                f"{s.path} belongs to a save still running (process {s.pid}); left in place "
                "(delete it if no save of this checkpoint is running)"
            )
        else:
            messages.append(
                f"{s.path} was left by a save of process {s.pid} on host {s.host}, which may still be running; "
                "left in place (delete it if no save of this checkpoint is running)"
            )
    for message in messages:
        say(message)
    return messages


def _mtime(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


# ---------------------------------------------------------------------------- saving
def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: str, new: str, drop: Iterable[str], say) -> None:
    """Hard-link (else copy) the entries of ``old`` that ``new`` lacks into ``new``; the
    names in ``drop`` are left behind (and reported)."""
    drop = set(drop)
    for entry in os.listdir(old):
        src, dst = os.path.join(old, entry), os.path.join(new, entry)
        if os.path.lexists(dst):
            continue
        if entry in drop:
            say(f"removed {src}: left by an earlier save")
        elif os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


@contextlib.contextmanager
def atomic_directory(path, *, keep_others: bool = False, drop: Iterable[str] = (), report: Report = None) -> Iterator[str]:
    """Write a directory that replaces ``path`` whole when the block ends without error::

        with atomic_directory("out/run") as tmp:
            save_file(tensors, os.path.join(tmp, "heads.safetensors"))

    Yields the temporary directory to fill.  On an error inside the block it is deleted
    and ``path`` stays as it was.  ``keep_others``: entries of the replaced directory that
    the new one lacks are carried over (hard links), e.g. logs written beside the
    checkpoint; ``drop``: names never carried over.  Leftovers of interrupted saves are
    resolved first (:func:`recover`, reported through ``report``).
    """
    target = _target(path)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise CheckpointError(f"cannot save a checkpoint directory at {target}: a file is there; pass another path")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    say = report or _warn
    recover(target, report=say)
    staging = temporary_path(target, "tmp")
    token = staging.rsplit(".tmp-", 1)[1]
    _ACTIVE.add(token)
    try:
        os.mkdir(staging)
        try:
            yield staging
            if os.path.isdir(target):
                if keep_others:
                    _carry_over(target, staging, drop, say)
                shutil.copymode(target, staging)
            fsync_tree(staging)
            fsync_dir(parent)
            _swap_in(staging, target, temporary_path(target, "old", rand=token.rsplit("-", 1)[1]))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        _ACTIVE.discard(token)


def _swap_in(new: str, target: str, aside: str) -> None:
    parent = os.path.dirname(target)
    had_old = os.path.lexists(target)
    if had_old:
        os.rename(target, aside)
        fsync_dir(parent)
    try:
        os.rename(new, target)
    except BaseException:
        if had_old and not os.path.lexists(target):
            os.rename(aside, target)  # put the old one back
        raise
    fsync_dir(parent)
    if had_old:
        _remove(aside)


@contextlib.contextmanager
def atomic_file(path, *, report: Report = None) -> Iterator[str]:
    """Write a file that replaces ``path`` whole when the block ends without error::

        with atomic_file("heads.safetensors") as tmp:
            save_file(tensors, tmp)

    Yields the temporary path to write (beside ``path``); it is fsync'ed and renamed over
    ``path``, or deleted on an error.  Leftovers of interrupted saves are resolved first.
    """
    target = _target(path)
    if os.path.isdir(target):
        raise CheckpointError(f"cannot save a checkpoint file at {target}: a directory is there; pass a file name")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    recover(target, report=report)
    staging = temporary_path(target, "tmp")
    token = staging.rsplit(".tmp-", 1)[1]
    _ACTIVE.add(token)
    try:
        try:
            yield staging
            fsync_file(staging)
            os.replace(staging, target)
            fsync_dir(parent)
        except BaseException:
            _remove(staging)
            raise
    finally:
        _ACTIVE.discard(token)
