"""Inbox notifications: ``notifications/resources/updated`` for ``busd://inbox/{agent}``.

Contracts:

* Coalesced: at most one notification is pending per inbox. Once one is sent
  for an agent, none follows until that agent fetches (``bus_fetch``); then, if
  messages still wait, the next poll sends one again. A burst of 50 messages is
  one notification.
* A notification is only a cue. Nothing is claimed or settled here: the
  message stays claimable until it is acked, and a lost notification loses no
  message (the next fetch finds it).
* Both spec generations the SDK serves: sessions that called
  ``resources/subscribe`` (2025-era, sent on the connection's standalone
  channel) and ``subscriptions/listen`` streams that asked for the inbox URI
  (2026-07-28, through the SDK's subscription bus).
* What waits is read from the bus (the daemon's ``status``, else the files) by
  one poller task, only while someone is subscribed; nothing is kept that a
  restart would need.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import structlog
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated

__all__ = ["INBOX_PREFIX", "Inboxes", "inbox_agent", "inbox_uri"]

INBOX_PREFIX = "busd://inbox/"
_log = structlog.get_logger("busd.mcp")


def inbox_uri(agent: str) -> str:
    """The inbox resource of ``agent``."""
    return f"{INBOX_PREFIX}{agent}"


def inbox_agent(uri: str) -> str | None:
    """The agent an inbox URI names, None for any other URI."""
    if uri.startswith(INBOX_PREFIX) and len(uri) > len(INBOX_PREFIX):
        return uri[len(INBOX_PREFIX) :]
    return None


class Inboxes:
    """Who watches which inbox, and the one pending notification per inbox."""

    def __init__(
        self, waiting: Callable[[list[str]], Awaitable[dict[str, int]]], interval: float = 0.25
    ) -> None:
        self._waiting = waiting
        self._interval = interval
        self._sessions: dict[str, list[ServerSession]] = {}
        self._listening: Counter[str] = Counter()
        self._pending: set[str] = set()
        self._fetches: Counter[str] = Counter()  # a poll begun before a fetch is stale
        self._wake = anyio.Event()
        self.bus = InMemorySubscriptionBus()
        """Where ``subscriptions/listen`` streams take their events from."""
        self.sent = 0
        """Notifications sent so far (each counted once, whatever the number of receivers)."""

    def watched(self) -> list[str]:
        return sorted(set(self._sessions) | {a for a, n in self._listening.items() if n > 0})

    def subscribe(self, agent: str, session: ServerSession) -> None:
        """A 2025-era session subscribed to ``agent``'s inbox."""
        sessions = self._sessions.setdefault(agent, [])
        if session not in sessions:
            sessions.append(session)
        self._wake.set()

    def unsubscribe(self, agent: str, session: ServerSession | None = None) -> None:
        sessions = self._sessions.get(agent, [])
        if session is None:
            sessions.clear()
        elif session in sessions:
            sessions.remove(session)
        if not sessions:
            self._sessions.pop(agent, None)

    @contextlib.contextmanager
    def listening(self, agents: list[str]) -> Iterator[None]:
        """A ``subscriptions/listen`` stream watches ``agents``' inboxes while inside."""
        self._listening.update(agents)
        self._wake.set()
        try:
            yield
        finally:
            self._listening.subtract(agents)

    def fetched(self, agent: str) -> None:
        """``agent`` fetched: its next arrival may be announced again."""
        self._pending.discard(agent)
        self._fetches[agent] += 1

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Poll the watched inboxes until cancelled."""
        task_status.started()
        while True:
            agents = self.watched()
            if not agents:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            before = {a: self._fetches[a] for a in agents}
            try:
                counts = await self._waiting(agents)
            except Exception as exc:  # noqa: BLE001 - a poll that fails is retried; the bus stays the truth
                _log.warning("mcp_inbox_poll_failed", error=str(exc))
                counts = {}
            for agent in agents:
                if self._fetches[agent] != before[agent]:
                    continue  # counted before that fetch took them: ask again
                if counts.get(agent, 0) > 0 and agent not in self._pending:
                    self._pending.add(agent)
                    await self._notify(agent)
            await anyio.sleep(self._interval)

    async def _notify(self, agent: str) -> None:
        uri = inbox_uri(agent)
        self.sent += 1
        for session in list(self._sessions.get(agent, [])):
            try:
                await session.send_resource_updated(uri)
            except Exception as exc:  # noqa: BLE001 - that client is gone: forget it, keep the others
                _log.info("mcp_subscriber_gone", agent=agent, error=str(exc))
                self.unsubscribe(agent, session)
        if self._listening.get(agent, 0) > 0:
            await self.bus.publish(ResourceUpdated(uri=uri))
