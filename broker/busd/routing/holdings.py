"""What each agent holds of a message: ready, claimed, or acknowledged.

Recovery asks this for every journal entry after the checkpoint. A
:class:`Holdings` lists each agent's ``inbox/`` and ``locks/`` directories once
and reads its processed ledger once, so a question costs a dictionary lookup
(plus one ``stat`` when a file matches), not a directory listing and a ledger
read: start-up stays quick with large ledgers and full inboxes.

A snapshot: files that appear after an agent's first question are not seen,
which is what recovery wants (it asks once per message id). The ledger is read
right after the directories are listed, so a message a consumer acked and
removed meanwhile is seen in one or the other (an ack appends to the ledger
before it removes the claim).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from busd.config import Config
from busd.core.codec import decode
from busd.core.model import Message
from busd.errors import InvalidMessage
from busd.store.fsio import list_names, read_limited
from busd.store.layout import parse_delivery_name
from busd.store.ledger import parse_line

__all__ = ["Holdings"]


class Holdings:
    """Answers "does ``agent`` already have ``msg``?" for one recovery pass."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._files: dict[str, dict[str, list[Path]]] = {}
        self._acked: dict[str, tuple[set[str], set[str]]] = {}  # agent -> (ids, keys)

    def has(self, agent: str, msg: Message, size: int | None = None) -> bool:
        """Whether ``agent`` has ``msg``: ready, claimed (of ``size`` bytes), or acked.

        A delivery file of the wrong size that does not decode was torn by a
        power cut before it was synced: it is removed, and the answer is False.
        """
        return self.holds(agent, msg.message_id, key=msg.idempotency_key, size=size)

    def holds(
        self, agent: str, message_id: str, *, key: str | None = None, size: int | None = None
    ) -> bool:
        """:meth:`has` by the message's id and idempotency key, without decoding it.

        What the journal fold asks (:func:`busd.routing.fold.replay`): an ``accepted``
        line names both, and its raw message gives ``size``.
        """
        for path in self._held(agent).get(message_id, ()):
            if size is None or _size(path) == size or _complete(path, self._config):
                return True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        ids, keys = self._acked[agent]
        # Two key spaces: an id matches acked ids only, a key acked keys only.
        return message_id in ids or (key is not None and key in keys)

    def _held(self, agent: str) -> dict[str, list[Path]]:
        held = self._files.get(agent)
        if held is None:
            held = self._files[agent] = {}
            layout = self._config.layout
            for directory in (layout.inbox_dir(agent), layout.locks_dir(agent)):
                for name in _names(directory):
                    parsed = parse_delivery_name(name)
                    if parsed is not None:
                        held.setdefault(parsed.message_id, []).append(directory / name)
            self._acked[agent] = _read_ledger(layout.ledger(agent))
        return held


def _read_ledger(path: Path) -> tuple[set[str], set[str]]:
    """The acked ids and keys of a ledger, read once (protocol.md 6.4: lines that do not
    decode, and a last line without its newline, are skipped; a bare id, Tapps' ack line,
    counts as an acked id)."""
    ids: set[str] = set()
    keys: set[str] = set()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ids, keys
    for line in data[: data.rfind(b"\n") + 1].split(b"\n"):
        rec = parse_line(line)
        if rec is None:
            continue  # empty, or a torn line glued to garbage
        ids.add(rec.message_id)
        if rec.idempotency_key is not None:
            keys.add(rec.idempotency_key)
    return ids, keys


def _names(directory: Path) -> list[str]:
    return list_names(directory, hidden=True, sort=False)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _complete(path: Path, config: Config) -> bool:
    """Whether ``path`` holds a whole, valid message (not one torn by a power cut)."""
    try:
        decode(read_limited(path, config.max_message_bytes))
    except (InvalidMessage, OSError):
        return False
    return True
