"""Subscribers: their flow-control windows and the loop that pushes to them.

A subscriber holds at most ``max_in_flight`` unacknowledged messages. The
push loop claims up to that window, inbox files first (the older part of the
queue), then memory (the broker's queue of a socket-served agent: a
subscriber makes its agent served while it lasts), sends each claim, and
waits; an ack or a nack
(:meth:`Subscribers.released`) opens the window again. File claims whose
lease expired (back in the inbox) are forgotten about once a second; memory
deliveries whose lease ended are reported by the broker (wired by
:mod:`busd.app` to :meth:`Subscribers.released`), so a subscriber that lost
some never stalls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
import msgspec

from busd.core.codec import encode_json
from busd.core.model import check_agent_name
from busd.routing.consumer import Claim, Consumer
from busd.routing.queues import Delivery
from busd.rpc.broker import Broker
from busd.rpc.protocol import ClaimedMessage, SubscribeParams
from busd.store.fsio import list_names
from busd.store.layout import parse_delivery_name

__all__ = ["Subscribers", "Subscription", "claim_payload", "memory_payload"]

_CLAIM_MAX = 100  # per claim call: pushes start before a large window is filled


def claim_payload(claim: Claim) -> ClaimedMessage:
    """A claimed file, as ``fetch`` returns it and ``subscribe`` pushes it."""
    return ClaimedMessage(
        message=msgspec.Raw(encode_json(claim.message)),
        delivery_count=claim.delivery_count,
        lease_expires_at=claim.lease_expires_at,
        receipt=claim.receipt,
    )


def memory_payload(delivery: Delivery, body: bytes) -> ClaimedMessage:
    """A memory delivery, in the same shape (``body`` is the journaled canonical JSON)."""
    return ClaimedMessage(
        message=msgspec.Raw(body),
        delivery_count=delivery.count,
        lease_expires_at=datetime.fromtimestamp(delivery.lease_until, UTC),
        receipt=delivery.receipt,
    )


@dataclass(eq=False)
class Subscription:
    """One subscriber: its agent, its flow-control window and the ids it holds."""

    agent_id: str
    max_in_flight: int
    in_flight: set[str] = field(default_factory=set)
    """Ids of the file claims pushed and not settled."""
    in_memory: set[str] = field(default_factory=set)
    """Ids of the memory deliveries pushed and not settled."""
    changed: anyio.Event = field(default_factory=anyio.Event)

    @property
    def held(self) -> int:
        """Messages pushed and not settled."""
        return len(self.in_flight) + len(self.in_memory)

    def release(self, message_ids: set[str]) -> None:
        """Forget ``message_ids`` (acked, nacked or returned) and wake the pusher."""
        if self.in_flight & message_ids or self.in_memory & message_ids:
            self.in_flight -= message_ids
            self.in_memory -= message_ids
            self.changed.set()
            self.changed = anyio.Event()


class Subscribers:
    """Every subscriber of one daemon, by agent."""

    def __init__(self, broker: Broker, consumer: Callable[[str], Awaitable[Consumer]]) -> None:
        self._broker = broker
        self._consumer = consumer
        self._by_agent: dict[str, set[Subscription]] = {}

    def of(self, agent_id: str) -> set[Subscription]:
        """The subscribers of ``agent_id`` (a copy)."""
        return set(self._by_agent.get(agent_id, ()))

    async def add(self, p: SubscribeParams) -> Subscription:
        """Register a subscriber (and join its topics, persisted by the broker)."""
        check_agent_name(p.agent_id)
        for topic in p.topics or ():
            check_agent_name(topic, "topic")
        sub = Subscription(p.agent_id, p.max_in_flight or self._broker.config.max_in_flight)
        for topic in p.topics or ():
            await self._broker.subscribe(topic, p.agent_id)
        self._by_agent.setdefault(p.agent_id, set()).add(sub)
        self._broker.attach(p.agent_id)
        return sub

    def remove(self, sub: Subscription) -> None:
        """Forget a subscriber (its claims come back when their leases expire)."""
        subs = self._by_agent.get(sub.agent_id)
        if subs is not None and sub in subs:
            subs.discard(sub)
            self._broker.detach(sub.agent_id)
            if not subs:
                del self._by_agent[sub.agent_id]

    def released(self, agent_id: str, message_ids: set[str]) -> None:
        """Tell the subscribers of ``agent_id`` that these ids are no longer in flight."""
        for sub in self._by_agent.get(agent_id, ()):
            sub.release(message_ids)

    async def pushes(
        self, sub: Subscription, send: Callable[[ClaimedMessage], Awaitable[None]]
    ) -> None:
        """Claim and push messages to ``sub`` forever, at most ``max_in_flight`` unacked."""
        while True:
            room = sub.max_in_flight - sub.held
            if room <= 0:
                with anyio.move_on_after(1.0):
                    await sub.changed.wait()
                await anyio.to_thread.run_sync(self._forget_returned, sub)
                continue
            consumer = await self._consumer(sub.agent_id)
            claims: list[Claim] = await anyio.to_thread.run_sync(
                consumer.claim, min(room, _CLAIM_MAX)
            )
            for claim in claims:
                sub.in_flight.add(claim.message.message_id)
                await send(claim_payload(claim))
            room -= len(claims)
            if claims or room <= 0:
                continue  # files first (the older part of the queue), memory once they are out
            taken = await self._broker.claim(sub.agent_id, min(room, _CLAIM_MAX))
            for delivery, body in taken:
                sub.in_memory.add(delivery.ref.message_id)
                await send(memory_payload(delivery, body))
            if not taken:
                await self._broker.wait_for_delivery(sub.agent_id, 1.0)

    def _forget_returned(self, sub: Subscription) -> None:
        # Claims whose lease expired went back to the inbox: not in flight any more.
        held: set[str] = set()
        for name in list_names(self._broker.config.layout.locks_dir(sub.agent_id)):
            parsed = parse_delivery_name(name)
            if parsed is not None:
                held.add(parsed.message_id)
        sub.in_flight &= held
