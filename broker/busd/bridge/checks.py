"""What the bridge checks before it moves anything: that NATS can keep busd's promise.

:func:`ensure_stream` finds the stream (or creates it: file storage, subjects ``busd.>``,
limits retention, a two-hour duplicate window, a max message size above busd's), then
:func:`check` refuses to start, with a :class:`~busd.errors.ConfigError` naming what is
wrong and how to fix it, when:

* the stream is not file-backed, or does not hold ``busd.>``;
* its duplicate window is under :data:`MIN_DUPLICATE_WINDOW_S` (a re-publish after a
  crash must still be recognised: exactly once into the remote inbox rests on it);
* its max message size, or the server's max payload, is under busd's ``max_message_bytes``
  (plus room for the headers);
* it has a single replica and the server does not fsync every write (``jetstream {
  sync_interval: always }``, read from the monitoring endpoint's ``/varz``), or that
  cannot be known, unless ``accept_weaker`` (``--accept-weaker-durability``): by default
  nats-server syncs every 2 minutes, and an acknowledged write can be lost in a power cut.

:func:`ensure_consumer` creates or updates the bus's durable pull consumer.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio

from busd.bridge.names import SUBJECT_ROOT, consumer_name, filter_subjects
from busd.errors import ConfigError

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.api import StreamInfo
    from nats.js.client import JetStreamContext

__all__ = [
    "ACK_WAIT_S",
    "CREATED_DUPLICATE_WINDOW_S",
    "HEADER_ROOM",
    "MIN_DUPLICATE_WINDOW_S",
    "Durability",
    "check",
    "default_monitor_url",
    "ensure_consumer",
    "ensure_stream",
    "probe_sync_always",
]

MIN_DUPLICATE_WINDOW_S = 3600.0
CREATED_DUPLICATE_WINDOW_S = 7200.0
HEADER_ROOM = 4096
"""Bytes a bridged message's headers may add on top of its body."""
ACK_WAIT_S = 30.0
"""How long NATS waits for the bridge's ack before it redelivers (a bridge killed mid-batch)."""


@dataclass(frozen=True, slots=True)
class Durability:
    """What the start checks found (logged at start)."""

    replicas: int
    sync_always: bool | None
    duplicate_window_s: float
    weaker_accepted: bool


def default_monitor_url(url: str) -> str:
    """``http://<host of url>:8222``: nats-server's usual monitoring port."""
    host = urlsplit(url.split(",")[0]).hostname or "127.0.0.1"
    return f"http://{host}:8222"


def probe_sync_always(monitor_url: str, timeout: float = 3.0) -> bool | None:
    """``jetstream.config.sync_always`` from ``<monitor_url>/varz``; None if unknown.

    Synchronous (``urllib``): call from a worker thread.
    """
    if urlsplit(monitor_url).scheme not in ("http", "https"):
        return None
    try:
        url = f"{monitor_url.rstrip('/')}/varz"
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - http(s) only
            varz: Any = json.loads(r.read(4 << 20))
    except (OSError, urllib.error.URLError, ValueError):
        return None
    config = (varz.get("jetstream") or {}).get("config") or {}
    value = config.get("sync_always")
    return bool(value) if value is not None else False


async def ensure_stream(
    js: JetStreamContext, stream: str, *, max_message_bytes: int, replicas: int
) -> StreamInfo:
    """The stream's info, creating it with the bridge's defaults when it does not exist."""
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    try:
        return await js.stream_info(stream)
    except NotFoundError:
        pass
    return await js.add_stream(
        StreamConfig(
            name=stream,
            subjects=[f"{SUBJECT_ROOT}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=CREATED_DUPLICATE_WINDOW_S,
            max_msg_size=max_message_bytes + HEADER_ROOM,
        )
    )


async def check(
    nc: Client,
    info: StreamInfo,
    *,
    max_message_bytes: int,
    monitor_url: str,
    accept_weaker: bool,
) -> Durability:
    """Refuse (ConfigError) a stream or server that cannot keep the bridge's promise."""
    from nats.js.api import StorageType

    cfg = info.config
    name = cfg.name
    if cfg.storage != StorageType.FILE:
        raise ConfigError(f"stream {name!r} is not file-backed: the bridge needs file storage")
    subjects = list(cfg.subjects or [])
    if not {f"{SUBJECT_ROOT}.>", ">"} & set(subjects):
        raise ConfigError(
            f"stream {name!r} holds {subjects}, not {SUBJECT_ROOT}.>: the bridge publishes "
            f"every bus's subjects there (add {SUBJECT_ROOT}.> or use another --stream)",
            key="bridge",
        )
    window = float(cfg.duplicate_window or 0)
    if window < MIN_DUPLICATE_WINDOW_S:
        raise ConfigError(
            f"stream {name!r} has a duplicate window of {window:g} s, under the "
            f"{MIN_DUPLICATE_WINDOW_S:g} s a re-published message needs to be recognised: "
            f"raise it (nats stream edit {name} --dupe-window 2h)",
            key="bridge",
        )
    need = max_message_bytes + HEADER_ROOM
    size = cfg.max_msg_size
    if size is not None and 0 <= size < need:
        raise ConfigError(
            f"stream {name!r} takes messages up to {size} bytes; busd's max_message_bytes "
            f"needs {need}",
            key="bridge",
        )
    if nc.max_payload < need:
        raise ConfigError(
            f"the NATS server's max_payload is {nc.max_payload} bytes; busd's "
            f"max_message_bytes needs {need} (set max_payload in nats-server.conf)",
            key="bridge",
        )
    replicas = int(cfg.num_replicas or 1)
    sync: bool | None = None
    if replicas < 2:
        sync = await anyio.to_thread.run_sync(probe_sync_always, monitor_url)
        if not sync and not accept_weaker:
            why = (
                "does not say `sync_interval: always`"
                if sync is False
                else f"could not be asked ({monitor_url}/varz did not answer)"
            )
            raise ConfigError(
                f"stream {name!r} has a single replica and the server {why}: an "
                "acknowledged message could be lost in a power cut. Set `jetstream { "
                "sync_interval: always }`, use 3 replicas, pass --monitor-url, or accept "
                "it with --accept-weaker-durability",
                key="bridge",
            )
    return Durability(replicas, sync, window, accept_weaker and not sync and replicas < 2)


async def ensure_consumer(
    js: JetStreamContext,
    stream: str,
    *,
    bus_name: str,
    topics: frozenset[str],
    window: int,
    ack_wait_s: float = ACK_WAIT_S,
) -> str:
    """Create or update the bus's durable pull consumer; its name.

    Explicit acks, at most ``window`` unacknowledged (1 keeps publish order), no
    delivery limit on the NATS side: the bridge counts NATS deliveries itself and
    dead-letters into busd at its own limit, so no message can be stranded in the stream.
    """
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    durable = consumer_name(bus_name)
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subjects=filter_subjects(bus_name, topics),
            max_ack_pending=window,
            max_deliver=-1,
            ack_wait=ack_wait_s,
        ),
    )
    return durable
