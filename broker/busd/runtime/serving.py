"""The served rule, and the Broker methods socket consumers use on the daemon.

:class:`Serving` decides who is *socket-served*: an agent with a subscriber, or
one that fetched over the socket within the last ``serve_grace_seconds``. Its
messages stay in the daemon's memory (:mod:`busd.runtime.memory`) with no inbox
file; every other agent gets files. :meth:`Serving.served` is also called from
the delivery lane's worker thread: it only reads two dicts, whose entries the
loop replaces atomically.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

__all__ = ["Serving"]


class Serving:
    """Who is socket-served: subscribers (counted per agent) and recent fetches."""

    def __init__(self, grace_s: Callable[[], float]) -> None:
        self._grace_s = grace_s
        self._subscribers: Counter[str] = Counter()
        self._fetched: dict[str, float] = {}

    def attach(self, agent: str) -> None:
        """A subscriber of ``agent`` arrived."""
        self._subscribers[agent] += 1

    def detach(self, agent: str) -> None:
        """A subscriber of ``agent`` left."""
        self._subscribers[agent] -= 1
        if self._subscribers[agent] <= 0:
            del self._subscribers[agent]

    def touch(self, agent: str) -> None:
        """``agent`` fetched over the socket now."""
        self._fetched[agent] = time.monotonic()

    def connections(self, agent: str) -> int:
        """Subscribers of ``agent`` now."""
        return self._subscribers.get(agent, 0)

    def served(self, agent: str) -> bool:
        """Whether ``agent`` is socket-served (the rule in the module docstring)."""
        if self._subscribers.get(agent, 0) > 0:
            return True
        at = self._fetched.get(agent)
        return at is not None and time.monotonic() - at <= self._grace_s()

    def agents(self) -> set[str]:
        """Agents with a subscriber or a fetch on record."""
        return set(self._subscribers) | set(self._fetched)
