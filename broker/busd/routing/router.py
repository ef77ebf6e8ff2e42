"""The routing core: outbox (and foreign inbox) files in, journal + inbox files out.

One :meth:`Router.route` call handles a batch of files as one group commit:

1. admit each file and publish through :mod:`busd.routing.intake`; a refused one
   leaves through :mod:`busd.routing.refusals` (DLQ entry, journal line, count);
2. drop duplicates (dedupe key already accepted within the window);
3. append every outcome to the journal in ONE write and ONE fsync: from this
   point an accepted message is durable, and its ``outbox/`` source is removed;
4. deliver to each recipient's inbox (:meth:`Router.finish`; a checkpoint later
   fsyncs the files in bulk). A recipient the caller says is *served* (a socket
   consumer takes it from the daemon's memory) gets no file but a :class:`Kept`
   naming the message's journal line (from ``Journal.append_at``).

With ``compat = "tapps"`` every inbox file this module writes (deliveries, crash
redos, memory write-outs, a producer's own inbox drop) is named and shaped by
:mod:`busd.store.tapps` (Tapps' form for its three types, ``.busd`` for the rest).

Steps 1-3 are :meth:`Router.commit`, step 4 :meth:`Router.finish`, run by the
daemon in two lanes. A crash after step 3 loses nothing: the journal after the
checkpoint is replayed at start-up (:mod:`busd.routing.recovery`). A file seen
again at the path its key was accepted from (a crash before its removal) is a
*redo* (deliver to whichever recipient lacks it), not a duplicate. The daemon
calls these from worker threads; the daemon-less CLI uses
:func:`busd.routing.offline.route_pending`.

Only the holder of the bus lock (``<root>/busd.lock``) routes a bus.

The values a pass takes and returns moved to :mod:`busd.routing.batch` (re-exported here).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import msgspec
import structlog

from busd.config import Config
from busd.core.codec import decode
from busd.core.model import Message, check_agent_name
from busd.routing import intake, refusals
from busd.routing.batch import Batch, Held, Incoming, Kept, RouteReport, Served
from busd.routing.batch import Item as _Item
from busd.routing.dedupe import DedupeIndex, KeySpaces
from busd.routing.holdings import Holdings
from busd.routing.intake import Origin, Parcel, Refused, Rules
from busd.store.fsio import rename_noreplace
from busd.store.journal import Journal, JournalEntry, Position
from busd.store.layout import delivery_name
from busd.store.mailbox import (
    arrival_clock,
    deliver,
    ensure_agent_dirs,
    sync_dirs,
    waiting,
    waiting_in,
)
from busd.store.tapps import deliver_tapps, place_in_inbox, tapps_payload

__all__ = ["Batch", "Held", "Incoming", "Kept", "RouteReport", "Router", "Served"]

_log = structlog.get_logger("busd.router")
_BATCH = 512

# (agent, bytes to write, message_id, arrival, the message in tapps mode: Tapps' names)
_Jobs = list[tuple[str, bytes, str, str, Message | None]]
_Out = tuple[list[JournalEntry], "RouteReport", datetime]  # where refusals and lines go


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
        # Up to here every accepted message is delivered (maybe unsynced).
        self._delivered: Position = self._position
        self._unsynced: list[Path] = []
        # Outbox ids committed, not yet finished: the same file dropped again meanwhile
        # is a duplicate, not a redo (a foreign inbox file stays a redo: it is renamed
        # in place, so it must not be removed as a duplicate while it waits).
        self._in_flight: set[str] = set()
        self.checkpoint_limit: Position | None = None
        """The latest position :meth:`checkpoint` may return (None: no limit)."""

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
        """Route by these from the next :meth:`commit` on; safe from any thread, at any
        time (one immutable :class:`Rules`, read once per commit). Same root only."""
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

    def checkpoint(self) -> Position:
        """Sync every delivery so far; the position a checkpoint may now record (in the
        delivery lane). Never past :attr:`checkpoint_limit`: the daemon's oldest
        unsettled memory message has no file; a restart rebuilds it from the journal."""
        self.sync()
        limit = self.checkpoint_limit
        return self._delivered if limit is None else min(self._delivered, limit)

    def mark_all_delivered(self) -> None:
        """Everything journaled is delivered (recovery re-delivered what was missing)."""
        self._delivered = self._position
        self._in_flight.clear()

    # -- scanning ---------------------------------------------------------

    def scan(self) -> list[Path]:
        """Every file waiting to be routed: :func:`busd.store.mailbox.waiting`."""
        return waiting(self.layout)

    def scan_dirs(self, dirs: set[Path]) -> list[Path]:
        """The files waiting in ``dirs`` (outbox or inbox directories named by hints)."""
        return waiting_in(self.layout, dirs)

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
        """:meth:`commit` then :meth:`finish` one batch of files and publishes."""
        batch = self.commit(paths, incoming)
        report = batch.report
        report.add(self.finish(batch))
        return report

    def commit(
        self,
        paths: Sequence[Path],
        incoming: Sequence[Incoming] = (),
        records: Sequence[JournalEntry] = (),
    ) -> Batch:
        """Admit, deduplicate and journal a batch: ONE journal write and fsync.

        A refused file or publish is dead-lettered, journaled in this same write and
        counted in ``batch.report``; ``records`` (the daemon's ``acked``,
        ``delivered``, ``dead_lettered`` lines) ride after the batch's own. On
        return every accepted message is durable, its ``outbox/`` source gone, and
        each :class:`Incoming` has its ``outcome``. :meth:`finish` may run in
        another thread meanwhile (never two of either at once).
        """
        rules = self._rules  # once: a concurrent reconfigure never mixes two configs in a batch
        batch = Batch()
        removals: list[Path] = []
        report = batch.report
        entries: list[JournalEntry] = []
        keys = KeySpaces()
        now = datetime.now(UTC)
        out = (entries, report, now)
        items = [i for p in paths if (i := self._admit_file(rules, p, out)) is not None]
        items += [i for inc in incoming if (i := self._admit_publish(rules, inc, out)) is not None]
        for item in items:
            key = item.msg.idempotency_key
            mid = item.msg.message_id
            # ids match ids, keys match keys (busd.routing.dedupe states the rule).
            seen = self.dedupe.find(mid, key)
            same_file = seen is not None and item.rel is not None and seen.source == item.rel
            if same_file and mid not in self._in_flight:
                batch.redo.append(item)
            elif seen is not None or keys.seen(mid, key):
                entries.append(_entry("duplicate", now, item.msg, item.rel, item.recipients))
                report.duplicates += 1
                if item.path is not None:
                    removals.append(item.path)
                if item.incoming is not None:
                    item.incoming.outcome = "duplicate"
            else:
                keys.add(mid, key)
                entry = _entry("accepted", now, item.msg, item.rel, item.recipients)
                item.length = len(entries)  # its line's index, until the append says more
                entries.append(msgspec.structs.replace(entry, message=msgspec.Raw(item.body)))
                batch.accepted.append(item)
        if entries or records:
            spans = self.journal.append_at([*entries, *records])
            for item in batch.accepted:
                item.position, item.length = spans[item.length]
            last, size = spans[-1]
            self._position = Position(last.segment, last.offset + size)
        batch.position = self._position
        stamp = time.time()
        for item in batch.accepted:
            self.dedupe.add(item.msg.message_id, item.msg.idempotency_key, item.rel, stamp)
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

    def finish(
        self, *batches: Batch, served: Served | None = None, held: Held | None = None
    ) -> RouteReport:
        """Deliver committed batches, in commit order, as one pass.

        Returns what only this step adds (``redone``, ``recipients``, ``kept``). A
        recipient for which ``served`` is true gets no file (nothing is created,
        renamed or unlinked for it): a :class:`Kept` in ``report.kept`` for the
        caller's memory queue. A crash redo skips a recipient that holds the message as a
        file or for which ``held(agent, message_id)`` is true (the daemon's memory holds
        it, or held it since start-up: a second copy would be delivered after its ack).
        Arrival keys are drawn in commit order. (A pool of
        writer threads was tried: on 2 cores its hand-offs halved throughput.)
        """
        report = RouteReport()
        jobs: _Jobs = []
        holdings: Holdings | None = None  # one per pass, and only when there is a redo
        for batch in batches:
            for item in batch.accepted:
                self._deliver(item, jobs, served, report.kept)
                _log.debug("message_accepted", message_id=item.msg.message_id, to=item.recipients)
            for item in batch.redo:
                holdings = holdings or Holdings(self.config)
                self._redo(item, jobs, holdings, held)
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

    def _write(self, jobs: _Jobs) -> None:
        for agent in {job[0] for job in jobs}:
            ensure_agent_dirs(self.layout, agent)
        for agent, data, message_id, arrival, msg in jobs:
            if msg is None:
                path = deliver(self.layout, agent, data, message_id, arrival=arrival)
            else:
                path = deliver_tapps(self.layout, agent, msg, arrival=arrival, data=data)
            self._unsynced.append(path)

    def _admit_file(self, rules: Rules, path: Path, out: _Out) -> _Item | None:
        entries, report, now = out
        origin = Origin.file(self.layout, path)
        try:
            result = intake.admit(rules, Parcel(origin), intake.FILE)
        except FileNotFoundError:
            return None  # claimed or removed by someone else since the scan
        if isinstance(result, Refused):
            refusals.dead_letter(self.layout, result, at=now, entries=entries, counts=report)
            return None
        return _Item(result.message, result.body, result.recipients, origin.rel, path, None)

    def _admit_publish(self, rules: Rules, inc: Incoming, out: _Out) -> _Item | None:
        entries, report, now = out
        parcel = Parcel(Origin.socket(inc.sender), data=inc.raw, message=inc.message)
        result = intake.admit(rules, parcel, intake.SOCKET)
        inc.message = result.message
        if isinstance(result, Refused):
            refusals.dead_letter(self.layout, result, at=now, entries=entries, counts=report)
            inc.outcome = result.error
            return None
        return _Item(result.message, result.body, result.recipients, None, None, inc)

    def _deliver(self, item: _Item, jobs: _Jobs, served: Served | None, kept: list[Kept]) -> None:
        path = item.path
        tapps = self.config.compat == "tapps"
        if path is not None and path.parent.parent == self.layout.inbox:
            self._name_in_place(item, path, tapps)
            return
        mid = item.msg.message_id
        data, msg = (tapps_payload(item.msg, item.body), item.msg) if tapps else (item.body, None)
        for r in item.recipients:
            if served is not None and served(r):
                kept.append(Kept(r, mid, item.msg.idempotency_key, item.position, item.length))
            else:
                jobs.append((r, data, mid, arrival_clock.next(), msg))

    def _name_in_place(self, item: _Item, path: Path, tapps: bool) -> None:
        """A producer wrote straight into the inbox: validated and journaled in place; a
        rename inside the directory gives it a delivery name (module docstring)."""
        mid, arrival = item.msg.message_id, arrival_clock.next()
        if tapps:
            placed = place_in_inbox(self.layout, path, item.msg, item.body, arrival)
            if placed is not None:
                self._unsynced.append(placed)
            return
        target = path.parent / delivery_name(arrival, 0, mid)
        try:
            rename_noreplace(path, target)
        except FileNotFoundError:
            return  # a daemon-less consumer claimed it first: it is journaled, that is all
        self._unsynced.append(target)

    def _redo(self, item: _Item, jobs: _Jobs, holdings: Holdings, held: Held | None) -> None:
        """Finish a pass that died after the journal append: deliver what is missing."""
        if item.path is not None and item.path.parent.parent == self.layout.inbox:
            tapps = self.config.compat == "tapps"
            if tapps and holdings.has(item.path.parent.name, item.msg):
                _unlink(item.path)  # its Tapps payload was written, then a crash came first
            else:
                self._deliver(item, jobs, None, [])
            return
        size = len(item.body)
        mid = item.msg.message_id
        missing = [
            r
            for r in item.recipients
            if not (held is not None and held(r, mid)) and not holdings.has(r, item.msg, size)
        ]
        if missing:
            self._deliver(_Item(item.msg, item.body, missing, item.rel, None, None), jobs, None, [])
        _log.info("message_redelivered_after_crash", message_id=item.msg.message_id, to=missing)

    def write_out(self, agent: str, messages: Sequence[tuple[str, bytes, int]]) -> None:
        """Memory messages ``(message_id, body, count)`` as ``agent``'s inbox files (synced
        by the next checkpoint, like every delivery: call it in the delivery lane)."""
        if messages:
            ensure_agent_dirs(self.layout, agent)
        tapps = self.config.compat == "tapps"
        for mid, body, count in messages:
            if tapps:
                path = deliver_tapps(self.layout, agent, decode(body), deliveries=count)
            else:
                path = deliver(self.layout, agent, body, mid, deliveries=count)
            self._unsynced.append(path)

    def note_delivered(self, position: Position) -> None:
        """A batch with nothing to deliver (only records) is delivered as it is committed."""
        self._delivered = max(self._delivered, position)

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


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        os.rmdir(path)
