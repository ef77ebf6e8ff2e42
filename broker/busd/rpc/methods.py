"""The operations behind the socket API, one coroutine per JSON-RPC method.

:class:`Methods` sees the process that routes the bus only as a
:class:`~busd.rpc.broker.Broker`. Every file operation runs in a worker thread,
building an agent's :class:`Consumer` included (it creates and fsyncs the
agent's directories). ``publish`` and ``publish_batch`` join the broker's next
group commit, so they answer only after the journal fsync, and concurrent
publishers share that fsync. Results are the ``*Result`` Structs of
:mod:`busd.rpc.protocol`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
import structlog

from busd import __version__
from busd.config import Config
from busd.core.codec import encode_json
from busd.core.model import check_agent_name
from busd.errors import BusdError, NotFound
from busd.ops.status import StatusReport
from busd.routing import replay as _replay
from busd.routing.consumer import Claim, Consumer
from busd.routing.router import Incoming
from busd.rpc.broker import Broker
from busd.rpc.protocol import (
    AckParams,
    AckResult,
    AgentParams,
    BatchItem,
    ClaimedMessage,
    DlqListParams,
    DlqListResult,
    DlqShowParams,
    DlqShowResult,
    ErrorBody,
    ExtendParams,
    ExtendResult,
    FetchParams,
    FetchResult,
    NackParams,
    NackResult,
    PingResult,
    PublishBatchParams,
    PublishBatchResult,
    PublishParams,
    PublishResult,
    ReplayParams,
    ReplayResult,
    RpcError,
    error_from_exception,
)
from busd.rpc.pushes import Subscribers
from busd.store import dlq

__all__ = ["Methods", "claim_payload"]

_log = structlog.get_logger("busd.service")


def claim_payload(claim: Claim) -> ClaimedMessage:
    """A claimed message, as ``fetch`` returns it and ``subscribe`` pushes it."""
    return ClaimedMessage(
        message=msgspec.Raw(encode_json(claim.message)),
        delivery_count=claim.delivery_count,
        lease_expires_at=claim.lease_expires_at,
    )


class Methods:
    """The JSON-RPC methods (all but ``subscribe``, which the connection runs) of one broker."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._consumers: dict[str, Consumer] = {}
        self.subscribers = Subscribers(broker, self.consumer)
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
        return self.broker.config

    async def consumer(self, agent_id: str) -> Consumer:
        """The agent's consumer, built in a worker thread the first time (it fsyncs dirs).

        One per agent: its processed ledger is read once, then only what is
        appended. A reload (a new config) builds it again.
        """
        config = self.config
        consumer = self._consumers.get(agent_id)
        if consumer is None or consumer.config is not config:
            consumer = await anyio.to_thread.run_sync(Consumer, config, agent_id)
            self._consumers[agent_id] = consumer
        return consumer

    async def ping(self, _: AgentParams) -> PingResult:
        return PingResult(
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(time.time() - self.broker.started_at, 3),
        )

    def _incoming(self, raw: msgspec.Raw, sender: str | None) -> Incoming:
        """One published message for the next commit: its bytes and sender, undecoded.

        The commit admits it in its worker thread (never on the event loop); a
        refused one is dead-lettered, journaled and counted there, and its
        ``outcome`` is the error :func:`_outcome` raises. A bad ``sender`` is
        refused here (InvalidName), before anything is written.
        """
        if sender is not None:
            check_agent_name(sender, "sender")
        return Incoming(sender=sender, raw=bytes(raw))

    async def publish(self, p: PublishParams) -> PublishResult:
        item = self._incoming(p.message, p.sender)
        await self.broker.publish([item])
        return _outcome(item)

    async def publish_batch(self, p: PublishBatchParams) -> PublishBatchResult:
        results: list[Incoming | BusdError] = []
        for raw in p.messages:
            try:
                results.append(self._incoming(raw, p.sender))
            except BusdError as exc:
                results.append(exc)
        items = [r for r in results if isinstance(r, Incoming)]
        if items:
            await self.broker.publish(items)
        out: list[BatchItem] = []
        for r in results:
            try:
                if isinstance(r, BusdError):
                    raise r
                out.append(BatchItem(result=_outcome(r)))
            except BusdError as exc:
                out.append(BatchItem(error=ErrorBody.of(error_from_exception(exc))))
        return PublishBatchResult(out)

    async def fetch(self, p: FetchParams) -> FetchResult:
        consumer = await self.consumer(p.agent_id)
        deadline = time.monotonic() + p.wait_s
        await self.broker.settled()
        while True:
            claims = await anyio.to_thread.run_sync(consumer.claim, p.max)
            remaining = deadline - time.monotonic()
            if claims or remaining <= 0:
                return FetchResult([claim_payload(c) for c in claims])
            await self.broker.wait_for_delivery(p.agent_id, min(remaining, 1.0))

    async def ack(self, p: AckParams) -> AckResult:
        consumer = await self.consumer(p.agent_id)
        n = await anyio.to_thread.run_sync(consumer.ack, p.message_ids)
        self.subscribers.released(p.agent_id, set(p.message_ids))
        return AckResult(n)

    async def nack(self, p: NackParams) -> NackResult:
        consumer = await self.consumer(p.agent_id)
        await anyio.to_thread.run_sync(lambda: consumer.release(p.message_id, delay_s=p.delay_s))
        self.subscribers.released(p.agent_id, {p.message_id})
        if not p.delay_s:
            self.broker.notify_arrival(p.agent_id)
        return NackResult()

    async def extend(self, p: ExtendParams) -> ExtendResult:
        consumer = await self.consumer(p.agent_id)
        expires = await anyio.to_thread.run_sync(consumer.extend, p.message_id, p.lease_s)
        return ExtendResult(expires)

    async def status(self, _: AgentParams) -> StatusReport:
        return await anyio.to_thread.run_sync(self.broker.status)

    async def dlq_list(self, p: DlqListParams) -> DlqListResult:
        layout = self.config.layout
        entries = await anyio.to_thread.run_sync(
            lambda: dlq.list_entries(layout, reason=p.reason, agent=p.agent)
        )
        return DlqListResult([{"name": e.name, **msgspec.to_builtins(e.record)} for e in entries])

    async def dlq_show(self, p: DlqShowParams) -> DlqShowResult:
        entry = await anyio.to_thread.run_sync(dlq.load, self.config.layout, p.name)
        data = await anyio.to_thread.run_sync(entry.data)
        return DlqShowResult(
            name=entry.name,
            record=msgspec.to_builtins(entry.record),
            data=data.decode("utf-8", errors="replace"),
        )

    async def replay(self, p: ReplayParams) -> ReplayResult:
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
        self.broker.request_scan()
        return ReplayResult(moved)


def _replay_one(config: Config, name: str, p: ReplayParams) -> _replay.ReplayResult:
    return _replay.replay(config, name, to=p.to, dry_run=p.dry_run)


def _outcome(item: Incoming) -> PublishResult:
    if isinstance(item.outcome, BusdError):
        raise item.outcome
    if item.outcome is None or item.message is None:
        raise BusdError("the routing pass failed; the message was not accepted")
    return PublishResult(item.message.message_id, item.outcome == "duplicate")
