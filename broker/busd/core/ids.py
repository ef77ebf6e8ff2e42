"""Message ids and arrival keys.

Message ids follow the message-bus seed format::

    MSG-YYYYMMDD-HHMMSS-NNNNNNNNN-PIDXXXXX-SSSS

UTC date and time, nanoseconds within the second, a five-character process
field and a four-digit per-process counter. Ids sort by creation time.

Uniqueness contract:

* Within a process, ``(nanoseconds, counter)`` strictly increases: when the clock
  stands still or steps back the generator reuses the last tick and bumps the
  counter, and when the counter would wrap inside one tick the tick advances by
  one nanosecond. So one process never repeats an id, even across clock jumps.
* Across live processes the five-character process field is injective over every
  pid Linux can hand out (``pid_max`` <= 2**22): pids below 100000 print as five
  decimal digits, exactly as the seed does, and larger pids print as a letter
  followed by four base-36 digits, which no decimal field can equal. Two live
  processes therefore never share the field, even when their pids are equal
  modulo 100000.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["ArrivalClock", "IdGenerator", "new_message_id", "pid_field"]

_B36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_COUNTER_LIMIT = 10_000
_SECOND_NS = 1_000_000_000


def pid_field(pid: int) -> str:
    """Return the five-character process field for ``pid`` (injective, see module doc)."""
    if pid < 100_000:
        return f"{pid:05d}"
    n = pid - 100_000
    lead, rest = divmod(n, 36**4)
    if lead >= 26:
        # Only reachable on platforms with pids above ~43.7 million (Windows);
        # wrap rather than fail: ids then rely on time + counter alone.
        lead %= 26
    digits = []
    for _ in range(4):
        rest, d = divmod(rest, 36)
        digits.append(_B36[d])
    return chr(ord("A") + lead) + "".join(reversed(digits))


class IdGenerator:
    """Thread-safe generator of seed-format message ids.

    ``clock`` (nanoseconds since the epoch) and ``pid`` are injectable so tests
    can freeze time or force pid collisions; by default the real clock and the
    current pid (refreshed after ``fork``) are used.
    """

    def __init__(self, *, clock: Callable[[], int] = time.time_ns, pid: int | None = None) -> None:
        self._clock = clock
        self._fixed_pid = pid
        self._pid = pid_field(os.getpid() if pid is None else pid)
        self._lock = threading.Lock()
        self._tick = 0
        self._counter = -1

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        if self._fixed_pid is None:
            self._pid = pid_field(os.getpid())

    def next(self) -> str:
        """Return a new id, unique within this process and across live processes."""
        with self._lock:
            now = self._clock()
            if now > self._tick:
                self._tick = now
                self._counter = 0
            else:
                self._counter += 1
                if self._counter >= _COUNTER_LIMIT:
                    self._tick += 1
                    self._counter = 0
            tick, counter, pid = self._tick, self._counter, self._pid
        secs, frac = divmod(tick, _SECOND_NS)
        stamp = datetime.fromtimestamp(secs, UTC).strftime("%Y%m%d-%H%M%S")
        return f"MSG-{stamp}-{frac:09d}-PID{pid}-{counter:04d}"


class ArrivalClock:
    """Strictly increasing nanosecond keys for delivery file names.

    Keys are 20-digit decimal strings, so the lexical order of names is the
    order in which one router delivered them, even if the wall clock steps back.
    """

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> str:
        """Return the next key: ``max(now, last + 1)`` as 20 digits."""
        with self._lock:
            self._last = max(self._clock(), self._last + 1)
            return f"{self._last:020d}"


_default = IdGenerator()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_default._after_fork)


def new_message_id() -> str:
    """Return a fresh message id from the process-wide generator."""
    return _default.next()
