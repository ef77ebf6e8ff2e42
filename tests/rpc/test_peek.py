"""The ``peek`` socket method against a real daemon: memory queue and inbox files together.

An agent that fetched over the socket is socket-served: its new messages wait in the
daemon's memory with no inbox file. ``peek`` lists them with the inbox files, in the
order ``fetch`` takes them, without claiming anything or making anyone served; and
busclient's ``peek`` asks the daemon first (before, it listed the inbox only and
answered ``[]`` while ``status`` counted the message as ready).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import busclient
from daemon_harness import Daemon, files, message, wait_for


def _ids(summaries: list[dict[str, Any]]) -> list[str]:
    return [s["message_id"] for s in summaries]


def _peek(c: busclient.Client, agent: str = "bob", **params: Any) -> list[dict[str, Any]]:
    """The raw ``peek`` answer's messages."""
    result = c.call("peek", {"agent_id": agent, **params})
    assert isinstance(result, dict) and list(result) == ["messages"]
    messages: list[dict[str, Any]] = result["messages"]
    return messages


def _files_then_memory(c: busclient.Client, root: Path) -> None:
    """m1..m3 as bob's inbox files; m1 claimed (bob is served from then on); m4, m5 in
    memory. Leaves m2, m3 as files and m4, m5 in memory, m1 in flight."""
    c.send_batch([message(i) for i in (1, 2, 3)])
    wait_for(lambda: len(files(root / "inbox" / "bob")) == 3, what="3 inbox files")
    [first] = c.fetch("bob", max=1)
    assert first.message_id == "m-000001"
    c.send_batch([message(i) for i in (4, 5)])


@pytest.mark.timeout(60)
def test_a_socket_served_agent_s_memory_messages_are_listed(root: Path, daemon: Daemon) -> None:
    """The reproduction: fetch (bob is served), then a fact to bob: it waits in memory."""
    with busclient.Client(root) as c:
        assert c.fetch("bob", max=1, wait_s=0.1) == []
        c.send(message(1))
        expected = {
            "message_id": "m-000001",
            "from": "alice",
            "type": "fact",
            "created_at": "2026-11-21T12:00:00Z",
            "delivery_count": 0,
            "workflow_id": "w1",
            "task_id": "t1",
        }
        assert c.peek("bob", 10) == [expected]
        assert _peek(c) == [expected]
        assert files(root / "inbox" / "bob") == []  # memory only: no file to list
        wait_for(lambda: c.status()["agents"]["bob"]["ready"] == 1, what="status: 1 ready")

    async def via_async() -> list[dict[str, Any]]:
        async with busclient.AsyncClient(root) as ac:
            return await ac.peek("bob", 10)

    assert asyncio.run(via_async()) == [expected]


@pytest.mark.timeout(60)
def test_files_and_memory_are_listed_in_fetch_order_and_max_is_honoured(
    root: Path, daemon: Daemon
) -> None:
    with busclient.Client(root) as c:
        _files_then_memory(c, root)
        names = [p.name for p in files(root / "inbox" / "bob")]
        assert len(names) == 2  # m2, m3; m4, m5 have no file
        assert _ids(c.peek("bob")) == ["m-000002", "m-000003", "m-000004", "m-000005"]
        assert _ids(_peek(c, max=3)) == ["m-000002", "m-000003", "m-000004"]
        assert _ids(_peek(c, max=1)) == ["m-000002"]
        assert _ids(c.peek("bob", 2)) == ["m-000002", "m-000003"]
        # A memory claim leaves the listing too; what is left is what fetch takes next.
        taken = c.fetch("bob", max=3)
        assert [d.message_id for d in taken] == ["m-000002", "m-000003", "m-000004"]
        assert _ids(c.peek("bob")) == ["m-000005"]
        c.nack("bob", receipt=taken[2].receipt)  # m4 back in memory, its count kept
        listed = c.peek("bob")
        assert _ids(listed) == ["m-000004", "m-000005"]
        assert [s["delivery_count"] for s in listed] == [1, 0]


@pytest.mark.timeout(60)
def test_peeking_claims_nothing_and_serves_no_one(root: Path, daemon: Daemon) -> None:
    with busclient.Client(root) as c:
        _files_then_memory(c, root)
        for _ in range(5):
            assert len(c.peek("bob")) == 4
        # carol never fetched: peeking at her neither serves her nor creates anything.
        assert c.peek("carol") == [] and not (root / "inbox" / "carol").exists()
        c.send(message(6, to="carol"))
        wait_for(lambda: files(root / "inbox" / "carol"), what="carol's inbox file")
        assert _ids(c.peek("carol")) == ["m-000006"]
        got = c.fetch("bob", max=10)
        assert [d.message_id for d in got] == ["m-000002", "m-000003", "m-000004", "m-000005"]
        assert [d.delivery_count for d in got] == [1, 1, 1, 1]
        assert c.peek("bob") == []


@pytest.mark.timeout(60)
def test_the_daemon_s_summaries_are_the_file_listing_s(root: Path) -> None:
    """Both paths agree: what the daemon shows of memory messages is what busclient shows
    of the same messages once a graceful stop has written them out as files."""
    daemon = Daemon(root).ready()
    try:
        with busclient.Client(root) as c:
            _files_then_memory(c, root)
            c.send(message(7, workflow_id="w2", task_id="t9", agent_id="dave"))
            live = c.peek("bob")
            assert _ids(live) == [f"m-00000{i}" for i in (2, 3, 4, 5, 7)]
            assert live[-1]["from"] == "dave" and live[-1]["task_id"] == "t9"
    finally:
        assert daemon.stop() == 0
    with busclient.Client(root) as c:
        offline = c.peek("bob")  # no daemon: the inbox files
    assert offline == live


@pytest.mark.timeout(60)
def test_an_invalid_agent_or_max_is_refused(root: Path, daemon: Daemon) -> None:
    with busclient.Client(root) as c:
        for bad in ("../etc", "a/b", "-x", "con"):
            with pytest.raises(busclient.InvalidName) as caught:
                c.call("peek", {"agent_id": bad})
            assert caught.value.code == -32602 and caught.value.reason == "invalid_name"
            with pytest.raises(busclient.InvalidName):
                c.peek(bad)
        for params in ({"max": 0}, {"max": 1001}, {"max": "3"}, {"wait_s": 1}):
            with pytest.raises(busclient.InvalidRequest) as refused:
                c.call("peek", {"agent_id": "bob", **params})
            assert refused.value.reason == "invalid_params"
