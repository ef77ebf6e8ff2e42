"""The directory layout of a bus root, and the names of files in it.

:class:`Layout` is the one place that names a file or directory of a root
(protocol.md section 2 is the contract); nothing else spells these names.

::

    <root>/
      busd.toml                    optional config (operator)
      busd.lock                    held by the process that routes (daemon)
      busd.sock                    the daemon's socket (when the path is short enough)
      busd.sock.path               where the socket is when it is not busd.sock
      subscriptions.json           topic subscriptions made at run time
      tmp/                         staging for atomic writes (same filesystem)
      outbox/<agent_id>/           messages an agent sends; routed by busd
      inbox/<agent_id>/            messages ready for agent_id
      locks/<agent_id>/            messages agent_id has claimed and not acked
      processed/<agent_id>.jsonl   ack ledger of agent_id (idempotency)
      processed/.<agent_id>.lock   its lock
      dlq/                         <name> (original bytes) + <name>.reason.json
      dlq/.lock                    lock for replay and purge
      dlq/replayed/<sha256>.json   records of replayed entries
      journal/                     append-only history, NDJSON segments
      journal/checkpoint           position up to which deliveries are durable
      journal/.lock                the journal writer's lock

Delivery names (``inbox/`` and ``locks/``) are
``<arrival:20 digits>-<deliveries:3 digits>-<message_id>.json``: the fixed-width
prefix makes listing order arrival order and lets the id parse back even though
message ids may themselves contain ``-`` and ``.``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from busd.store.fsio import fsync_dir, list_names, mark_top_dir

__all__ = [
    "DIR_MODE",
    "JOURNAL_LOCK_NAME",
    "DeliveryName",
    "Layout",
    "delivery_name",
    "ensure_dir",
    "init_bus",
    "ledger_lock_path",
    "outbox_name",
    "parse_delivery_name",
]

DIR_MODE = 0o700
JOURNAL_LOCK_NAME = ".lock"
"""The writer's lock inside a journal directory (``Journal`` is given the directory)."""
_SUBDIRS = ("tmp", "outbox", "inbox", "locks", "processed", "dlq", "journal")
_DELIVERY_RE = re.compile(r"([0-9]{20})-([0-9]{3})-([A-Za-z0-9][A-Za-z0-9._-]{0,127})\.json")
_MAX_DELIVERIES_IN_NAME = 999


class DeliveryName(NamedTuple):
    """The parts of a delivery file name."""

    arrival: str
    deliveries: int
    message_id: str


def delivery_name(arrival: str, deliveries: int, message_id: str) -> str:
    """Format a delivery name; ``deliveries`` is capped at 999 to keep the width fixed."""
    return f"{arrival}-{min(deliveries, _MAX_DELIVERIES_IN_NAME):03d}-{message_id}.json"


def parse_delivery_name(name: str) -> DeliveryName | None:
    """Parse a delivery name, or return ``None`` for a foreign name."""
    m = _DELIVERY_RE.fullmatch(name)
    if m is None:
        return None
    return DeliveryName(m.group(1), int(m.group(2)), m.group(3))


def ledger_lock_path(ledger: Path) -> Path:
    """The lock file of the ledger ``processed/<agent>.jsonl``: ``processed/.<agent>.lock``."""
    return ledger.with_name(f".{ledger.stem}.lock")


def outbox_name(arrival: str, message_id: str) -> str:
    """The name busd's own producers give a message in ``outbox/<agent>/``."""
    return f"{arrival}-{message_id}.json"


@dataclass(frozen=True, slots=True)
class Layout:
    """Every path of one bus root. Pure: building one touches no file."""

    root: Path

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def processed(self) -> Path:
        return self.root / "processed"

    @property
    def dlq(self) -> Path:
        return self.root / "dlq"

    @property
    def journal(self) -> Path:
        return self.root / "journal"

    @property
    def config_file(self) -> Path:
        """``busd.toml``: read when no other config file is named."""
        return self.root / "busd.toml"

    @property
    def bus_lock(self) -> Path:
        """``busd.lock``: the bus lock (protocol.md 9)."""
        return self.root / "busd.lock"

    @property
    def lock_file(self) -> Path:
        """The bus lock; the older name of :attr:`bus_lock`."""
        return self.bus_lock

    @property
    def socket(self) -> Path:
        """``busd.sock``: the daemon's socket when this path fits in ``sun_path``."""
        return self.root / "busd.sock"

    @property
    def socket_path_file(self) -> Path:
        """``busd.sock.path``: records the socket path when it is not :attr:`socket`."""
        return self.root / "busd.sock.path"

    @property
    def subscriptions_file(self) -> Path:
        """``subscriptions.json``: topic subscriptions made at run time."""
        return self.root / "subscriptions.json"

    @property
    def checkpoint_file(self) -> Path:
        """``journal/checkpoint``: the position up to which deliveries are durable."""
        return self.journal / "checkpoint"

    @property
    def journal_lock(self) -> Path:
        """``journal/.lock``: the journal writer's lock."""
        return self.journal / JOURNAL_LOCK_NAME

    @property
    def dlq_lock(self) -> Path:
        """``dlq/.lock``: held by replay, in-place record updates and purge."""
        return self.dlq / ".lock"

    @property
    def dlq_replayed(self) -> Path:
        """``dlq/replayed/``: records of replayed entries, by sha256 of the bytes."""
        return self.dlq / "replayed"

    def outbox_dir(self, agent: str) -> Path:
        return self.outbox / agent

    def inbox_dir(self, agent: str) -> Path:
        return self.inbox / agent

    def locks_dir(self, agent: str) -> Path:
        return self.locks / agent

    def ledger(self, agent: str) -> Path:
        return self.processed / f"{agent}.jsonl"

    def ledger_lock(self, agent: str) -> Path:
        return ledger_lock_path(self.ledger(agent))

    def is_initialized(self) -> bool:
        """True when every top-level directory of the layout exists."""
        return all((self.root / d).is_dir() for d in _SUBDIRS)

    def agents(self) -> list[str]:
        """Agent ids that have an inbox, an outbox or claims, sorted."""
        names: set[str] = set()
        for parent in (self.inbox, self.outbox, self.locks):
            # Agent directories are few: one stat each is cheaper than a second listing helper.
            names.update(n for n in list_names(parent) if (parent / n).is_dir())
        return sorted(names)


def ensure_dir(path: Path) -> bool:
    """Create directory ``path`` (mode 0700) if missing and make its entry durable.

    Returns True when it was created. The parent must exist.
    """
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    fsync_dir(path.parent)
    return True


def init_bus(root: Path) -> Layout:
    """Create the layout under ``root`` (idempotent) and return it.

    The root and every directory are created 0700: a bus is private to its
    owner unless the operator widens it on purpose.
    """
    root = root.absolute()
    if not root.is_dir():
        root.mkdir(mode=DIR_MODE, parents=True)
        fsync_dir(root.parent)
    # Before the subdirectories exist: they then start in block groups with room,
    # so creating the bus's many small files stays cheap (see mark_top_dir).
    mark_top_dir(root)
    layout = Layout(root)
    for sub in _SUBDIRS:
        ensure_dir(root / sub)
    return layout
