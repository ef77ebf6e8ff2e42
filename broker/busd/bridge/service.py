"""``busd bridge nats``: one process carrying one bus's messages to and from NATS JetStream.

:func:`run` connects (retrying while NATS is away: the bridge may start first), runs
the start checks (:mod:`busd.bridge.checks`, a :class:`~busd.errors.ConfigError` when
NATS cannot keep the promise), creates the bus's durable consumer, then runs the two
directions (:mod:`busd.bridge.outbound`, :mod:`busd.bridge.inbound`) and the status
writer side by side until SIGTERM or SIGINT. nats-py reconnects by itself; meanwhile
outbound claims nothing and inbound fetches nothing, and ``busd status`` shows the bridge
disconnected with its last error.

nats-py is imported here, inside the functions, never at import time of the CLI.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from busd.bridge import checks
from busd.bridge.inbound import DEFAULT_DELIVERY_LIMIT, Inbound
from busd.bridge.local import LocalBus
from busd.bridge.outbound import Outbound
from busd.bridge.state import STATUS_INTERVAL_S, State, write
from busd.config import Config
from busd.errors import BusdError
from busd.routing.intake import BRIDGE_AGENT

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.client import JetStreamContext

__all__ = ["DEFAULT_WINDOW", "Options", "run"]

DEFAULT_WINDOW = 64
"""Messages in flight each way when ``ordered`` is false."""
_log = structlog.get_logger("busd.bridge")


@dataclass(frozen=True, slots=True)
class Options:
    """The bridge's settings: ``[bridge]`` in busd.toml, overridden by the command line."""

    url: str
    stream: str
    ordered: bool = False
    window: int = DEFAULT_WINDOW
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    monitor_url: str | None = None
    accept_weaker_durability: bool = False
    replicas: int = 1
    ack_wait_s: float = checks.ACK_WAIT_S

    @property
    def in_flight(self) -> int:
        """1 when ordered (publish order per destination), else ``window``."""
        return 1 if self.ordered else self.window


async def run(config: Config, opts: Options) -> None:
    """Bridge ``config``'s bus until SIGTERM/SIGINT (ConfigError if the checks refuse)."""
    state = State(opts.url, opts.stream)
    nc = await _connect(config, opts, state)
    try:
        js = nc.jetstream(timeout=10.0)
        info = await checks.ensure_stream(
            js,
            opts.stream,
            max_message_bytes=config.max_message_bytes,
            replicas=opts.replicas,
        )
        durability = await checks.check(
            nc,
            info,
            max_message_bytes=config.max_message_bytes,
            monitor_url=opts.monitor_url or checks.default_monitor_url(opts.url),
            accept_weaker=opts.accept_weaker_durability,
        )
        durable = await checks.ensure_consumer(
            js,
            opts.stream,
            bus_name=config.bus_name,
            topics=frozenset(config.bridge.topics),
            window=opts.in_flight,
            ack_wait_s=opts.ack_wait_s,
        )
        _log.info(
            "bridge_ready",
            bus=config.bus_name,
            url=opts.url,
            stream=opts.stream,
            consumer=durable,
            replicas=durability.replicas,
            sync_always=durability.sync_always,
            weaker_durability_accepted=durability.weaker_accepted,
            ordered=opts.ordered,
        )
        out = Outbound(config, nc, js, state, stream=opts.stream, window=opts.in_flight)
        inbound = Inbound(
            config,
            js,
            state,
            stream=opts.stream,
            durable=durable,
            window=opts.in_flight,
            delivery_limit=opts.delivery_limit,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(out.run)
            tg.start_soon(inbound.run)
            tg.start_soon(_report, config, js, nc, state, opts.stream, durable)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    _log.info("bridge_stopping")
                    tg.cancel_scope.cancel()
                    break
    finally:
        with anyio.CancelScope(shield=True):
            state.connected = False
            await _write(config, state)
            await nc.close()


async def _connect(config: Config, opts: Options, state: State) -> Client:
    import nats

    async def disconnected() -> None:
        state.connected = False
        state.error("NATS disconnected")
        _log.warning("bridge_disconnected", url=opts.url)

    async def reconnected() -> None:
        state.connected = True
        _log.info("bridge_reconnected", url=opts.url)

    async def error(exc: Exception) -> None:
        state.error(f"NATS: {type(exc).__name__}: {exc}")

    delay = 0.2
    while True:
        try:
            nc = await nats.connect(
                servers=opts.url.split(","),
                name=f"busd-bridge-{config.bus_name}",
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
            )
        except Exception as exc:  # noqa: BLE001 - nats-py raises many kinds; all mean "not yet"
            state.error(f"NATS connect {opts.url}: {type(exc).__name__}: {exc}")
            _log.warning("bridge_connect_failed", url=opts.url, error=str(exc))
            await _write(config, state)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        state.connected = True
        return nc


async def _report(
    config: Config, js: JetStreamContext, nc: Client, state: State, stream: str, durable: str
) -> None:
    """Refresh the backlogs and the status file every STATUS_INTERVAL_S."""
    local = LocalBus(config, timeout=5.0)
    try:
        while True:
            state.connected = nc.is_connected
            try:
                status: Any = await local.call("status", {})
                agent = (status.get("agents") or {}).get(BRIDGE_AGENT) or {}
                state.outbound_backlog = int(agent.get("ready", 0)) + int(agent.get("in_flight", 0))
            except BusdError:
                state.outbound_backlog = None
            if nc.is_connected:
                try:
                    info = await js.consumer_info(stream, durable, timeout=2.0)
                    state.inbound_backlog = int(info.num_pending or 0) + int(
                        info.num_ack_pending or 0
                    )
                except Exception:  # noqa: BLE001 - a gauge: unknown until the next round
                    state.inbound_backlog = None
            await _write(config, state)
            await anyio.sleep(STATUS_INTERVAL_S)
    finally:
        with anyio.CancelScope(shield=True):
            await local.aclose()


async def _write(config: Config, state: State) -> None:
    snapshot = state.snapshot()
    try:
        await anyio.to_thread.run_sync(write, config.layout, snapshot)
    except OSError as exc:
        _log.warning("bridge_status_unwritable", error=str(exc))
