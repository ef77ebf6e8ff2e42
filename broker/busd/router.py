"""The routing core: outbox (and foreign inbox) files in, journal + inbox files out.

One :meth:`Router.route` call handles a batch of files as one group commit:

1. read each file safely and validate it; invalid files go to the DLQ;
2. drop duplicates (dedupe key already accepted within the window);
3. append every outcome to the journal in ONE write and ONE fsync: from this
   point an accepted message is durable;
4. deliver to each recipient's inbox, fsync those files and directories;
5. only then remove the sources from ``outbox/``.

A crash between any two steps is repaired by routing the leftover source file
again: the dedupe index remembers the path each key was accepted from, so a
file seen again at that same path is a *redo* (deliver to whichever recipient
lacks it), not a duplicate. The daemon calls :meth:`Router.route` from a worker
thread; the daemon-less CLI calls :func:`route_pending`.

Only the holder of :class:`BusLock` (``<root>/busd.lock``) routes a bus.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import msgspec
import structlog

from . import dlq
from .buslock import BusLock
from .codec import decode, encode_json
from .config import Config
from .dedupe import DedupeIndex
from .delivery import arrival_clock, deliver, sync_dirs
from .errors import InvalidMessage, InvalidName, Reason
from .fsio import read_limited, rename_noreplace
from .journal import Journal, JournalEntry
from .layout import delivery_name, parse_delivery_name
from .ledger import ProcessedLedger
from .model import Message, check_agent_name, dedupe_key, effective_recipients

__all__ = ["RouteReport", "Router", "route_pending"]

_log = structlog.get_logger("busd.router")
_BATCH = 512


class RouteReport(msgspec.Struct, kw_only=True):
    """Counts of what one or more routing passes did."""

    accepted: int = 0
    delivered: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    redone: int = 0

    def add(self, other: RouteReport) -> None:
        """Add ``other``'s counts to these."""
        for f in self.__struct_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))


class _Unroutable(Exception):
    pass


class Router:
    """Routes files of one bus. Owns the journal writer and the dedupe index.

    Not thread-safe: exactly one thread of the lock holder routes at a time.
    """

    def __init__(self, config: Config, journal: Journal | None = None) -> None:
        self.config = config
        self.layout = config.layout
        check_agent_name(config.default_recipient, "default_recipient")
        self.journal = journal or Journal(
            self.layout.journal, segment_bytes=config.journal_segment_bytes, fsync=config.fsync
        )
        self.dedupe = DedupeIndex.rebuild(self.journal, config.dedupe_window_seconds)
        self.subscriptions: dict[str, list[str]] = {
            topic: list(agents) for topic, agents in config.subscriptions.items()
        }

    def __enter__(self) -> Router:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the journal writer."""
        self.journal.close()

    # -- scanning ---------------------------------------------------------

    def scan(self) -> list[Path]:
        """Every file waiting to be routed: outbox files, then foreign inbox files.

        Names starting with ``.`` are in-progress writes by convention and skipped.
        """
        found = [p for d in _subdirs(self.layout.outbox) for p in _entries(d)]
        found.extend(p for p in _entries(self.layout.outbox) if not p.is_dir())
        for d in _subdirs(self.layout.inbox):
            found.extend(p for p in _entries(d) if parse_delivery_name(p.name) is None)
        return found

    def scan_dirs(self, dirs: set[Path]) -> list[Path]:
        """The files waiting in ``dirs`` (outbox or inbox directories named by hints)."""
        found: list[Path] = []
        for d in sorted(dirs):
            if d == self.layout.outbox:
                found.extend(p for p in _entries(d) if not p.is_dir())
                continue
            entries = _entries(d)
            if d.parent == self.layout.inbox:
                entries = [p for p in entries if parse_delivery_name(p.name) is None]
            found.extend(entries)
        return found

    def route_all(self) -> RouteReport:
        """Route everything :meth:`scan` finds, in batches, until nothing is left."""
        total = RouteReport()
        while True:
            pending = self.scan()
            if not pending:
                return total
            for i in range(0, len(pending), _BATCH):
                total.add(self.route(pending[i : i + _BATCH]))

    # -- routing ----------------------------------------------------------

    def route(self, paths: Sequence[Path]) -> RouteReport:
        """Route one batch of files as one group commit (see the module docstring)."""
        report = RouteReport()
        entries: list[JournalEntry] = []
        accepted: list[tuple[Path, Message, bytes, list[str], str]] = []
        redo: list[tuple[Path, Message, bytes]] = []
        removals: list[Path] = []
        batch_keys: dict[str, str] = {}
        now = datetime.now(UTC)
        for path in paths:
            rel = path.relative_to(self.layout.root).as_posix()
            in_inbox = path.parent.parent == self.layout.inbox
            sender = path.parent.name if path.parent != self.layout.outbox else None
            try:
                data = read_limited(path, self.config.max_message_bytes)
                msg = decode(data, max_bytes=self.config.max_message_bytes)
                recipients = [sender] if in_inbox and sender else self._recipients(msg)
            except FileNotFoundError:
                continue  # claimed or removed by someone else since the scan
            except (InvalidMessage, _Unroutable, InvalidName) as exc:
                entries.append(self._dead_letter(path, rel, sender, exc, now))
                report.dead_lettered += 1
                continue
            key = dedupe_key(msg)
            seen = self.dedupe.get(key)
            if (seen is not None and seen.source == rel) or batch_keys.get(key) == rel:
                redo.append((path, msg, data))
                continue
            if seen is not None or key in batch_keys:
                entries.append(_entry("duplicate", now, msg, rel, recipients))
                removals.append(path)
                report.duplicates += 1
                continue
            batch_keys[key] = rel
            body = data if in_inbox else encode_json(msg)
            entry = _entry("accepted", now, msg, rel, recipients)
            entries.append(msgspec.structs.replace(entry, message=msgspec.Raw(body)))
            accepted.append((path, msg, body, recipients, rel))
        if entries:
            self.journal.append(entries)
        stamp = time.time()
        for _, msg, _, _, rel in accepted:
            self.dedupe.add(dedupe_key(msg), msg.message_id, rel, stamp)
        written: list[Path] = []
        for path, msg, body, recipients, _ in accepted:
            written.extend(self._deliver(path, msg, body, recipients))
            report.accepted += 1
            report.delivered += len(recipients)
            _log.info("message_accepted", message_id=msg.message_id, to=recipients)
        for path, msg, body in redo:
            written.extend(self._redo(path, msg, body))
            report.redone += 1
        if self.config.fsync and written:
            sync_dirs(written)
        for path, *_ in accepted:
            if path.parent.parent != self.layout.inbox:
                removals.append(path)
        removals.extend(p for p, _, _ in redo if p.parent.parent != self.layout.inbox)
        for path in removals:
            _unlink(path)
        return report

    def _recipients(self, msg: Message) -> list[str]:
        out: list[str] = []
        for r in effective_recipients(msg, self.config.default_recipient):
            if r.startswith("topic:"):
                subscribers = self.subscriptions.get(r[6:], [])
                if not subscribers:
                    raise _Unroutable(f"topic {r[6:]!r} has no subscribers")
                out.extend(subscribers)
            else:
                out.append(r)
        out = list(dict.fromkeys(out))
        if self.config.unknown_recipient == "dlq":
            unknown = [r for r in out if not self.layout.inbox_dir(r).is_dir()]
            if unknown:
                raise _Unroutable(f"unknown recipient(s): {', '.join(unknown)}")
        return out

    def _deliver(self, path: Path, msg: Message, body: bytes, recipients: list[str]) -> list[Path]:
        if path.parent.parent == self.layout.inbox:
            # A producer wrote straight into the inbox: validated and journaled
            # in place; a rename inside the directory gives it a delivery name.
            target = path.parent / delivery_name(arrival_clock.next(), 0, msg.message_id)
            try:
                rename_noreplace(path, target)
            except FileNotFoundError:
                return []  # a daemon-less consumer claimed it first: it is journaled, that is all
            return [target]
        return [deliver(self.layout, r, body, msg.message_id) for r in recipients]

    def _redo(self, path: Path, msg: Message, body: bytes) -> list[Path]:
        """Finish a pass that died after the journal append: deliver what is missing."""
        if path.parent.parent == self.layout.inbox:
            return self._deliver(path, msg, body, [path.parent.name])
        written = []
        for r in self._recipients(msg):
            if not self._has(r, msg):
                written.append(deliver(self.layout, r, encode_json(msg), msg.message_id))
        _log.info("message_redelivered_after_crash", message_id=msg.message_id)
        return written

    def _has(self, agent: str, msg: Message) -> bool:
        for d in (self.layout.inbox_dir(agent), self.layout.locks_dir(agent)):
            for p in _entries(d):
                parsed = parse_delivery_name(p.name)
                if parsed is not None and parsed.message_id == msg.message_id:
                    return True
        ledger = ProcessedLedger(self.layout.ledger(agent))
        return dedupe_key(msg) in ledger or msg.message_id in ledger

    def _dead_letter(
        self, path: Path, rel: str, sender: str | None, exc: Exception, now: datetime
    ) -> JournalEntry:
        if isinstance(exc, InvalidMessage):
            reason, detail = exc.reason, exc.detail
        else:
            reason, detail = Reason.UNROUTABLE, str(exc)
        name = dlq.dead_letter(
            self.layout, reason=reason, detail=detail, source=path, sender=sender
        )
        _log.warning("message_dead_lettered", source=rel, reason=reason.value, detail=detail)
        return JournalEntry(
            event="dead_lettered",
            at=now,
            source=rel,
            agent=sender,
            reason=reason.value,
            detail=detail,
            to=[name],
        )


def _entry(event: str, at: datetime, msg: Message, source: str, to: list[str]) -> JournalEntry:
    return JournalEntry(
        event=event,
        at=at,
        message_id=msg.message_id,
        idempotency_key=msg.idempotency_key,
        agent=msg.agent_id,
        to=to,
        source=source,
    )


def _subdirs(parent: Path) -> Iterator[Path]:
    try:
        with os.scandir(parent) as it:
            dirs = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return
    for name in dirs:
        if not name.startswith("."):
            yield parent / name


def _entries(directory: Path) -> list[Path]:
    try:
        with os.scandir(directory) as it:
            names = sorted(e.name for e in it if not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [directory / n for n in names]


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        os.rmdir(path)


def route_pending(config: Config) -> RouteReport | None:
    """Route everything waiting, if no daemon runs; return None when one does.

    This is how the daemon-less CLI makes ``send`` then ``recv`` work with no
    daemon: it takes the bus lock for the length of one pass.
    """
    lock = BusLock(config.layout, role="cli")
    if not lock.acquire(timeout=0):
        return None
    try:
        with Router(config) as router:
            return router.route_all()
    finally:
        lock.release()
