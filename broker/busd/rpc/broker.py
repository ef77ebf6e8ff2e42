"""What the socket methods need from the process that routes the bus.

The rpc package knows this Protocol, never the daemon: ``busd.runtime.daemon.Daemon``
implements it, ``busd.app`` wires the two together, and tests drive
:class:`~busd.rpc.methods.Methods` with a small fake.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from busd.config import Config
from busd.ops.status import StatusReport
from busd.routing.queues import AckOutcome, Delivery
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

    async def status(self) -> StatusReport:
        """What ``busd status --json`` prints (the listings run in a worker thread)."""
        ...

    # -- memory deliveries: the messages of socket-served agents ----------------

    def attach(self, agent: str) -> None:
        """A subscriber of ``agent`` arrived (it is socket-served while one remains)."""
        ...

    def detach(self, agent: str) -> None:
        """A subscriber of ``agent`` left."""
        ...

    def touch(self, agent: str) -> None:
        """``agent`` fetched over the socket (served for ``serve_grace_seconds``)."""
        ...

    async def claim(self, agent: str, n: int) -> list[tuple[Delivery, bytes]]:
        """Claim up to ``n`` memory messages of ``agent``, oldest first, with their bodies."""
        ...

    async def waiting(self, agent: str, n: int) -> list[tuple[str, int, bytes]]:
        """Up to ``n`` memory messages of ``agent`` that are not claimed (ready or delayed),
        oldest first, as ``(message_id, deliveries so far, body)``; nothing changes, the
        agent does not become served (the bodies are read in a worker thread)."""
        ...

    async def settle(
        self, agent: str, *, receipts: list[str], message_ids: list[str]
    ) -> AckOutcome:
        """Ack memory deliveries, answered after the fsync; StaleReceipt if one is stale."""
        ...

    def holds(self, agent: str, message_id: str) -> bool:
        """Whether memory holds ``message_id`` for ``agent`` (ready or in flight)."""
        ...

    def release(
        self, agent: str, *, receipt: str | None, message_id: str | None, delay_s: float
    ) -> None:
        """Put a memory delivery back, now or after ``delay_s`` (NotFound, StaleReceipt)."""
        ...

    def extend(
        self, agent: str, *, receipt: str | None, message_id: str | None, lease_s: float
    ) -> datetime:
        """Push a memory delivery's lease (NotFound, StaleReceipt)."""
        ...

    async def reject(
        self, agent: str, *, receipt: str | None, message_id: str | None, reason: str
    ) -> str:
        """Dead-letter a memory delivery in flight (reason ``rejected``); the DLQ entry name.

        Answered once the entry and its ``dead_lettered`` journal line are durable
        (NotFound, StaleReceipt).
        """
        ...
