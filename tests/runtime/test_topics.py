"""Runtime topic subscriptions: persisted durably, in a worker thread, and merged."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from busd.runtime.topics import Topics
from conftest import Bus


def _spy(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, int]]) -> None:
    """Record which thread fsyncs and replaces (the real calls still run)."""
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", threading.get_ident()))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        calls.append(("replace", threading.get_ident()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)


def test_subscribe_writes_durably_off_the_event_loop(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is fsynced and replaced in a worker thread, never on the loop's thread."""
    calls: list[tuple[str, int]] = []

    async def main() -> tuple[int, dict[str, list[str]] | None]:
        topics = Topics(bus.layout)
        await topics.reload(bus.config)
        _spy(monkeypatch, calls)
        with capture_logs() as logs:
            merged = await topics.subscribe("deploys", "bob")
        assert [e["event"] for e in logs] == ["topic_subscribed"]
        return threading.get_ident(), merged

    loop_thread, merged = anyio.run(main)
    assert merged == {"deploys": ["bob"]}
    assert {kind for kind, _ in calls} == {"fsync", "replace"}
    assert all(thread != loop_thread for _, thread in calls), calls
    # It survives: a new process (a new Topics) reads it back.
    assert Topics(bus.layout).load(bus.config) == {"deploys": ["bob"]}
    assert not [p for p in bus.root.iterdir() if p.name.startswith(".")]


def test_subscribe_twice_writes_once_and_merges_with_config(bus: Bus) -> None:
    """A known subscription is not written again; config topics and runtime ones merge."""
    config = bus.with_config(subscriptions={"deploys": ["alice"]})

    async def main() -> None:
        topics = Topics(bus.layout)
        assert await topics.reload(config) == {"deploys": ["alice"]}
        assert await topics.subscribe("deploys", "alice") is None  # from the config
        assert await topics.subscribe("deploys", "bob") == {"deploys": ["alice", "bob"]}
        mtime = topics.path.stat().st_mtime_ns
        assert await topics.subscribe("deploys", "bob") is None
        assert topics.path.stat().st_mtime_ns == mtime

    anyio.run(main)
    assert Topics(bus.layout).load(bus.config) == {"deploys": ["bob"]}


def test_a_broken_file_is_logged_and_ignored(bus: Bus) -> None:
    """A file that does not parse is logged, and subscribing rewrites it whole."""
    bus.layout.subscriptions_file.write_text("{not json")
    topics = Topics(bus.layout)
    with capture_logs() as logs:
        assert topics.load(bus.config) == {}
    assert [e["event"] for e in logs] == ["subscriptions_file_ignored"]
    anyio.run(topics.subscribe, "deploys", "bob")
    assert Topics(bus.layout).load(bus.config) == {"deploys": ["bob"]}
