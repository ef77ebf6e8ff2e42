"""The operations behind the socket API, one coroutine per JSON-RPC method.

Every file operation runs in a worker thread. ``publish`` and
``publish_batch`` join the daemon's next group commit, so they answer only
after the journal fsync, and concurrent publishers share that fsync.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from busd import __version__
from busd.config import Config
from busd.core.codec import decode, encode_json
from busd.core.model import check_agent_name
from busd.errors import BusdError, InvalidMessage, NotFound
from busd.routing.consumer import Claim, Consumer
from busd.routing.router import Incoming
from busd.rpc.protocol import (
    AckParams,
    AgentParams,
    DlqListParams,
    DlqShowParams,
    ExtendParams,
    FetchParams,
    NackParams,
    PublishBatchParams,
    PublishParams,
    ReplayParams,
    RpcError,
    SubscribeParams,
    error_from_exception,
)
from busd.store import dlq
from busd.store.layout import parse_delivery_name

if TYPE_CHECKING:
    from busd.runtime.daemon import Daemon

__all__ = ["Service", "Subscription", "claim_payload"]

_log = structlog.get_logger("busd.service")


def claim_payload(claim: Claim) -> dict[str, Any]:
    """The JSON shape of a claimed message, as ``fetch`` returns and ``subscribe`` pushes."""
    return {
        "message": msgspec.Raw(encode_json(claim.message)),
        "delivery_count": claim.delivery_count,
        "lease_expires_at": claim.lease_expires_at,
    }


@dataclass(eq=False)
class Subscription:
    """One subscriber: its agent, its flow-control window and the ids it holds."""

    agent_id: str
    max_in_flight: int
    in_flight: set[str] = field(default_factory=set)
    changed: anyio.Event = field(default_factory=anyio.Event)

    def release(self, message_ids: set[str]) -> None:
        """Forget ``message_ids`` (acked, nacked or returned) and wake the pusher."""
        if self.in_flight & message_ids:
            self.in_flight -= message_ids
            self.changed.set()
            self.changed = anyio.Event()


class Service:
    """The JSON-RPC methods of one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.subscriptions: dict[str, set[Subscription]] = {}
        self._consumers: dict[str, Consumer] = {}
        self.methods: dict[str, tuple[type[Any], Callable[[Any], Awaitable[Any]]]] = {
            "ping": (AgentParams, self.ping),
            "publish": (PublishParams, self.publish),
            "publish_batch": (PublishBatchParams, self.publish_batch),
            "fetch": (FetchParams, self.fetch),
            "ack": (AckParams, self.ack),
            "nack": (NackParams, self.nack),
            "extend": (ExtendParams, self.extend),
            "status": (AgentParams, self.status),
            "dlq.list": (DlqListParams, self.dlq_list),
            "dlq.show": (DlqShowParams, self.dlq_show),
            "replay": (ReplayParams, self.replay),
        }

    @property
    def config(self) -> Config:
        return self.daemon.config

    def _consumer(self, agent_id: str) -> Consumer:
        # One per agent: its processed ledger is read once, then only what is appended.
        consumer = self._consumers.get(agent_id)
        if consumer is None or consumer.config is not self.config:
            consumer = self._consumers[agent_id] = Consumer(self.config, agent_id)
        return consumer

    async def ping(self, _: AgentParams) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.daemon.started_at, 3),
        }

    async def _incoming(self, raw: msgspec.Raw, sender: str | None) -> Incoming:
        """Validate one published message; a refused one is dead-lettered, then raised."""
        data = bytes(raw)
        if sender is not None:
            check_agent_name(sender, "sender")
        try:
            msg = decode(data, fill_missing=True, max_bytes=self.config.max_message_bytes)
        except InvalidMessage as exc:
            await anyio.to_thread.run_sync(self._dead_letter, data, sender, exc)
            raise
        return Incoming(msg, sender=sender, raw=data)

    def _dead_letter(self, data: bytes, sender: str | None, exc: InvalidMessage) -> None:
        name = dlq.dead_letter(
            self.config.layout,
            reason=exc.reason,
            detail=exc.detail,
            data=data,
            sender=sender,
            original_path="socket",
        )
        self.daemon.totals.dead_lettered += 1
        _log.warning("message_dead_lettered", source="socket", reason=exc.reason.value, name=name)

    async def publish(self, p: PublishParams) -> dict[str, Any]:
        item = await self._incoming(p.message, p.sender)
        await self.daemon.publish([item])
        return _outcome(item)

    async def publish_batch(self, p: PublishBatchParams) -> dict[str, Any]:
        results: list[Any] = []
        items: list[Incoming] = []
        for raw in p.messages:
            try:
                item = await self._incoming(raw, p.sender)
            except BusdError as exc:
                results.append(exc)
                continue
            items.append(item)
            results.append(item)
        if items:
            await self.daemon.publish(items)
        out: list[dict[str, Any]] = []
        for r in results:
            try:
                out.append({"result": _outcome(r) if isinstance(r, Incoming) else _raise(r)})
            except BusdError as exc:
                err = error_from_exception(exc)
                out.append({"error": {"code": err.code, "message": err.message, "data": err.data}})
        return {"results": out}

    async def fetch(self, p: FetchParams) -> dict[str, Any]:
        consumer = self._consumer(p.agent_id)
        deadline = time.monotonic() + p.wait_s
        await self.daemon.settled()
        while True:
            claims = await anyio.to_thread.run_sync(consumer.claim, p.max)
            remaining = deadline - time.monotonic()
            if claims or remaining <= 0:
                return {"messages": [claim_payload(c) for c in claims]}
            await self.daemon.wait_for_delivery(p.agent_id, min(remaining, 1.0))

    async def ack(self, p: AckParams) -> dict[str, Any]:
        n = await anyio.to_thread.run_sync(self._consumer(p.agent_id).ack, p.message_ids)
        self.released(p.agent_id, set(p.message_ids))
        return {"acked": n}

    async def nack(self, p: NackParams) -> dict[str, Any]:
        consumer = self._consumer(p.agent_id)
        await anyio.to_thread.run_sync(lambda: consumer.release(p.message_id, delay_s=p.delay_s))
        self.released(p.agent_id, {p.message_id})
        if not p.delay_s:
            self.daemon.notify_arrival(p.agent_id)
        return {}

    async def extend(self, p: ExtendParams) -> dict[str, Any]:
        consumer = self._consumer(p.agent_id)
        expires = await anyio.to_thread.run_sync(consumer.extend, p.message_id, p.lease_s)
        return {"lease_expires_at": expires}

    async def status(self, _: AgentParams) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self.daemon.status)

    async def dlq_list(self, p: DlqListParams) -> dict[str, Any]:
        layout = self.config.layout
        entries = await anyio.to_thread.run_sync(
            lambda: dlq.list_entries(layout, reason=p.reason, agent=p.agent)
        )
        return {"entries": [{"name": e.name, **msgspec.to_builtins(e.record)} for e in entries]}

    async def dlq_show(self, p: DlqShowParams) -> dict[str, Any]:
        entry = await anyio.to_thread.run_sync(dlq.load, self.config.layout, p.name)
        data = await anyio.to_thread.run_sync(entry.data)
        return {
            "name": entry.name,
            "record": msgspec.to_builtins(entry.record),
            "data": data.decode("utf-8", errors="replace"),
        }

    async def replay(self, p: ReplayParams) -> dict[str, Any]:
        layout, config = self.config.layout, self.config
        if p.names:
            names = p.names
        elif p.reason or p.all:
            entries = await anyio.to_thread.run_sync(
                lambda: dlq.list_entries(layout, reason=p.reason)
            )
            names = [e.name for e in entries]
        else:
            raise RpcError(-32602, "replay needs names, reason or all", "invalid_params")
        moved: list[dict[str, Any]] = []
        for name in names:  # only what was in the DLQ when we started moves
            try:
                result = await anyio.to_thread.run_sync(_replay_one, config, name, p)
            except NotFound as exc:
                moved.append({"name": name, "status": "not_found", "detail": exc.message})
                continue
            moved.append(msgspec.to_builtins(result, enc_hook=str))  # target is a Path
        self.daemon.request_scan()
        return {"replayed": moved}

    # -- subscriptions ------------------------------------------------------

    def add_subscription(self, p: SubscribeParams) -> Subscription:
        """Register a subscriber (and its topics) for pushes."""
        check_agent_name(p.agent_id)
        for topic in p.topics or ():
            check_agent_name(topic, "topic")
        sub = Subscription(p.agent_id, p.max_in_flight or self.config.max_in_flight)
        self.subscriptions.setdefault(p.agent_id, set()).add(sub)
        for topic in p.topics or ():
            self.daemon.subscribe(topic, p.agent_id)
        return sub

    def remove_subscription(self, sub: Subscription) -> None:
        """Forget a subscriber (its claims come back when their leases expire)."""
        subs = self.subscriptions.get(sub.agent_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.subscriptions[sub.agent_id]

    def released(self, agent_id: str, message_ids: set[str]) -> None:
        """Tell the subscribers of ``agent_id`` that these ids are no longer in flight."""
        for sub in self.subscriptions.get(agent_id, ()):
            sub.release(message_ids)

    async def pushes(self, sub: Subscription, send: Callable[[Claim], Awaitable[None]]) -> None:
        """Claim and push messages to ``sub`` forever, at most ``max_in_flight`` unacked."""
        consumer = self._consumer(sub.agent_id)
        while True:
            room = sub.max_in_flight - len(sub.in_flight)
            if room <= 0:
                with anyio.move_on_after(1.0):
                    await sub.changed.wait()
                await anyio.to_thread.run_sync(self._forget_returned, sub)
                continue
            claims = await anyio.to_thread.run_sync(consumer.claim, min(room, 100))
            if not claims:
                await self.daemon.wait_for_delivery(sub.agent_id, 1.0)
                continue
            for claim in claims:
                sub.in_flight.add(claim.message.message_id)
                await send(claim)

    def _forget_returned(self, sub: Subscription) -> None:
        # Claims whose lease expired went back to the inbox: not in flight any more.
        held: set[str] = set()
        for path in self.config.layout.locks_dir(sub.agent_id).iterdir():
            parsed = parse_delivery_name(path.name)
            if parsed is not None:
                held.add(parsed.message_id)
        sub.in_flight &= held


def _replay_one(config: Config, name: str, p: ReplayParams) -> dlq.ReplayResult:
    return dlq.replay(config, name, to=p.to, dry_run=p.dry_run)


def _raise(exc: BusdError) -> Any:
    raise exc


def _outcome(item: Incoming) -> dict[str, Any]:
    if isinstance(item.outcome, BusdError):
        raise item.outcome
    if item.outcome is None:
        raise BusdError("the routing pass failed; the message was not accepted")
    return {"message_id": item.message.message_id, "duplicate": item.outcome == "duplicate"}
