"""What the daemon has done since it started: totals and per-minute rates.

:meth:`Metrics.count` is the only way anything is counted: every routing
report (commits, deliveries, recovery, lease sweeps, socket refusals that the
router journals) goes through it, so ``status`` totals and ``rates_per_min``
can never disagree about what happened.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from busd.routing.router import RouteReport

__all__ = ["Metrics", "RateTracker"]


class RateTracker:
    """Counts per minute over the last 1 and 15 minutes, in one-second buckets.

    ``add`` runs on the event loop, ``per_minute`` in a worker thread: a lock
    guards the buckets. A rate is the count inside the window divided by the
    window, or by the uptime when that is shorter (at least one minute), so a
    young daemon does not look idle.
    """

    KINDS = ("accepted", "delivered", "dead_lettered")
    WINDOWS = (("1m", 60.0), ("15m", 900.0))

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._buckets: deque[list[float]] = deque()  # [second, accepted, delivered, dead]
        self._lock = threading.Lock()

    def add(self, accepted: int = 0, delivered: int = 0, dead_lettered: int = 0) -> None:
        """Count events that happened now."""
        if not (accepted or delivered or dead_lettered):
            return
        second = float(int(self._clock()))
        with self._lock:
            if not self._buckets or self._buckets[-1][0] != second:
                self._buckets.append([second, 0.0, 0.0, 0.0])
            bucket = self._buckets[-1]
            bucket[1] += accepted
            bucket[2] += delivered
            bucket[3] += dead_lettered
            while self._buckets and self._buckets[0][0] <= second - self.WINDOWS[-1][1]:
                self._buckets.popleft()

    def per_minute(self) -> dict[str, dict[str, float]]:
        """``{"accepted": {"1m": r, "15m": r}, "delivered": ..., "dead_lettered": ...}``."""
        now = self._clock()
        uptime = now - self._started
        with self._lock:
            buckets = list(self._buckets)
        out: dict[str, dict[str, float]] = {kind: {} for kind in self.KINDS}
        for label, window in self.WINDOWS:
            inside = [b for b in buckets if b[0] > now - window]
            minutes = min(window, max(uptime, 60.0)) / 60.0
            for i, kind in enumerate(self.KINDS, start=1):
                out[kind][label] = round(sum(b[i] for b in inside) / minutes, 3)
        return out


class Metrics:
    """Totals and rates of one daemon; :meth:`count` is the only writer."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.rates = RateTracker(clock)
        self._accepted = 0
        self._delivered = 0
        self._duplicates = 0
        self._dead_lettered = 0

    def count(self, report: RouteReport) -> None:
        """Add what one routing step did to the totals and to the rates."""
        self._accepted += report.accepted
        self._delivered += report.delivered
        self._duplicates += report.duplicates
        self._dead_lettered += report.dead_lettered
        self.rates.add(report.accepted, report.delivered, report.dead_lettered)

    @property
    def accepted(self) -> int:
        """Messages accepted (journaled) since start-up."""
        return self._accepted

    def totals(self) -> dict[str, int]:
        """A copy of the totals, in the order ``busd status --json`` prints them."""
        return {
            "accepted": self._accepted,
            "delivered": self._delivered,
            "duplicates": self._duplicates,
            "dead_lettered": self._dead_lettered,
        }

    def per_minute(self) -> dict[str, dict[str, float]]:
        """The rates (safe from a worker thread)."""
        return self.rates.per_minute()
