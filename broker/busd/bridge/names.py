"""Where a bridged message goes on NATS, and how it is named there (docs/multi-host.md).

Pure functions of the message and the bus's settings, shared by both directions:

* subjects: ``busd.<bus>.agent.<agent>`` (one agent on that bus), ``busd.<bus>.agents``
  (several: one NATS message carries them all, the message's ``to`` is the truth), and
  ``busd.topic.<topic>`` for a topic shared in ``[bridge] topics``. Names may hold ``.``,
  which separates NATS subject tokens, so every name becomes one token with ``.`` written
  ``%2E`` (``%`` is not in the agent-id rule, so the escape cannot collide);
* ``Nats-Msg-Id``: ``<origin bus>|<destination>|<message id>``: a re-publish after a
  crash is the same id, which JetStream reports as a duplicate inside its window;
* headers: the origin bus (a bus skips its own topic messages) and the SHA-256 of the
  body (checked on arrival).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from busd.core.model import TOPIC_PREFIX, Message, effective_recipients

__all__ = [
    "HDR_MSG_ID",
    "HDR_ORIGIN",
    "HDR_SHA256",
    "SUBJECT_ROOT",
    "Destination",
    "consumer_name",
    "destinations",
    "filter_subjects",
    "msg_id",
    "sha256",
    "token",
]

SUBJECT_ROOT = "busd"
"""Every bridge subject starts ``busd.``; a stream the bridge creates holds ``busd.>``."""
HDR_MSG_ID = "Nats-Msg-Id"
HDR_ORIGIN = "Busd-Origin"
HDR_SHA256 = "Busd-Sha256"


def token(name: str) -> str:
    """``name`` as one NATS subject token (and a valid durable name)."""
    return name.replace(".", "%2E")


@dataclass(frozen=True, slots=True)
class Destination:
    """One NATS message of a bridged busd message: a remote bus, or a shared topic."""

    subject: str
    key: str
    """``bus:<bus>`` or ``topic:<topic>``: the destination part of ``Nats-Msg-Id``."""


def destinations(
    msg: Message, *, bus_name: str, topics: frozenset[str], default_recipient: str
) -> list[Destination]:
    """The NATS messages ``msg`` becomes, in the order its ``to`` names them.

    The rule mirrors :func:`busd.routing.intake.resolve`: ``agent@<other bus>`` and a
    topic in ``topics``; local recipients are the local bus's business.
    """
    by_bus: dict[str, list[str]] = {}
    shared: list[str] = []
    for r in effective_recipients(msg, default_recipient):
        if r.startswith(TOPIC_PREFIX):
            topic = r.removeprefix(TOPIC_PREFIX)
            if topic in topics and topic not in shared:
                shared.append(topic)
            continue
        agent, _, bus = r.partition("@")
        if bus and bus != bus_name:
            agents = by_bus.setdefault(bus, [])
            if agent not in agents:
                agents.append(agent)
    out: list[Destination] = []
    for bus, agents in by_bus.items():
        tail = f"agent.{token(agents[0])}" if len(agents) == 1 else "agents"
        out.append(Destination(f"{SUBJECT_ROOT}.{token(bus)}.{tail}", f"bus:{bus}"))
    for topic in shared:
        out.append(Destination(f"{SUBJECT_ROOT}.topic.{token(topic)}", f"topic:{topic}"))
    return out


def msg_id(origin: str, destination: Destination, message_id: str) -> str:
    """The ``Nats-Msg-Id`` of one bridged copy: the same on every re-publish."""
    return f"{origin}|{destination.key}|{message_id}"


def sha256(body: bytes) -> str:
    """The content hash header value."""
    return hashlib.sha256(body).hexdigest()


def filter_subjects(bus_name: str, topics: frozenset[str] | list[str]) -> list[str]:
    """What the inbound consumer of ``bus_name`` reads: its own subjects and its topics."""
    return [f"{SUBJECT_ROOT}.{token(bus_name)}.>"] + [
        f"{SUBJECT_ROOT}.topic.{token(t)}" for t in sorted(topics)
    ]


def consumer_name(bus_name: str) -> str:
    """The durable consumer of ``bus_name``'s inbound messages."""
    return f"busd-{token(bus_name)}"
