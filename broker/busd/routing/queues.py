"""The in-memory queues of socket-served agents (:mod:`busd.routing.fold` rebuilds them).

The journal is the queue (protocol.md section 8): an ``accepted`` line makes a message
wait for each recipient; ``acked`` {message_id, agent, receipt} and ``dead_lettered``
{message_id, agent, reason delivery_limit | rejected} settle it for that one agent;
``delivered`` {message_id, agent, receipt, count} records a hand-out so the delivery
count survives a crash. :class:`Queues` is what the daemon keeps of that for the agents
it serves from memory; :func:`busd.routing.fold.replay` is the pure fold from journal
spans to that state.

Contract of :class:`Queues` (synchronous, no I/O, not thread-safe: one lane owns it):

- Per agent, each unsettled message is in exactly one state: *ready* (claimable in
  arrival order, i.e. journal position order), *delayed* (released with a delay: ready
  at its ``not_before``), or *in flight* (one current :class:`Delivery`, named by its
  receipt, with a lease). A message id is held at most once per agent: adding a held
  id again changes nothing.
- A receipt that names a delivery which is no longer the current claim of a message the
  agent still holds (its lease expired and it was handed out again, or it was released)
  raises :class:`~busd.errors.StaleReceipt` and changes nothing: a stale receipt never
  settles, releases or extends the newer claim. A receipt of a message the agent no
  longer holds at all (settled) is *not held*, as is a ``message_id`` with no current
  claim.
- Costs: add, claim (per message), ack, release, extend and drop are O(1) or O(log n);
  :meth:`Queues.oldest` and :meth:`Queues.low_water` scan only the in-flight and delayed
  messages; :meth:`Queues.drain` sorts what it removes. A ready message costs a
  :class:`Ref`, one small slotted record and one dict entry (about 400 bytes with its
  id), bodies are never held: a :class:`Ref` is where the ``accepted`` line is, for
  :meth:`busd.store.journal.Journal.read_at`.
- Ready refs of an agent sit in a deque in arrival order (adds come in journal order:
  O(1) appends); refs that become ready again (released, lease expired, added out of
  order) go to a small heap by position, and claims take the older head of the two.
  Removing a ready ref (drop, exhausted) leaves a tombstone that the next pass skips.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from busd.errors import NotFound, StaleReceipt
from busd.store.journal import Position
from busd.store.layout import parse_delivery_name

__all__ = ["AckOutcome", "Delivery", "Queues", "Ref"]


@dataclass(frozen=True, slots=True)
class Ref:
    """One accepted message waiting for one agent: where its ``accepted`` line is."""

    message_id: str
    key: str | None  # idempotency_key
    position: Position  # start of its `accepted` journal line
    length: int  # bytes of that line, newline included (for pread)


@dataclass(slots=True)
class Delivery:
    """One hand-out of a ref: ``count`` is the deliveries so far, this one included."""

    ref: Ref
    receipt: str
    count: int
    lease_until: float  # time.time() seconds


class AckOutcome(NamedTuple):
    """What :meth:`Queues.ack` settled, and the ids or receipts the agent did not hold."""

    acked: list[Delivery]
    not_held: list[str]


class _Slot:
    """One unsettled message of one agent: ready (``delivery`` None) or in flight."""

    __slots__ = ("count", "delivery", "ref")

    def __init__(self, ref: Ref, count: int) -> None:
        self.ref, self.count = ref, count
        self.delivery: Delivery | None = None


@dataclass(slots=True)
class _Agent:
    slots: dict[str, _Slot] = field(default_factory=dict)  # message id -> its one state
    ready: deque[_Slot] = field(default_factory=deque)  # arrival order; may hold tombstones
    again: list[tuple[Position, int, _Slot]] = field(default_factory=list)  # heap: ready again
    delayed: list[tuple[float, int, _Slot]] = field(default_factory=list)  # heap: not_before
    by_receipt: dict[str, Delivery] = field(default_factory=dict)  # the current claims
    n_ready: int = 0  # ready and delayed, tombstones not counted

    def live(self, slot: _Slot) -> bool:
        """Whether a slot taken from a ready structure is still ready (not a tombstone)."""
        return slot.delivery is None and self.slots.get(slot.ref.message_id) is slot

    def head(self) -> _Slot | None:
        """The oldest claimable slot (tombstones dropped on the way), not removed."""
        while self.ready and not self.live(self.ready[0]):
            self.ready.popleft()
        while self.again and not self.live(self.again[0][2]):
            heapq.heappop(self.again)
        first = self.ready[0] if self.ready else None
        other = self.again[0][2] if self.again else None
        if first is None or (other is not None and other.ref.position < first.ref.position):
            return other
        return first

    def pop(self) -> _Slot | None:
        slot = self.head()
        if slot is None:
            return None
        if self.ready and self.ready[0] is slot:
            self.ready.popleft()
        else:
            heapq.heappop(self.again)
        return slot

    def promote(self, now: float, seq: Iterable[int]) -> None:
        """Delayed slots whose ``not_before`` has come become claimable."""
        tick = iter(seq)
        while self.delayed and self.delayed[0][0] <= now:
            slot = heapq.heappop(self.delayed)[2]
            if self.live(slot):
                heapq.heappush(self.again, (slot.ref.position, next(tick), slot))


def _receipt_message_id(receipt: str) -> str | None:
    parsed = parse_delivery_name(receipt + ".json")
    return parsed.message_id if parsed is not None else None


class Queues:
    """Every memory-served agent's queue (see the module docstring for the contract)."""

    def __init__(self) -> None:
        self._agents: dict[str, _Agent] = {}
        self._leases: list[tuple[float, int, str, Delivery]] = []  # heap; stale entries skipped
        self._seq = itertools.count()

    def _agent(self, agent: str) -> _Agent:
        q = self._agents.get(agent)
        if q is None:
            q = self._agents[agent] = _Agent()
        return q

    # -- adding and claiming -----------------------------------------------

    def add(self, agent: str, ref: Ref, *, count: int = 0, not_before: float = 0.0) -> None:
        """Make ``ref`` wait for ``agent``, delivered ``count`` times so far; claimable from
        ``not_before`` (epoch seconds) on. An id the agent already holds is left as it is.
        """
        q = self._agent(agent)
        if ref.message_id in q.slots:
            return
        slot = q.slots[ref.message_id] = _Slot(ref, count)
        q.n_ready += 1
        if not_before > 0:
            heapq.heappush(q.delayed, (not_before, next(self._seq), slot))
        elif not q.ready or q.ready[-1].ref.position <= ref.position:
            q.ready.append(slot)
        else:
            heapq.heappush(q.again, (ref.position, next(self._seq), slot))

    def _load(self, agent: str, refs: list[tuple[Ref, int]]) -> None:
        """:meth:`add` for many refs in journal order (the fold's bulk load)."""
        q = self._agent(agent)
        slots, ready = q.slots, q.ready
        for ref, count in refs:
            if ref.message_id not in slots:
                slot = slots[ref.message_id] = _Slot(ref, count)
                if ready and ready[-1].ref.position > ref.position:
                    heapq.heappush(q.again, (ref.position, next(self._seq), slot))
                else:
                    ready.append(slot)
                q.n_ready += 1

    def claim(
        self,
        agent: str,
        n: int,
        *,
        now: float,
        lease_s: float,
        max_deliveries: int,
        new_receipt: Callable[[Ref, int], str],
    ) -> tuple[list[Delivery], list[tuple[Ref, int]]]:
        """Hand out up to ``n`` ready refs in arrival order, each leased until ``now +
        lease_s`` under ``new_receipt(ref, count)``.

        Returns ``(claimed, exhausted)``: refs already delivered ``max_deliveries`` times
        are removed instead and returned with their count (the caller dead-letters them,
        reason ``delivery_limit``); they do not count towards ``n``.
        """
        q = self._agents.get(agent)
        claimed: list[Delivery] = []
        exhausted: list[tuple[Ref, int]] = []
        if q is None or n <= 0:
            return claimed, exhausted
        q.promote(now, self._seq)
        while len(claimed) < n and (slot := q.pop()) is not None:
            q.n_ready -= 1
            if slot.count >= max_deliveries:
                del q.slots[slot.ref.message_id]
                exhausted.append((slot.ref, slot.count))
                continue
            slot.count += 1
            receipt = new_receipt(slot.ref, slot.count)
            delivery = Delivery(slot.ref, receipt, slot.count, now + lease_s)
            slot.delivery = q.by_receipt[delivery.receipt] = delivery
            heapq.heappush(self._leases, (delivery.lease_until, next(self._seq), agent, delivery))
            claimed.append(delivery)
        return claimed, exhausted

    # -- settling ------------------------------------------------------------

    def ack(
        self, agent: str, *, receipts: Sequence[str] = (), message_ids: Sequence[str] = ()
    ) -> AckOutcome:
        """Settle current claims named by receipt, or by message id ("the current claim").

        Raises :class:`StaleReceipt` (``receipts`` = the stale ones) and settles nothing if
        any receipt names a non-current delivery of a message the agent holds. An id or
        receipt the agent does not hold in flight is returned in ``not_held``.
        """
        q = self._agents.get(agent)
        targets: dict[str, Delivery] = {}
        not_held: list[str] = []
        stale: list[str] = []
        for receipt in dict.fromkeys(receipts):
            delivery = q.by_receipt.get(receipt) if q is not None else None
            if delivery is not None:
                targets[receipt] = delivery
            elif q is not None and _receipt_message_id(receipt) in q.slots:
                stale.append(receipt)
            else:
                not_held.append(receipt)
        if stale:
            raise StaleReceipt(
                f"{len(stale)} receipt(s) of {agent} name a delivery that is no longer "
                "the current claim",
                receipts=stale,
            )
        for mid in dict.fromkeys(message_ids):
            slot = q.slots.get(mid) if q is not None else None
            if slot is not None and slot.delivery is not None:
                targets[slot.delivery.receipt] = slot.delivery
            else:
                not_held.append(mid)
        if q is not None:
            for delivery in targets.values():
                del q.by_receipt[delivery.receipt]
                del q.slots[delivery.ref.message_id]
        return AckOutcome(list(targets.values()), not_held)

    def _current(self, agent: str, receipt: str | None, message_id: str | None) -> Delivery:
        """The current claim named by ``receipt`` (else ``message_id``)."""
        if receipt is None and message_id is None:
            raise ValueError("name the claim by receipt or message_id")
        q = self._agents.get(agent)
        if receipt is not None:
            delivery = q.by_receipt.get(receipt) if q is not None else None
            if delivery is not None:
                return delivery
            mid = _receipt_message_id(receipt)
            if q is not None and mid in q.slots:
                msg = f"receipt {receipt} of {agent} is no longer the current claim"
                raise StaleReceipt(msg, receipts=[receipt])
            raise NotFound(f"{agent} holds no claim {receipt}", receipt=receipt)
        assert message_id is not None
        slot = q.slots.get(message_id) if q is not None else None
        if slot is None or slot.delivery is None:
            raise NotFound(f"{agent} holds no claim on {message_id}", message_id=message_id)
        return slot.delivery

    def release(
        self,
        agent: str,
        *,
        receipt: str | None = None,
        message_id: str | None = None,
        now: float,
        delay_s: float = 0.0,
    ) -> Delivery:
        """Give a current claim back (nack): ready again at once, or at ``now + delay_s``;
        the count is kept. :class:`StaleReceipt` or :class:`NotFound` if not the current one.
        """
        delivery = self._current(agent, receipt, message_id)
        self._unclaim(agent, delivery, now + delay_s if delay_s > 0 else 0.0)
        return delivery

    def _unclaim(self, agent: str, delivery: Delivery, not_before: float) -> None:
        q = self._agents[agent]
        slot = q.slots[delivery.ref.message_id]
        del q.by_receipt[delivery.receipt]
        slot.delivery = None
        q.n_ready += 1
        if not_before > 0:
            heapq.heappush(q.delayed, (not_before, next(self._seq), slot))
        else:
            heapq.heappush(q.again, (slot.ref.position, next(self._seq), slot))

    def extend(
        self,
        agent: str,
        *,
        receipt: str | None = None,
        message_id: str | None = None,
        now: float,
        lease_s: float,
    ) -> Delivery:
        """Set a current claim's lease to ``now + lease_s`` (longer or shorter)."""
        delivery = self._current(agent, receipt, message_id)
        delivery.lease_until = now + lease_s
        # The old heap entry stays and is skipped when due: this one is the live one.
        heapq.heappush(self._leases, (delivery.lease_until, next(self._seq), agent, delivery))
        return delivery

    def expire(self, now: float) -> list[tuple[str, Delivery]]:
        """Claims whose lease is due (``lease_until <= now``) become ready again."""
        due: list[tuple[str, Delivery]] = []
        while self._leases and self._leases[0][0] <= now:
            at, _, agent, delivery = heapq.heappop(self._leases)
            q = self._agents.get(agent)
            current = q is not None and q.by_receipt.get(delivery.receipt) is delivery
            if current and delivery.lease_until == at:  # else settled, or extended since
                self._unclaim(agent, delivery, 0.0)
                due.append((agent, delivery))
        return due

    def next_expiry(self) -> float | None:
        """The earliest lease deadline of any current claim (when to call :meth:`expire`)."""
        while self._leases:
            at, _, agent, delivery = self._leases[0]
            q = self._agents.get(agent)
            current = q is not None and q.by_receipt.get(delivery.receipt) is delivery
            if current and delivery.lease_until == at:
                return at
            heapq.heappop(self._leases)
        return None

    def drain(self, agent: str, *, in_flight: bool = False) -> list[tuple[Ref, int]]:
        """Remove every ready (and delayed) ref of ``agent`` with its count, oldest first:
        to be written out as inbox files. With ``in_flight``, the claims too (a graceful
        stop), each with the count of its current delivery.
        """
        q = self._agents.get(agent)
        if q is None:
            return []
        taken = [s for s in q.slots.values() if in_flight or s.delivery is None]
        taken.sort(key=lambda s: s.ref.position)
        for slot in taken:
            del q.slots[slot.ref.message_id]
            if slot.delivery is not None:
                del q.by_receipt[slot.delivery.receipt]
        q.ready.clear()
        q.again.clear()
        q.delayed.clear()
        q.n_ready = 0
        return [(s.ref, s.count) for s in taken]

    def drop(self, agent: str, message_id: str) -> Delivery | None:
        """Forget ``message_id`` for ``agent`` (dead-lettered): its current claim if it was
        in flight, else None (it was ready, or not held)."""
        q = self._agents.get(agent)
        slot = q.slots.pop(message_id, None) if q is not None else None
        if q is None or slot is None:
            return None
        if slot.delivery is None:
            q.n_ready -= 1  # its place in a ready structure is now a tombstone
            return None
        del q.by_receipt[slot.delivery.receipt]
        return slot.delivery

    # -- reading ---------------------------------------------------------------

    def holds(self, agent: str, message_id: str) -> bool:
        """Whether ``message_id`` is unsettled for ``agent`` here (ready, delayed or claimed)."""
        q = self._agents.get(agent)
        return q is not None and message_id in q.slots

    def ready(self, agent: str) -> int:
        """How many refs of ``agent`` are ready, delayed ones included."""
        q = self._agents.get(agent)
        return q.n_ready if q is not None else 0

    def in_flight(self, agent: str) -> int:
        """How many refs of ``agent`` are claimed."""
        q = self._agents.get(agent)
        return len(q.by_receipt) if q is not None else 0

    def next_due(self, agent: str) -> float | None:
        """When the earliest delayed ref of ``agent`` becomes claimable (None: none is)."""
        q = self._agents.get(agent)
        if q is None:
            return None
        due = [at for at, _, slot in q.delayed if q.live(slot)]
        return min(due) if due else None

    def oldest(self, agent: str) -> Ref | None:
        """The oldest unsettled ref of ``agent`` (ready, delayed or in flight)."""
        q = self._agents.get(agent)
        if q is None:
            return None
        found = [s.ref for s in (q.head(),) if s is not None]
        found.extend(s.ref for _, _, s in q.delayed if q.live(s))
        found.extend(d.ref for d in q.by_receipt.values())
        return min(found, key=lambda r: r.position) if found else None

    def low_water(self) -> Position | None:
        """The lowest journal position of any unsettled ref: a checkpoint never passes it."""
        positions = [r.position for a in self._agents if (r := self.oldest(a)) is not None]
        return min(positions) if positions else None

    def agents(self) -> list[str]:
        """The agents holding unsettled refs, sorted."""
        return sorted(a for a, q in self._agents.items() if q.slots)

    def unsettled(self, agent: str) -> list[tuple[Ref, int]]:
        """Every unsettled ref of ``agent`` with its count, oldest first (nothing removed)."""
        q = self._agents.get(agent)
        if q is None:
            return []
        return sorted(((s.ref, s.count) for s in q.slots.values()), key=lambda t: t[0].position)

    def waiting(self, agent: str, n: int) -> list[tuple[Ref, int]]:
        """Up to ``n`` unclaimed refs of ``agent`` (ready or delayed) with their counts,
        oldest first (nothing removed): what ``peek`` lists."""
        q = self._agents.get(agent)
        if q is None or n <= 0:
            return []
        ready = ((s.ref, s.count) for s in q.slots.values() if s.delivery is None)
        return heapq.nsmallest(n, ready, key=lambda t: t[0].position)
