"""The one way out: every refused message leaves through :func:`dead_letter`.

Whoever refuses a message (the router at intake, a socket publish at commit,
the consumer at claim time, the lease sweep, a consumer's ``fail``) calls
:func:`dead_letter`, which does the same three things in the same order:

1. writes the DLQ entry (:func:`busd.store.dlq.dead_letter`: the file moved in
   as it is, or the published bytes written, then the reason record), with the
   record fields filled by one rule from the :class:`~busd.routing.intake.Origin`;
2. produces the ``dead_lettered`` journal entry (protocol.md section 8: ``agent``
   is the directory or socket sender it came from, ``to`` the DLQ entry name,
   ``source`` the file), and appends it to ``entries`` when given;
3. counts it: ``counts.dead_lettered += 1`` when ``counts`` is given (a
   :class:`~busd.routing.router.RouteReport`, which the daemon adds to its
   totals and ``rates_per_min``).

Only the bus-lock holder appends to the journal, so the entry is journaled
only when a journal is at hand: the router passes its batch's ``entries``
(journaled with that batch's one write and fsync). The consumer and the lease
sweep are not the journal writer and pass none: their refusals are written and
counted, not journaled (protocol.md: "consumer-side dead letters ... are not
journaled"). The entry is returned either way.

Synchronous; the DLQ write fsyncs, so call it from a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from busd.core.codec import encode_json
from busd.errors import InvalidMessage, Reason
from busd.routing.intake import Refused
from busd.store import dlq
from busd.store.journal import JournalEntry
from busd.store.layout import Layout

__all__ = ["Counts", "DeadLetter", "dead_letter"]

_log = structlog.get_logger("busd.refusals")


class Counts(Protocol):
    """Anything that counts dead letters (a ``RouteReport``, a ``Consumer``)."""

    dead_lettered: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What :func:`dead_letter` did: the DLQ entry name and its journal entry."""

    name: str
    entry: JournalEntry


def dead_letter(
    layout: Layout,
    refused: Refused,
    *,
    at: datetime | None = None,
    entries: list[JournalEntry] | None = None,
    counts: Counts | None = None,
    delivery_count: int = 0,
) -> DeadLetter:
    """Dead-letter ``refused``: DLQ entry, journal entry (into ``entries``), count.

    A refused file (``origin.path``) is moved into the DLQ as it is; a socket
    publish has its bytes written (the bytes published, else the canonical
    JSON of an in-process message). The record's ``sender`` is the origin's
    (outbox directory, socket sender), else the message's ``agent_id`` when it
    decoded; ``recipient`` is the inbox it sat in or the claiming agent.
    ``at`` is the journal timestamp (one value per batch; now by default).
    :class:`~busd.errors.NotFound` if a file vanished before it moved.
    """
    origin, msg, exc = refused.origin, refused.message, refused.error
    if isinstance(exc, InvalidMessage):
        reason, detail = exc.reason, exc.detail
    else:
        reason, detail = Reason.UNROUTABLE, exc.message
    data = None
    if origin.path is None:
        data = refused.data
        if data is None:
            assert msg is not None, "a refusal without a file needs bytes or a message"
            data = encode_json(msg)  # an in-process caller handed a decoded message
    message_id = msg.message_id if msg is not None else None
    name = dlq.dead_letter(
        layout,
        reason=reason,
        detail=detail,
        source=origin.path,
        data=data,
        sender=origin.sender if origin.sender is not None else (msg.agent_id if msg else None),
        recipient=origin.recipient,
        message_id=message_id,
        delivery_count=delivery_count,
        original_path=origin.original_path,
    )
    _log.warning(
        "message_dead_lettered",
        source=origin.original_path,
        reason=reason.value,
        detail=detail,
        name=name,
    )
    entry = JournalEntry(
        event="dead_lettered",
        at=at if at is not None else datetime.now(UTC),
        source=origin.journal_source,
        # A consumer-side dead letter settles the message for the agent that held it (the
        # journal fold reads it so); any other refusal names who sent it.
        agent=origin.recipient if origin.kind == "claim" else origin.sender,
        reason=reason.value,
        detail=detail,
        to=[name],
        message_id=message_id,
    )
    if entries is not None:
        entries.append(entry)
    if counts is not None:
        counts.dead_lettered += 1
    return DeadLetter(name, entry)
