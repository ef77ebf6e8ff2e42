"""The state of a bus at a glance: :class:`StatusReport`, the one shape of ``busd status``.

:func:`report` builds it from directory listings alone: it never reads the
journal's contents or any message, only lists directories and stats a few
files, so it stays fast on a bus with a large journal and many waiting files.
What only a running daemon knows (pid, uptime, rates, totals, dedupe index, and
its in-memory queues) comes in as a :class:`DaemonInfo`; without one those fields
are null, and the keys stay the same.

Each agent's figures add the daemon's memory queue (:class:`QueueInfo`) to its
files: ``ready`` and ``in_flight`` count inbox files and claims plus memory
messages ready and in flight; ``served`` is ``"socket"`` while a socket consumer
serves the agent (``connections`` of them) and ``"files"`` otherwise, and always
without a daemon (it has no memory: files only). ``oldest_unsettled`` names the
oldest message the agent has not settled: the oldest of its inbox files and
claims if it has any (files hold the older part of a queue: a served agent's new
messages stay in memory, and what is written out is written oldest first), else
the daemon's oldest memory message.

``busd status --json``, the ``status`` RPC and the daemon-less path all return
this one Struct, so they cannot drift apart.

This module is on the ``busd status`` start-up path: keep its imports light.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from busd import __version__
from busd.config import Config, socket_path
from busd.ops.listings import (
    Listings,
    Waiting,
    arrival_of,
    listed,
    mailbox,
    outbox_of,
    summarized,
)

__all__ = [
    "BRIDGE_STALE_S",
    "OUTBOX_STALE_S",
    "SERVED_FILES",
    "SERVED_SOCKET",
    "AgentStatus",
    "BridgeStatus",
    "DaemonInfo",
    "DaemonState",
    "DedupeStatus",
    "DlqStatus",
    "JournalStatus",
    "OutboxStatus",
    "QueueInfo",
    "Rate",
    "Rates",
    "StatusReport",
    "Totals",
    "iso_time",
    "report",
    "short_duration",
]

OUTBOX_STALE_S = 60.0
"""A file waiting in an outbox longer than this means nobody routes the bus."""


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    """Counts since the daemon started; null without a daemon."""

    accepted: int | None = None
    delivered: int | None = None
    duplicates: int | None = None
    dead_lettered: int | None = None


class Rate(msgspec.Struct, frozen=True, kw_only=True):
    """Events per minute over the last 1 and 15 minutes (JSON keys ``1m``, ``15m``)."""

    one_min: float | None = msgspec.field(default=None, name="1m")
    fifteen_min: float | None = msgspec.field(default=None, name="15m")


class Rates(msgspec.Struct, frozen=True, kw_only=True):
    """Per-minute rates by kind; ``msgspec.convert(RateTracker.per_minute(), Rates)``."""

    accepted: Rate = msgspec.field(default_factory=Rate)
    delivered: Rate = msgspec.field(default_factory=Rate)
    dead_lettered: Rate = msgspec.field(default_factory=Rate)


SERVED_SOCKET = "socket"
SERVED_FILES = "files"


class QueueInfo(msgspec.Struct, frozen=True):
    """One agent's in-memory queue in the daemon, and how the agent is served.

    ``served`` is ``"socket"`` (a subscription, or a socket fetch within
    ``serve_grace_seconds``) or ``"files"``; ``connections`` counts the socket
    consumers serving it; ``ready`` and ``in_flight`` count memory messages only
    (not files); ``oldest_unsettled`` is the message id of the oldest memory
    message not yet settled (ready or in flight), None if there is none.
    """

    served: str
    connections: int
    ready: int
    in_flight: int
    oldest_unsettled: str | None = None


class DaemonInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What only a running daemon knows; the daemon passes it to :func:`report`.

    ``queues`` holds one :class:`QueueInfo` per agent with a memory queue or a
    socket consumer (agents without one are served by files, as without a daemon).
    """

    pid: int
    uptime_s: float
    socket: str
    watcher: str
    config_file: str | None
    dedupe_index: int
    undelivered: int
    totals: Totals
    rates_per_min: Rates
    queues: dict[str, QueueInfo] = msgspec.field(default_factory=dict)


class DaemonState(msgspec.Struct, frozen=True, kw_only=True):
    """The ``daemon`` section: ``error`` is set when one listens but does not answer."""

    running: bool
    pid: int | None
    uptime_s: float | None
    version: str | None
    socket: str
    watcher: str | None
    error: str | None


class AgentStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One agent's mailboxes and memory queue; times are ISO 8601 UTC.

    ``ready``/``in_flight`` count files plus the daemon's memory messages; ``served``
    is ``"socket"`` or ``"files"``, with ``connections`` socket consumers;
    ``oldest_unsettled`` is the message id of the oldest message not yet settled.
    """

    ready: int
    in_flight: int
    max_in_flight: int
    redelivered: int
    oldest_ready_age_s: float | None
    outbox: int
    outbox_oldest_age_s: float | None
    last_delivery_at: str | None
    last_ack_at: str | None
    served: str = SERVED_FILES
    connections: int = 0
    oldest_unsettled: str | None = None


class OutboxStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Files nobody has routed yet, over every outbox."""

    backlog: int
    oldest_age_s: float | None


class DlqStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Dead letters by reason (sorted) and the age of the oldest: busd's own, in
    :attr:`~busd.store.layout.Layout.dlq` (``dlq/busd/`` with ``compat = "tapps"``)."""

    entries: int
    by_reason: dict[str, int]
    oldest_age_s: float | None


class JournalStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Segments and bytes; ``undelivered`` (awaiting inbox files) only with a daemon."""

    segments: int
    bytes: int
    undelivered: int | None


class DedupeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The deduplication index size (daemon only) and window."""

    index_size: int | None
    window_s: float


class BridgeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What ``busd bridge nats`` last wrote to ``bridge-status.json`` (docs/multi-host.md).

    ``stale`` is computed here: the file is older than :data:`BRIDGE_STALE_S`, so no
    bridge is running (or it hangs). Backlogs: ``outbound`` is the ``_bridge`` queue,
    ``inbound`` what NATS holds for this bus (pending + unacknowledged).
    """

    url: str
    stream: str
    pid: int
    connected: bool
    updated_at: str
    outbound_backlog: int | None = None
    inbound_backlog: int | None = None
    published: int = 0
    publish_duplicates: int = 0
    received: int = 0
    delivered: int = 0
    busd_duplicates: int = 0
    dead_lettered: int = 0
    naks: int = 0
    last_error: str | None = None
    last_error_at: str | None = None
    stale: bool = False


BRIDGE_STALE_S = 30.0
"""A bridge refreshes its status file every few seconds; older than this, it is not running."""


def _bridge(path: Path, now: float) -> BridgeStatus | None:
    try:
        data = path.read_bytes()
        bridge = msgspec.json.decode(data[:65536], type=BridgeStatus)
    except (OSError, msgspec.ValidationError, msgspec.DecodeError):
        return None  # no bridge on this bus (or a torn, foreign file): nothing to show
    age = _age(_mtime(path), now)
    return msgspec.structs.replace(bridge, stale=age is None or age > BRIDGE_STALE_S)


class StatusReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``busd status --json`` prints and the ``status`` RPC returns (field order = keys)."""

    root: str
    version: str
    config_file: str | None
    daemon: DaemonState
    agents: dict[str, AgentStatus]
    outbox: OutboxStatus
    dlq: DlqStatus
    journal: JournalStatus
    dedupe: DedupeStatus
    totals: Totals
    rates_per_min: Rates
    generated_at: str
    attention: list[str]
    healthy: bool
    bridge: BridgeStatus | None = None


def report(
    config: Config,
    daemon: DaemonInfo | None,
    *,
    daemon_error: str | None = None,
    listings: Listings | None = None,
) -> StatusReport:
    """The status of ``config``'s bus; ``daemon`` is None when none runs.

    ``daemon_error`` says a daemon listens but did not answer (``code: message``):
    the report is then read from the files and marks the daemon running with it.
    ``listings`` (a daemon's) reuses the mailbox and DLQ listings that did not change.
    """
    layout = config.layout
    now = time.time()
    agents: dict[str, AgentStatus] = {}
    oldest_outbox: float | None = None
    queues = daemon.queues if daemon else {}
    # An agent may have a memory queue before it has any directory.
    for agent in dict.fromkeys([*layout.agents(), *sorted(queues)]):
        ready = summarized(listings, layout.inbox_dir(agent), mailbox)
        claimed = summarized(listings, layout.locks_dir(agent), mailbox)
        outbox = _waiting(listings, layout.outbox_dir(agent))
        waiting = outbox.oldest_mtime
        if waiting is not None and (oldest_outbox is None or waiting < oldest_outbox):
            oldest_outbox = waiting
        queue = queues.get(agent)
        oldest = min(filter(None, (ready.oldest, claimed.oldest)), default=None)
        newest = max(filter(None, (ready.newest, claimed.newest)), default=None)
        agents[agent] = AgentStatus(
            ready=ready.total + (queue.ready if queue else 0),
            in_flight=claimed.total + (queue.in_flight if queue else 0),
            max_in_flight=config.max_in_flight,
            redelivered=ready.redelivered,
            oldest_ready_age_s=_since_arrival(ready.oldest, now),
            outbox=outbox.total,
            outbox_oldest_age_s=_age(waiting, now),
            last_delivery_at=iso_time(arrival_of(newest) if newest else None),
            last_ack_at=iso_time(_mtime(layout.ledger(agent))),
            served=queue.served if queue else SERVED_FILES,
            connections=queue.connections if queue else 0,
            oldest_unsettled=(oldest[25:].removesuffix(".json") if oldest else None)
            or (queue.oldest_unsettled if queue else None),
        )
    running = daemon is not None or daemon_error is not None
    state = DaemonState(
        running=running,
        pid=daemon.pid if daemon else None,
        uptime_s=daemon.uptime_s if daemon else None,
        version=__version__ if running else None,
        socket=daemon.socket if daemon else str(socket_path(config)),
        watcher=daemon.watcher if daemon else None,
        error=daemon_error,
    )
    segments = [n for n in listed(layout.journal) if n.endswith(".ndjson")]
    journal = JournalStatus(
        segments=len(segments),
        bytes=sum(_size(layout.journal / n) for n in segments),
        undelivered=daemon.undelivered if daemon else None,
    )
    outboxes = OutboxStatus(
        backlog=sum(a.outbox for a in agents.values()), oldest_age_s=_age(oldest_outbox, now)
    )
    dlq = _dlq_status(summarized(listings, layout.dlq, _dlq_summary(layout.dlq)), now)
    attention = _attention(state, dlq, outboxes, agents)
    return StatusReport(
        root=str(layout.root),
        version=__version__,
        config_file=daemon.config_file if daemon else config.config_file,
        daemon=state,
        agents=agents,
        outbox=outboxes,
        dlq=dlq,
        journal=journal,
        dedupe=DedupeStatus(
            index_size=daemon.dedupe_index if daemon else None,
            window_s=config.dedupe_window_seconds,
        ),
        totals=daemon.totals if daemon else Totals(),
        rates_per_min=daemon.rates_per_min if daemon else Rates(),
        generated_at=iso_time(now) or "",
        attention=attention,
        healthy=running and not attention,
        bridge=_bridge(layout.bridge_status_file, now),
    )


def short_duration(seconds: float | None) -> str:
    """A short duration: ``45s``, ``3m20s``, ``2h05m``, ``7d``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    for big, small, size, sub in (("d", "h", 86400, 3600), ("h", "m", 3600, 60), ("m", "s", 60, 1)):
        if s >= size:
            whole, rest = divmod(s, size)
            rest //= sub
            return f"{whole}{big}{rest:02d}{small}" if rest and whole < 10 else f"{whole}{big}"
    return f"{s}s"


def iso_time(epoch: float | None) -> str | None:
    """``epoch`` as ISO 8601 UTC with microseconds and ``Z``, the bus's time format."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _attention(
    daemon: DaemonState,
    dlq: DlqStatus,
    outbox: OutboxStatus,
    agents: dict[str, AgentStatus],
) -> list[str]:
    """What needs an operator, most urgent first (empty: all is well)."""
    problems: list[str] = []
    if not daemon.running:
        problems.append("the daemon is not running")
    elif daemon.error:
        problems.append(f"the daemon does not answer: {daemon.error}")
    if dlq.entries:
        reasons = ", ".join(f"{r} {n}" for r, n in dlq.by_reason.items())
        problems.append(f"{dlq.entries} dead letters ({reasons}): see `busd dlq list`")
    if outbox.oldest_age_s is not None and outbox.oldest_age_s > OUTBOX_STALE_S:
        problems.append(
            f"{outbox.backlog} files wait in outboxes, the oldest for "
            f"{short_duration(outbox.oldest_age_s)}: nothing routes the bus"
        )
    for name, a in agents.items():
        if a.in_flight > a.max_in_flight > 0:
            problems.append(f"{name} holds {a.in_flight} claims, over max_in_flight")
    return problems


def _dlq_summary(directory: Path) -> Callable[[list[str]], tuple[Counter[str], float | None]]:
    """The DLQ's entries by reason and its oldest record's mtime, from its names."""

    def summarize(names: list[str]) -> tuple[Counter[str], float | None]:
        reasons: Counter[str] = Counter()
        oldest: float | None = None
        for name in names:
            if name.endswith(".reason.json"):
                reasons[_reason_of(directory / name)] += 1
                mtime = _mtime(directory / name)
                if mtime is not None and (oldest is None or mtime < oldest):
                    oldest = mtime
        return reasons, oldest

    return summarize


def _dlq_status(summary: tuple[Counter[str], float | None], now: float) -> DlqStatus:
    reasons, oldest = summary
    return DlqStatus(
        entries=sum(reasons.values()),
        by_reason=dict(sorted(reasons.items())),
        oldest_age_s=_age(oldest, now),
    )


def _age(epoch: float | None, now: float) -> float | None:
    return None if epoch is None else round(now - epoch, 3)


def _since_arrival(name: str | None, now: float) -> float | None:
    """How long ago the delivery ``name`` arrived (never negative: clocks step)."""
    return None if name is None else max(0.0, round(now - arrival_of(name), 3))


def _waiting(listings: Listings | None, directory: Path) -> Waiting:
    if listings is None:
        return outbox_of(directory, listed(directory))
    return listings.waiting(directory)


def _reason_of(path: os.PathLike[str]) -> str:
    # The reason is the first field of every record; reading 200 bytes is enough
    # and keeps status from decoding thousands of records in full.
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except FileNotFoundError:
        return "unknown"
    marker = b'"reason":"'
    i = head.find(marker)
    if i < 0:
        return "unknown"
    j = head.find(b'"', i + len(marker))
    return head[i + len(marker) : j].decode("ascii", "replace") if j > 0 else "unknown"


def _mtime(path: os.PathLike[str]) -> float | None:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def _size(path: os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
