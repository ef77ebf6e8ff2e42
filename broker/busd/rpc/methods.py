"""The operations behind the socket API, one coroutine per JSON-RPC method.

:class:`Methods` sees the process that routes the bus only as a
:class:`~busd.rpc.broker.Broker`. Every file operation runs in a worker thread,
building an agent's :class:`Consumer` included (it creates and fsyncs the
agent's directories). ``publish`` and ``publish_batch`` join the broker's next
group commit, so they answer only after the journal fsync, and concurrent
publishers share that fsync. Results are the ``*Result`` Structs of
:mod:`busd.rpc.protocol`.

Consumers: a ``fetch`` marks its agent socket-served (the broker keeps that
agent's new messages in memory, with no inbox file) and takes inbox files
first (written before the agent was served, by foreign producers, or put
back by the lease sweep: the older part of the queue, so arrival order holds
across the switch), then memory. Every delivery has a receipt. ``ack``/``nack``/``extend`` settle
memory deliveries through the broker (an ack is answered after its ``acked``
journal line is fsynced) and file deliveries through the agent's
:class:`Consumer`; ``message_ids`` means "the current claim" of each id, memory
or file. A stale receipt is refused with ``stale_receipt``.
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
from busd.core.model import check_agent_name
from busd.errors import BusdError, InvalidMessage, NotFound
from busd.ops.status import StatusReport
from busd.routing import replay as _replay
from busd.routing.consumer import Consumer
from busd.routing.router import Incoming
from busd.rpc.broker import Broker
from busd.rpc.protocol import (
    AckParams,
    AckResult,
    AgentParams,
    BatchItem,
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
    PeekedMessage,
    PeekParams,
    PeekResult,
    PingResult,
    PublishBatchParams,
    PublishBatchResult,
    PublishParams,
    PublishResult,
    RejectParams,
    RejectResult,
    ReplayParams,
    ReplayResult,
    RpcError,
    error_from_exception,
)
from busd.rpc.pushes import Subscribers, claim_payload, memory_payload
from busd.store import dlq, foreign
from busd.store.fsio import list_names, read_limited
from busd.store.layout import Layout, parse_delivery_name

__all__ = ["Methods", "claim_payload", "memory_payload"]

_log = structlog.get_logger("busd.service")


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
            "reject": (RejectParams, self.reject),
            "peek": (PeekParams, self.peek),
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
        agent = p.agent_id
        self.broker.touch(agent)  # served from now on: new messages stay in memory
        consumer = await self.consumer(agent)
        deadline = time.monotonic() + p.wait_s
        await self.broker.settled()
        while True:
            # Files first: they are the older part of the queue (written before the
            # agent was served), so arrival order holds across the switch.
            claims = await anyio.to_thread.run_sync(consumer.claim, p.max)
            out = [claim_payload(c) for c in claims]
            if len(out) < p.max:
                taken = await self.broker.claim(agent, p.max - len(out))
                out.extend(memory_payload(d, body) for d, body in taken)
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return FetchResult(out)
            await self.broker.wait_for_delivery(agent, min(remaining, 1.0))
            self.broker.touch(agent)

    async def ack(self, p: AckParams) -> AckResult:
        if not p.message_ids and not p.receipts:
            raise RpcError(
                -32602, "ack needs message_ids or receipts", "invalid_params", {"path": "$"}
            )
        agent = p.agent_id
        consumer = await self.consumer(agent)
        # Memory first: it refuses a stale receipt before anything is settled.
        memory = await self.broker.settle(agent, receipts=p.receipts, message_ids=p.message_ids)
        left = set(memory.not_held)
        receipts = [r for r in p.receipts if r in left]
        ids = [m for m in p.message_ids if m in left]
        acked, not_held = len(memory.acked), list[str]()
        if receipts or ids:
            n, not_held = await anyio.to_thread.run_sync(
                lambda: consumer.settle(message_ids=ids, receipts=receipts)
            )
            acked += n
        settled = {d.ref.message_id for d in memory.acked} | set(p.message_ids)
        settled.update(_receipt_id(r) for r in p.receipts)
        self.subscribers.released(agent, settled)
        return AckResult(acked, not_held)

    async def nack(self, p: NackParams) -> NackResult:
        agent, receipt, mid = p.agent_id, p.receipt, _named(p.message_id, p.receipt)
        if self.broker.holds(agent, mid):
            self.broker.release(agent, receipt=receipt, message_id=p.message_id, delay_s=p.delay_s)
        else:
            consumer = await self.consumer(agent)
            await anyio.to_thread.run_sync(
                lambda: consumer.release(p.message_id, receipt=receipt, delay_s=p.delay_s)
            )
            if not p.delay_s:
                self.broker.notify_arrival(agent)
        self.subscribers.released(agent, {mid})
        return NackResult()

    async def extend(self, p: ExtendParams) -> ExtendResult:
        agent, receipt, mid = p.agent_id, p.receipt, _named(p.message_id, p.receipt)
        if self.broker.holds(agent, mid):
            expires = self.broker.extend(
                agent, receipt=receipt, message_id=p.message_id, lease_s=p.lease_s
            )
            return ExtendResult(expires)
        consumer = await self.consumer(agent)
        expires = await anyio.to_thread.run_sync(
            lambda: consumer.extend(p.message_id, receipt=receipt, lease_s=p.lease_s)
        )
        return ExtendResult(expires)

    async def reject(self, p: RejectParams) -> RejectResult:
        """Dead-letter a held delivery, reason ``rejected`` (protocol.md 6.2): memory
        through the broker, a file claim through the agent's consumer."""
        agent, receipt, mid = p.agent_id, p.receipt, _named(p.message_id, p.receipt)
        if self.broker.holds(agent, mid):
            name = await self.broker.reject(
                agent, receipt=receipt, message_id=p.message_id, reason=p.reason
            )
        else:
            consumer = await self.consumer(agent)
            name = await anyio.to_thread.run_sync(
                lambda: consumer.fail(p.message_id, p.reason, receipt=receipt)
            )
        self.subscribers.released(agent, {mid})
        return RejectResult(name)

    async def peek(self, p: PeekParams) -> PeekResult:
        """What waits for an agent, unclaimed, in the order ``fetch`` takes it: inbox files
        first (the older part of the queue), then memory; summaries, no bodies.

        Changes nothing: no claim, no directory, and the agent does not become served.
        Memory is read before the files, so a message written out meanwhile shows up
        as a file (and is listed once), never in neither.
        """
        agent = check_agent_name(p.agent_id, "agent_id")
        await self.broker.settled()  # what a publisher was told is accepted is listed
        memory = await self.broker.waiting(agent, p.max)
        layout, limit = self.config.layout, self.config.max_message_bytes

        def listed() -> list[PeekedMessage]:
            out = _inbox(layout, agent, p.max, limit)
            seen = {m.message_id for m in out}
            for mid, count, body in memory:
                if len(out) >= p.max:
                    break
                if mid not in seen:
                    out.append(_summary(body, mid, count))
            return out

        return PeekResult(await anyio.to_thread.run_sync(listed))

    async def status(self, _: AgentParams) -> StatusReport:
        return await self.broker.status()

    async def dlq_list(self, p: DlqListParams) -> DlqListResult:
        """busd's entries (filtered), then, unless filtered out, the foreign ones (a Tapps
        dead letter, say: reason ``foreign``, ``"foreign": true``; never moved by busd)."""
        layout = self.config.layout

        def rows() -> list[dict[str, Any]]:
            entries = dlq.list_entries(layout, reason=p.reason, agent=p.agent)
            out = [{"name": e.name, **msgspec.to_builtins(e.record)} for e in entries]
            if p.agent is None and p.reason in (None, foreign.FOREIGN_REASON):
                out += [e.row() for e in foreign.list_foreign(layout)]
            return out

        return DlqListResult(await anyio.to_thread.run_sync(rows))

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


def _inbox(layout: Layout, agent: str, n: int, max_bytes: int) -> list[PeekedMessage]:
    """The first ``n`` deliveries in ``inbox/<agent>/`` (names of any delivery form)."""
    out: list[PeekedMessage] = []
    directory = layout.inbox_dir(agent)
    for name in list_names(directory):
        if len(out) >= n:
            break
        parsed = parse_delivery_name(name)
        if parsed is None:
            continue  # a foreign name: not a delivery until a claim names it
        try:
            data = read_limited(directory / name, max_bytes)
        except InvalidMessage:
            data = b""  # too large or not a regular file: listed by its name alone
        except OSError:
            continue  # claimed meanwhile
        out.append(_summary(data, parsed.message_id, parsed.deliveries))
    return out


def _summary(data: bytes, message_id: str, count: int) -> PeekedMessage:
    """busclient's ``_summary`` of a delivery's bytes: what is not a JSON message with a
    string ``message_id`` (front matter, say) shows its name's id and nulls. The fields
    shown are envelope fields, which a Tapps payload keeps in place."""
    try:
        msg = msgspec.json.decode(data.removeprefix(b"\xef\xbb\xbf"))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        msg = None
    if not isinstance(msg, dict) or not isinstance(msg.get("message_id"), str):
        msg = {}

    def text(key: str) -> str | None:
        value = msg.get(key)
        return value if isinstance(value, str) else None

    return PeekedMessage(
        message_id=text("message_id") or message_id,
        from_=text("agent_id"),
        type=text("message_type"),
        created_at=text("created_at"),
        delivery_count=count,
        workflow_id=text("workflow_id"),
        task_id=text("task_id"),
    )


def _replay_one(config: Config, name: str, p: ReplayParams) -> _replay.ReplayResult:
    return _replay.replay(config, name, to=p.to, dry_run=p.dry_run)


def _receipt_id(receipt: str) -> str:
    """The message id a receipt names ("" if it is not one)."""
    parsed = parse_delivery_name(f"{receipt}.json")
    return parsed.message_id if parsed is not None else ""


def _named(message_id: str | None, receipt: str | None) -> str:
    """The message a nack/extend names: its ``receipt``'s, else ``message_id``."""
    if receipt is not None:
        mid = _receipt_id(receipt)
        if not mid or (message_id is not None and message_id != mid):
            raise NotFound(f"no delivery {receipt}", receipt=receipt)
        return mid
    if message_id is None:
        raise RpcError(-32602, "name a message_id or a receipt", "invalid_params", {"path": "$"})
    return message_id


def _outcome(item: Incoming) -> PublishResult:
    if isinstance(item.outcome, BusdError):
        raise item.outcome
    if item.outcome is None or item.message is None:
        raise BusdError("the routing pass failed; the message was not accepted")
    return PublishResult(item.message.message_id, item.outcome == "duplicate")
