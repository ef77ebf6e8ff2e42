"""What the bridge reports: counters, the last error, and the status file ``busd status`` reads.

One :class:`State` per bridge process, touched on the event loop only. :func:`write`
replaces ``<root>/bridge-status.json`` (:attr:`busd.store.layout.Layout.bridge_status_file`)
with a :class:`busd.ops.status.BridgeStatus`, through a temporary file and a rename so a
reader never sees half of it. Not fsynced: it is a gauge, rewritten every
:data:`STATUS_INTERVAL_S`; ``busd status`` marks it ``stale`` when it stops changing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import msgspec

from busd.ops.status import BridgeStatus, iso_time
from busd.store.layout import Layout

__all__ = ["STATUS_INTERVAL_S", "State", "write"]

STATUS_INTERVAL_S = 2.0


@dataclass(slots=True)
class State:
    """Counters since the bridge started (``published``: PubAcks; ``delivered``: accepted here)."""

    url: str
    stream: str
    connected: bool = False
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
    last_error_at: float | None = None

    def error(self, text: str) -> None:
        """Remember ``text`` as the last error (shown by ``busd status``)."""
        self.last_error = text[:500]
        self.last_error_at = time.time()

    def snapshot(self) -> BridgeStatus:
        """The status file's contents now."""
        return BridgeStatus(
            url=self.url,
            stream=self.stream,
            pid=os.getpid(),
            connected=self.connected,
            updated_at=iso_time(time.time()) or "",
            outbound_backlog=self.outbound_backlog,
            inbound_backlog=self.inbound_backlog,
            published=self.published,
            publish_duplicates=self.publish_duplicates,
            received=self.received,
            delivered=self.delivered,
            busd_duplicates=self.busd_duplicates,
            dead_lettered=self.dead_lettered,
            naks=self.naks,
            last_error=self.last_error,
            last_error_at=iso_time(self.last_error_at),
        )


def write(layout: Layout, status: BridgeStatus) -> None:
    """Replace the status file with ``status`` (synchronous: call from a worker thread)."""
    target = layout.bridge_status_file
    tmp = layout.tmp / f".bridge-status-{os.getpid()}.json"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, msgspec.json.encode(status) + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, target)
