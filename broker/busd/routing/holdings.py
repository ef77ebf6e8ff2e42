"""What each agent holds of a message: ready, claimed, or acknowledged.

Recovery asks this for every journal entry after the checkpoint. A
:class:`Holdings` lists each agent's ``inbox/`` and ``locks/`` directories once
and reads its processed ledger once, so a question costs a dictionary lookup
(plus one ``stat`` when a file matches), not a directory listing and a ledger
read: start-up stays quick with large ledgers and full inboxes.

A snapshot: files that appear after an agent's first question are not seen,
which is what recovery wants (it asks once per message id).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from busd.config import Config
from busd.core.codec import decode
from busd.core.model import Message, dedupe_key
from busd.errors import InvalidMessage
from busd.store.fsio import read_limited
from busd.store.layout import parse_delivery_name
from busd.store.ledger import ProcessedLedger

__all__ = ["Holdings"]


class Holdings:
    """Answers "does ``agent`` already have ``msg``?" for one recovery pass."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._files: dict[str, dict[str, list[Path]]] = {}
        self._ledgers: dict[str, ProcessedLedger] = {}

    def has(self, agent: str, msg: Message, size: int | None = None) -> bool:
        """Whether ``agent`` has ``msg``: ready, claimed (of ``size`` bytes), or acked.

        A delivery file of the wrong size that does not decode was torn by a
        power cut before it was synced: it is removed, and the answer is False.
        """
        for path in self._held(agent).get(msg.message_id, ()):
            if size is None or _size(path) == size or _complete(path, self._config):
                return True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        ledger = self._ledgers.get(agent)
        if ledger is None:
            ledger = self._ledgers[agent] = ProcessedLedger(self._config.layout.ledger(agent))
        return dedupe_key(msg) in ledger or msg.message_id in ledger

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
        return held


def _names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


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
