"""The routing core: outbox (and foreign inbox) files in, journal + inbox files out.

One :meth:`Router.route` call handles a batch of files as one group commit:

1. admit each file and socket publish through the one door,
   :mod:`busd.routing.intake`; a refused one leaves through the one way out,
   :mod:`busd.routing.refusals` (DLQ entry, ``dead_lettered`` journal line, count);
2. drop duplicates (dedupe key already accepted within the window);
3. append every outcome to the journal in ONE write and ONE fsync: from this
   point an accepted message is durable, and its ``outbox/`` source is removed;
4. deliver to each recipient's inbox (:meth:`Router.finish`); a checkpoint
   later fsyncs those files and directories in bulk.

Steps 1-3 are :meth:`Router.commit`, step 4 :meth:`Router.finish`. The daemon
runs them in two lanes, so the next batch is journaled while the last one's
inbox files are written. A crash after step 3 loses nothing: the journal after
the last checkpoint is replayed at start-up (:mod:`busd.routing.recovery`). A crash
between the fsync and the removal of a source leaves the file to be seen again:
the dedupe index remembers the path each key was accepted from, so a file seen
again at that same path is a *redo* (deliver to whichever recipient lacks it),
not a duplicate. The daemon calls these from worker threads; the daemon-less
CLI calls :func:`busd.routing.offline.route_pending`.

Only the holder of the bus lock (``<root>/busd.lock``) routes a bus.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import msgspec
import structlog

from busd.config import Config
from busd.core.model import Message, check_agent_name, dedupe_key
from busd.errors import BusdError
from busd.routing import intake, refusals
from busd.routing.dedupe import DedupeIndex
from busd.routing.holdings import Holdings
from busd.routing.intake import Origin, Parcel, Refused, Rules
from busd.store.fsio import rename_noreplace
from busd.store.journal import START, Journal, JournalEntry, Position
from busd.store.layout import delivery_name, parse_delivery_name
from busd.store.mailbox import arrival_clock, deliver, ensure_agent_dirs, sync_dirs

__all__ = ["Batch", "Incoming", "RouteReport", "Router"]

_log = structlog.get_logger("busd.router")
_BATCH = 512


class RouteReport(msgspec.Struct, kw_only=True):
    """Counts of what one or more routing passes did."""

    accepted: int = 0
    delivered: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    redone: int = 0
    recipients: set[str] = msgspec.field(default_factory=set)

    def add(self, other: RouteReport) -> None:
        """Add ``other``'s counts to these (``recipients`` is a union)."""
        for f in self.__struct_fields__:
            if f == "recipients":
                self.recipients |= other.recipients
            else:
                setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass(slots=True)
class Incoming:
    """A socket publish handed to :meth:`Router.commit`: its bytes and sender.

    ``commit`` admits it through :data:`busd.routing.intake.SOCKET` in its
    worker thread (decoded there, never on the event loop) and sets ``outcome``:
    ``"accepted"``, ``"duplicate"``, or the :class:`BusdError` that refused it
    (dead-lettered, journaled and counted in that batch's report). ``message``
    is the decoded message afterwards (None if it did not decode). An
    in-process caller may hand a decoded ``message`` instead of ``raw``.
    """

    message: Message | None = None
    sender: str | None = None
    raw: bytes | None = None
    outcome: str | BusdError | None = None

    def __post_init__(self) -> None:
        if self.message is None and self.raw is None:
            raise ValueError("Incoming needs raw bytes or a message")


@dataclass(slots=True)
class Batch:
    """A committed batch awaiting :meth:`Router.finish`."""

    report: RouteReport = field(default_factory=lambda: RouteReport())
    accepted: list[_Item] = field(default_factory=list)
    redo: list[_Item] = field(default_factory=list)
    position: Position = START

    @property
    def size(self) -> int:
        """About the bytes this batch holds until :meth:`Router.finish` (for back-pressure).

        Each message is held twice: its JSON body and the decoded message.
        """
        return sum(2 * len(i.body) for i in (*self.accepted, *self.redo))


@dataclass(slots=True)
class _Item:
    msg: Message
    body: bytes
    recipients: list[str]
    rel: str | None
    path: Path | None
    incoming: Incoming | None


class Router:
    """Routes files of one bus. Owns the journal writer, the dedupe index and its positions.

    Not thread-safe: exactly one thread of the lock holder commits at a time,
    and one finishes (the two lanes). The exception is :meth:`reconfigure`,
    which any thread may call at any time (see there).
    """

    def __init__(self, config: Config, journal: Journal | None = None) -> None:
        self.layout = config.layout
        check_agent_name(config.default_recipient, "default_recipient")
        self._rules = Rules(config)
        self.journal = journal or Journal(
            self.layout.journal, segment_bytes=config.journal_segment_bytes, fsync=config.fsync
        )
        self.dedupe = DedupeIndex.rebuild(self.journal, config.dedupe_window_seconds)
        self._position: Position = self.journal.end_position()
        # The journal position up to which every accepted message was delivered
        # (files written, maybe not yet synced): what a checkpoint may cover.
        self._delivered: Position = self._position
        self._unsynced: list[Path] = []
        # Ids from outbox files committed but not yet delivered by finish(): the
        # same file dropped again meanwhile is a duplicate, not a redo (which would
        # deliver twice). A foreign inbox file stays a redo: finish() renames it in
        # place, so it must not be removed as a duplicate while it waits.
        self._in_flight: set[str] = set()

    def __enter__(self) -> Router:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the journal writer."""
        self.journal.close()

    # -- configuration and positions ----------------------------------------

    @property
    def config(self) -> Config:
        """The config the next :meth:`commit` routes by."""
        return self._rules.config

    @property
    def subscriptions(self) -> dict[str, list[str]]:
        """A copy of the topic map the next :meth:`commit` routes by."""
        return {topic: list(agents) for topic, agents in self._rules.subscriptions.items()}

    def reconfigure(self, config: Config, subscriptions: dict[str, list[str]]) -> None:
        """Route by ``config`` and ``subscriptions`` from the next :meth:`commit` on.

        Safe from any thread, at any time: the config and the topic map are
        built into one immutable :class:`~busd.routing.intake.Rules` and
        published with one reference store, and each :meth:`commit` reads that
        reference once, at its start. A commit already running finishes under
        the old rules; the next one sees the new ones, never a mix. The dedupe
        window is read only by ``dedupe.expire()`` (never by a commit), which
        reads it once. The root (hence the layout) must not change.
        """
        check_agent_name(config.default_recipient, "default_recipient")
        self._rules = Rules(config, subscriptions)
        self.dedupe.window_s = config.dedupe_window_seconds

    @property
    def position(self) -> Position:
        """The journal position after the last commit."""
        return self._position

    @property
    def delivered(self) -> Position:
        """The position up to which every accepted message has its inbox files."""
        return self._delivered

    @property
    def unsynced(self) -> Sequence[Path]:
        """Deliveries written since the last :meth:`sync` (not a copy: do not keep it)."""
        return self._unsynced

    def needs_checkpoint(self, since: Position) -> bool:
        """Whether a checkpoint would cover more than one taken at ``since``."""
        return bool(self._unsynced) or self._delivered != since

    def checkpoint(self) -> Position:
        """Make every delivery so far durable; the position a checkpoint may now record.

        Run in the delivery lane (no :meth:`finish` in flight), so that the
        position covers exactly the deliveries just synced.
        """
        self.sync()
        return self._delivered

    def mark_all_delivered(self) -> None:
        """Everything journaled is delivered (recovery re-delivered what was missing)."""
        self._delivered = self._position
        self._in_flight.clear()

    # -- scanning ---------------------------------------------------------

    def scan(self) -> list[Path]:
        """Every file waiting to be routed: outbox files, then foreign inbox files.

        Names starting with ``.`` are in-progress writes by convention and skipped.
        """
        found = [p for d in _subdirs(self.layout.outbox) for p in _entries(d)]
        found.extend(p for p in _entries(self.layout.outbox) if not p.is_dir())
        for d in _subdirs(self.layout.inbox):
            found.extend(_foreign(d))
        return found

    def scan_dirs(self, dirs: set[Path]) -> list[Path]:
        """The files waiting in ``dirs`` (outbox or inbox directories named by hints)."""
        found: list[Path] = []
        for d in sorted(dirs):
            if d == self.layout.outbox:
                found.extend(p for p in _entries(d) if not p.is_dir())
                continue
            found.extend(_foreign(d) if d.parent == self.layout.inbox else _entries(d))
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

    def route(self, paths: Sequence[Path], incoming: Sequence[Incoming] = ()) -> RouteReport:
        """Route one batch of files and in-memory messages as one group commit.

        The same as :meth:`commit` followed by :meth:`finish`.
        """
        batch = self.commit(paths, incoming)
        report = batch.report
        report.add(self.finish(batch))
        return report

    def commit(self, paths: Sequence[Path], incoming: Sequence[Incoming] = ()) -> Batch:
        """Admit, deduplicate and journal a batch: ONE journal write and fsync.

        Every file and every :class:`Incoming` passes :mod:`busd.routing.intake`;
        a refused one is dead-lettered through :mod:`busd.routing.refusals`,
        journaled ``dead_lettered`` in this same write and counted in
        ``batch.report``. When this returns, every accepted message is durable,
        its ``outbox/`` source is gone, and each :class:`Incoming` has its
        ``outcome``. Deliveries wait for :meth:`finish`, which may run in another
        thread while the next ``commit`` does (never two ``finish`` or two
        ``commit`` at once).
        """
        rules = self._rules  # once: a concurrent reconfigure never mixes two configs in a batch
        batch = Batch()
        removals: list[Path] = []
        report = batch.report
        entries: list[JournalEntry] = []
        keys: set[str] = set()
        now = datetime.now(UTC)
        items = [
            i for p in paths if (i := self._admit_file(rules, p, entries, report, now)) is not None
        ]
        for inc in incoming:
            if (item := self._admit_publish(rules, inc, entries, report, now)) is not None:
                items.append(item)
        for item in items:
            key = dedupe_key(item.msg)
            mid = item.msg.message_id
            # message ids are unique by contract: a second message with a seen id is a
            # duplicate even under another idempotency key (it would share file names).
            seen = self.dedupe.get(key) or self.dedupe.get(mid)
            if (
                item.rel is not None
                and seen is not None
                and seen.source == item.rel
                and mid not in self._in_flight
            ):
                batch.redo.append(item)
            elif seen is not None or key in keys or mid in keys:
                entries.append(_entry("duplicate", now, item.msg, item.rel, item.recipients))
                report.duplicates += 1
                if item.path is not None:
                    removals.append(item.path)
                if item.incoming is not None:
                    item.incoming.outcome = "duplicate"
            else:
                keys.update((key, mid))
                entry = _entry("accepted", now, item.msg, item.rel, item.recipients)
                entries.append(msgspec.structs.replace(entry, message=msgspec.Raw(item.body)))
                batch.accepted.append(item)
        if entries:
            self._position = self.journal.append(entries)
        batch.position = self._position
        stamp = time.time()
        for item in batch.accepted:
            self.dedupe.add(dedupe_key(item.msg), item.msg.message_id, item.rel, stamp)
            if item.msg.idempotency_key is not None:
                self.dedupe.add(item.msg.message_id, item.msg.message_id, item.rel, stamp)
            if item.incoming is not None:
                item.incoming.outcome = "accepted"
                item.incoming = None  # its raw bytes need not wait for finish()
            report.accepted += 1
            report.delivered += len(item.recipients)
            if item.path is not None and item.path.parent.parent != self.layout.inbox:
                removals.append(item.path)  # journaled: the source has done its job
                self._in_flight.add(item.msg.message_id)
        for path in removals:
            _unlink(path)
        if batch.accepted:
            _log.debug("batch_committed", accepted=len(batch.accepted))
        return batch

    def finish(self, *batches: Batch) -> RouteReport:
        """Deliver committed batches, in commit order, as one pass.

        Returns what only this step adds (``redone``, ``recipients``); the
        counts of what was accepted are in each ``batch.report`` from :meth:`commit`.

        Names (arrival keys) are drawn in commit order, so listing an inbox gives
        arrival order. (A pool of writer threads was tried: on 2 cores its lock
        hand-offs halved throughput once file creation was cheap.)
        """
        report = RouteReport()
        jobs: list[tuple[str, bytes, str, str]] = []
        holdings: Holdings | None = None  # one per pass, and only when there is a redo
        for batch in batches:
            for item in batch.accepted:
                self._deliver(item, jobs)
                _log.debug("message_accepted", message_id=item.msg.message_id, to=item.recipients)
            for item in batch.redo:
                holdings = holdings or Holdings(self.config)
                self._redo(item, jobs, holdings)
                report.redone += 1
        self._write(jobs)
        for batch in batches:
            for item in batch.redo:
                if item.path is not None and item.path.parent.parent != self.layout.inbox:
                    _unlink(item.path)
            report.recipients.update(r for i in batch.accepted for r in i.recipients)
            self._in_flight.difference_update(i.msg.message_id for i in batch.accepted)
        if batches:
            # Only now may a checkpoint cover these batches: their deliveries all exist.
            self._delivered = max(self._delivered, batches[-1].position)
        return report

    def _write(self, jobs: list[tuple[str, bytes, str, str]]) -> None:
        for agent in {job[0] for job in jobs}:
            ensure_agent_dirs(self.layout, agent)
        for agent, body, message_id, arrival in jobs:
            self._unsynced.append(deliver(self.layout, agent, body, message_id, arrival=arrival))

    def _admit_file(
        self,
        rules: Rules,
        path: Path,
        entries: list[JournalEntry],
        report: RouteReport,
        now: datetime,
    ) -> _Item | None:
        origin = Origin.file(self.layout, path)
        try:
            result = intake.admit(rules, Parcel(origin), intake.FILE)
        except FileNotFoundError:
            return None  # claimed or removed by someone else since the scan
        if isinstance(result, Refused):
            refusals.dead_letter(self.layout, result, at=now, entries=entries, counts=report)
            return None
        return _Item(result.message, result.body, result.recipients, origin.rel, path, None)

    def _admit_publish(
        self,
        rules: Rules,
        inc: Incoming,
        entries: list[JournalEntry],
        report: RouteReport,
        now: datetime,
    ) -> _Item | None:
        parcel = Parcel(Origin.socket(inc.sender), data=inc.raw, message=inc.message)
        result = intake.admit(rules, parcel, intake.SOCKET)
        inc.message = result.message
        if isinstance(result, Refused):
            refusals.dead_letter(self.layout, result, at=now, entries=entries, counts=report)
            inc.outcome = result.error
            return None
        return _Item(result.message, result.body, result.recipients, None, None, inc)

    def _deliver(self, item: _Item, jobs: list[tuple[str, bytes, str, str]]) -> None:
        path = item.path
        if path is not None and path.parent.parent == self.layout.inbox:
            # A producer wrote straight into the inbox: validated and journaled
            # in place; a rename inside the directory gives it a delivery name.
            target = path.parent / delivery_name(arrival_clock.next(), 0, item.msg.message_id)
            try:
                rename_noreplace(path, target)
            except FileNotFoundError:
                return  # a daemon-less consumer claimed it first: it is journaled, that is all
            self._unsynced.append(target)
            return
        for r in item.recipients:
            jobs.append((r, item.body, item.msg.message_id, arrival_clock.next()))

    def _redo(
        self, item: _Item, jobs: list[tuple[str, bytes, str, str]], holdings: Holdings
    ) -> None:
        """Finish a pass that died after the journal append: deliver what is missing."""
        if item.path is not None and item.path.parent.parent == self.layout.inbox:
            self._deliver(item, jobs)
            return
        size = len(item.body)
        missing = [r for r in item.recipients if not holdings.has(r, item.msg, size)]
        if missing:
            self._deliver(_Item(item.msg, item.body, missing, item.rel, None, None), jobs)
        _log.info("message_redelivered_after_crash", message_id=item.msg.message_id, to=missing)

    def deliver_again(self, msg: Message, body: bytes, recipients: list[str]) -> None:
        """Deliver an already-journaled message to ``recipients`` (recovery)."""
        jobs: list[tuple[str, bytes, str, str]] = []
        self._deliver(_Item(msg, body, recipients, None, None, None), jobs)
        self._write(jobs)

    def sync(self) -> None:
        """Make every delivery since the last call durable (files, then directories)."""
        if self._unsynced and self.config.fsync:
            sync_dirs(self._unsynced)
        self._unsynced.clear()


def _entry(
    event: str, at: datetime, msg: Message, source: str | None, to: list[str] | None
) -> JournalEntry:
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


def _foreign(directory: Path) -> list[Path]:
    """Files of an inbox without a delivery name (dropped there by a producer).

    Filtered before sorting: an inbox may hold 100,000 delivered files, and only
    the few foreign ones need an order.
    """
    try:
        with os.scandir(directory) as it:
            names = [
                e.name
                for e in it
                if not e.name.startswith(".") and parse_delivery_name(e.name) is None
            ]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [directory / n for n in sorted(names)]


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        os.rmdir(path)
