"""The deduplication index: which message ids and idempotency keys were accepted, when, from where.

The rule (protocol.md states it for users): busd remembers two sets for the
dedupe window, the **ids** of accepted messages and the **idempotency keys** of
accepted messages. A message is a duplicate iff its ``message_id`` is among the
accepted ids, or it carries an ``idempotency_key`` that is among the accepted
keys. An id is only ever compared with ids and a key with keys, so a key equal
to another message's id makes neither a duplicate. Every accepted message adds
its id to the ids and, if it has one, its key to the keys.

Why ids count for keyed messages too: message ids are unique by contract, and
everything downstream (delivery names, ack by message id, recovery's holdings,
the in-memory queues) names a message by its id; two accepted messages with one
id would be confused there, and recovery could take one for the other.

The journal is the persistent form of the index: every ``accepted`` entry
carries its ``message_id``, ``idempotency_key`` and ``source``. The index is
rebuilt from the journal at start-up (entries older than the window are
skipped), so a restart never forgets an id or a key that is still inside the window.

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

__all__ = ["DedupeIndex", "KeySpaces", "Seen"]


class Seen(NamedTuple):
    """What the index remembers of one accepted id or key."""

    message_id: str
    source: str | None
    at: float


class KeySpaces:
    """The two sets of the rule without times or sources: for the messages of one batch.

    ``seen`` answers the rule; ``add`` records an accepted message.
    """

    __slots__ = ("ids", "keys")

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.keys: set[str] = set()

    def seen(self, message_id: str, key: str | None) -> bool:
        """Whether a message with this id and idempotency key is a duplicate here."""
        return message_id in self.ids or (key is not None and key in self.keys)

    def add(self, message_id: str, key: str | None) -> None:
        """Record an accepted message: its id, and its key if it has one."""
        self.ids.add(message_id)
        if key is not None:
            self.keys.add(key)


class DedupeIndex:
    """Ids and keys accepted within the last ``window_s`` seconds, each oldest first.

    Not thread-safe: one router owns it.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._ids: OrderedDict[str, Seen] = OrderedDict()
        self._keys: OrderedDict[str, Seen] = OrderedDict()

    def __len__(self) -> int:
        """How many ids and keys are remembered (the two sets together)."""
        return len(self._ids) + len(self._keys)

    def find(self, message_id: str, key: str | None) -> Seen | None:
        """The acceptance that makes this message a duplicate, or None if it is new.

        The id is looked up among the ids first (it names the very message: a
        routing pass seen again), then the key among the keys.
        """
        seen = self._ids.get(message_id)
        if seen is None and key is not None:
            seen = self._keys.get(key)
        return seen

    def has_id(self, message_id: str) -> bool:
        """Whether a message with this id was accepted inside the window."""
        return message_id in self._ids

    def has_key(self, key: str) -> bool:
        """Whether a message with this idempotency key was accepted inside the window."""
        return key in self._keys

    def add(
        self, message_id: str, key: str | None, source: str | None, at: float | None = None
    ) -> None:
        """Remember an accepted message's id, and its key if any; the newest acceptance wins."""
        seen = Seen(message_id, source, time.time() if at is None else at)
        _put(self._ids, message_id, seen)
        if key is not None:
            _put(self._keys, key, seen)

    def expire(self, now: float | None = None) -> int:
        """Forget ids and keys older than the window; return how many were dropped."""
        limit = (time.time() if now is None else now) - self.window_s
        return _expire(self._ids, limit) + _expire(self._keys, limit)

    @classmethod
    def rebuild(cls, journal: Journal, window_s: float, now: float | None = None) -> DedupeIndex:
        """Rebuild the index from every ``accepted`` entry of ``journal`` inside the window."""
        index = cls(window_s)
        limit = (time.time() if now is None else now) - window_s
        for entry in journal.read(events=("accepted",)):
            at = _timestamp(entry.at)
            if at < limit or entry.message_id is None:
                continue
            index.add(entry.message_id, entry.idempotency_key or None, entry.source, at)
        return index


def _put(seen: OrderedDict[str, Seen], name: str, record: Seen) -> None:
    # Re-inserted, not updated: the dict stays in acceptance order for expire().
    seen.pop(name, None)
    seen[name] = record


def _expire(seen: OrderedDict[str, Seen], limit: float) -> int:
    dropped = 0
    while seen:
        name, record = next(iter(seen.items()))
        if record.at >= limit:
            break
        del seen[name]
        dropped += 1
    return dropped


def _timestamp(value: datetime) -> float:
    return value.timestamp()
