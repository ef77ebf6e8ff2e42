"""Every error busd raises, each with a stable ``code``.

Contract: code below the CLI raises only subclasses of :class:`BusdError`
(or lets an ``OSError`` it cannot explain propagate). The CLI maps them to
messages and exit codes; the socket server maps ``code`` to JSON-RPC errors.
Codes are public: scripts match on them, so they never change meaning.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

__all__ = [
    "AlreadyRunning",
    "BusdError",
    "ConfigError",
    "DaemonNotRunning",
    "Forbidden",
    "InvalidMessage",
    "InvalidName",
    "LockTimeout",
    "NotFound",
    "Overloaded",
    "Reason",
    "RemoteError",
    "RpcTimeout",
    "ShuttingDown",
    "StaleReceipt",
    "StorageError",
    "Unroutable",
]


class Reason(enum.StrEnum):
    """Why a message is in the dead-letter queue (the ``reason`` of a reason record)."""

    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    SCHEMA = "schema"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    TOO_LARGE = "too_large"
    NOT_A_REGULAR_FILE = "not_a_regular_file"
    UNROUTABLE = "unroutable"
    DELIVERY_LIMIT = "delivery_limit"
    REJECTED = "rejected"
    UNREADABLE = "unreadable"
    BRIDGE_DELIVERY_LIMIT = "bridge_delivery_limit"
    MULTIPLE_MESSAGES = "multiple_messages"


class BusdError(Exception):
    """Base class: ``code`` is stable, ``str(err)`` is for humans.

    ``rpc_code`` is the JSON-RPC error code the socket API answers with; the
    error's ``code`` travels as ``error.data.reason``.
    """

    code: ClassVar[str] = "busd_error"
    rpc_code: ClassVar[int] = -32000

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context: dict[str, Any] = context

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description: ``code``, ``message`` and any context."""
        return {"code": self.code, "message": self.message, **self.context}


class ConfigError(BusdError):
    """A config key, environment variable or flag has a bad name or value."""

    code = "config_error"
    rpc_code = -32009


class LockTimeout(BusdError):
    """An exclusive file lock was not acquired within its timeout."""

    code = "lock_timeout"
    rpc_code = -32005


class InvalidName(BusdError):
    """An agent id, topic or file name is not safe to use as a path component."""

    code = "invalid_name"
    rpc_code = -32602


class NotFound(BusdError):
    """A named message, claim or DLQ entry does not exist."""

    code = "not_found"
    rpc_code = -32004


class AlreadyRunning(BusdError):
    """Another daemon holds the bus lock; ``pid`` names it when known."""

    code = "already_running"
    rpc_code = -32010

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message, pid=pid)
        self.pid = pid


class StorageError(BusdError):
    """The filesystem refused a write busd needs (disk full, read-only, permissions)."""

    code = "storage_error"
    rpc_code = -32006


class InvalidMessage(BusdError):
    """A message failed to decode or validate.

    ``reason`` is the DLQ reason code; ``detail`` is human-readable and names
    the field path (for example ``$.status``) when one is known.
    """

    code = "invalid_message"
    rpc_code = -32602

    def __init__(self, reason: Reason, detail: str, path: str | None = None) -> None:
        where = f" (at {path})" if path and path not in detail else ""
        super().__init__(f"{reason.value}: {detail}{where}", reason=reason.value, path=path)
        self.reason = reason
        self.detail = detail
        self.path = path


class Unroutable(BusdError):
    """A valid message has no recipient busd may deliver to (DLQ reason ``unroutable``)."""

    code = "unroutable"
    rpc_code = -32007


class Overloaded(BusdError):
    """A limit was reached (connections, request size); retry later or send less."""

    code = "overloaded"
    rpc_code = -32008


class Forbidden(BusdError):
    """The peer's uid/gid is not allowed to use this bus."""

    code = "forbidden"
    rpc_code = -32003


class ShuttingDown(BusdError):
    """The daemon is stopping and takes no new work."""

    code = "shutting_down"
    rpc_code = -32011


class StaleReceipt(BusdError):
    """A receipt names a delivery that is no longer the current claim of its message.

    The lease of that delivery expired and the message was handed out again (a
    newer receipt now names it), or the delivery was released back to the queue.
    Nothing was settled, released or extended: a stale receipt never touches the
    newer claim. ``receipts`` (in ``context``, hence in the socket answer's
    ``data``) lists the stale receipts of the call.
    """

    code = "stale_receipt"
    rpc_code = -32012

    @property
    def receipts(self) -> list[str]:
        """The stale receipts of the refused call."""
        return [str(r) for r in self.context.get("receipts") or ()]


class DaemonNotRunning(BusdError):
    """Raised by the socket client: nothing listens on the bus's socket (no daemon runs,
    or it is starting). Callers with a file fallback use it to fall back."""

    code = "daemon_not_running"


class RpcTimeout(BusdError):
    """Raised by the socket client: the daemon accepted the connection but did not answer
    in time."""

    code = "timeout"


class RemoteError(BusdError):
    """Raised by the socket client for an error answer whose code it does not know;
    ``context`` holds the answer's details."""

    code = "remote_error"
