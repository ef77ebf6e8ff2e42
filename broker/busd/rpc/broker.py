"""What the socket methods need from the process that routes the bus.

The rpc package knows this Protocol, never the daemon: ``busd.runtime.daemon.Daemon``
implements it, ``busd.app`` wires the two together, and tests drive
:class:`~busd.rpc.methods.Methods` with a small fake.
"""

from __future__ import annotations

from typing import Protocol

from busd.config import Config
from busd.ops.status import StatusReport
from busd.routing.router import Incoming

__all__ = ["Broker"]


class Broker(Protocol):
    """The handful of daemon members the JSON-RPC methods use."""

    @property
    def config(self) -> Config:
        """The config in force (replaced on reload)."""
        ...

    @property
    def started_at(self) -> float:
        """When the process started (``time.time()``), for ``ping``."""
        ...

    async def publish(self, items: list[Incoming]) -> None:
        """Join the next group commit; return once each item has its ``outcome``."""
        ...

    async def settled(self) -> None:
        """Return once every publish answered so far has its inbox files."""
        ...

    async def wait_for_delivery(self, agent: str, timeout: float) -> None:
        """Return when something may have arrived for ``agent``, or after ``timeout``."""
        ...

    def notify_arrival(self, agent: str) -> None:
        """Wake fetchers and pushers of ``agent`` (a claim was put back)."""
        ...

    def request_scan(self) -> None:
        """Scan every outbox soon (a replay published into them)."""
        ...

    async def subscribe(self, topic: str, agent: str) -> None:
        """Add ``agent`` to ``topic``, persisted (the I/O runs in a worker thread)."""
        ...

    def status(self) -> StatusReport:
        """What ``busd status --json`` prints (blocking: call from a worker thread)."""
        ...
