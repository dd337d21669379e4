"""Record files: what ``eval`` and ``generate --output-json`` write, one record at a time.

The format is JSON Lines, appended to and never rewritten::

    {"meta": {"command": "eval", "model": ..., "cp": 4, ...}}   <- a run starts writing
    {"task": "vt", "length": 4096, "index": 0, "method": "exact", ...}   <- one record a line
    ...
    {"done": {"seconds": 812.4, "records": 96, "complete": true}}   <- that run ended cleanly

Each line is written, flushed and ``fsync``-ed as its record finishes, so a run that is cut
short keeps every record it finished; a later run into the same file appends its own
``meta`` line and records after them (a *session* each).  A last line cut off mid-write (an
unfinished JSON object, no newline) is not a finished record: readers skip it and the next
writer drops it.

Older files, one JSON document (``{"meta": ..., "records": [...]}`` from ``eval``,
``{"model": ..., "runs": [...]}`` from ``generate``), still read as one session; a writer
appending to one first rewrites it (atomically) in this format, keeping its records.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from ..errors import APBConfigError

#: the fields that make a line of an ``eval`` file a record (its key and its score)
EVAL_FIELDS = ("task", "length", "index", "method", "ranks", "score")
#: the field every ``generate`` record (one run) has
GENERATE_FIELDS = ("mode",)


@dataclass
class Session:
    """One run's part of a record file: its ``meta`` line, its records and its ``done``
    line (None when the run did not end cleanly)."""

    meta: dict
    records: List[dict] = field(default_factory=list)
    done: Optional[dict] = None


@dataclass
class RecordFile:
    """A record file as read: its sessions, whether it was an older JSON document
    (``legacy``), and whether a last line cut off mid-write was skipped (``truncated``)."""

    path: str
    sessions: List[Session]
    legacy: bool = False
    truncated: bool = False
    valid_bytes: int = 0  # the length of the file up to the end of its last complete line

    @property
    def records(self) -> List[dict]:
        return [r for s in self.sessions for r in s.records]


def _check_fields(path, where, record, required):
    missing = [k for k in required if k not in record]
    if missing:
        raise APBConfigError(
            f"{path}{where}: not a record of this command (no {', '.join(map(repr, missing))}); "
            "give a file written by the same command, or a new file"
        )


def read_record_file(path: str, *, required: Sequence[str] = ()) -> RecordFile:
    """The sessions of the record file ``path`` (this format or an older JSON document).

    ``required``: fields every record must have (:data:`EVAL_FIELDS`,
    :data:`GENERATE_FIELDS`); a file whose records lack them is refused, naming the line.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except IsADirectoryError:
        raise APBConfigError(f"{path} is a directory, not a record file") from None
    except OSError as exc:
        raise APBConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APBConfigError(f"{path} is not a record file (not UTF-8 text)") from None
    if not text.strip():
        return RecordFile(path, [], valid_bytes=len(raw))
    legacy = _read_legacy(path, text, required)
    if legacy is not None:
        return legacy
    sessions: List[Session] = []
    lines = text.split("\n")
    truncated, offset, valid = False, 0, 0
    for lineno, line in enumerate(lines, 1):
        last = lineno == len(lines)
        offset += len(line.encode("utf-8")) + (0 if last else 1)
        if not line.strip():
            valid = offset if not last else valid
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            if last and line.lstrip().startswith("{"):  # no newline after it: a record cut short
                truncated = True
                break
            raise APBConfigError(f"{path}:{lineno}: not a record file line ({exc})") from None
        if not isinstance(item, dict):
            raise APBConfigError(f"{path}:{lineno}: not a record file line (a JSON {type(item).__name__})")
        valid = offset
        if set(item) == {"meta"}:
            sessions.append(Session(dict(item["meta"])))
        elif set(item) == {"done"}:
            if sessions:
                sessions[-1].done = item["done"]
        else:
            _check_fields(path, f":{lineno}", item, required)
            if not sessions:
                sessions.append(Session({}))
            sessions[-1].records.append(item)
    return RecordFile(path, sessions, truncated=truncated, valid_bytes=valid)


def _read_legacy(path, text, required) -> Optional[RecordFile]:
    """An older one-document file, or None when ``text`` is not one."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        raise APBConfigError(f"{path} is not a record file (a JSON {type(data).__name__})")
    for key in ("records", "runs"):  # eval's {"meta", "records"}; generate's {..., "runs"}
        if isinstance(data.get(key), list) and (key == "runs" or "meta" in data or len(data) == 1):
            meta = dict(data.get("meta", {})) if key == "records" else {k: v for k, v in data.items() if k != "runs"}
            for i, record in enumerate(data[key]):
                if not isinstance(record, dict):
                    raise APBConfigError(f"{path}: {key}[{i}] is not a record")
                _check_fields(path, f" ({key}[{i}])", record, required)
            return RecordFile(path, [Session(meta, list(data[key]), done={})], legacy=True,
                              valid_bytes=len(text.encode("utf-8")))
    return None  # one line of this format


def read_records(paths: Sequence[str], *, required: Sequence[str] = ()) -> List[dict]:
    """Every record of the files ``paths``, in file order."""
    return [r for path in paths for r in read_record_file(path, required=required).records]


def read_generation(path: str) -> dict:
    """The last ``generate`` run of ``path`` in the shape of the older ``--output-json``
    document: its meta fields (``model``, ``tp``, ``cp``, ``expected_answer``, ...) and
    ``runs``, the records it wrote (one per mode)."""
    f = read_record_file(path, required=GENERATE_FIELDS)
    if not f.sessions:
        raise APBConfigError(f"{path}: no generation records")
    last = f.sessions[-1]
    return {**{k: v for k, v in last.meta.items() if k != "command"}, "runs": list(last.records)}


def _sync_directory(path: str) -> None:
    """fsync the directory holding ``path``, so that a file created or renamed there stays."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: str, lines: Sequence[str]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_directory(path)


class RecordWriter:
    """Appends records to ``path`` as they finish (see the module's docstring).

    ``meta`` is written before the first record (a run that finishes nothing adds nothing);
    :meth:`finish` writes the ``done`` line.  An older JSON document at ``path`` is rewritten
    in this format first, and a last line cut off mid-write is dropped; every finished
    record already there is kept.
    """

    def __init__(self, path: str, meta: dict, *, required: Sequence[str] = ()):
        self.path, self.meta, self.count = path, dict(meta), 0
        self._meta_written = False
        if os.path.exists(path):
            existing = read_record_file(path, required=required)
            if existing.legacy:
                s = existing.sessions[0]
                _write_atomically(path, [json.dumps({"meta": s.meta})] + [json.dumps(r) for r in s.records])
            elif existing.truncated or os.path.getsize(path) != existing.valid_bytes:
                with open(path, "r+b") as f:  # drop the unfinished line (and trailing blanks)
                    f.truncate(existing.valid_bytes)
                    f.flush()
                    os.fsync(f.fileno())
            if os.path.getsize(path):
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
                if needs_newline:
                    with open(path, "ab") as f:
                        f.write(b"\n")
        created = not os.path.exists(path)
        self._file = open(path, "a", encoding="utf-8")
        if created:
            _sync_directory(path)

    def _line(self, item) -> None:
        self._file.write(json.dumps(item) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, record: dict) -> None:
        """Append one finished record (after this run's ``meta`` line, the first time)."""
        if not self._meta_written:
            self._line({"meta": self.meta})
            self._meta_written = True
        self._line(record)
        self.count += 1

    def finish(self, **info) -> None:
        """Mark this run's records complete (``info``: e.g. its seconds)."""
        if self._meta_written:
            self._line({"done": dict(info, records=self.count, complete=True)})

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
