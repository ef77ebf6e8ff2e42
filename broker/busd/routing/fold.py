"""The journal fold: the queue state that journal records describe (protocol.md section 8).

An ``accepted`` line makes a message wait for each recipient; ``acked`` {message_id, agent,
receipt} and ``dead_lettered`` {message_id, agent, reason delivery_limit | rejected} settle
it for that one agent; ``delivered`` {message_id, agent, receipt, count} records a hand-out
so the delivery count survives a crash. :func:`replay` folds journal spans into
:class:`~busd.routing.queues.Queues` (for the agents kept in memory) and the list of
messages that must become inbox files; the record builders below make the lines it reads.
Pure and synchronous: start-up recovery (:mod:`busd.routing.recovery`) feeds it.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Final, NamedTuple

from busd.errors import Reason
from busd.routing.queues import Delivery, Queues, Ref
from busd.store.journal import JournalEntry, Position, Span

__all__ = [
    "SETTLING_REASONS",
    "Pending",
    "Replayed",
    "acked_entry",
    "delivered_entry",
    "replay",
]

SETTLING_REASONS: Final = frozenset({Reason.DELIVERY_LIMIT.value, Reason.REJECTED.value})
"""The ``reason`` of a ``dead_lettered`` line that settles a message for its ``agent``:
consumer-side dead letters. Intake refusals (the ``agent`` there is the sender) never do."""


# -- the records -----------------------------------------------------------------


def acked_entry(message_id: str, agent: str, receipt: str, at: datetime) -> JournalEntry:
    """The ``acked`` line of one settled memory delivery (answered after its fsync)."""
    return JournalEntry(event="acked", at=at, message_id=message_id, agent=agent, receipt=receipt)


def delivered_entry(agent: str, delivery: Delivery, at: datetime) -> JournalEntry:
    """The ``delivered`` line of one memory hand-out: its receipt and count."""
    return JournalEntry(
        event="delivered",
        at=at,
        message_id=delivery.ref.message_id,
        agent=agent,
        receipt=delivery.receipt,
        count=delivery.count,
    )


# -- the fold ------------------------------------------------------------------


class Pending(NamedTuple):
    """A message that must become an inbox file for ``agent``, already handed out
    ``deliveries`` times (the count its delivery name carries)."""

    agent: str
    ref: Ref
    deliveries: int


@dataclass(slots=True)
class Replayed:
    """What :func:`replay` found: memory agents' refs in ``queues``, other agents' in
    ``files`` (journal order)."""

    queues: Queues
    files: list[Pending]

    @property
    def files_from(self) -> Position | None:
        """The first position a checkpoint must not pass until ``files`` are written."""
        return self.files[0].ref.position if self.files else None


def _never(agent: str, entry: JournalEntry) -> bool:
    return False


def replay(
    entries: Iterable[Span],
    *,
    memory_agents: Container[str] | Callable[[str], bool],
    holds: Callable[[str, JournalEntry], bool] = _never,
) -> Replayed:
    """The queue state that ``entries`` (journal spans, in order) describe.

    Every ``accepted`` message with a ``message`` and a ``source`` outside ``inbox/`` (a
    foreign inbox file is delivered in place: it is a file already) waits for each of its
    recipients, unless ``holds(agent, entry)`` says that agent already has it as a file
    (inbox, locks, ledger: :class:`~busd.routing.holdings.Holdings`), or it is settled
    later in ``entries``: an ``acked`` line for that agent and id, or a ``dead_lettered``
    one with a :data:`SETTLING_REASONS` reason. Its count is the highest ``count`` of its
    ``delivered`` lines for that agent. An id accepted again after it was settled waits
    again. Pure: ``holds`` is asked once per accepted message and recipient, in order.

    Recipients in ``memory_agents`` (a container, or a predicate) get their refs in
    :attr:`Replayed.queues` (all ready: no lease survives a restart); the others in
    :attr:`Replayed.files`.
    """
    in_memory = memory_agents if callable(memory_agents) else memory_agents.__contains__
    waiting: dict[tuple[str, str], Ref] = {}  # insertion order is journal order
    counts: dict[tuple[str, str], int] = {}
    for entry, position, length in entries:
        mid, event = entry.message_id, entry.event
        if mid is None:
            continue
        if event == "accepted":
            if entry.message is None or not entry.to:
                continue
            if entry.source is not None and entry.source.startswith("inbox/"):
                continue  # delivered in place; a leftover foreign file is re-routed by the scan
            ref: Ref | None = None
            for agent in entry.to:
                if (agent, mid) in waiting or holds(agent, entry):
                    continue
                ref = ref or Ref(mid, entry.idempotency_key, position, length)
                waiting[agent, mid] = ref
        elif entry.agent is None:
            continue
        elif event == "delivered":
            slot = (entry.agent, mid)
            if slot in waiting and entry.count is not None:
                counts[slot] = max(counts.get(slot, 0), entry.count)
        elif event == "acked" or (event == "dead_lettered" and entry.reason in SETTLING_REASONS):
            slot = (entry.agent, mid)
            if waiting.pop(slot, None) is not None:
                counts.pop(slot, None)
    queues = Queues()
    files: list[Pending] = []
    loaded: dict[str, list[tuple[Ref, int]]] = {}
    for (agent, mid), ref in waiting.items():
        count = counts.get((agent, mid), 0) if counts else 0
        if agent in loaded:
            loaded[agent].append((ref, count))
        elif in_memory(agent):
            loaded[agent] = [(ref, count)]
        else:
            files.append(Pending(agent, ref, count))
    for agent, refs in loaded.items():
        queues._load(agent, refs)
    return Replayed(queues, files)
