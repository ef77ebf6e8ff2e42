"""The journal's on-disk format: segment names, the line codec, positions, line ends.

Contract (the files :class:`busd.store.journal.Journal` writes and reads):

- A segment is ``<index:12 digits>.ndjson`` in the journal directory; indexes start at 1 and
  grow by 1 (:func:`segment_path`, :func:`segment_indexes`).
- A line is one JSON object (a :class:`JournalEntry`) ending in ``\\n``: :func:`encode_entry`
  gives it without the newline, :func:`decode_entry` takes it back. Unknown fields are
  ignored, so older readers accept newer lines; absent optional fields are left out.
- A :class:`Position` is a byte offset in one segment; an entry is addressed by the position
  where its line starts and the line's length, newline included (a :data:`Span`).
- :func:`complete_end` finds where the last whole line ends: a last line without its ``\\n``
  is a write in progress or a torn one, and no reader returns it.
- :class:`SegmentReaders` reads one line back by position (``pread``, served from the page
  cache) through a small cache of read-only descriptors: thread-safe, and a forked child
  opens its own. Everything else here is a pure function: no locks, no state.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Container
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias

import msgspec

from busd.errors import InvalidMessage, Reason
from busd.store.fsio import list_names

__all__ = [
    "O_BINARY",
    "START",
    "JournalEntry",
    "Position",
    "SegmentReaders",
    "Span",
    "complete_end",
    "decode_entry",
    "decode_or_none",
    "encode_entry",
    "seek_read",
    "segment_indexes",
    "segment_path",
]

if TYPE_CHECKING:
    _RawOrNone: TypeAlias = msgspec.Raw | None
else:
    # msgspec cannot decode Raw inside a union; a bare Raw with a None default behaves the same.
    _RawOrNone = msgspec.Raw

_SEGMENT_RE: Final = re.compile(r"([0-9]{12})\.ndjson")
_TAIL_BLOCK: Final = 1 << 16
_HAS_PREAD: Final = hasattr(os, "pread")
_READ_FDS: Final = 32  # segment descriptors read_at keeps open (a few segments are live)
O_BINARY: Final = getattr(os, "O_BINARY", 0)
"""``os.O_BINARY`` where it exists (Windows), else 0: segments are opened as bytes."""


class Position(msgspec.Struct, frozen=True, order=True):
    """A point in the history: byte ``offset`` in segment number ``segment``; ordered."""

    segment: int
    offset: int


START: Final = Position(0, 0)
"""The position before every entry."""


class JournalEntry(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """One journal line. ``at`` is UTC; ``message`` is the full message JSON, kept raw.

    ``receipt`` (``acked``, ``delivered``) names one delivery; ``count`` (``delivered``) is
    the deliveries so far, that one included. Absent fields are left out of the line, so
    lines without them are byte-identical to those of earlier versions.
    """

    event: str
    at: datetime
    message_id: str | None = None
    idempotency_key: str | None = None
    agent: str | None = None
    to: list[str] | None = None
    source: str | None = None
    reason: str | None = None
    detail: str | None = None
    receipt: str | None = None
    count: int | None = None
    message: _RawOrNone = None


Span: TypeAlias = tuple[JournalEntry, Position, int]
"""An entry, the position where its line starts, and the line's length (newline included)."""


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(JournalEntry)


def encode_entry(entry: JournalEntry) -> bytes:
    """One line without its newline. ``entry.message`` must be valid JSON."""
    data = _encoder.encode(entry)
    # Only a raw message can hold a literal newline, and in valid JSON that is whitespace.
    return data.replace(b"\n", b" ") if b"\n" in data else data


def decode_entry(line: bytes) -> JournalEntry:
    """Decode one line (newline optional); raises :class:`InvalidMessage` if it is not an entry."""
    try:
        entry = _decoder.decode(line)
    except msgspec.DecodeError as exc:
        schema = isinstance(exc, msgspec.ValidationError)
        reason = Reason.SCHEMA if schema else Reason.INVALID_JSON
        raise InvalidMessage(reason, f"journal line: {exc}") from exc
    except UnicodeDecodeError as exc:  # msgspec's error for bad UTF-8 inside a string
        raise InvalidMessage(Reason.INVALID_UTF8, f"journal line: {exc}") from exc
    raw = entry.message
    if raw is not None and len(raw) == 4 and bytes(raw) == b"null":
        msgspec.structs.force_setattr(entry, "message", None)
    return entry


def decode_or_none(line: bytes) -> JournalEntry | None:
    """:func:`decode_entry`, or None for a line that is not an entry (readers skip it)."""
    try:
        return decode_entry(line)
    except InvalidMessage:
        return None


def segment_path(directory: Path, index: int) -> Path:
    """The file of segment number ``index`` in the journal ``directory``."""
    return directory / f"{index:012d}.ndjson"


def segment_indexes(directory: Path) -> list[int]:
    """The numbers of the segments in ``directory``, in ascending order."""
    names = list_names(directory)
    return sorted(int(m.group(1)) for n in names if (m := _SEGMENT_RE.fullmatch(n)))


def seek_read(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes of ``fd`` at ``offset``, moving the descriptor's file offset."""
    # Not os.pread (POSIX only): the fd offset is ours alone, and O_APPEND writes ignore it.
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, size)


def complete_end(fd: int, size: int) -> int:
    """The offset just after the last ``\\n`` among the first ``size`` bytes (0 if none)."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_BLOCK)
        nl = seek_read(fd, end - start, start).rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        end = start
    return 0


class SegmentReaders:
    """Read-only descriptors of the segments in ``directory``, for reads by position.

    Thread-safe; after a ``fork`` the child leaves the parent's descriptors alone and opens
    its own. At most ``_READ_FDS`` stay open, the least recently used closed first.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        # Least recently used first; pread shares no file offset, so the lock guards only the
        # dict (and the seek where there is no pread).
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def pread(self, segment: int, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` of segment ``segment``; FileNotFoundError if the
        segment is gone."""
        with self._lock:
            if self._pid != os.getpid():
                self._fds.clear()  # the parent's descriptors: leave them to it
                self._pid = os.getpid()
            fd = self._fds.pop(segment, None)
            if fd is None:
                fd = os.open(segment_path(self._directory, segment), os.O_RDONLY | O_BINARY)
                while len(self._fds) >= _READ_FDS:  # evict the least recently used
                    with contextlib.suppress(OSError):
                        os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[segment] = fd  # re-inserted: most recently used last
            if _HAS_PREAD:
                return os.pread(fd, size, offset)
            return seek_read(fd, size, offset)  # no pread (Windows): the lock covers the seek

    def forget(self, segments: Container[int] | None = None) -> None:
        """Close the descriptors of ``segments`` (all if None); a later read reopens them."""
        with self._lock:
            for index in list(self._fds):
                if segments is None or index in segments:
                    with contextlib.suppress(OSError):
                        os.close(self._fds.pop(index))
