"""Dead-letter entries: the original bytes plus a reason record, listing, purge.

An entry in ``<root>/dlq/`` is two names:

* ``<arrival:20 digits>-<sanitised original name>`` holds the ORIGINAL BYTES,
  untouched: when the failing file is at hand it is moved in with
  :func:`~busd.fsio.rename_noreplace` (same filesystem), so not even a copy
  happens. Symlinks, FIFOs and directories are moved as themselves, never
  opened or followed.
* ``<name>.reason.json`` is a :class:`ReasonRecord`.

Write order is data, then record (both durable), so readers list entries by
their records: data without a record is a write in progress (or a crash in
one) and is skipped. Removal goes the other way (record first), so an entry
vanishes atomically for readers.

This module is the store only. Replay (:mod:`busd.routing.replay`) routes: it
validates the bytes again and, when they pass, hands them back to the bus, then
calls :func:`retire_replayed`, which moves the record to
``dlq/replayed/<sha256>.json``, keyed by the sha256 of the bytes republished: if
the same bytes fail again, :func:`dead_letter` carries over their replay count and
history. Replay, in-place record updates (:func:`note_replay_failed`) and purge
hold the exclusive lock ``dlq/.lock`` (:func:`locked`), so two concurrent replays
of one entry never both deliver it. Records are replaced with
:func:`~busd.store.fsio.replace_durable`.

**Foreign files.** busd never deletes or moves a file in ``dlq/`` it did not write.
Its own files are the records, the data named by a record, and orphan data named
``<20 digits>-<name>`` that has no ``.reason.txt`` beside it. Everything else in
``dlq/`` (not hidden, not ``replayed/`` nor busd's entry directory) is *foreign*: Tapps'
dead letters ``<stem>.<hex>.json`` with ``<stem>.<hex>.reason.txt``, or any other
file. :func:`list_foreign` lists them (with the text of their ``.reason.txt``) and
:func:`load_foreign` reads one; purge and replay never touch them. With
``compat = "tapps"`` busd's own entries live in ``dlq/busd/`` (:attr:`Layout.dlq`),
so Tapps' ``replay_dlq`` (``dlq/*.json``) never sees them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from busd.errors import InvalidMessage, NotFound, Reason, StorageError
from busd.store.fsio import (
    file_lock,
    fsync_dir,
    list_names,
    read_limited,
    rename_noreplace,
    replace_durable,
    write_durable,
)
from busd.store.layout import Layout, ensure_dir, ensure_dlq
from busd.store.mailbox import arrival_clock

__all__ = [
    "ENTRY_NAME",
    "FOREIGN_REASON_SUFFIX",
    "RECORD_MAX_BYTES",
    "RECORD_SUFFIX",
    "DlqEntry",
    "HistoryEvent",
    "ReasonRecord",
    "dead_letter",
    "find",
    "foreign_reason_name",
    "is_orphan",
    "list_entries",
    "load",
    "locked",
    "note_replay_failed",
    "purge",
    "retire_replayed",
]

RECORD_SUFFIX = ".reason.json"
FOREIGN_REASON_SUFFIX = ".reason.txt"
"""Tapps' reason file beside its dead letter ``<stem>.<hex>.json``."""
_MAX_NAME = 150
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_LOCK_TIMEOUT_S = 10.0
# An orphan data file (crash between data and record) is purged only when this old,
# so an in-progress dead_letter is never raced.
_ORPHAN_MIN_AGE_S = 3600.0


class HistoryEvent(msgspec.Struct, frozen=True):
    """One step in an entry's life: ``event`` is ``failed``, ``replay_failed`` or ``replayed``."""

    at: str
    event: str
    detail: str = ""


class ReasonRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Why and when an entry failed. Times are RFC 3339 UTC; ``schema`` is this format's version."""

    reason: str
    detail: str
    original_path: str | None = None
    sender: str | None = None
    recipient: str | None = None
    message_id: str | None = None
    size: int = 0
    sha256: str | None = None
    first_failure_at: str
    last_failure_at: str
    delivery_count: int = 0
    replays: int = 0
    history: list[HistoryEvent] = []
    schema: int = 1


@dataclass(frozen=True, slots=True)
class DlqEntry:
    """A listed entry: its ``name``, its ``record`` and the ``path`` of its data."""

    name: str
    record: ReasonRecord
    path: Path

    def data(self) -> bytes:
        """The original bytes (never follows a symlink; ``not_a_regular_file`` raises)."""
        return read_limited(self.path, max(self.record.size, 0))


_HASH_MAX_BYTES = 64 << 20  # above the largest message limit anyone sets; bigger is not read


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _sanitise(name: str) -> str:
    safe = _UNSAFE.sub("_", name).lstrip(".")[: _MAX_NAME - 21] or "unnamed"
    if safe.endswith(RECORD_SUFFIX):
        # Would be mistaken for another entry's record when listing.
        safe = safe[:-1] + "_"
    return safe


def _record_path(layout: Layout, name: str) -> Path:
    return layout.dlq / (name + RECORD_SUFFIX)


def _encode(record: ReasonRecord) -> bytes:
    return msgspec.json.encode(record) + b"\n"


def _hash_regular(path: Path, limit: int = _HASH_MAX_BYTES) -> tuple[int, str | None]:
    """Size and sha256 of ``path`` if it is a regular file (fsynced), else ``(0, None)``.

    The file is made 0600 (a producer's 0644 file must not stay readable in the
    DLQ). A file larger than ``limit`` is neither read nor hashed: its size is
    recorded with ``sha256`` null, so a planted huge file costs no I/O.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except OSError:
        return 0, None  # a symlink (ELOOP), a directory, a socket: never read
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return 0, None
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        if st.st_size > limit:
            return st.st_size, None
        digest = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
            size += len(chunk)
        # The producer may not have fsynced: the DLQ copy must survive a crash.
        os.fsync(fd)
        return size, digest.hexdigest()
    finally:
        os.close(fd)


def _place(layout: Layout, base: str, source: Path | None, data: bytes | None) -> str:
    """Move ``source`` in (or write ``data``) under a fresh entry name; return the name."""
    while True:
        name = f"{arrival_clock.next()}-{base}"
        try:
            if source is not None:
                rename_noreplace(source, layout.dlq / name)
            else:
                write_durable(layout.dlq, name, data or b"", tmp_dir=layout.tmp)
            return name
        except FileExistsError:
            continue  # another process drew this arrival key; draw the next one
        except OSError as exc:
            if source is None or exc.errno != errno.EXDEV or data is None:
                raise
            # Source on another filesystem: write the bytes we have, then drop it.
            name = _place(layout, base, None, data)
            os.unlink(source)
            return name


ENTRY_NAME = re.compile(r"[0-9]{20}-[A-Za-z0-9._-]{1,200}")
"""The names of busd's entries (data; the record adds ``.reason.json``)."""
RECORD_MAX_BYTES = 64 * 1024
"""A reason record is small: never load a planted giant."""


def _load_record(path: Path) -> ReasonRecord | None:
    try:
        raw = read_limited(path, RECORD_MAX_BYTES)
    except FileNotFoundError:
        return None
    except InvalidMessage as exc:
        raise StorageError(
            f"unreadable DLQ record {path.name}: {exc.detail}", path=str(path)
        ) from exc
    try:
        return msgspec.json.decode(raw, type=ReasonRecord)
    except msgspec.DecodeError as exc:
        raise StorageError(f"unreadable DLQ record {path.name}: {exc}", path=str(path)) from exc


def dead_letter(
    layout: Layout,
    *,
    reason: Reason,
    detail: str,
    source: Path | None = None,
    data: bytes | None = None,
    sender: str | None = None,
    recipient: str | None = None,
    message_id: str | None = None,
    delivery_count: int = 0,
    history: Sequence[HistoryEvent] | None = None,
    original_path: str | None = None,
) -> str:
    """Put a failed message in the DLQ and return the entry name.

    With ``source`` the file (or link, FIFO, directory) is moved in as is and
    its size and sha256 are taken from the moved regular file; ``data`` is
    then only used when the source sits on another filesystem. Without
    ``source``, ``data`` is written. ``original_path`` overrides the recorded
    path (relative to the root) and the name the entry is derived from, for
    callers that renamed the file before failing it. If the source vanished
    and no ``data`` is given, :class:`NotFound` is raised.
    """
    if source is None and data is None:
        raise ValueError("dead_letter needs a source or data")
    ensure_dlq(layout)
    if original_path is None and source is not None:
        try:
            original_path = source.absolute().relative_to(layout.root).as_posix()
        except ValueError:
            original_path = str(source)
    base = _sanitise(Path(original_path).name if original_path else (message_id or "message"))
    try:
        name = _place(layout, base, source, data)
    except FileNotFoundError:
        if data is None:
            raise NotFound(f"{source} vanished before it was dead-lettered") from None
        source, name = None, _place(layout, base, None, data)
    if source is not None:
        size, sha = _hash_regular(layout.dlq / name)
        with suppress(FileNotFoundError):
            fsync_dir(source.parent)
    else:
        assert data is not None
        size, sha = len(data), hashlib.sha256(data).hexdigest()
    now = _now()
    event = HistoryEvent(now, "failed", f"{reason.value}: {detail}")
    previous = _load_record(layout.dlq_replayed / f"{sha}.json") if sha else None
    record = ReasonRecord(
        reason=reason.value,
        detail=detail,
        original_path=original_path,
        sender=sender,
        recipient=recipient,
        message_id=message_id,
        size=size,
        sha256=sha,
        first_failure_at=previous.first_failure_at if previous else now,
        last_failure_at=now,
        delivery_count=delivery_count,
        replays=previous.replays if previous else 0,
        history=[*(previous.history if previous else ()), *(history or ()), event],
    )
    # write_durable fsyncs the record and the dlq directory (covering the data's entry too).
    write_durable(layout.dlq, name + RECORD_SUFFIX, _encode(record), tmp_dir=layout.tmp)
    return name


def list_entries(
    layout: Layout, *, reason: Reason | str | None = None, agent: str | None = None
) -> list[DlqEntry]:
    """Entries with a record, by name (arrival order); filter by reason and sender/recipient."""
    names = [n for n in list_names(layout.dlq) if n.endswith(RECORD_SUFFIX)]
    out: list[DlqEntry] = []
    for record_name in names:
        name = record_name[: -len(RECORD_SUFFIX)]
        try:
            record = _load_record(layout.dlq / record_name)
        except StorageError:
            record = None  # unreadable: load() reports it, a listing skips it
        if record is None or (reason is not None and record.reason != str(reason)):
            continue
        if agent is None or agent in (record.sender, record.recipient):
            out.append(DlqEntry(name, record, layout.dlq / name))
    return out


def load(layout: Layout, name: str) -> DlqEntry:
    """The entry ``name``; :class:`NotFound` if it has no record (never was, or replayed)."""
    if not ENTRY_NAME.fullmatch(name):
        raise NotFound(f"no DLQ entry {name!r}", name=name[:200])
    record = _load_record(_record_path(layout, name))
    if record is None:
        raise NotFound(f"no DLQ entry {name!r}", name=name)
    return DlqEntry(name, record, layout.dlq / name)


@contextmanager
def locked(layout: Layout) -> Iterator[None]:
    """Hold ``dlq/.lock`` (replay, record updates, purge); :class:`LockTimeout` after 10 s."""
    ensure_dlq(layout)
    with file_lock(layout.dlq_lock, timeout=_LOCK_TIMEOUT_S, what="the DLQ"):
        yield


def _remove(path: Path) -> None:
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)  # never follows links inside
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def note_replay_failed(layout: Layout, entry: DlqEntry, why: str, detail: str) -> ReasonRecord:
    """Record a failed replay of ``entry`` in place: ``replays`` + 1, ``detail``, history.

    The caller holds :func:`locked`. Returns the new record.
    """
    now = _now()
    new = _bump(entry.record, "replay_failed", why, detail=detail, last_failure_at=now)
    replace_durable(_record_path(layout, entry.name), _encode(new), tmp_dir=layout.tmp)
    return new


def retire_replayed(layout: Layout, entry: DlqEntry, body: bytes, target: Path) -> None:
    """Finish the replay of ``entry`` whose ``body`` was handed back to the bus as ``target``.

    The caller holds :func:`locked`. The record (``replays`` + 1, a ``replayed`` event
    naming ``target``) moves to ``dlq/replayed/<sha256 of body>.json``; then the entry's
    record is removed first (from here on the entry is gone for every reader), then its
    data.
    """
    sha = hashlib.sha256(body).hexdigest()
    note = target.relative_to(layout.root).as_posix()
    done = _bump(entry.record, "replayed", note)
    ensure_dir(layout.dlq_replayed)
    replace_durable(layout.dlq_replayed / f"{sha}.json", _encode(done), tmp_dir=layout.tmp)
    os.unlink(_record_path(layout, entry.name))
    _remove(entry.path)
    fsync_dir(layout.dlq)


def _bump(record: ReasonRecord, event: str, note: str, **changes: Any) -> ReasonRecord:
    """``record`` with ``replays`` + 1, a history event and ``changes``."""
    history = [*record.history, HistoryEvent(_now(), event, note)]
    return msgspec.structs.replace(record, replays=record.replays + 1, history=history, **changes)


def _age_s(record: ReasonRecord, fallback: float, now: float) -> float:
    try:
        at = datetime.fromisoformat(record.last_failure_at).timestamp()
    except ValueError:
        at = fallback
    return now - at


def purge(
    layout: Layout,
    *,
    older_than_s: float,
    now: float | None = None,
    on_purged: Callable[[str], None] | None = None,
) -> list[str]:
    """Remove entries whose last failure is older than ``older_than_s``; return their names.

    Also prunes ``replayed/`` records and orphan data files (no record, older
    than ``max(older_than_s, 1 h)`` by ctime, which a rename into the DLQ sets).
    ``on_purged`` is called with each entry name once it is gone (progress display).
    """
    now = time.time() if now is None else now
    purged: list[str] = []
    with locked(layout):
        for entry in list_entries(layout):
            rpath = _record_path(layout, entry.name)
            with suppress(FileNotFoundError):
                if _age_s(entry.record, os.stat(rpath).st_mtime, now) > older_than_s:
                    os.unlink(rpath)
                    _remove(entry.path)
                    purged.append(entry.name)
                    if on_purged is not None:
                        on_purged(entry.name)
        # Data without a record is a crash between the two writes; only old ones go, so
        # an in-progress dead_letter is never raced. ctime: the rename into the DLQ sets it.
        names = set(list_names(layout.dlq))
        leftovers = [
            (layout.dlq / n, max(older_than_s, _ORPHAN_MIN_AGE_S))
            for n in names
            if is_orphan(n, names)
        ]
        replayed = layout.dlq_replayed
        leftovers += [(replayed / n, older_than_s) for n in list_names(replayed)]
        for path, age in leftovers:
            with suppress(FileNotFoundError):
                if now - os.lstat(path).st_ctime > age:
                    _remove(path)
        fsync_dir(layout.dlq)
    return purged


def foreign_reason_name(name: str) -> str:
    """The name of Tapps' reason file for ``name`` (``x.json`` -> ``x.reason.txt``)."""
    stem = name[: -len(".json")] if name.endswith(".json") else name
    return stem + FOREIGN_REASON_SUFFIX


def is_orphan(name: str, names: set[str]) -> bool:
    """Whether ``name`` is busd's data without its record (a crash between the two)."""
    return (
        ENTRY_NAME.fullmatch(name) is not None
        and not name.endswith((RECORD_SUFFIX, FOREIGN_REASON_SUFFIX))
        and name + RECORD_SUFFIX not in names
        and foreign_reason_name(name) not in names
    )


def find(layout: Layout, original_path: str, sha256: str) -> str | None:
    """The entry holding bytes with ``sha256`` dead-lettered from ``original_path``, if
    any: a writer that may meet the same refusal again (a followed file read again after a
    crash) dead-letters it once. Reads only the records whose names could match."""
    suffix = "-" + _sanitise(Path(original_path).name) + RECORD_SUFFIX
    for name in list_names(layout.dlq):
        if not name.endswith(suffix):
            continue
        try:
            record = _load_record(layout.dlq / name)
        except StorageError:
            continue
        if record is not None and (record.original_path, record.sha256) == (original_path, sha256):
            return name[: -len(RECORD_SUFFIX)]
    return None
