"""The bus lock, ``<root>/busd.lock``: whoever holds it is the one router of a bus.

The daemon holds it for its whole life; the daemon-less CLI holds it for one
routing pass. The holder writes ``{"pid", "role", "since"}`` into the file so
that a refused process can name who is running. The lock is an OS file lock
(:func:`~busd.store.fsio.file_lock`), so it dies with its process: a SIGKILLed
daemon never leaves a lock that blocks the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Literal

from busd.errors import LockTimeout
from busd.store.fsio import file_lock
from busd.store.layout import Layout

__all__ = ["BusLock", "Role"]

Role = Literal["daemon", "cli"]


class BusLock:
    """An exclusive, non-reentrant lock on ``<root>/busd.lock``, held with ``file_lock``."""

    def __init__(self, layout: Layout, role: Role) -> None:
        self.path = layout.bus_lock
        self.role = role
        self._held: contextlib.ExitStack | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._held is not None

    def acquire(self, timeout: float = 0.0) -> bool:
        """Try to take the lock for up to ``timeout`` seconds; return whether we hold it.

        Once held, the file's content is replaced by ``{"pid", "role", "since"}``
        (one JSON object, no newline, protocol.md 9).
        """
        stack = contextlib.ExitStack()
        try:
            fh = stack.enter_context(file_lock(self.path, timeout=timeout, what="the bus lock"))
        except LockTimeout:
            return False
        try:
            fh.truncate(0)
            fh.seek(0)
            info = {"pid": os.getpid(), "role": self.role, "since": time.time()}
            fh.write(json.dumps(info).encode())
        except BaseException:
            stack.close()
            raise
        self._held = stack
        return True

    def release(self) -> None:
        """Release the lock (idempotent). The file stays; its content goes stale."""
        held, self._held = self._held, None
        if held is not None:
            held.close()

    def holder(self) -> dict[str, Any] | None:
        """What the current or last holder wrote, or None if unknown."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "null")
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def is_held_elsewhere(self) -> bool:
        """True when another process holds the lock right now."""
        if self.held:
            return False
        if not self.acquire(timeout=0):
            return True
        self.release()
        return False
