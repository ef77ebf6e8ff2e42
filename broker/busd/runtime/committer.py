"""The commit lane: file hints and socket publishes -> ``Router.commit`` (journal + fsync).

One loop (:meth:`Committer.run`) takes everything that piled up since its
last pass: the directories the watcher named, a full scan when asked for, and
every socket publish waiting. Files are committed in batches of 512; the
socket publishes ride with the first batch, so one fsync covers all of them
and their publishers are answered as soon as it is durable, while the
delivery lane writes the inbox files (:mod:`busd.runtime.deliverer`).

Group commit falls out of the structure: while one batch is in its worker
thread, new hints and publishes pile up, and the next commit takes them all;
it also waits briefly for the publishers it just answered (:meth:`_gather`).

A storage error (disk full, read-only, permissions) loses nothing: sources
stay in the outboxes, a journaled batch is redone, the publishers get the
error, and the pass is retried with a growing pause (0.1 s doubling to 5 s).

The daemon's own journal records (``acked``, ``delivered``, consumer-side
``dead_lettered`` of memory deliveries) ride in the same write:
:meth:`Committer.record` waits for the fsync (an ack is answered only then,
and acks of many consumers share it, like publishes), :meth:`Committer.record_soon`
does not (a ``delivered`` line may be lost in a crash: only a count is lower).

Whoever needs the Router's commit half (lease sweeps, retention, recovery,
``reconfigure``) holds :attr:`Committer.lane`; whoever needs both lanes takes
this one first.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import structlog

from busd.config import Config
from busd.errors import BusdError, ShuttingDown
from busd.routing.router import Batch, Incoming, Router
from busd.runtime.arrivals import Wakeup
from busd.runtime.deliverer import Deliverer
from busd.runtime.metrics import Metrics
from busd.store.fsio import storage_error
from busd.store.journal import JournalEntry

__all__ = ["BATCH", "GATHER_MAX_S", "Committer"]

_log = structlog.get_logger("busd.daemon")

BATCH = 512
"""Files per commit (one journal append and fsync each)."""
GATHER_MAX_S = 0.002
"""The longest :meth:`Committer._gather` waits for publishers to come back."""

_Publish = tuple[list[Incoming], anyio.Event]


class _Records:
    """Journal records for the next commit; ``done`` is set once they are fsynced."""

    __slots__ = ("done", "entries", "error")

    def __init__(self, entries: list[JournalEntry], wait: bool) -> None:
        self.entries = entries
        self.done: anyio.Event | None = anyio.Event() if wait else None
        self.error: BusdError | None = None


class Committer:
    """Owns the hints, the waiting publishes and the commit lane of one Router."""

    def __init__(self, router: Router, deliverer: Deliverer, metrics: Metrics) -> None:
        self._router = router
        self._deliverer = deliverer
        self._metrics = metrics
        self.lane = anyio.Lock()
        self._root = router.layout.root
        self._dirty: set[Path] = set()
        self._full_scan = False
        self._wake = Wakeup()
        self._publishes: list[_Publish] = []
        self._records: list[_Records] = []
        self._arrived = Wakeup()  # set by each publish call (see _gather)
        self._last_callers = 0  # publish calls in the last commit that had any
        self._commit_s = 0.0  # how long the last commit took
        self._closed = False

    # -- what others hand in ------------------------------------------------

    def on_hints(self, hints: set[Path]) -> None:
        """Directories that may hold work (the watcher's callback); the root: all of them."""
        if self._root in hints:  # the watcher lost track: scan everything
            hints = hints - {self._root}
            self._full_scan = True
        self._dirty |= hints
        self._wake.set()

    def request_full_scan(self) -> None:
        """Scan every outbox and inbox in the next pass."""
        self._full_scan = True
        self._wake.set()

    def request_pass(self) -> None:
        """Run a pass soon even if nothing is waiting (say, to recover deliveries)."""
        self._wake.set()

    def close(self) -> None:
        """Refuse publishes from now on (the daemon is stopping)."""
        self._closed = True

    async def publish(self, items: list[Incoming]) -> None:
        """Hand ``items`` to the next group commit; return once each has its outcome.

        An accepted item is in the fsynced journal when this returns.
        """
        if self._closed:
            raise ShuttingDown("busd is shutting down; publish to the outbox instead")
        done = anyio.Event()
        self._publishes.append((items, done))
        self._wake.set()
        self._arrived.set()
        await done.wait()

    def record_soon(self, entries: list[JournalEntry]) -> None:
        """Append ``entries`` with the next group commit; neither wait nor cause one.

        They ride the next publish, ack or routing pass (the rescan timer makes one
        at least every ``rescan_interval_seconds``): a fetch costs no fsync of its own.
        """
        self._records.append(_Records(entries, wait=False))

    async def record(self, entries: list[JournalEntry]) -> None:
        """Append ``entries`` with the next group commit; return once they are fsynced."""
        if self._closed:
            raise ShuttingDown("busd is shutting down")
        records = _Records(entries, wait=True)
        self._records.append(records)
        self._wake.set()
        self._arrived.set()
        assert records.done is not None
        await records.done.wait()
        if records.error is not None:
            raise records.error

    async def reconfigure(self, config: Config, subscriptions: dict[str, list[str]]) -> None:
        """Give the Router a new config and topics, between two commits (in the lane)."""
        async with self.lane:
            await anyio.to_thread.run_sync(self._router.reconfigure, config, subscriptions)

    # -- the loop -------------------------------------------------------------

    async def run(self) -> None:
        """Commit whatever piled up, pass after pass, until cancelled."""
        backoff = 0.0
        while True:
            await self._wake.wait()
            await self._gather()
            self._wake.clear()
            dirs, full = self._dirty, self._full_scan
            self._dirty, self._full_scan = set(), False
            publishes, self._publishes = self._publishes, []
            records, self._records = self._records, []
            try:
                await self._pass(dirs, full, publishes, records)
                backoff = 0.0
            except (BusdError, OSError) as exc:
                # Disk full, read-only, permissions: nothing accepted is lost (sources
                # stay in the outboxes; a journaled batch is redone), publishers get
                # the error, and the pass is retried with a growing pause.
                error = exc if isinstance(exc, BusdError) else storage_error(exc)
                for items, _ in publishes:
                    for item in items:
                        if item.outcome is None:
                            item.outcome = error
                for r in records:
                    r.error = error
                # Unwaited records are tried again with the next pass.
                self._records[:0] = [r for r in records if r.done is None]
                backoff = min(max(backoff * 2, 0.1), 5.0)
                _log.error("route_pass_failed", error=str(exc), retry_in_s=backoff)
                self._deliverer.mark_broken()
                _release(publishes)
                self._full_scan = True
                await anyio.sleep(backoff)
                self._wake.set()
            finally:
                # Never leave a publisher (or an acker) hanging.
                _release(publishes)
                _settle(records)

    async def _gather(self) -> None:
        """Group commit: give the publishers just answered a moment to come back.

        When the last commit carried publish calls and more arrived while it ran,
        together ``k`` > 1, and fewer wait now, wait until ``k`` do, or for half the
        last commit's duration (at most 2 ms), whichever comes first. Counting those
        who arrived during the commit matters: two groups of equal size would each
        see their own size waiting and never merge. Without it, concurrent publishers split into
        two alternating groups (those answered while a commit was in flight cannot
        join it), and a slow disk pays two flushes for what one could cover, as
        PostgreSQL's ``commit_delay``/``commit_siblings`` avoid. A lone publisher
        (``k`` = 1) never waits.
        """
        k = self._last_callers
        if k < 2 or self._callers() >= k or not self._callers():
            return
        with anyio.move_on_after(min(self._commit_s / 2, GATHER_MAX_S)):
            self._arrived.clear()
            while self._callers() < k:
                await self._arrived.wait()

    def _callers(self) -> int:
        """Calls waiting for the next fsync: publishes and waited records (acks)."""
        return len(self._publishes) + sum(1 for r in self._records if r.done is not None)

    async def _pass(
        self, dirs: set[Path], full: bool, publishes: list[_Publish], records: list[_Records]
    ) -> None:
        incoming = [item for items, _ in publishes for item in items]
        entries = [e for r in records for e in r.entries]
        callers = len(publishes) + sum(1 for r in records if r.done is not None)
        async with self.lane:
            if self._deliverer.broken:
                # A pass failed after its journal append, or deliveries failed:
                # deliver what the journal holds after the checkpoint.
                await self._deliverer.recover()
            paths: list[Path] = []
            if dirs or full:  # socket-only passes skip a worker-thread round trip
                paths = await anyio.to_thread.run_sync(self._scan, dirs, full)
            for i in range(0, max(len(paths), 1), BATCH):
                await self._deliverer.room()
                # Socket publishes ride with the first batch: one fsync for all.
                started = time.monotonic()
                batch: Batch = await anyio.to_thread.run_sync(
                    self._router.commit,
                    paths[i : i + BATCH],
                    incoming if i == 0 else (),
                    entries if i == 0 else (),
                )
                self._commit_s = time.monotonic() - started
                if i == 0 and callers:
                    # The publishers about to be answered plus those who arrived while
                    # this commit ran: how many the next commit should wait for.
                    self._last_callers = callers + self._callers()
                self._metrics.count(batch.report)
                await self._deliverer.enqueue(batch)
                if i == 0:
                    # Durable now: answer while the inbox files are written.
                    _release(publishes)
                    _settle(records)

    def _scan(self, dirs: set[Path], full: bool) -> list[Path]:
        router = self._router
        if full:
            router.dedupe.expire()  # on the slow timer: often enough for a 7-day window
            return router.scan()
        return router.scan_dirs(dirs)


def _release(publishes: Sequence[_Publish]) -> None:
    for _, done in publishes:
        done.set()


def _settle(records: Sequence[_Records]) -> None:
    for r in records:
        if r.done is not None:
            r.done.set()
