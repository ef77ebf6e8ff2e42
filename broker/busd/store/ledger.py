"""The processed ledger, ``processed/<agent>.jsonl``: what an agent acknowledged.

One JSON object per line: ``{"message_id", "idempotency_key", "acked_at"}``.
Appends are one write + one fsync under an exclusive lock on
``processed/.<agent>.lock``; readers take no lock and never consume a last line
without its newline. Compaction rewrites the file without the records older
than the dedupe window, atomically (tmp + fsync + replace) under the same lock.
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
import portalocker

from busd.errors import LockTimeout
from busd.store.fsio import fsync_dir, tmp_name

__all__ = ["LedgerRecord", "ProcessedLedger", "rfc3339"]

_LOCK_TIMEOUT_S = 10.0


def rfc3339(ts: float) -> str:
    """``ts`` (seconds since the epoch) as RFC 3339 UTC with microseconds and ``Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LedgerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One line of ``processed/<agent>.jsonl``."""

    message_id: str
    idempotency_key: str | None = None
    acked_at: str


class ProcessedLedger:
    """The keys (message ids and idempotency keys) an agent has acknowledged.

    Reads the file once, then only the bytes appended since (the offset of the
    last complete line is remembered), so repeated checks are cheap. A last
    line without its newline (a write in progress, or torn by a crash) is not
    consumed; lines that fail to decode are skipped. Thread-safe.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.parent / f".{path.stem}.lock"
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
            try:
                rec = msgspec.json.decode(line, type=LedgerRecord)
            except msgspec.DecodeError:
                continue  # a torn line glued to garbage, or an empty line
            self._add(rec)

    def __contains__(self, key: object) -> bool:
        self.refresh()
        return key in self._keys

    def __len__(self) -> int:
        self.refresh()
        return len(self._keys)

    def add_many(self, records: Iterable[LedgerRecord]) -> None:
        """Append ``records`` as one write + one fsync under the exclusive ledger lock.

        Raises :class:`LockTimeout` if the lock is not acquired within 10 s.
        """
        recs = list(records)
        if not recs:
            return
        payload = b"".join(msgspec.json.encode(r) + b"\n" for r in recs)
        with self._locked():
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
        with self._mutex:
            for r in recs:
                self._add(r)

    def _add(self, rec: LedgerRecord) -> None:
        self._keys.add(rec.message_id)
        if rec.idempotency_key is not None:
            self._keys.add(rec.idempotency_key)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock = portalocker.Lock(
            self.lock_path, mode="a", timeout=_LOCK_TIMEOUT_S, check_interval=0.005
        )
        try:
            lock.acquire()
        except portalocker.exceptions.LockException as exc:
            raise LockTimeout(
                f"ledger {self.path.name} locked for {_LOCK_TIMEOUT_S:g} s",
                lock=str(self.lock_path),
            ) from exc
        try:
            yield
        finally:
            lock.release()

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
                try:
                    rec = msgspec.json.decode(line, type=LedgerRecord)
                    old = datetime.fromisoformat(rec.acked_at).timestamp() < limit
                except (msgspec.DecodeError, ValueError):
                    old = False
                if old:
                    dropped += 1
                else:
                    kept.append(line + b"\n")
            if not dropped:
                return 0
            tmp = self.path.parent / f".{tmp_name()}"
            with open(tmp, "wb") as f:
                f.write(b"".join(kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
        with self._mutex:
            self._keys.clear()
            self._offset, self._ino = 0, None
        return dropped
