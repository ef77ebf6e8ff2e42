"""The claim files in ``locks/<agent>/``: their names, their leases, their way back.

What :mod:`busd.routing.consumer` claims, settles and sweeps, on disk. Contracts:

* A claim's name is a delivery name (:mod:`busd.store.layout`, either form), or, for a
  foreign file (dropped straight into the inbox), the hidden
  ``.claim-<16 hex>-<foreign name>`` (:func:`hidden_claim_name`; the foreign name is left
  out if the whole would pass 255 bytes, and :func:`foreign_name` makes one up then).
* A claim's mtime is its lease expiry (:func:`set_lease`), set without following symlinks:
  a symlink in an inbox must not let us touch its target.
* A claim is *stamped* when its mtime is later than its ctime (:func:`unstamped` is the
  negation): busd sets a lease before the claiming rename, and a rename or a utime sets the
  ctime to now, so every lease busd sets is ahead of the ctime. Tapps claims by a bare
  rename and leaves its claims unstamped.
* :func:`return_to_inbox` moves a claim back under its name, never replacing a file: on a
  clash the delivery count is kept and the arrival key is new.
* Listings include hidden names: busd's own claims of foreign files are ``.claim-*``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from busd.core.model import Message
from busd.store.fsio import list_names, rename_noreplace
from busd.store.layout import Layout, parse_delivery_name, receipt_of
from busd.store.mailbox import arrival_clock

__all__ = [
    "CLAIM_PREFIX",
    "Claim",
    "ExpiredReport",
    "count_of",
    "foreign_name",
    "foreign_origin",
    "hidden_claim_name",
    "index_of",
    "names_in",
    "return_to_inbox",
    "set_lease",
    "unstamped",
]

CLAIM_PREFIX = ".claim-"
"""The prefix of a hidden claim: busd's claim of a foreign file."""
_HEX = 16
_NAME_MAX = 255
_UTIME_NOFOLLOW = os.utime in os.supports_follow_symlinks


def set_lease(path: Path, expiry: float) -> datetime:
    """Set the lease of ``path`` (its mtime) to ``expiry`` (epoch seconds); returns it, UTC."""
    # Never follow: a symlink in an inbox must not let us touch its target.
    ns = int(expiry * 1e9)
    os.utime(path, ns=(time.time_ns(), ns), follow_symlinks=not _UTIME_NOFOLLOW)
    return datetime.fromtimestamp(expiry, UTC)


@dataclass(frozen=True, slots=True)
class Claim:
    """A claimed message: ``path`` is in ``locks/``; ``delivery_count`` includes this one."""

    message: Message
    name: str
    path: Path
    delivery_count: int
    lease_expires_at: datetime
    raw: bytes

    @property
    def receipt(self) -> str:
        """The receipt of this delivery: the claim file's name without its suffix."""
        return receipt_of(self.name)


@dataclass(frozen=True, slots=True)
class ExpiredReport:
    """What :func:`return_expired` did: inbox names returned, DLQ entry names created."""

    returned: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    stamped: list[str] = field(default_factory=list)
    """Unstamped (Tapps) claims given a lease instead of being returned (tapps mode)."""


def unstamped(st: os.stat_result) -> bool:
    """Whether a claim's mtime was never set as a lease: a lease busd sets is always later
    than the ctime that setting it (and the claiming rename) leaves (module docstring)."""
    return st.st_mtime_ns <= st.st_ctime_ns


def names_in(directory: Path) -> list[str]:
    """The names in an inbox or locks directory, hidden ones included."""
    # Hidden names too: busd's own claims of foreign files are `.claim-*`.
    return list_names(directory, hidden=True)


def hidden_claim_name(name: str) -> str:
    """A new hidden claim name for the foreign inbox file ``name`` (module docstring)."""
    hidden = f"{CLAIM_PREFIX}{uuid.uuid4().hex[:_HEX]}-{name}"
    if len(os.fsencode(hidden)) > _NAME_MAX:
        hidden = hidden[: len(CLAIM_PREFIX) + _HEX]
    return hidden


def foreign_name(hidden: str) -> str:
    """The foreign name kept in a hidden claim name (made up if it was too long)."""
    return hidden[len(CLAIM_PREFIX) + _HEX + 1 :] or f"{hidden[-_HEX:]}.json"


def foreign_origin(agent: str, name: str) -> str | None:
    """The inbox path a hidden claim came from (None for a delivery name)."""
    return f"inbox/{agent}/{foreign_name(name)}" if name.startswith(CLAIM_PREFIX) else None


def index_of(locks: Path, names: Iterable[str]) -> dict[str, list[Path]]:
    """Claimed delivery files by message id (hidden and foreign names left out)."""
    found: dict[str, list[Path]] = {}
    for name in names:
        parsed = parse_delivery_name(name)
        if parsed is not None:
            found.setdefault(parsed.message_id, []).append(locks / name)
    return found


def count_of(path: Path) -> int:
    """The delivery count in a claim's name (0 for a hidden or foreign name)."""
    parsed = parse_delivery_name(path.name)
    return parsed.deliveries if parsed is not None else 0


def return_to_inbox(layout: Layout, agent: str, path: Path, name: str) -> str:
    """Move a claim back to ``inbox/<agent>/name``; on a clash keep the count, new arrival."""
    inbox = layout.inbox_dir(agent)
    parsed = parse_delivery_name(name)
    while True:
        try:
            rename_noreplace(path, inbox / name)
            return name
        except FileExistsError:
            if parsed is None:
                name = f"{arrival_clock.next()}-{name}"
            else:
                name = parsed.renamed(arrival=arrival_clock.next())
