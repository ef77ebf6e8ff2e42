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
    "InvalidMessage",
    "InvalidName",
    "LockTimeout",
    "NotFound",
    "Reason",
    "StorageError",
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


class BusdError(Exception):
    """Base class: ``code`` is stable, ``str(err)`` is for humans."""

    code: ClassVar[str] = "busd_error"

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


class LockTimeout(BusdError):
    """An exclusive file lock was not acquired within its timeout."""

    code = "lock_timeout"


class InvalidName(BusdError):
    """An agent id, topic or file name is not safe to use as a path component."""

    code = "invalid_name"


class NotFound(BusdError):
    """A named message, claim or DLQ entry does not exist."""

    code = "not_found"


class AlreadyRunning(BusdError):
    """Another daemon holds the bus lock; ``pid`` names it when known."""

    code = "already_running"

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message, pid=pid)
        self.pid = pid


class StorageError(BusdError):
    """The filesystem refused a write busd needs (disk full, read-only, permissions)."""

    code = "storage_error"


class InvalidMessage(BusdError):
    """A message failed to decode or validate.

    ``reason`` is the DLQ reason code; ``detail`` is human-readable and names
    the field path (for example ``$.status``) when one is known.
    """

    code = "invalid_message"

    def __init__(self, reason: Reason, detail: str, path: str | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}", reason=reason.value, path=path)
        self.reason = reason
        self.detail = detail
        self.path = path
