"""Topic subscriptions: the config's, plus those added at run time over the socket.

Runtime subscriptions are kept in ``<root>/subscriptions.json`` (protocol.md
§11), ``{"topic": ["agent", ...]}``, so they outlive the daemon. The file is
replaced durably (temp file, fsync, rename, fsync of the root; no fsyncs with
``fsync = false``) in a worker thread: a subscription that was answered
survives a power cut, and the event loop never waits on the disk. A file
that does not parse, or names that break the name rule, are logged and
skipped, never fatal.

Not safe for concurrent calls: the daemon serializes them (subscribe, reload).
The Router gets the merged mapping only through ``Router.reconfigure``, inside
the commit lane (:meth:`busd.runtime.committer.Committer.reconfigure`).
"""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import structlog

from busd.config import Config
from busd.core.model import check_agent_name
from busd.errors import InvalidName
from busd.store.fsio import replace_durable
from busd.store.layout import Layout

__all__ = ["Topics"]

_log = structlog.get_logger("busd.daemon")


class Topics:
    """Topic -> agents for one bus: the config's merged with the persisted runtime ones."""

    def __init__(self, layout: Layout) -> None:
        self.path: Path = layout.subscriptions_file
        self._merged: dict[str, list[str]] = {}
        self._fsync = True

    def merged(self) -> dict[str, list[str]]:
        """A copy of the mapping last loaded or changed."""
        return {topic: list(agents) for topic, agents in self._merged.items()}

    def load(self, config: Config) -> dict[str, list[str]]:
        """Merge ``config.subscriptions`` with the file (blocking: call from a thread)."""
        self._fsync = config.fsync
        merged = {topic: list(agents) for topic, agents in config.subscriptions.items()}
        for topic, agents in self._runtime().items():
            merged[topic] = list(dict.fromkeys([*merged.get(topic, []), *agents]))
        self._merged = merged
        return self.merged()

    async def reload(self, config: Config) -> dict[str, list[str]]:
        """:meth:`load` in a worker thread."""
        return await anyio.to_thread.run_sync(self.load, config)

    async def subscribe(self, topic: str, agent: str) -> dict[str, list[str]] | None:
        """Add ``agent`` to ``topic`` and persist it; the new mapping, or None if known.

        The names are checked first (:class:`InvalidName`). The file is written
        in a worker thread, durably, before the new mapping is returned.
        """
        check_agent_name(topic, "topic")
        check_agent_name(agent)
        if agent in self._merged.get(topic, ()):
            return None
        await anyio.to_thread.run_sync(self._persist, topic, agent)
        self._merged.setdefault(topic, []).append(agent)
        _log.info("topic_subscribed", topic=topic, agent=agent)
        return self.merged()

    def _persist(self, topic: str, agent: str) -> None:
        runtime = self._runtime()
        agents = runtime.setdefault(topic, [])
        if agent not in agents:
            agents.append(agent)
        replace_durable(self.path, msgspec.json.encode(runtime), fsync=self._fsync)

    def _runtime(self) -> dict[str, list[str]]:
        try:
            data = msgspec.json.decode(self.path.read_bytes(), type=dict[str, list[str]])
        except FileNotFoundError:
            return {}
        except msgspec.DecodeError as exc:
            _log.error("subscriptions_file_ignored", path=str(self.path), error=str(exc))
            return {}
        clean: dict[str, list[str]] = {}
        for topic, agents in data.items():
            try:
                check_agent_name(topic, "topic")
                clean[topic] = [check_agent_name(a) for a in agents]
            except InvalidName as exc:
                _log.error("subscription_ignored", topic=topic, error=exc.message)
        return clean
