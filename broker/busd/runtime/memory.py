"""The daemon's in-memory queues: socket consumers served from memory, files for the rest.

"The journal is the queue" (issue 11): a message committed for a *socket-served*
agent gets no inbox file; it waits here as a :class:`~busd.routing.queues.Ref`
(its journal line's position and length) and its body is read back from the
journal (``Journal.read_at``, the page cache) when it is claimed.

Contracts:

* The served rule (:class:`Serving`): an agent is socket-served while it has a
  subscriber, or fetched over the socket within the last
  ``serve_grace_seconds``. For the first ``serve_grace_seconds`` after start-up
  every agent's rebuilt messages stay here (a consumer reconnecting after a
  restart finds them in memory); after that, an unserved agent's ready
  messages are written out as normal inbox files (:meth:`Memory.write_out`,
  in the delivery lane, each file named with the message's delivery count).
  In-flight ones follow when their lease ends.
* Every state change that must survive a crash is a journal record through
  the committer's group commit (:meth:`busd.runtime.committer.Committer.record`):
  ``delivered`` (not waited for: losing one only lowers a count), ``acked``
  (the ack is answered after its fsync, acks of many consumers share one),
  ``dead_lettered`` for deliveries past ``max_deliveries`` (the DLQ entry holds
  the bytes read back from the journal).
* Checkpoints never pass :meth:`Memory.floor`: the oldest message unsettled in
  memory, or acked but whose ``acked`` line is not fsynced yet. So after a
  SIGKILL, start-up (and the daemon-less ``route_pending``) rebuild every
  unsettled memory message from the journal.
* Everything here runs on the event loop, except the bodies read and the files
  written, which run in worker threads: :class:`~busd.routing.queues.Queues` is
  touched by one thread only.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import structlog

from busd.config import Config
from busd.core.codec import decode
from busd.errors import BusdError, InvalidMessage, NotFound, Reason
from busd.ops.status import SERVED_FILES, SERVED_SOCKET, QueueInfo
from busd.routing import recovery, refusals
from busd.routing.fold import acked_entry, delivered_entry
from busd.routing.intake import Origin, Refused
from busd.routing.queues import AckOutcome, Delivery, Queues, Ref
from busd.routing.router import Kept, Router, RouteReport
from busd.runtime.committer import Committer
from busd.runtime.deliverer import Deliverer
from busd.runtime.metrics import Metrics
from busd.runtime.serving import Serving
from busd.store.journal import Journal, JournalEntry, Position
from busd.store.layout import delivery_name
from busd.store.mailbox import arrival_clock

__all__ = ["Memory", "Taken", "new_receipt", "rebuild"]

_log = structlog.get_logger("busd.daemon")
_WRITE_OUT_CHUNK = 256


def new_receipt(ref: Ref, count: int) -> str:
    """A receipt for a memory delivery: the delivery-name grammar without ``.json``."""
    return delivery_name(arrival_clock.next(), count, ref.message_id).removesuffix(".json")


Taken = tuple[Delivery, bytes]
"""A memory delivery handed out, with the message's canonical JSON."""


class Memory:
    """The daemon's queues and what changes them (one per running daemon)."""

    def __init__(
        self,
        router: Router,
        committer: Committer,
        deliverer: Deliverer,
        metrics: Metrics,
        config: Callable[[], Config],
        serving: Serving,
        queues: Queues | None = None,
    ) -> None:
        self.queues = queues if queues is not None else Queues()
        self.serving = serving
        self._router = router
        self._committer = committer
        self._deliverer = deliverer
        self._metrics = metrics
        self._config = config
        self._acking: Counter[Position] = Counter()  # acked, `acked` line not fsynced yet
        self.rebuilt: set[tuple[str, str]] = set()
        """``(agent, message_id)`` of every message the start-up rebuild found unsettled."""
        self.hold_until = 0.0
        """``time.monotonic()`` before which nothing is written out (start-up grace)."""
        self.on_returned: Callable[[str, set[str]], None] = lambda agent, ids: None
        """Called with the ids of an agent's memory deliveries whose lease ended."""

    @property
    def journal(self) -> Journal:
        """The journal the memory messages' bodies are read back from."""
        return self._router.journal

    # -- what the delivery lane hands in --------------------------------------

    def keep(self, kept: Iterable[Kept]) -> None:
        """Messages ``Router.finish`` left for served agents: into their queues."""
        for k in kept:
            self.queues.add(k.agent, Ref(k.message_id, k.key, k.position, k.length))

    def covers(self, agent: str, message_id: str) -> bool:
        """Memory holds the message, or the start-up rebuild had it (in memory or as a
        file written then): a crash redo of its outbox file must write no second copy,
        which would be delivered again after the memory copy's ack."""
        return self.queues.holds(agent, message_id) or (agent, message_id) in self.rebuilt

    def floor(self) -> Position | None:
        """The position no checkpoint may pass (None: memory holds nothing unsettled)."""
        low = self.queues.low_water()
        if self._acking:
            pending = min(self._acking)
            low = pending if low is None else min(low, pending)
        return low

    # -- the socket consumer's operations ---------------------------------------

    async def claim(self, agent: str, n: int) -> list[Taken]:
        """Claim up to ``n`` memory messages of ``agent``, oldest first, with their bodies.

        Exhausted ones (delivered ``max_deliveries`` times) are dead-lettered
        instead. The ``delivered`` records join the next group commit, unwaited.
        """
        config = self._config()
        claimed, exhausted = self.queues.claim(
            agent,
            n,
            now=time.time(),
            lease_s=config.lease_seconds,
            max_deliveries=config.max_deliveries,
            new_receipt=new_receipt,
        )
        if not claimed and not exhausted:
            return []
        refs = [d.ref for d in claimed] + [ref for ref, _ in exhausted]
        bodies = await anyio.to_thread.run_sync(self._bodies, refs)
        if exhausted:
            await self._exhausted(agent, exhausted, bodies, config)
        now = datetime.now(UTC)
        taken: list[Taken] = []
        records: list[JournalEntry] = []
        for d in claimed:
            body = bodies.get(d.ref.message_id)
            if body is None:  # its segment is gone: nothing left to hand out
                self.queues.drop(agent, d.ref.message_id)
                continue
            taken.append((d, body))
            records.append(delivered_entry(agent, d, now))
        if records:
            self._committer.record_soon(records)
        return taken

    async def ack(
        self, agent: str, *, receipts: Sequence[str] = (), message_ids: Sequence[str] = ()
    ) -> AckOutcome:
        """Settle memory deliveries; answered once their ``acked`` lines are fsynced.

        Raises :class:`~busd.errors.StaleReceipt` (nothing settled) when a
        receipt names a delivery that is no longer current. ``not_held`` lists
        the ids and receipts memory does not hold (file claims, say).
        """
        outcome = self.queues.ack(agent, receipts=receipts, message_ids=message_ids)
        if not outcome.acked:
            return outcome
        now = datetime.now(UTC)
        records = [acked_entry(d.ref.message_id, agent, d.receipt, now) for d in outcome.acked]
        positions = [d.ref.position for d in outcome.acked]
        self._hold(positions)
        try:
            await self._committer.record(records)
        except BaseException:
            # Not durable: the ack is refused and the messages are ready again.
            for d in outcome.acked:
                self.queues.add(agent, d.ref, count=d.count)
            raise
        finally:
            self._unhold(positions)
        return outcome

    def _hold(self, positions: list[Position]) -> None:
        self._acking.update(positions)

    def _unhold(self, positions: list[Position]) -> None:
        self._acking.subtract(positions)
        self._acking = +self._acking  # drop the zeros

    def holds(self, agent: str, message_id: str) -> bool:
        """Whether memory holds ``message_id`` for ``agent`` (ready or in flight)."""
        return self.queues.holds(agent, message_id)

    def release(
        self,
        agent: str,
        *,
        receipt: str | None = None,
        message_id: str | None = None,
        delay_s: float = 0.0,
    ) -> None:
        """Put a memory delivery back (nack), now or after ``delay_s``; the count is kept."""
        self.queues.release(
            agent, receipt=receipt, message_id=message_id, now=time.time(), delay_s=delay_s
        )

    def extend(
        self,
        agent: str,
        *,
        receipt: str | None = None,
        message_id: str | None = None,
        lease_s: float,
    ) -> datetime:
        """Push a memory delivery's lease to ``lease_s`` from now."""
        d = self.queues.extend(
            agent, receipt=receipt, message_id=message_id, now=time.time(), lease_s=lease_s
        )
        return datetime.fromtimestamp(d.lease_until, UTC)

    async def reject(
        self, agent: str, *, receipt: str | None = None, message_id: str | None = None, reason: str
    ) -> str:
        """Dead-letter a delivery in flight (reason ``rejected``, ``detail`` = ``reason``).

        Answered once its DLQ entry (the bytes read back from the journal) and its
        ``dead_lettered`` journal line are fsynced; on a failure the message is
        ready again. NotFound / StaleReceipt as for a nack. Returns the entry name.
        """
        by_receipt = [receipt] if receipt is not None else []
        by_id = [message_id] if receipt is None and message_id is not None else []
        taken = self.queues.ack(agent, receipts=by_receipt, message_ids=by_id).acked
        if not taken:
            named = receipt or message_id
            raise NotFound(
                f"{agent} holds no claim {named}", receipt=receipt, message_id=message_id
            )
        delivery = taken[0]
        position = delivery.ref.position
        layout = self._config().layout
        report = RouteReport()

        def dead_letter() -> JournalEntry:
            body = self._bodies([delivery.ref]).get(delivery.ref.message_id)
            if body is None:
                raise NotFound(f"the journal no longer holds {delivery.ref.message_id}")
            try:
                msg = decode(body)
            except InvalidMessage:
                msg = None
            why = InvalidMessage(Reason.REJECTED, reason)
            refused = Refused(Origin("claim", recipient=agent), why, msg, body)
            done = refusals.dead_letter(
                layout, refused, counts=report, delivery_count=delivery.count
            )
            return msgspec.structs.replace(done.entry, agent=agent)

        self._hold([position])  # out of memory, not yet in the DLQ: hold the checkpoint
        try:
            entry = await anyio.to_thread.run_sync(dead_letter)
            self._metrics.count(report)
            await self._committer.record([entry])
        except BaseException:
            self.queues.add(agent, delivery.ref, count=delivery.count)
            raise
        finally:
            self._unhold([position])
        assert entry.to is not None
        return entry.to[0]

    def info(self) -> dict[str, QueueInfo]:
        """Each agent with a memory queue or a socket consumer, as ``busd status`` shows it."""
        queues, serving = self.queues, self.serving
        out: dict[str, QueueInfo] = {}
        for agent in sorted(set(queues.agents()) | serving.agents()):
            oldest = queues.oldest(agent)
            out[agent] = QueueInfo(
                served=SERVED_SOCKET if serving.served(agent) else SERVED_FILES,
                connections=serving.connections(agent),
                ready=queues.ready(agent),
                in_flight=queues.in_flight(agent),
                oldest_unsettled=oldest.message_id if oldest is not None else None,
            )
        return out

    # -- timers -------------------------------------------------------------------

    def expire(self, now: float | None = None) -> set[str]:
        """Leases that ended: back to ready. Returns the agents that got messages back."""
        returned = self.queues.expire(time.time() if now is None else now)
        by_agent: dict[str, set[str]] = {}
        for agent, d in returned:
            by_agent.setdefault(agent, set()).add(d.ref.message_id)
        for agent, ids in by_agent.items():
            self.on_returned(agent, ids)
        return set(by_agent)

    async def write_out(
        self, *, everything: bool = False, progress: Callable[[], None] | None = None
    ) -> int:
        """Write the ready messages of unserved agents as inbox files (all: ``everything``).

        ``progress`` is called (in the worker thread) after every
        :data:`_WRITE_OUT_CHUNK` files: a graceful stop re-arms its force-exit timer
        there, which then bounds a stalled write-out, not a long one.

        In the delivery lane, so a checkpoint syncs the files before it covers
        them. A failure puts the messages back in memory (nothing lost; some
        may then exist twice, which the ledger absorbs).
        """
        if everything:
            self.expire(math.inf)
        elif time.monotonic() < self.hold_until:
            return 0
        agents = [
            a
            for a in self.queues.agents()
            if self.queues.ready(a) and (everything or not self.serving.served(a))
        ]
        if not agents:
            return 0
        written = 0
        async with self._deliverer.lane:
            drained = [(a, self.queues.drain(a)) for a in agents]
            try:
                await anyio.to_thread.run_sync(self._write, drained, progress)
            except (BusdError, OSError) as exc:
                _log.error("memory_write_out_failed", error=str(exc))
                for agent, refs in drained:
                    for ref, count in refs:
                        self.queues.add(agent, ref, count=count)
                return 0
            written = sum(len(refs) for _, refs in drained)
        _log.info("memory_written_out", agents=agents, messages=written)
        return written

    # -- worker-thread halves ---------------------------------------------------

    def _bodies(self, refs: Iterable[Ref]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        journal = self._router.journal
        for ref in refs:
            try:
                entry = journal.read_at(ref.position, ref.length)
            except NotFound:
                _log.error("memory_message_lost", message_id=ref.message_id)
                continue
            if entry.message is not None:
                out[ref.message_id] = bytes(entry.message)
        return out

    def _write(
        self,
        drained: list[tuple[str, list[tuple[Ref, int]]]],
        progress: Callable[[], None] | None = None,
    ) -> None:
        for agent, all_refs in drained:
            for i in range(0, len(all_refs), _WRITE_OUT_CHUNK):
                refs = all_refs[i : i + _WRITE_OUT_CHUNK]
                bodies = self._bodies(ref for ref, _ in refs)
                self._router.write_out(
                    agent,
                    [
                        (r.message_id, bodies[r.message_id], c)
                        for r, c in refs
                        if r.message_id in bodies
                    ],
                )
                if progress is not None:
                    progress()

    async def _exhausted(
        self,
        agent: str,
        exhausted: list[tuple[Ref, int]],
        bodies: dict[str, bytes],
        config: Config,
    ) -> None:
        layout = config.layout
        report = RouteReport()
        positions = [ref.position for ref, _ in exhausted]

        def dead_letter() -> list[JournalEntry]:
            entries: list[JournalEntry] = []
            for ref, count in exhausted:
                body = bodies.get(ref.message_id)
                if body is None:
                    continue
                try:
                    msg = decode(body)
                except InvalidMessage:
                    msg = None
                detail = f"already delivered {count} times (max_deliveries={config.max_deliveries})"
                refused = Refused(
                    Origin("claim", recipient=agent),
                    InvalidMessage(Reason.DELIVERY_LIMIT, detail),
                    msg,
                    body,
                )
                done = refusals.dead_letter(layout, refused, counts=report, delivery_count=count)
                entries.append(msgspec.structs.replace(done.entry, agent=agent))
            return entries

        # Out of memory already, in the DLQ only once the thread is done: hold the checkpoint.
        self._hold(positions)
        try:
            entries = await anyio.to_thread.run_sync(dead_letter)
        finally:
            self._unhold(positions)
        self._metrics.count(report)
        if entries:
            self._committer.record_soon(entries)


def rebuild(router: Router, grace_s: float) -> tuple[Queues, int, set[tuple[str, str]]]:
    """The memory queues after the checkpoint, how many files were written now, and the
    ``(agent, message_id)`` of everything it found unsettled (see :meth:`Memory.covers`).

    An agent that holds files (inbox or claims) is a file consumer: what it lacks is
    written as files at once, as before memory queues. Every other agent's messages
    stay in memory for the start-up grace (none with ``serve_grace_seconds`` = 0).
    """
    layout = router.layout

    def keep(agent: str) -> bool:
        return grace_s > 0 and not (
            _any_file(layout.inbox_dir(agent)) or _any_file(layout.locks_dir(agent))
        )

    result = recovery.rebuild(router, served=keep)
    written = recovery.write_out(router, result.files)
    router.mark_all_delivered()
    found = {(p.agent, p.ref.message_id) for p in result.files}
    for agent in result.queues.agents():
        found.update((agent, ref.message_id) for ref, _ in result.queues.unsettled(agent))
    return result.queues, len(written), found


def _any_file(directory: Path) -> bool:
    try:
        with os.scandir(directory) as it:
            return any(not e.name.startswith(".") for e in it)
    except (FileNotFoundError, NotADirectoryError):
        return False
