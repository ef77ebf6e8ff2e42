"""Follow conductor-loop bus files (``[[conductor.follow]]``): their new messages, routed once.

A followed ``path`` is a bus file, or a directory searched (recursively) for
``*MESSAGE-BUS.md``. conductor-loop agents append to those files with O_APPEND
under an exclusive ``flock``; the :class:`Follower` reads what is new:

* when: a watchfiles watch of the files' directories (a hint: names ending in
  ``MESSAGE-BUS.md``), and a full pass every ``rescan_interval_seconds`` (the
  safety net, and how new files in followed directories are found);
* how: the file opened read-only (never written, moved or removed), the bytes
  after the stored offset read under ``LOCK_SH`` (a writer's entry is never seen
  half-written), split by conductor's own rules (:func:`busd.core.conductor.split`;
  an unterminated tail waits for the next pass), each record mapped with
  :func:`busd.core.conductor.to_message` (``to`` = the entry's recipient);
* then: the messages of a batch (at most :data:`BATCH`) are published through the
  committer, the path socket publishes take (one group commit: journal + fsync),
  and only then is the offset stored (:mod:`busd.store.cursors`). A crash between
  the two reads the batch again and the dedupe index answers ``duplicate`` (by
  ``message_id``): never a second delivery.

A file whose size fell below the offset (truncated), or that is another file now
(other ``st_dev``/``st_ino``, or its first bytes changed), is read again from 0;
dedupe makes that safe within ``dedupe_window_seconds``. A file conductor rotated
(renamed to ``<name>.<stamp>.archived``, its inode kept) is first read to its end
under the archive name, so nothing appended before the rotation is lost.

A record conductor itself would drop (``Record.error``), or whose mapped message
busd refuses at decoding, is dead-lettered with its bytes, its file and byte offset
(``original_path`` ``<file>@<offset>``), once: a batch read again after a crash
finds its DLQ entry and writes no second one. Refusals at routing (a topic without
subscribers) are the commit's, as for any publish.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import structlog
import watchfiles
from anyio.abc import TaskStatus

from busd.config import Config
from busd.core import codec, conductor
from busd.errors import (
    BusdError,
    InvalidMessage,
    InvalidName,
    Reason,
    ShuttingDown,
    Unroutable,
)
from busd.routing.intake import Origin, Refused
from busd.routing.refusals import dead_letter
from busd.routing.router import Incoming, RouteReport
from busd.runtime.arrivals import Wakeup
from busd.runtime.committer import Committer
from busd.runtime.metrics import Metrics
from busd.store import dlq
from busd.store.cursors import HEAD_BYTES, Cursor, Cursors
from busd.store.fsio import list_names
from busd.store.journal import JournalEntry

__all__ = ["BATCH", "BUS_SUFFIX", "SENDER", "Follower", "bus_files"]

_log = structlog.get_logger("busd.conductor")

BATCH = 512
"""Messages per publish (one group commit) and per stored offset."""
BUS_SUFFIX = conductor.BUS_FILE_SUFFIX
"""What a file in a followed directory is named like to be followed."""
SENDER = conductor.AGENT_ID
"""The sender a followed message is published as (its ``agent_id`` says the same)."""

_MAX_READ = 64 << 20  # per pass and file: a bigger backlog is read in several passes
_LOCK_TRIES = 100  # x 0.05 s: a writer holds its lock for one write; never wait forever
_ARCHIVED = ".archived"


@dataclass(slots=True)
class _Chunk:
    """What one read of a file gave: messages and refusals in file order, and the cursor
    to store once they are routed (``None``: nothing new)."""

    path: Path
    to: str
    cursor: Cursor
    key: str
    items: list[Incoming] = field(default_factory=list)
    dropped: list[tuple[conductor.Record, Reason, str]] = field(default_factory=list)
    more: bool = False


def bus_files(config: Config) -> list[tuple[Path, str]]:
    """Every followed bus file with its recipient, in config order (blocking: a thread)."""
    out: dict[Path, str] = {}
    for entry in config.conductor.follow:
        root = config.resolve(entry.path)
        if root.is_dir():
            for found in _walk(root):
                out.setdefault(found, entry.to)
        else:
            out.setdefault(root, entry.to)
    return list(out.items())


def _hinted(config: Config, paths: set[Path]) -> list[tuple[Path, str]]:
    """The followed files among ``paths`` (named by events), with their recipients."""
    out: dict[Path, str] = {}
    for path in sorted(paths):
        for entry in config.conductor.follow:
            root = config.resolve(entry.path)
            if path == root or (path.name.endswith(BUS_SUFFIX) and path.is_relative_to(root)):
                out.setdefault(path, entry.to)
                break
    return list(out.items())


def _watch_targets(config: Config) -> tuple[list[Path], list[Path]]:
    """The directories holding followed files (watched alone) and followed directories
    (watched recursively) that exist now; the rescan covers the others."""
    files: list[Path] = []
    dirs: list[Path] = []
    for entry in config.conductor.follow:
        path = config.resolve(entry.path)
        (dirs if path.is_dir() else files).append(path)
    return sorted({f.parent for f in files if f.parent.is_dir()}), sorted(set(dirs))


def _walk(root: Path) -> Iterable[Path]:
    for directory, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            if name.endswith(BUS_SUFFIX):
                yield Path(directory) / name


class Follower:
    """Follows every ``[[conductor.follow]]`` entry of the config in force."""

    def __init__(
        self,
        config: Callable[[], Config],
        committer: Committer,
        metrics: Metrics,
        stop: anyio.Event | None = None,
    ) -> None:
        self._config = config
        # Set by the daemon before it cancels: a watch thread in flight returns at once.
        self._stop = stop if stop is not None else anyio.Event()
        self._committer = committer
        self._metrics = metrics
        self._cursors: dict[str, Cursor] = {}
        self._store = Cursors(config().layout, fsync=config().fsync)
        self._wake = Wakeup()
        self._dirty: set[Path] = set()
        self._full = True

    # -- the loop ---------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow until cancelled; started once the watch is set up."""
        self._cursors, problem = await anyio.to_thread.run_sync(self._store.load)
        if problem is not None:
            _log.error("conductor_cursors_ignored", path=str(self._store.path), error=problem)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch)
            tg.start_soon(self._rescan_timer)
            task_status.started()
            self._wake.set()  # the first pass: everything appended while no daemon ran
            await self._loop()

    async def _loop(self) -> None:
        backoff = 0.0
        while True:
            await self._wake.wait()
            full, dirty = self._full, self._dirty
            self._full, self._dirty = False, set()
            try:
                await self._pass(full, dirty)
                backoff = 0.0
            except ShuttingDown:
                return  # the daemon stops: the offsets stored are where the next one starts
            except (BusdError, OSError) as exc:
                # The journal or the cursor file could not be written: nothing is lost
                # (the offset was not stored); read the same bytes again later.
                backoff = min(max(backoff * 2, 0.1), 5.0)
                _log.error("conductor_follow_failed", error=str(exc), retry_in_s=backoff)
                self._full = True
                await anyio.sleep(backoff)
                self._wake.set()

    async def _rescan_timer(self) -> None:
        while True:
            await anyio.sleep(self._config().rescan_interval_seconds)
            self._full = True
            self._wake.set()

    async def _watch(self) -> None:
        """Hints from watchfiles; a failure falls back to polling, then to the rescan."""
        polling = self._config().force_polling
        while not self._stop.is_set():
            parents, dirs = await anyio.to_thread.run_sync(_watch_targets, self._config())
            try:
                async with anyio.create_task_group() as tg:
                    if parents:
                        tg.start_soon(self._awatch, parents, False, polling)
                    if dirs:
                        tg.start_soon(self._awatch, dirs, True, polling)
                return
            except Exception as exc:  # noqa: BLE001 - a watch is a hint; the rescan goes on
                _log.warning("conductor_watch_failed", error=str(exc), fallback="polling")
                polling = True
                with anyio.move_on_after(1.0):
                    await self._stop.wait()

    async def _awatch(self, paths: list[Path], recursive: bool, polling: bool) -> None:
        config = self._config()

        def keep(change: watchfiles.Change, path: str) -> bool:
            return change != watchfiles.Change.deleted and path.endswith(BUS_SUFFIX)

        async for changes in watchfiles.awatch(
            *paths,
            watch_filter=keep,
            stop_event=self._stop,
            debounce=config.watch_debounce_ms,
            step=config.watch_step_ms,
            force_polling=polling or None,
            poll_delay_ms=100,
            rust_timeout=5000,
            recursive=recursive,
            ignore_permission_denied=True,
        ):
            self._dirty.update(Path(p) for _, p in changes)
            self._wake.set()

    # -- one pass -----------------------------------------------------------------

    async def _pass(self, full: bool, dirty: set[Path]) -> None:
        config = self._config()
        if full:
            targets = await anyio.to_thread.run_sync(bus_files, config)
        else:
            targets = _hinted(config, dirty)  # no walk: an event names its file
        for path, to in targets:
            while True:
                chunk = await anyio.to_thread.run_sync(self._read, config, path, to)
                if chunk is None:
                    break
                await self._route(config, chunk)
                if not chunk.more:
                    break

    async def _route(self, config: Config, chunk: _Chunk) -> None:
        """Dead letters, then the batch's commit, then (durable) the cursor."""
        if chunk.dropped:
            entries = await anyio.to_thread.run_sync(self._dead_letter, config, chunk)
            if entries:
                await self._committer.record(entries)
                self._metrics.count(RouteReport(dead_lettered=len(entries)))
        for i in range(0, len(chunk.items), BATCH):
            items = chunk.items[i : i + BATCH]
            await self._committer.publish(items)
            for item in items:
                if isinstance(item.outcome, BusdError) and not _refusal(item.outcome):
                    raise item.outcome  # not durable: keep the offset, try again
        self._cursors[chunk.key] = chunk.cursor
        cursors = dict(self._cursors)
        await anyio.to_thread.run_sync(self._store.store, cursors)
        if chunk.items or chunk.dropped:
            _log.info(
                "conductor_followed",
                path=str(chunk.path),
                messages=len(chunk.items),
                dead_lettered=len(chunk.dropped),
                offset=chunk.cursor.offset,
            )

    # -- worker-thread halves --------------------------------------------------------

    def _read(self, config: Config, path: Path, to: str) -> _Chunk | None:
        """The records after the cursor of ``path`` (or of the file it was rotated to)."""
        key = str(path)
        cursor = self._cursors.get(key)
        try:
            fd = _open(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            _log.warning("conductor_file_unreadable", path=key, error=str(exc))
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            if cursor is not None and (cursor.dev, cursor.ino) != (st.st_dev, st.st_ino):
                old = _rotated(path, cursor)
                if old is not None:
                    chunk = self._read_locked(config, old, cursor, to, key)
                    if chunk is not None:
                        return chunk
                _log.info("conductor_file_replaced", path=key)
                cursor = None
            return self._read_fd(config, fd, path, cursor, to, key)
        finally:
            os.close(fd)

    def _read_locked(
        self, config: Config, path: Path, cursor: Cursor, to: str, key: str
    ) -> _Chunk | None:
        try:
            fd = _open(path)
        except OSError:
            return None
        try:
            return self._read_fd(config, fd, path, cursor, to, key)
        finally:
            os.close(fd)

    def _read_fd(
        self, config: Config, fd: int, path: Path, cursor: Cursor | None, to: str, key: str
    ) -> _Chunk | None:
        st = os.fstat(fd)
        _lock_shared(fd)
        try:
            size = os.fstat(fd).st_size
            head = _pread(fd, min(size, HEAD_BYTES), 0)
            if cursor is not None and (
                size < cursor.offset or _sha(head[: cursor.head_len]) != cursor.head
            ):
                _log.info("conductor_file_reset", path=key, size=size, offset=cursor.offset)
                cursor = None
            start = cursor.offset if cursor is not None else 0
            line = cursor.line if cursor is not None else 0
            if size <= start and cursor is not None:
                return None
            data = _pread(fd, min(size - start, _MAX_READ), start)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        records, complete = _split(data, start, line)
        end = start + complete
        new = Cursor(
            offset=end,
            line=line + data.count(b"\n", 0, complete),
            dev=st.st_dev,
            ino=st.st_ino,
            head=_sha(head[: min(end, HEAD_BYTES)]),
            head_len=min(end, HEAD_BYTES),
        )
        if cursor is not None and new == cursor:
            return None
        chunk = _Chunk(path, to, new, key, more=size - start > _MAX_READ)
        for rec in records:
            try:
                fields = conductor.to_message(rec, to=to, source=str(path))
                msg = codec.decode(msgspec.json.encode(fields), max_bytes=config.max_message_bytes)
            except InvalidMessage as exc:
                detail = f"{exc.detail} ({path}, byte {rec.offset})"
                chunk.dropped.append((rec, exc.reason, detail))
                continue
            chunk.items.append(Incoming(message=msg, sender=SENDER))
        return chunk

    def _dead_letter(self, config: Config, chunk: _Chunk) -> list[JournalEntry]:
        """DLQ entries for the chunk's refused records, skipping those already there."""
        layout = config.layout
        now = datetime.now(UTC)
        entries: list[JournalEntry] = []
        for rec, reason, detail in chunk.dropped:
            original = f"{chunk.path}@{rec.offset}"
            if dlq.find(layout, original, hashlib.sha256(rec.raw).hexdigest()) is not None:
                continue  # a batch read again after a crash: dead-lettered once
            # The way `busd import conductor` dead-letters a record: the one way out.
            origin = Origin("file", None, original, SENDER)
            refused = Refused(origin, InvalidMessage(reason, detail), data=rec.raw)
            dead_letter(layout, refused, at=now, entries=entries)
        return entries


def _refusal(exc: BusdError) -> bool:
    """A publish refused and dead-lettered by the commit (done with), not a storage error."""
    return isinstance(exc, (InvalidMessage, Unroutable, InvalidName))


def _split(data: bytes, base: int, line: int) -> tuple[list[conductor.Record], int]:
    """:func:`conductor.split` of bytes read at file offset ``base``, ``line`` lines in.

    ``split`` counts lines from the start of what it is given (legacy lines take their
    ids from their line number): ``line`` newlines stand in for the bytes not read
    again. Returns records with offsets in the file, and the complete length of ``data``.
    """
    records, complete = conductor.split(b"\n" * line + data, start=line)
    shift = base - line
    return [
        dataclasses.replace(r, offset=r.offset + shift, end=r.end + shift) for r in records
    ], complete - line


def _open(path: Path) -> int:
    # O_NONBLOCK: a FIFO planted under a bus file's name must not hang the thread.
    return os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))


def _lock_shared(fd: int) -> None:
    """``LOCK_SH``: conductor appends under ``LOCK_EX``, so no half entry is read."""
    for _ in range(_LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        time.sleep(0.05)
    raise OSError(errno.EWOULDBLOCK, "a writer holds the bus file's lock")


def _pread(fd: int, n: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        part = os.pread(fd, n, offset)
        if not part:
            break
        parts.append(part)
        n -= len(part)
        offset += len(part)
    return b"".join(parts)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rotated(path: Path, cursor: Cursor) -> Path | None:
    """The archive conductor renamed ``path`` to (same inode as the cursor), if any."""
    prefix = path.name + "."
    try:
        names = list_names(path.parent)
    except OSError:
        return None
    for name in names:
        if name.startswith(prefix) and name.endswith(_ARCHIVED):
            candidate = path.parent / name
            try:
                st = os.stat(candidate)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (cursor.dev, cursor.ino):
                return candidate
    return None
