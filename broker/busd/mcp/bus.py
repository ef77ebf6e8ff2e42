"""The seam between the MCP tools and the bus: busclient clients, refusals, message views.

Contracts:

* :meth:`Bus.call` runs one busclient call in a worker thread with a client of its
  own (the socket when a daemon runs, the files when none does), so a long
  ``bus_fetch`` never holds up another call and nothing outlives a call but the bus.
* Every refusal leaves as a :class:`ToolError`: busd's stable ``code``
  (``invalid_message`` with the ``path`` and DLQ ``reason``, ``stale_receipt``,
  ``not_found``, ``daemon_not_running`` only where the files cannot serve ...) and a
  sentence a model can act on.
* Without a daemon, :meth:`Bus.route` does the routing pass ``busd send`` and
  ``busd recv`` do, so what was written into outboxes reaches the inboxes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec

import busclient
from busd.config import Config
from busd.errors import BusdError

__all__ = ["CORE_FIELDS", "Args", "Bus", "Result", "ToolError", "error_of", "message_item"]

_T = TypeVar("_T")
Args = dict[str, Any]
Result = dict[str, Any]

# Fields every message has; the rest of a message is shown as `fields`.
CORE_FIELDS = frozenset(
    {"schema_version", "message_type", "message_id", "created_at", "agent_id"}
    | {"workflow_id", "task_id", "body"}
)


class ToolError(Exception):
    """A refused tool call: ``code`` (busd's stable error code), a sentence, extra data."""

    def __init__(self, code: str, message: str, **data: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = {k: v for k, v in data.items() if v is not None}

    def content(self) -> Result:
        """The structured content of the MCP tool error."""
        return {"error": {"code": self.code, "message": self.message, **self.data}}


def error_of(exc: Exception) -> ToolError:
    """The tool error for a refusal of busclient or busd, with a hint a model can act on."""
    if isinstance(exc, ToolError):
        return exc
    if isinstance(exc, busclient.InvalidMessage):
        path = exc.path or "$"
        return ToolError(
            "invalid_message",
            f"the message was refused ({exc.reason}) at {path}: {exc.detail}. "
            "Fix that field and send again; the refused copy is in the dead-letter queue "
            "when a daemon checked it.",
            reason=exc.reason,
            path=path,
        )
    if isinstance(exc, busclient.StaleReceipt):
        return ToolError(
            "stale_receipt",
            "the receipt names a delivery that is no longer yours (its lease expired and it "
            "was handed out again, or it was released): drop this message and bus_fetch again.",
            receipts=exc.receipts,
        )
    if isinstance(exc, busclient.NotFound):
        return ToolError(
            "not_found",
            f"{exc} - it is not held by this agent (already acked, rejected, or never "
            "fetched): bus_fetch to get a current receipt.",
        )
    if isinstance(exc, busclient.InvalidName):
        return ToolError("invalid_name", f"{exc}: agent ids are 1-64 of A-Z a-z 0-9 . _ -")
    if isinstance(exc, busclient.Unavailable):
        return ToolError(
            "daemon_not_running",
            f"{exc}. This needs the daemon: start it with `busd run`.",
        )
    if isinstance(exc, busclient.BusError):
        code = exc.reason or type(exc).default_reason
        return ToolError(code, str(exc))
    if isinstance(exc, BusdError):
        return ToolError(exc.code, exc.message)
    if isinstance(exc, OSError):
        return ToolError("storage_error", f"the bus files could not be used: {exc}")
    raise exc


@dataclass
class Bus:
    """How the tools reach the bus: the root, the config, and who to tell about fetches."""

    config: Config
    on_fetch: Callable[[str], None] = field(default=lambda agent: None)

    @property
    def root(self) -> Path:
        return Path(self.config.root)

    def client(self, *, fallback: bool = True) -> busclient.Client:
        """A fresh client (cheap: the connection is opened by the first call)."""
        return busclient.Client(
            self.config.root, socket_path=self.config.socket_path, fallback=fallback
        )

    async def call(self, fn: Callable[[busclient.Client], _T], *, fallback: bool = True) -> _T:
        """``fn(client)`` in a worker thread; refusals become :class:`ToolError`."""

        def run() -> _T:
            with self.client(fallback=fallback) as client:
                return fn(client)

        try:
            return await anyio.to_thread.run_sync(run)
        except (busclient.BusError, BusdError, OSError) as exc:
            raise error_of(exc) from None

    async def offline(self) -> bool:
        """Whether no daemon answers (then the tools route the outboxes themselves)."""
        try:
            await self.call(lambda c: c.ping(), fallback=False)
        except ToolError as exc:
            if exc.code == "daemon_not_running":
                return True
            raise
        return False

    async def route(self) -> None:
        """Without a daemon, one routing pass as ``busd send``/``busd recv`` do, so what
        was written into outboxes reaches the inboxes; a no-op when a daemon holds the
        bus lock or no outbox holds anything."""
        config = self.config

        def run() -> None:
            if _outboxes_empty(config):
                return
            from busd.routing.offline import route_pending

            route_pending(config)

        try:
            await anyio.to_thread.run_sync(run)
        except (BusdError, OSError) as exc:
            raise error_of(exc) from None

    async def status(self, client_fallback: bool = True) -> Result:
        """What ``busd status --json`` prints: the daemon's answer, else the files'."""
        try:
            return await self.call(lambda c: c.status(), fallback=False)
        except ToolError as exc:
            if exc.code != "daemon_not_running" or not client_fallback:
                raise
        from busd.ops.status import report  # the files' report, as `busd status` builds it

        built = await anyio.to_thread.run_sync(report, self.config, None)
        out: Result = msgspec.to_builtins(built)
        return out


def _outboxes_empty(config: Config) -> bool:
    outbox = config.layout.outbox
    try:
        with os.scandir(outbox) as agents:
            dirs = [e.path for e in agents if e.is_dir() and not e.name.startswith(".")]
    except FileNotFoundError:
        return True
    for path in dirs:
        try:
            with os.scandir(path) as it:
                if any(not e.name.startswith(".") for e in it):
                    return False
        except FileNotFoundError:
            continue
    return True


def message_item(
    msg: Mapping[str, Any],
    *,
    receipt: str | None = None,
    delivery_count: int | None = None,
    lease_expires_at: str | None = None,
    include_body: bool = True,
) -> Result:
    """How a tool shows one message: the envelope flat, everything type-specific in
    ``fields``."""
    out: Result = {"message_id": msg.get("message_id")}
    if receipt is not None:
        out["receipt"] = receipt
    out.update(
        {
            "from": msg.get("agent_id"),
            "type": msg.get("message_type"),
            "created_at": msg.get("created_at"),
            "workflow_id": msg.get("workflow_id"),
            "task_id": msg.get("task_id"),
        }
    )
    if delivery_count is not None:
        out["delivery_count"] = delivery_count
    if lease_expires_at is not None:
        out["lease_expires_at"] = lease_expires_at
    if include_body:
        out["body"] = msg.get("body", "")
    out["fields"] = {k: v for k, v in msg.items() if k not in CORE_FIELDS}
    return out
