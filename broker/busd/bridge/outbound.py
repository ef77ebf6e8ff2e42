"""Outbound: the ``_bridge`` queue of this bus, published to JetStream, acked after the PubAck.

Contract, per message of the queue:

1. claimed (``fetch``) only while NATS is connected: a claim counts toward busd's
   ``max_deliveries``, and an outage must not spend them;
2. published once per destination (:func:`busd.bridge.names.destinations`), each with its
   ``Nats-Msg-Id``, and its PubAck awaited; a publish that fails is retried in place with
   the claim's lease extended, never nacked (a nack would count a delivery too);
3. acked in busd after every PubAck of the message. A crash between 2 and 3 leaves the
   claim to expire (``lease_seconds``); the next claim re-publishes, which JetStream
   answers as a duplicate (counted in ``publish_duplicates``) and stores once.

A message that names no remote destination (addressed to ``_bridge`` itself, or a topic
no longer shared) is ``reject``-ed into this bus's DLQ. ``ordered``: one message in
flight, in queue order; otherwise up to ``window`` are published concurrently. An
ordered bridge that starts while the queue still has a claim in flight (a previous
bridge died holding it) waits for that lease to run out first, so the older message is
claimed again before any newer one overtakes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from busd.bridge.local import LocalBus, RemoteFailure
from busd.bridge.names import HDR_MSG_ID, HDR_ORIGIN, HDR_SHA256, destinations, msg_id, sha256
from busd.bridge.state import State
from busd.config import Config
from busd.core import codec
from busd.errors import BusdError, DaemonNotRunning, InvalidMessage, RpcTimeout
from busd.routing.intake import BRIDGE_AGENT

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.client import JetStreamContext

__all__ = ["Outbound"]

_log = structlog.get_logger("busd.bridge.outbound")
_RETRY_MAX_S = 5.0


class _Claimed(msgspec.Struct):
    message: msgspec.Raw
    receipt: str
    delivery_count: int


class _Fetched(msgspec.Struct):
    messages: list[_Claimed]


class Outbound:
    """The outbound loop of one bridge (:meth:`run` until cancelled)."""

    def __init__(
        self,
        config: Config,
        nc: Client,
        js: JetStreamContext,
        state: State,
        *,
        stream: str,
        window: int,
        sleep: Callable[[float], Any] = anyio.sleep,
    ) -> None:
        self.config = config
        self.nc = nc
        self.js = js
        self.state = state
        self.stream = stream
        self.window = window
        self.local = LocalBus(config)
        self.topics = frozenset(config.bridge.topics)
        self._sleep = sleep
        self._lease_s = config.lease_seconds

    async def run(self) -> None:
        """Claim, publish, ack; forever."""
        try:
            if self.window == 1:
                await self._wait_for_orphaned_claims()
            while True:
                if not self.nc.is_connected:
                    await anyio.sleep(0.2)
                    continue
                try:
                    raw = await self.local.call_raw(
                        "fetch",
                        b'{"agent_id":"%s","max":%d,"wait_s":1.0}'
                        % (BRIDGE_AGENT.encode(), self.window),
                    )
                except (DaemonNotRunning, RpcTimeout, RemoteFailure) as exc:
                    self.state.error(f"local busd: {exc.message}")
                    await anyio.sleep(1.0)
                    continue
                batch = msgspec.json.decode(raw, type=_Fetched).messages
                if batch:
                    await self._handle(batch)
        finally:
            with anyio.CancelScope(shield=True):
                await self.local.aclose()

    async def _wait_for_orphaned_claims(self) -> None:
        deadline = anyio.current_time() + self._lease_s * 2 + 5.0
        while anyio.current_time() < deadline:
            try:
                status: Any = await self.local.call("status", {})
            except BusdError:
                await anyio.sleep(0.5)
                continue
            agent = (status.get("agents") or {}).get(BRIDGE_AGENT) or {}
            if not agent.get("in_flight"):
                return
            _log.info("bridge_waiting_for_lease", in_flight=agent.get("in_flight"))
            await anyio.sleep(0.5)

    async def _handle(self, batch: list[_Claimed]) -> None:
        done: list[str] = []
        async with anyio.create_task_group() as tg:
            limiter = anyio.CapacityLimiter(self.window)

            async def one(item: _Claimed) -> None:
                async with limiter:
                    if await self._carry(item):
                        done.append(item.receipt)

            for item in batch:
                if self.window == 1:
                    await one(item)
                else:
                    tg.start_soon(one, item)
        if done:
            await self._ack(done)

    async def _carry(self, item: _Claimed) -> bool:
        """Publish every copy of ``item``; True to ack it, False if it was rejected."""
        body = bytes(item.message)
        try:
            msg = codec.decode(body, max_bytes=self.config.max_message_bytes + 1)
        except InvalidMessage as exc:  # the journal held it: only a format change gets here
            await self._reject(item, f"bridge: undecodable: {exc.detail}")
            return False
        dests = destinations(
            msg,
            bus_name=self.config.bus_name,
            topics=self.topics,
            default_recipient=self.config.default_recipient,
        )
        if not dests:
            await self._reject(item, "bridge: the message names no other bus or shared topic")
            return False
        digest = sha256(body)
        for dest in dests:
            headers = {
                HDR_MSG_ID: msg_id(self.config.bus_name, dest, msg.message_id),
                HDR_ORIGIN: self.config.bus_name,
                HDR_SHA256: digest,
            }
            await self._publish(item, dest.subject, body, headers)
        return True

    async def _publish(
        self, item: _Claimed, subject: str, body: bytes, headers: dict[str, str]
    ) -> None:
        from nats.errors import Error as NatsError

        delay = 0.1
        extended_at = anyio.current_time()
        while True:
            try:
                ack = await self.js.publish(
                    subject, body, timeout=5.0, stream=self.stream, headers=dict(headers)
                )
            except (NatsError, TimeoutError, OSError) as exc:
                self.state.error(f"publish {subject}: {type(exc).__name__}: {exc}")
                _log.warning("bridge_publish_failed", subject=subject, error=str(exc))
            else:
                self.state.published += 1
                if ack.duplicate:
                    # A re-publish after a crash: JetStream stored it once, before.
                    self.state.publish_duplicates += 1
                    _log.info("bridge_publish_duplicate", subject=subject, seq=ack.seq)
                return
            await self._sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)
            # Hold the claim while NATS is away: a nack or an expired lease would count a
            # delivery, and busd dead-letters at max_deliveries.
            if anyio.current_time() - extended_at > self._lease_s / 3:
                await self._extend(item)
                extended_at = anyio.current_time()

    async def _extend(self, item: _Claimed) -> None:
        try:
            await self.local.call(
                "extend",
                {
                    "agent_id": BRIDGE_AGENT,
                    "receipt": item.receipt,
                    "lease_s": max(1.0, math.ceil(self._lease_s)),
                },
            )
        except BusdError as exc:
            self.state.error(f"local busd: extend: {exc.message}")

    async def _reject(self, item: _Claimed, reason: str) -> None:
        try:
            await self.local.call(
                "reject", {"agent_id": BRIDGE_AGENT, "receipt": item.receipt, "reason": reason}
            )
        except BusdError as exc:
            self.state.error(f"local busd: reject: {exc.message}")
        else:
            _log.warning("bridge_rejected", receipt=item.receipt, reason=reason)

    async def _ack(self, receipts: list[str]) -> None:
        delay = 0.2
        while True:
            try:
                await self.local.call("ack", {"agent_id": BRIDGE_AGENT, "receipts": receipts})
                return
            except RemoteFailure as exc:
                # stale: the lease ran out meanwhile; the re-claim re-publishes (a duplicate)
                self.state.error(f"local busd: ack: {exc.message}")
                return
            except (DaemonNotRunning, RpcTimeout) as exc:
                self.state.error(f"local busd: ack: {exc.message}")
                if delay > _RETRY_MAX_S * 4:
                    return  # the daemon restarted: these claims are gone, re-claimed later
                await anyio.sleep(delay)
                delay *= 2
