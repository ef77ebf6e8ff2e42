"""The deduplication index: which dedupe keys were accepted, when, from where.

The journal is the persistent form of the index: every ``accepted`` entry
carries its ``message_id``, ``idempotency_key`` and ``source``. The index is
rebuilt from the journal at start-up (entries older than the window are
skipped), so a restart never forgets a key that is still inside the window.

Remembering the ``source`` is what makes crash recovery exact: a file seen
again at the very path it was accepted from is not a new duplicate but a
routing pass that died before it removed the file, so the router re-checks
its deliveries instead of dropping it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from datetime import datetime
from typing import NamedTuple

from busd.store.journal import Journal

__all__ = ["DedupeIndex", "Seen"]


class Seen(NamedTuple):
    """What the index remembers of one accepted key."""

    message_id: str
    source: str | None
    at: float


class DedupeIndex:
    """Keys accepted within the last ``window_s`` seconds, oldest first.

    Not thread-safe: one router owns it.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._seen: OrderedDict[str, Seen] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    def get(self, key: str) -> Seen | None:
        """The record of ``key``, or None if it was never accepted inside the window."""
        return self._seen.get(key)

    def add(self, key: str, message_id: str, source: str | None, at: float | None = None) -> None:
        """Remember ``key``; the newest acceptance wins."""
        self._seen.pop(key, None)
        self._seen[key] = Seen(message_id, source, time.time() if at is None else at)

    def expire(self, now: float | None = None) -> int:
        """Forget keys older than the window; return how many were dropped."""
        limit = (time.time() if now is None else now) - self.window_s
        dropped = 0
        while self._seen:
            key, seen = next(iter(self._seen.items()))
            if seen.at >= limit:
                break
            del self._seen[key]
            dropped += 1
        return dropped

    @classmethod
    def rebuild(cls, journal: Journal, window_s: float, now: float | None = None) -> DedupeIndex:
        """Rebuild the index from every ``accepted`` entry of ``journal`` inside the window."""
        index = cls(window_s)
        limit = (time.time() if now is None else now) - window_s
        for entry in journal.read(events=("accepted",)):
            at = _timestamp(entry.at)
            if at < limit or entry.message_id is None:
                continue
            index.add(entry.message_id, entry.message_id, entry.source, at)
            if entry.idempotency_key:
                index.add(entry.idempotency_key, entry.message_id, entry.source, at)
        return index


def _timestamp(value: datetime) -> float:
    return value.timestamp()
