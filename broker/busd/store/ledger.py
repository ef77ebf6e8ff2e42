"""The processed ledger, ``processed/<agent>.jsonl``: what an agent acknowledged.

One JSON object per line: ``{"message_id", "idempotency_key", "acked_at"}``.
A line that is not a JSON object (its first non-blank byte is not ``{``) is a *bare
id*, the whole line stripped of white space: what Tapps' FileMessageBus appends
(``message_id + "\n"``). Every reader (:func:`parse_line`) takes it as an ack of that
id, without a key, in every mode; compaction keeps it (it has no date). With
``compat = "tapps"`` busd's appends add a bare-id line after each JSON line, in the
same write (``add_many(bare_ids=True)``), so Tapps' reader sees busd's acks too.
The acked ids and the acked idempotency keys are two separate sets: a claimed
message was processed before iff its ``message_id`` is among the acked ids or
its ``idempotency_key`` among the acked keys (:meth:`ProcessedLedger.acked`);
an id never matches a key, so a key equal to another message's id settles neither.
Appends are one write + one fsync under an exclusive lock on
``processed/.<agent>.lock`` (:func:`~busd.store.fsio.file_lock`, given up after
10 s with :class:`LockTimeout`); readers take no lock and never consume a last
line without its newline. Compaction rewrites the file without the records older
than the dedupe window, atomically and durably
(:func:`~busd.store.fsio.replace_durable`) under the same lock. Disk-full,
read-only and permission failures raise :class:`StorageError`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from busd.store.fsio import STORAGE_ERRNOS, file_lock, fsync_dir, replace_durable, storage_error
from busd.store.layout import ledger_lock_path

__all__ = ["LedgerRecord", "ProcessedLedger", "parse_line", "rfc3339"]

_LOCK_TIMEOUT_S = 10.0


def rfc3339(ts: float) -> str:
    """``ts`` (seconds since the epoch) as RFC 3339 UTC with microseconds and ``Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LedgerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One line of ``processed/<agent>.jsonl``."""

    message_id: str
    idempotency_key: str | None = None
    acked_at: str


_decoder = msgspec.json.Decoder(LedgerRecord)
_BARE_UNDATED = ""


def parse_line(line: bytes) -> LedgerRecord | None:
    """One complete ledger line (without its newline) as a record, or None to skip it.

    A JSON line decodes as a :class:`LedgerRecord` (unknown fields ignored); any other
    non-blank line is a bare id (Tapps' ack): a record with that id, no key and an
    empty ``acked_at``. Blank lines, and JSON lines that do not decode, are skipped.
    """
    text = line.strip()
    if not text:
        return None
    if text[:1] == b"{":
        try:
            return _decoder.decode(text)
        except msgspec.DecodeError:
            return None  # a torn line glued to garbage
    try:
        return LedgerRecord(message_id=text.decode("utf-8"), acked_at=_BARE_UNDATED)
    except UnicodeDecodeError:
        return None


class ProcessedLedger:
    """The message ids and (apart) the idempotency keys an agent has acknowledged.

    Reads the file once, then only the bytes appended since (the offset of the
    last complete line is remembered), so repeated checks are cheap. A last
    line without its newline (a write in progress, or torn by a crash) is not
    consumed; lines that fail to decode are skipped. Thread-safe.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = ledger_lock_path(path)
        self._ids: set[str] = set()
        self._keys: set[str] = set()
        self._offset = 0
        self._ino: int | None = None
        self._mutex = threading.Lock()

    def refresh(self) -> None:
        """Read what was appended since the last call (all of it if the file was replaced)."""
        with self._mutex:
            self._refresh()

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            if st.st_ino != self._ino or st.st_size < self._offset:
                self._ids.clear()
                self._keys.clear()
                self._offset, self._ino = 0, st.st_ino
            if st.st_size == self._offset:
                return
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(st.st_size - self._offset)
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self._offset += end + 1
        for line in chunk[:end].split(b"\n"):
            rec = parse_line(line)
            if rec is not None:
                self._add(rec)

    def acked(self, message_id: str, key: str | None) -> bool:
        """Whether a message with this id and idempotency key was acknowledged.

        True iff ``message_id`` is among the acked ids or ``key`` (if any) among
        the acked keys: the claim-time guard that keeps side effects single.
        """
        self.refresh()
        return message_id in self._ids or (key is not None and key in self._keys)

    def has_id(self, message_id: str) -> bool:
        """Whether a message with this id was acknowledged."""
        self.refresh()
        return message_id in self._ids

    def has_key(self, key: str) -> bool:
        """Whether a message with this idempotency key was acknowledged."""
        self.refresh()
        return key in self._keys

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is an acked id or an acked key: a loose look-up for tools
        and tests. Deciding whether a message was processed is :meth:`acked`."""
        self.refresh()
        return name in self._ids or name in self._keys

    def __len__(self) -> int:
        """How many acked ids and acked keys are known (the two sets together)."""
        self.refresh()
        return len(self._ids) + len(self._keys)

    def add_many(self, records: Iterable[LedgerRecord], *, bare_ids: bool = False) -> None:
        """Append ``records`` as one write + one fsync under the exclusive ledger lock.

        ``bare_ids`` (``compat = "tapps"``): each JSON line is followed by a line holding
        the bare message id, which is what Tapps' reader matches. Raises
        :class:`LockTimeout` if the lock is not acquired within 10 s.
        """
        recs = list(records)
        if not recs:
            return
        payload = b"".join(_encode_line(r, bare_ids) for r in recs)
        with self._locked():
            try:
                self._append(payload)
            except OSError as exc:
                if exc.errno in STORAGE_ERRNOS:
                    raise storage_error(exc, path=self.path) from exc
                raise
        with self._mutex:
            for r in recs:
                self._add(r)

    def _add(self, rec: LedgerRecord) -> None:
        self._ids.add(rec.message_id)
        if rec.idempotency_key is not None:
            self._keys.add(rec.idempotency_key)

    def _append(self, payload: bytes) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A writer died mid-line: end that line so ours is not glued to it.
                payload = b"\n" + payload
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if size == 0:
            fsync_dir(self.path.parent)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # The module constant is read at call time, so tests may shorten it.
        with file_lock(self.lock_path, timeout=_LOCK_TIMEOUT_S, what=f"ledger {self.path.name}"):
            yield

    def compact(self, older_than_s: float, *, now: float | None = None) -> int:
        """Drop records acked more than ``older_than_s`` ago; return how many were dropped.

        The rewrite is atomic: readers see the old file or the new one, never a mix.
        Records whose ``acked_at`` does not parse are kept (never drop what we
        cannot date).
        """
        limit = (time.time() if now is None else now) - older_than_s
        with self._locked():
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                return 0
            kept: list[bytes] = []
            dropped = 0
            for line in data.split(b"\n"):
                if not line:
                    continue
                rec = parse_line(line)
                try:
                    old = (
                        rec is not None and datetime.fromisoformat(rec.acked_at).timestamp() < limit
                    )
                except ValueError:
                    old = False  # a bare id (no date) or a date we cannot read: kept
                if old:
                    dropped += 1
                else:
                    kept.append(line + b"\n")
            if not dropped:
                return 0
            # The tmp file is hidden beside the ledger: the ledger knows no tmp/ directory.
            replace_durable(self.path, b"".join(kept))
        with self._mutex:
            self._ids.clear()
            self._keys.clear()
            self._offset, self._ino = 0, None
        return dropped


def _encode_line(record: LedgerRecord, bare_id: bool) -> bytes:
    line = msgspec.json.encode(record) + b"\n"
    if bare_id and "\n" not in record.message_id and "\r" not in record.message_id:
        line += record.message_id.encode("utf-8") + b"\n"
    return line
