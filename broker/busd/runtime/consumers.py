"""The Broker methods of memory deliveries, mixed into the daemon (``busd.rpc.broker``).

Contracts:

* Each method acts on the daemon's :class:`~busd.runtime.memory.Memory`: claim, settle,
  release (nack), extend, reject. The class mixing this in provides the memory.
* Who is served (:class:`~busd.runtime.serving.Serving`) changes only through
  :meth:`ConsumerMethods.attach`, :meth:`~ConsumerMethods.detach` and
  :meth:`~ConsumerMethods.touch`.
* :meth:`ConsumerMethods.waiting` (``peek``) only reads: the agent's memory messages that
  are ready or delayed, never the ones claimed, oldest first (journal position: arrival
  order), each with its delivery count so far. The queue is read on the event loop (it is
  the loop's); the bodies are read in a worker thread, one ``Journal.read_at`` (the page
  cache) each, and a message whose segment is gone is left out, as a claim would drop it.
  No claim, no ``delivered`` record, no change to who is served.
"""

from __future__ import annotations

from datetime import datetime

import anyio

from busd.errors import NotFound
from busd.routing.queues import AckOutcome, Ref
from busd.runtime.arrivals import Arrivals
from busd.runtime.memory import Memory, Taken
from busd.runtime.serving import Serving
from busd.store.journal import Journal

__all__ = ["ConsumerMethods"]


class ConsumerMethods:
    """Broker methods of memory deliveries; the class mixing it in provides the memory."""

    serving: Serving
    arrivals: Arrivals

    def _memory(self) -> Memory:
        raise NotImplementedError

    def _memory_or_none(self) -> Memory | None:
        raise NotImplementedError

    def attach(self, agent: str) -> None:
        """A subscriber of ``agent`` arrived: it is socket-served while one remains."""
        self.serving.attach(agent)

    def detach(self, agent: str) -> None:
        """A subscriber of ``agent`` left."""
        self.serving.detach(agent)

    def touch(self, agent: str) -> None:
        """``agent`` fetched over the socket: served for ``serve_grace_seconds``."""
        self.serving.touch(agent)

    async def claim(self, agent: str, n: int) -> list[Taken]:
        """Claim up to ``n`` of ``agent``'s memory messages (with bodies), oldest first."""
        return await self._memory().claim(agent, n)

    async def settle(
        self, agent: str, *, receipts: list[str], message_ids: list[str]
    ) -> AckOutcome:
        """Ack memory deliveries (answered after the ``acked`` fsync); StaleReceipt if stale."""
        return await self._memory().ack(agent, receipts=receipts, message_ids=message_ids)

    def holds(self, agent: str, message_id: str) -> bool:
        """Whether memory holds ``message_id`` for ``agent`` (ready or in flight)."""
        return (memory := self._memory_or_none()) is not None and memory.holds(agent, message_id)

    def release(
        self, agent: str, *, receipt: str | None, message_id: str | None, delay_s: float
    ) -> None:
        """Put a memory delivery back (nack), now or after ``delay_s``."""
        self._memory().release(agent, receipt=receipt, message_id=message_id, delay_s=delay_s)
        if not delay_s:
            self.arrivals.notify((agent,))

    def extend(
        self, agent: str, *, receipt: str | None, message_id: str | None, lease_s: float
    ) -> datetime:
        """Push a memory delivery's lease to ``lease_s`` from now."""
        return self._memory().extend(agent, receipt=receipt, message_id=message_id, lease_s=lease_s)

    async def waiting(self, agent: str, n: int) -> list[tuple[str, int, bytes]]:
        """Up to ``n`` unclaimed memory messages of ``agent``, oldest first, with their
        counts and bodies (``peek``): the queue read on the loop, the journal in a worker
        thread."""
        memory = self._memory()
        refs = memory.queues.waiting(agent, n)
        if not refs:
            return []
        return await anyio.to_thread.run_sync(_bodies, memory.journal, refs)

    async def reject(
        self, agent: str, *, receipt: str | None, message_id: str | None, reason: str
    ) -> str:
        """Dead-letter a memory delivery in flight, reason ``rejected``; the DLQ entry name."""
        return await self._memory().reject(
            agent, receipt=receipt, message_id=message_id, reason=reason
        )


def _bodies(journal: Journal, refs: list[tuple[Ref, int]]) -> list[tuple[str, int, bytes]]:
    """``(message_id, count, canonical JSON)`` of each ref still in the journal, in order."""
    out: list[tuple[str, int, bytes]] = []
    for ref, count in refs:
        try:
            entry = journal.read_at(ref.position, ref.length)
        except NotFound:
            continue  # pruned or cut: nothing left to show (a claim drops it too)
        if entry.message is not None:
            out.append((ref.message_id, count, bytes(entry.message)))
    return out
