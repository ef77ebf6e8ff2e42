"""Inbound: this bus's subjects on JetStream, published into busd, acked after busd answered.

Contract, per NATS message (a durable pull consumer, explicit acks, at most ``window``
unacknowledged):

* its own topic messages coming back (``Busd-Origin`` is this bus): acked, skipped;
* delivered more than ``delivery_limit`` times (NATS's count): written to this bus's DLQ
  with reason ``bridge_delivery_limit`` and its bytes, then terminated in NATS; replaying
  the entry routes it like a bridged message (sender ``_bridge``);
* bytes that are not JSON, or whose ``Busd-Sha256`` does not match: dead-lettered here
  (``invalid_utf8`` / ``invalid_json`` / ``schema``), terminated;
* otherwise one ``publish_batch`` (sender ``_bridge``) for the whole fetch: an accepted
  or duplicate answer is acked in NATS only after busd answered (it answers after the
  journal fsync); a refusal (busd dead-lettered it, with its bytes) is terminated;
  ``overloaded`` / ``storage_error`` / ``shutting_down`` / a timeout is a nak with a
  growing delay;
* no daemon: a valid message falls back to a durable file in ``outbox/_bridge/``
  (protocol.md section 5) and is acked; the daemon routes it when it is back.

A crash anywhere acks nothing more: NATS redelivers after ``ack_wait``, and busd answers
``duplicate`` for what it had already accepted. So each message enters the inbox once.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from busd.bridge.local import LocalBus, RemoteFailure
from busd.bridge.names import HDR_ORIGIN, HDR_SHA256, sha256
from busd.bridge.state import State
from busd.config import Config
from busd.core import codec
from busd.errors import DaemonNotRunning, InvalidMessage, Reason, RpcTimeout
from busd.routing import refusals
from busd.routing.intake import BRIDGE_AGENT, Origin, Refused
from busd.store.mailbox import publish_bytes

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

__all__ = ["DEFAULT_DELIVERY_LIMIT", "Inbound"]

DEFAULT_DELIVERY_LIMIT = 10
_log = structlog.get_logger("busd.bridge.inbound")
_REFUSED = frozenset({"invalid_message", "unroutable", "invalid_name"})
_NAK_MAX_S = 60.0


class Inbound:
    """The inbound loop of one bridge (:meth:`run` until cancelled)."""

    def __init__(
        self,
        config: Config,
        js: JetStreamContext,
        state: State,
        *,
        stream: str,
        durable: str,
        window: int,
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    ) -> None:
        self.config = config
        self.js = js
        self.state = state
        self.stream = stream
        self.durable = durable
        self.window = window
        self.delivery_limit = delivery_limit
        self.local = LocalBus(config)

    async def run(self) -> None:
        """Fetch, publish, ack; forever."""
        from nats.errors import Error as NatsError
        from nats.errors import TimeoutError as NatsTimeout

        sub = await self.js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
        try:
            while True:
                try:
                    msgs = await sub.fetch(batch=self.window, timeout=1.0)
                except (NatsTimeout, TimeoutError):
                    continue
                except NatsError as exc:
                    self.state.error(f"fetch: {type(exc).__name__}: {exc}")
                    await anyio.sleep(0.5)
                    continue
                await self.handle(msgs)
        finally:
            with anyio.CancelScope(shield=True):
                await self.local.aclose()

    async def handle(self, msgs: list[Msg]) -> None:
        """Settle one fetched batch (each message acked, nacked or terminated once)."""
        own = self.config.bus_name
        publish: list[tuple[Msg, bytes]] = []
        for m in msgs:
            self.state.received += 1
            headers = m.headers or {}
            if headers.get(HDR_ORIGIN) == own:
                await m.ack()
                continue
            data = bytes(m.data)
            if m.metadata.num_delivered > self.delivery_limit:
                await self._dead_letter(
                    m,
                    data,
                    Reason.BRIDGE_DELIVERY_LIMIT,
                    f"delivered {m.metadata.num_delivered - 1} times by NATS "
                    f"(limit {self.delivery_limit}) without busd accepting it",
                )
                continue
            problem = _check_bytes(data, headers.get(HDR_SHA256))
            if problem is not None:
                await self._dead_letter(m, data, *problem)
                continue
            publish.append((m, data))
        if publish:
            await self._publish(publish)

    async def _publish(self, items: list[tuple[Msg, bytes]]) -> None:
        params = b'{"sender":"%s","messages":[%s]}' % (
            BRIDGE_AGENT.encode(),
            b",".join(_one_line(d) for _, d in items),
        )
        try:
            result: Any = msgspec.json.decode(await self.local.call_raw("publish_batch", params))
        except DaemonNotRunning as exc:
            self.state.error(f"local busd: {exc.message}")
            for m, data in items:
                await self._fall_back(m, data)
            return
        except (RpcTimeout, RemoteFailure) as exc:
            self.state.error(f"local busd: {exc.message}")
            for m, _ in items:
                await self._nak(m)
            return
        for (m, _), answer in zip(items, result["results"], strict=True):
            if "result" in answer:
                if answer["result"].get("duplicate"):
                    # A redelivery of what busd had accepted (a crash before the NATS ack).
                    self.state.busd_duplicates += 1
                    _log.info("bridge_busd_duplicate", message_id=answer["result"]["message_id"])
                else:
                    self.state.delivered += 1
                await m.ack()
                continue
            error = answer.get("error") or {}
            code = str((error.get("data") or {}).get("error") or "")
            if code in _REFUSED:
                self.state.dead_lettered += 1
                self.state.error(f"refused by busd: {error.get('message')}")
                await m.term()
            else:
                self.state.error(f"local busd: {error.get('message')}")
                await self._nak(m)

    async def _fall_back(self, m: Msg, data: bytes) -> None:
        """No daemon: a valid message becomes an outbox file (durable), then the NATS ack."""
        try:
            msg = codec.decode(data, max_bytes=self.config.max_message_bytes)
        except InvalidMessage:
            await self._nak(m)  # the daemon will refuse it, with its reason, when it is back
            return
        layout, fsync = self.config.layout, self.config.fsync
        try:
            await anyio.to_thread.run_sync(
                lambda: publish_bytes(layout, BRIDGE_AGENT, data, msg.message_id, fsync=fsync)
            )
        except OSError as exc:
            self.state.error(f"outbox fallback: {exc}")
            await self._nak(m)
            return
        self.state.delivered += 1
        await m.ack()

    async def _nak(self, m: Msg) -> None:
        self.state.naks += 1
        await m.nak(delay=min(2.0 ** max(0, m.metadata.num_delivered - 1), _NAK_MAX_S))

    async def _dead_letter(self, m: Msg, data: bytes, reason: Reason, detail: str) -> None:
        refused = Refused(Origin.socket(BRIDGE_AGENT), InvalidMessage(reason, detail), data=data)
        try:
            try:
                refused = Refused(
                    refused.origin,
                    refused.error,
                    codec.decode(data, max_bytes=self.config.max_message_bytes),
                    data,
                )
            except InvalidMessage:
                pass  # the record then names no message id
            layout = self.config.layout
            name = await anyio.to_thread.run_sync(
                lambda: refusals.dead_letter(layout, refused).name
            )
        except OSError as exc:
            self.state.error(f"dead-letter: {exc}")
            await self._nak(m)
            return
        self.state.dead_lettered += 1
        _log.warning("bridge_dead_lettered", reason=reason.value, name=name, detail=detail)
        await m.term()


def _check_bytes(data: bytes, digest: str | None) -> tuple[Reason, str] | None:
    """Why ``data`` cannot be handed to busd as JSON (None: it can)."""
    if digest is not None and digest != sha256(data):
        return Reason.SCHEMA, f"content hash mismatch ({HDR_SHA256})"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reason.INVALID_UTF8, f"not UTF-8: {exc}"
    try:
        json.loads(text)
    except ValueError as exc:
        return Reason.INVALID_JSON, f"not JSON: {exc}"
    return None


def _one_line(data: bytes) -> bytes:
    """``data`` (valid JSON) as one line: the socket's framing is one request a line."""
    if b"\n" not in data and b"\r" not in data:
        return data
    return json.dumps(json.loads(data), ensure_ascii=False, separators=(",", ":")).encode()
