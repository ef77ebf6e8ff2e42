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
      conductor-follow.json        how far each followed conductor-loop bus file is routed
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
message ids may themselves contain ``-`` and ``.``. The *Tapps form*
``<arrival>-<deliveries>_<message_id>_<message_type>.json`` (written with
``compat = "tapps"`` for Tapps' three types) parses the same way: its tail is what
Tapps' ack and fail globs (``*_{id}_{type}.json``) look for, and the type, one of
three fixed words at the very end, keeps the id unambiguous. The *native form*
``<arrival>-<deliveries>-<message_id>.busd`` (tapps mode, busd's other five types,
which Tapps cannot parse) is busd's form with a suffix Tapps' ``*.json`` glob skips.
Every reader of delivery names understands all three forms in every mode; a
receipt is the name without its suffix (:func:`receipt_of`).

With ``compat = "tapps"`` busd's dead-letter entries live in ``dlq/busd/``
(:attr:`Layout.dlq`), out of the ``dlq/*.json`` glob of Tapps' ``replay_dlq``;
``dlq/`` itself (:attr:`Layout.dlq_top`) then holds only what others wrote.
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
    "TAPPS_TYPES",
    "DeliveryName",
    "Layout",
    "delivery_name",
    "ensure_dir",
    "ensure_dlq",
    "init_bus",
    "ledger_lock_path",
    "outbox_name",
    "parse_delivery_name",
    "receipt_of",
    "tapps_delivery_name",
]

DIR_MODE = 0o700
JOURNAL_LOCK_NAME = ".lock"
"""The writer's lock inside a journal directory (``Journal`` is given the directory)."""
_SUBDIRS = ("tmp", "outbox", "inbox", "locks", "processed", "dlq", "journal")
_DELIVERY_RE = re.compile(r"([0-9]{20})-([0-9]{3})-([A-Za-z0-9][A-Za-z0-9._-]{0,127})\.json")
TAPPS_TYPES = ("task_assignment", "status_update", "task_complete")
"""The message types Tapps' FileMessageBus parses; only these get Tapps delivery names."""
_TAPPS_DELIVERY_RE = re.compile(
    r"([0-9]{20})-([0-9]{3})_([A-Za-z0-9][A-Za-z0-9._-]{0,127})"
    r"_(task_assignment|status_update|task_complete)\.json"
)
_NATIVE_DELIVERY_RE = re.compile(r"([0-9]{20})-([0-9]{3})-([A-Za-z0-9][A-Za-z0-9._-]{0,127})\.busd")
_NATIVE_SUFFIX = ".busd"
_MAX_DELIVERIES_IN_NAME = 999


class _Parts(NamedTuple):
    arrival: str
    deliveries: int
    message_id: str


class DeliveryName(_Parts):
    """The parts of a delivery file name: compares equal to ``(arrival, deliveries, id)``.

    ``message_type`` is set for the Tapps form only (one of :data:`TAPPS_TYPES`);
    ``native`` is True for the native form (``.busd``).
    """

    message_type: str | None
    native: bool

    def __new__(
        cls,
        arrival: str,
        deliveries: int,
        message_id: str,
        message_type: str | None = None,
        native: bool = False,
    ) -> DeliveryName:
        self = super().__new__(cls, arrival, deliveries, message_id)
        self.message_type = message_type
        self.native = native
        return self

    def renamed(self, arrival: str | None = None, deliveries: int | None = None) -> str:
        """This name in the same form with another arrival and/or count."""
        name = delivery_name(
            self.arrival if arrival is None else arrival,
            self.deliveries if deliveries is None else deliveries,
            self.message_id,
            self.message_type,
        )
        return name.removesuffix(".json") + _NATIVE_SUFFIX if self.native else name


def delivery_name(
    arrival: str, deliveries: int, message_id: str, message_type: str | None = None
) -> str:
    """Format a delivery name; ``deliveries`` is capped at 999 to keep the width fixed.

    With ``message_type`` (one of :data:`TAPPS_TYPES`) the Tapps form; with None (or
    another type) busd's own form.
    """
    count = min(deliveries, _MAX_DELIVERIES_IN_NAME)
    if message_type in TAPPS_TYPES:
        return f"{arrival}-{count:03d}_{message_id}_{message_type}.json"
    return f"{arrival}-{count:03d}-{message_id}.json"


def tapps_delivery_name(arrival: str, deliveries: int, message_id: str, message_type: str) -> str:
    """The name of a delivery in tapps mode: the Tapps form for Tapps' three types, the
    native form (``.busd``, out of Tapps' ``*.json`` glob) for every other type."""
    if message_type in TAPPS_TYPES:
        return delivery_name(arrival, deliveries, message_id, message_type)
    return delivery_name(arrival, deliveries, message_id).removesuffix(".json") + _NATIVE_SUFFIX


def receipt_of(name: str) -> str:
    """The receipt of the claim named ``name``: the name without its suffix."""
    return (
        name.removesuffix(_NATIVE_SUFFIX)
        if name.endswith(_NATIVE_SUFFIX)
        else name.removesuffix(".json")
    )


def parse_delivery_name(name: str) -> DeliveryName | None:
    """Parse a delivery name (any form), or return ``None`` for a foreign name."""
    m = _DELIVERY_RE.fullmatch(name)
    if m is not None:
        return DeliveryName(m.group(1), int(m.group(2)), m.group(3))
    m = _TAPPS_DELIVERY_RE.fullmatch(name)
    if m is not None:
        return DeliveryName(m.group(1), int(m.group(2)), m.group(3), m.group(4))
    m = _NATIVE_DELIVERY_RE.fullmatch(name)
    if m is None:
        return None
    return DeliveryName(m.group(1), int(m.group(2)), m.group(3), native=True)


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
    dlq_subdir: str = ""
    """Where busd's own dead letters go below ``dlq/``: ``"busd"`` with ``compat = "tapps"``."""

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
        """The directory of busd's dead-letter entries (``dlq/``, or ``dlq/busd/``)."""
        top = self.dlq_top
        return top / self.dlq_subdir if self.dlq_subdir else top

    @property
    def dlq_top(self) -> Path:
        """``dlq/``: where other systems (Tapps) put their dead letters, too."""
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
    def bridge_status_file(self) -> Path:
        """``bridge-status.json``: what ``busd bridge nats`` last reported (``busd status``)."""
        return self.root / "bridge-status.json"

    @property
    def web_token_file(self) -> Path:
        """``web-token``: the secret of ``busd web`` (0600, created at its first start)."""
        return self.root / "web-token"

    @property
    def conductor_follow_file(self) -> Path:
        """``conductor-follow.json``: the cursors of followed conductor-loop bus files."""
        return self.root / "conductor-follow.json"

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


def ensure_dlq(layout: Layout) -> None:
    """Create :attr:`Layout.dlq` if it is a subdirectory that is missing (tapps mode)."""
    if layout.dlq_subdir:
        ensure_dir(layout.dlq)
