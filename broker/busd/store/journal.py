"""The bus history: append-only NDJSON segments in ``<root>/journal/``.

Moved to :mod:`busd.store.segments` (re-exported here): the segment names, the line codec,
:class:`Position`, and the descriptor cache behind :meth:`Journal.read_at`.

Contract:

- Only the highest-numbered segment is written. A new one starts when the current one would
  grow past ``segment_bytes``; a batch is never split, so a batch larger than that gets a
  segment alone.
- Writers hold the exclusive lock ``journal/.lock`` (also across processes); readers never
  lock. A last line without its ``\\n`` is a write in progress or a torn one (the writer
  died): readers never return it, and the next writer (or :meth:`Journal.repair`) cuts it off
  before appending, so a torn prefix is never glued to a later line. A crash during
  :meth:`Journal.append` may keep a prefix of the batch's whole lines; once ``append``
  returns, the whole batch is durable (one ``write``, one ``fsync``).
- Lines that fail to decode are skipped by readers and counted in :attr:`Journal.skipped`.
- An entry is addressed by the :class:`Position` where its line starts and the line's length
  (newline included): :meth:`Journal.append_at` returns both, :meth:`Journal.read_spans` yields
  them, and :meth:`Journal.read_at` reads that one line back (``pread``, served from the page
  cache), so a queue may hold an index of messages instead of their bodies.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Container, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from busd.errors import NotFound
from busd.store.fsio import STORAGE_ERRNOS, file_lock, fsync_dir, storage_error
from busd.store.layout import JOURNAL_LOCK_NAME
from busd.store.segments import (
    O_BINARY,
    START,
    JournalEntry,
    Position,
    SegmentReaders,
    Span,
    complete_end,
    decode_entry,
    decode_or_none,
    encode_entry,
    seek_read,
    segment_indexes,
    segment_path,
)

__all__ = [
    "START",
    "Journal",
    "JournalEntry",
    "Position",
    "Span",
    "decode_entry",
    "encode_entry",
]

_READ_CHUNK: Final = 1 << 20


class Journal:
    """The journal in ``directory`` (the ``journal/`` folder of a bus root).

    Appends are serialized by a thread lock and the file lock; readers share nothing but
    :attr:`skipped`. After a ``fork`` the child reopens its descriptors. ``close`` releases
    them; a later append reopens them.
    """

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        lock_timeout: float = 10.0,
        fsync: bool = True,
    ) -> None:
        if segment_bytes <= 0 or lock_timeout < 0:
            raise ValueError("segment_bytes must be > 0 and lock_timeout >= 0")
        self.directory = Path(directory)
        self.lock_path = self.directory / JOURNAL_LOCK_NAME
        self.segment_bytes, self.lock_timeout, self.fsync = segment_bytes, lock_timeout, fsync
        self.skipped = 0
        """Undecodable lines (and torn tails of finished segments) readers passed over."""
        self._mutex, self._stats = threading.Lock(), threading.Lock()
        self._pid = os.getpid()
        self._seg_fd: int | None = None
        self._seg_index = 0
        self._readers = SegmentReaders(self.directory)  # read_at's descriptors

    def _path(self, index: int) -> Path:
        return segment_path(self.directory, index)

    def _indexes(self) -> list[int]:
        return segment_indexes(self.directory)

    def segments(self) -> list[Path]:
        """The segment files, oldest first."""
        return [self._path(i) for i in self._indexes()]

    def size_bytes(self) -> int:
        """Total size of the segments."""
        total = 0
        for path in self.segments():
            with contextlib.suppress(FileNotFoundError):  # pruned meanwhile
                total += path.stat().st_size
        return total

    def _sync_dir(self, path: Path) -> None:
        if self.fsync:
            fsync_dir(path)

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Hold the thread and file locks; map storage failures to :class:`StorageError`."""
        with self._mutex, self._storage_errors():
            if self._pid != os.getpid():
                # An inherited segment descriptor shares the parent's offset: start afresh.
                self._close_fds()
                self._pid = os.getpid()
            if not self.directory.is_dir():
                self.directory.mkdir(parents=True, exist_ok=True)
                self._sync_dir(self.directory.parent)
            with file_lock(self.lock_path, timeout=self.lock_timeout, what="the journal"):
                yield

    @contextlib.contextmanager
    def _storage_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            self._close_fds()  # reopen (and re-check the segment) next time
            if exc.errno not in STORAGE_ERRNOS:
                raise
            raise storage_error(exc, path=exc.filename or self.directory) from exc

    def _close_fds(self) -> None:
        if self._seg_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._seg_fd)
        self._seg_fd = None

    def _open_segment(self, index: int, *, new: bool) -> int:
        self._close_fds()
        flags = os.O_RDWR | os.O_APPEND | O_BINARY | (os.O_CREAT | os.O_EXCL if new else 0)
        self._seg_fd, self._seg_index = os.open(self._path(index), flags, 0o644), index
        if new:
            self._sync_dir(self.directory)
        return self._seg_fd

    def _current(self, *, create: bool) -> int | None:
        """The descriptor of the newest segment; the caller holds the write lock."""
        fd = self._seg_fd
        # Another process may have rotated (a newer file) or pruned (no links) since last time.
        if (
            fd is not None
            and os.fstat(fd).st_nlink
            and not self._path(self._seg_index + 1).exists()
        ):
            return fd
        if indexes := self._indexes():
            return self._open_segment(indexes[-1], new=False)
        return self._open_segment(1, new=True) if create else None

    def _cut_torn_tail(self, fd: int) -> tuple[int, int]:
        """Truncate ``fd`` after its last newline: ``(new size, bytes removed)``."""
        size = os.fstat(fd).st_size
        if size == 0 or seek_read(fd, 1, size - 1) == b"\n":
            return size, 0
        cut = complete_end(fd, size)
        os.ftruncate(fd, cut)
        if self.fsync:
            os.fsync(fd)
        return cut, size - cut

    def append(self, entries: Sequence[JournalEntry]) -> Position:
        """Durably append ``entries`` in order; returns the position after them.

        Raises :class:`LockTimeout`, or :class:`StorageError` (disk full, read-only, ...)
        after truncating the partial batch away.
        """
        return self.append_lines([encode_entry(e) for e in entries])

    def append_lines(self, lines: Sequence[bytes]) -> Position:
        """:meth:`append` for pre-encoded lines (each non-empty, without any ``\\n``)."""
        if any(not line or b"\n" in line for line in lines):
            raise ValueError("a journal line must be non-empty and contain no newline")
        data = b"\n".join(lines) + b"\n" if lines else b""
        with self._write_lock():
            fd = self._current(create=bool(data))
            if fd is None:
                return START
            size = self._cut_torn_tail(fd)[0]
            if not data:
                return Position(self._seg_index, size)
            if size > 0 and size + len(data) > self.segment_bytes:
                fd, size = self._open_segment(self._seg_index + 1, new=True), 0
            try:
                view = memoryview(data)
                while view:  # os.write may write less than asked
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):  # no half batch for the next append to keep
                    os.ftruncate(fd, size)
                raise
            return Position(self._seg_index, size + len(data))

    def append_at(self, entries: Sequence[JournalEntry]) -> list[tuple[Position, int]]:
        """:meth:`append` (the same one write and one fsync), returning where each entry is:
        the position its line starts at and the line's length, newline included, in order.

        These are what :meth:`read_at` takes. Empty ``entries`` write nothing and return [].
        """
        lines = [encode_entry(e) for e in entries]
        if not lines:
            return []
        end = self.append_lines(lines)
        # A batch is never split across segments, so it ends where the append says.
        offset = end.offset - sum(len(line) + 1 for line in lines)
        spans: list[tuple[Position, int]] = []
        for line in lines:
            spans.append((Position(end.segment, offset), len(line) + 1))
            offset += len(line) + 1
        return spans

    def read_at(self, position: Position, length: int) -> JournalEntry:
        """The entry whose line starts at ``position`` and is ``length`` bytes long (newline
        included), as :meth:`append_at` or :meth:`read_spans` gave them.

        One ``pread`` from a cached descriptor of the segment (thread-safe), so a recently
        written entry comes from the page cache. Raises :class:`NotFound` if the segment is
        gone (pruned) or no longer holds that line (cut), :class:`InvalidMessage` if the
        bytes there are not an entry (a wrong position).
        """
        if length <= 0 or position.offset < 0:
            raise ValueError("read_at needs a line's start and its length (> 0)")
        where = f"{position.segment}:{position.offset}"
        try:
            data = self._readers.pread(position.segment, length, position.offset)
        except FileNotFoundError:
            msg = f"journal segment {position.segment} of {self.directory} is gone"
            raise NotFound(msg, position=where) from None
        if len(data) != length or not data.endswith(b"\n"):
            msg = f"no journal line of {length} bytes at {where} in {self.directory}"
            raise NotFound(msg, position=where)
        return decode_entry(data)

    def repair(self) -> int:
        """Cut a torn tail off the newest segment, durably; returns the bytes removed."""
        with self._write_lock():
            fd = self._current(create=False)
            return 0 if fd is None else self._cut_torn_tail(fd)[1]

    def prune(
        self,
        *,
        max_age_seconds: float | None,
        max_total_bytes: int | None,
        keep_after: Position | None = None,
    ) -> list[Path]:
        """Delete whole segments, oldest first, while the oldest is older than
        ``max_age_seconds`` (by mtime, the time of its newest entry) or the total exceeds
        ``max_total_bytes``. Never deletes the newest segment, nor any segment at or after
        ``keep_after.segment``. Returns the deleted paths.
        """
        removed: list[Path] = []
        with self._write_lock():
            indexes = self._indexes()
            stats = [self._path(i).stat() for i in indexes]
            total, now = sum(st.st_size for st in stats), time.time()
            for index, st in zip(indexes[:-1], stats[:-1], strict=True):
                too_old = max_age_seconds is not None and now - st.st_mtime > max_age_seconds
                too_big = max_total_bytes is not None and total > max_total_bytes
                kept = keep_after is not None and index >= keep_after.segment
                if kept or not (too_old or too_big):
                    break
                try:
                    self._path(index).unlink()
                except PermissionError:  # Windows: a reader has it open; retry next time
                    break
                removed.append(self._path(index))
                total -= st.st_size
            if removed:
                self._sync_dir(self.directory)
        # An open descriptor would keep a deleted segment's blocks (and its stale lines).
        self._readers.forget({int(p.name[:12]) for p in removed})
        return removed

    def close(self) -> None:
        """Release the descriptors (idempotent)."""
        with self._mutex:
            self._close_fds()
        self._readers.forget()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _skip(self) -> None:
        with self._stats:
            self.skipped += 1

    def read_from(self, position: Position = START) -> Iterator[tuple[JournalEntry, Position]]:
        """Entries after ``position``, each with the position just after it, until caught up.

        A position in a pruned segment continues at the oldest remaining segment.
        """
        for entry, start, length in self.read_spans(position):
            yield entry, Position(start.segment, start.offset + length)

    def read_spans(self, position: Position = START) -> Iterator[Span]:
        """:meth:`read_from`, but each entry comes with the position where its line starts
        and the line's length (newline included): what :meth:`read_at` reads back.
        """
        segment, offset = position.segment, position.offset
        while later := [i for i in self._indexes() if i >= segment]:
            if later[0] != segment:
                segment, offset = later[0], 0
            # Seen before reading: once a newer segment exists, this one never grows again.
            sealed = len(later) > 1
            try:
                f = open(self._path(segment), "rb", buffering=0)  # noqa: SIM115
            except FileNotFoundError:  # pruned meanwhile
                segment, offset = segment + 1, 0
                continue
            with f:
                chunk = _READ_CHUNK
                while True:
                    # Re-read from a line start: a torn tail may be cut and rewritten meanwhile.
                    f.seek(offset)
                    buf = f.read(chunk)
                    end = buf.rfind(b"\n") + 1
                    if end == 0 and len(buf) == chunk:  # a line longer than the buffer
                        chunk *= 2
                        continue
                    if end == 0:
                        if buf and sealed:
                            self._skip()
                        break
                    for line in buf[: end - 1].split(b"\n"):
                        start, length = offset, len(line) + 1
                        offset += length
                        if (entry := decode_or_none(line)) is None:
                            self._skip()
                        else:
                            yield entry, Position(segment, start), length
            if not sealed:
                return
            segment, offset = segment + 1, 0

    def _after(self, message_id: str, start: Position) -> Position:
        for entry, pos in self.read_from(start):
            if entry.message_id == message_id:
                return pos
        msg = f"message {message_id!r} is not in the journal {self.directory}"
        raise NotFound(msg, message_id=message_id)

    def read(
        self,
        since: str | None = None,
        *,
        events: Container[str] | None = None,
        start: Position | None = None,
    ) -> Iterator[JournalEntry]:
        """Entries in order (from ``start``), only those whose event is in ``events`` if given.

        With ``since``, only entries after the first entry with that message id; if there is
        none, iterating raises :class:`NotFound` (the id is unknown or was pruned).
        """
        pos = START if start is None else start
        if since is not None:
            pos = self._after(since, pos)
        for entry, _ in self.read_from(pos):
            if events is None or entry.event in events:
                yield entry

    def poll_for_new(self, last_id: str | None) -> list[JournalEntry]:
        """Entries after the first one with ``last_id`` (all if None); :class:`NotFound` if absent.

        Scans from the start every call: long-lived followers should keep a :class:`Position`.
        """
        return list(self.read(since=last_id))

    def follow(
        self,
        since: str | None = None,
        *,
        poll_interval: float = 0.1,
        stop: Callable[[], bool] | None = None,
        start: Position | None = None,
    ) -> Iterator[JournalEntry]:
        """Like :meth:`read`, then keep yielding entries as they are appended (across
        rotations), polling every ``poll_interval`` s, until ``stop()`` is true (checked after
        every entry and every poll). Blocks: run it in a worker thread from async code.
        """
        pos = START if start is None else start
        if since is not None:
            pos = self._after(since, pos)
        while True:
            for entry, after in self.read_from(pos):
                pos = after
                yield entry
                if stop is not None and stop():
                    return
            if stop is not None and stop():
                return
            time.sleep(poll_interval)

    def end_position(self) -> Position:
        """The position after the last complete line: where following "from now on" starts."""
        if not (indexes := self._indexes()):
            return START
        try:
            fd = os.open(self._path(indexes[-1]), os.O_RDONLY | O_BINARY)
        except FileNotFoundError:  # pruned meanwhile
            return self.end_position()
        try:
            return Position(indexes[-1], complete_end(fd, os.fstat(fd).st_size))
        finally:
            os.close(fd)
