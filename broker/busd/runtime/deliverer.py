"""The delivery lane: committed batches -> ``Router.finish`` (inbox files), checkpoints.

Publishers are answered after the journal fsync, before their inbox files
exist; this lane writes those files, oldest batch first, many batches per
pass, while the commit lane journals the next batch (docs/internals.md).

Contracts:

* Back-pressure: at most 10,000 messages (or about 8 MiB) wait between the
  lanes; past that :meth:`Deliverer.room` makes commits wait (publishers see
  latency, not errors). The journal holds all of it anyway.
* Read your writes: :meth:`Deliverer.settled` returns once every batch
  committed before the call has its inbox files.
* Served agents: ``finish`` is given the daemon's served rule; what it keeps
  for socket-served agents (no file) is handed to ``keep`` (the memory
  queues) before the batch counts as finished, so a fetch that waited for
  :meth:`Deliverer.settled` finds it in memory.
* A checkpoint never passes ``floor()`` (the oldest message unsettled in
  memory): it has no file to sync, only its journal line.
* A failed pass loses nothing (the batches are journaled after the
  checkpoint and ``Router.delivered`` has not moved past them): the lane is
  marked broken, the commit lane is asked for a pass, and that pass calls
  :meth:`Deliverer.recover`, which delivers from the journal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import anyio
import structlog

from busd.errors import BusdError
from busd.routing.queues import Queues
from busd.routing.recovery import recover_deliveries, write_checkpoint
from busd.routing.router import Batch, Held, Kept, Router, RouteReport, Served
from busd.runtime.arrivals import Arrivals, Wakeup
from busd.runtime.metrics import Metrics
from busd.store.journal import START, Position

__all__ = ["MAX_PENDING", "MAX_PENDING_BYTES", "Deliverer"]

_log = structlog.get_logger("busd.daemon")

MAX_PENDING = 10_000
"""Messages that may wait between the lanes before commits wait."""
MAX_PENDING_BYTES = 8 * 1024 * 1024
"""Bytes (about) that may wait between the lanes before commits wait."""


class Deliverer:
    """Owns what is committed but not yet delivered; one loop (:meth:`run`) drains it."""

    def __init__(
        self,
        router: Router,
        metrics: Metrics,
        arrivals: Arrivals,
        *,
        on_failure: Callable[[], None],
        max_pending: int = MAX_PENDING,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        served: Served | None = None,
        keep: Callable[[Iterable[Kept]], None] | None = None,
        floor: Callable[[], Position | None] | None = None,
    ) -> None:
        self._router = router
        self._metrics = metrics
        self._arrivals = arrivals
        self._on_failure = on_failure  # asks the commit lane for a (recovering) pass
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self.lane = anyio.Lock()
        self._pending: list[tuple[int, Batch]] = []  # (commit number, batch)
        self._pending_bytes = 0
        self._pending_messages = 0
        self._committed = 0  # batches committed so far
        self._finished = 0  # ... whose deliveries exist (or that recovery covered)
        self._progress = anyio.Condition()  # notified when _finished moves
        self._wake = Wakeup()
        self._delivering = False  # a finish() is in its worker thread
        self._broken = False
        self._checkpointed = START
        self.served = served
        """The served rule ``finish`` delivers by (None: files for everyone)."""
        self.keep = keep
        """Takes what ``finish`` kept for served agents (set together with :attr:`served`)."""
        self.floor = floor
        """The position no checkpoint may pass (the memory queues' oldest unsettled)."""
        self.live: Queues | None = None
        """The memory queues: recovery counts what they hold as held (no second file)."""
        self.held: Held | None = None
        """Whether memory holds (or held since start-up) a message: a crash redo writes
        no file for it (set together with :attr:`served`)."""

    @property
    def undelivered(self) -> int:
        """Messages committed whose inbox files are not written yet."""
        return self._pending_messages

    @property
    def broken(self) -> bool:
        """True after a failure until :meth:`recover` ran."""
        return self._broken

    def mark_broken(self) -> None:
        """A commit failed after its journal append: deliver from the journal next."""
        self._broken = True

    async def enqueue(self, batch: Batch) -> None:
        """Queue a batch just committed (on the loop, right after its commit)."""
        self._committed += 1
        # An empty batch may only count as finished when nothing before it is
        # still being written: not queued, and not in the finish() running now.
        if batch.accepted or batch.redo or self._pending or self._delivering:
            self._pending.append((self._committed, batch))
            self._pending_bytes += batch.size
            self._pending_messages += len(batch.accepted) + len(batch.redo)
            self._wake.set()
        else:
            self._router.note_delivered(batch.position)
            await self._advance(self._committed)  # nothing to deliver, nothing queued before

    async def room(self) -> None:
        """Back-pressure: wait while too much committed work awaits its inbox files."""
        async with self._progress:
            while self._full() and not self._broken:
                await self._progress.wait()

    def _full(self) -> bool:
        return (
            self._pending_bytes > self._max_pending_bytes
            or self._pending_messages > self._max_pending
        )

    async def settled(self) -> None:
        """Return once deliveries of every batch committed so far are in the inboxes."""
        target = self._committed
        async with self._progress:
            while self._finished < target:
                await self._progress.wait()

    async def _advance(self, finished: int) -> None:
        self._finished = max(self._finished, finished)
        async with self._progress:
            self._progress.notify_all()

    async def run(self) -> None:
        """Write the inbox files of committed batches, oldest first, many per pass."""
        while True:
            await self._wake.wait()
            report: RouteReport | None = None
            async with self.lane:
                pending, self._pending = self._pending, []
                if not pending or self._broken:
                    continue  # recovery delivers from the journal what was queued
                batches = [b for _, b in pending]
                self._delivering = True
                try:
                    served = self.served if self.keep is not None else None
                    # Shielded: the batches are off the queue now. A stop landing here
                    # (the lane's acquire yields shielded, the thread's entry is a
                    # checkpoint) must not drop them: their publishers were answered.
                    with anyio.CancelScope(shield=True):
                        finished = await anyio.to_thread.run_sync(
                            _finish, self._router, batches, served, self.held
                        )
                    report = finished
                except (BusdError, OSError) as exc:
                    # Nothing is lost: these batches are journaled after the
                    # checkpoint, and `delivered` has not moved past them.
                    _log.error("delivery_failed", error=str(exc))
                    self._broken = True
                    self._on_failure()
                    await self._advance(self._finished)  # a commit waiting for room goes on
                else:
                    if finished.kept and self.keep is not None:
                        self.keep(finished.kept)
                    await self._advance(pending[-1][0])
                finally:
                    self._delivering = False
                    self._pending_bytes -= sum(b.size for b in batches)
                    self._pending_messages -= sum(len(b.accepted) + len(b.redo) for b in batches)
            if report is not None:
                self._metrics.count(report)
                self._arrivals.notify(report.recipients)

    async def recover(self) -> None:
        """Deliver everything journaled after the checkpoint (caller holds the commit lane)."""
        async with self.lane:
            live = self.live
            self._router.checkpoint_limit = self.floor() if self.floor is not None else None
            await anyio.to_thread.run_sync(lambda: recover_deliveries(self._router, live=live))
            self._broken = False
            self._pending.clear()
            self._pending_bytes = self._pending_messages = 0
            await self._advance(self._committed)
        self._arrivals.notify(None)

    async def checkpoint(self) -> None:
        """Sync deliveries and record the position they cover, when anything moved."""
        router = self._router
        floor = self.floor() if self.floor is not None else None
        target = router.delivered if floor is None else min(router.delivered, floor)
        if router.unsynced or target != self._checkpointed:
            try:
                async with self.lane:
                    # Read on the loop, in the lane: nothing enters memory meanwhile.
                    router.checkpoint_limit = self.floor() if self.floor is not None else None
                    self._checkpointed = await anyio.to_thread.run_sync(write_checkpoint, router)
            except (BusdError, OSError) as exc:  # disk full or read-only: recovery covers it
                _log.error("checkpoint_failed", error=str(exc))

    def final_checkpoint(self, floor: Position | None = None) -> None:
        """On the way out: deliver what is queued, then checkpoint (best effort; a thread).

        Queued batches get files for every recipient (the memory is being
        written out); ``floor`` is the memory's last word on what is unsettled.
        """
        router = self._router
        router.checkpoint_limit = floor
        try:
            if self._pending and not self._broken:
                router.finish(*(b for _, b in self._pending))
            write_checkpoint(router)
        except (BusdError, OSError) as exc:  # the next start recovers from the journal
            _log.error("final_checkpoint_failed", error=str(exc))


def _finish(
    router: Router, batches: list[Batch], served: Served | None, held: Held | None
) -> RouteReport:
    return router.finish(*batches, served=served, held=held)
