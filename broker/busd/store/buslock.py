"""The bus lock, ``<root>/busd.lock``: whoever holds it is the one router of a bus.

The daemon holds it for its whole life; the daemon-less CLI holds it for one
routing pass. The holder writes ``{"pid", "role", "since"}`` into the file so
that a refused process can name who is running. The lock is an OS file lock
(portalocker), so it dies with its process: a SIGKILLed daemon never leaves a
lock that blocks the next start.
"""

from __future__ import annotations

import json
import os
import time
from typing import IO, Any, Literal

import portalocker

from busd.store.layout import Layout

__all__ = ["BusLock", "Role"]

Role = Literal["daemon", "cli"]


class BusLock:
    """An exclusive, non-reentrant lock on ``<root>/busd.lock``."""

    def __init__(self, layout: Layout, role: Role) -> None:
        self.path = layout.lock_file
        self.role = role
        self._fh: IO[str] | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fh is not None

    def acquire(self, timeout: float = 0.0, poll: float = 0.02) -> bool:
        """Try to take the lock for up to ``timeout`` seconds; return whether we hold it."""
        fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open while locked
        deadline = time.monotonic() + timeout
        while True:
            try:
                portalocker.lock(
                    fh, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING
                )
                break
            except portalocker.exceptions.LockException:
                if time.monotonic() >= deadline:
                    fh.close()
                    return False
                time.sleep(poll)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "role": self.role, "since": time.time()}))
        fh.flush()
        self._fh = fh
        return True

    def release(self) -> None:
        """Release the lock (idempotent). The file stays; its content goes stale."""
        if self._fh is None:
            return
        try:
            portalocker.unlock(self._fh)
        finally:
            self._fh.close()
            self._fh = None

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
