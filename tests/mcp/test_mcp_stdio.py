"""``busd mcp`` over stdio, driven by the MCP SDK's own client, against real daemons.

Each agent is a ``busd mcp --agent NAME`` subprocess; the daemon is a real ``busd
run`` (tests/daemon_harness.py), or absent for the file-protocol cases.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.session import IncomingMessage, MessageHandlerFnT

import busclient
from daemon_harness import Daemon, files, journal_ids

BUSD = str(Path(sys.executable).with_name("busd"))


@asynccontextmanager
async def agent(
    root: Path,
    name: str,
    *extra: str,
    mode: str = "legacy",
    handler: MessageHandlerFnT | None = None,
) -> AsyncIterator[Client]:
    """An MCP client connected to a fresh ``busd mcp --agent NAME`` subprocess."""
    params = StdioServerParameters(
        command=BUSD, args=["mcp", "--agent", name, "--root", str(root), *extra]
    )
    async with Client(params, mode=mode, message_handler=handler, read_timeout_seconds=30) as c:
        yield c


async def call(c: Client, tool: str, **args: Any) -> dict[str, Any]:
    """A tool call that must succeed; its structured content."""
    r = await c.call_tool(tool, args)
    assert not r.is_error, r.structured_content
    assert isinstance(r.structured_content, dict)
    # The text block carries the same JSON, for clients that read only text.
    first = r.content[0]
    assert isinstance(first, types.TextContent)
    assert json.loads(first.text) == r.structured_content
    return r.structured_content


async def refused(c: Client, tool: str, **args: Any) -> dict[str, Any]:
    """A tool call that must be a tool error; its ``error`` object."""
    r = await c.call_tool(tool, args)
    assert r.is_error, r.structured_content
    assert isinstance(r.structured_content, dict)
    error: dict[str, Any] = r.structured_content["error"]
    assert error["code"] and error["message"]
    return error


def _dlq_records(root: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((root / "dlq").glob("*.reason.json"))]


async def _exchange(alice: Client, bob: Client, wf: str, via: str) -> None:
    """alice assigns a task to bob; bob replies task_complete and acks; alice acks."""
    sent = await call(
        alice,
        "bus_send",
        to="bob",
        body="build the release",
        type="task_assignment",
        workflow_id=wf,
        task_id="build",
        fields={"priority": "high", "inputs": {"ref": "v1"}},
    )
    assert sent["via"] == via and sent["duplicate"] is False
    got = await call(bob, "bus_fetch", max=10, wait_s=10)
    assert got["count"] == 1, got
    task = got["messages"][0]
    assert task["message_id"] == sent["message_id"]
    assert task["from"] == "alice" and task["type"] == "task_assignment"
    assert task["fields"]["priority"] == "high" and task["fields"]["inputs"] == {"ref": "v1"}
    assert task["delivery_count"] == 1 and task["receipt"] and task["body"] == "build the release"
    reply = await call(
        bob,
        "bus_reply",
        message_id=task["message_id"],
        body="done",
        type="task_complete",
        fields={"status": "completed", "results": {"artifact": "app.tgz"}},
    )
    acked = await call(bob, "bus_ack", receipts=[task["receipt"]])
    assert acked == {"acked": 1, "settled": [task["receipt"]], "not_held": []}
    back = await call(alice, "bus_fetch", wait_s=10)
    assert back["count"] == 1, back
    done = back["messages"][0]
    assert done["message_id"] == reply["message_id"] and done["type"] == "task_complete"
    assert done["fields"]["parents"] == [task["message_id"]]
    assert done["fields"]["status"] == "completed"
    assert (done["workflow_id"], done["task_id"]) == (wf, "build")
    # An ack never reports a silent 0: what was not held is named.
    acked = await call(alice, "bus_ack", message_ids=[done["message_id"], "no-such-message"])
    assert acked["acked"] == 1 and acked["not_held"] == ["no-such-message"]


@pytest.mark.timeout(90)
def test_two_agents_exchange_a_task_through_the_daemon(root: Path, daemon: Daemon) -> None:
    """task_assignment then task_complete, socket all the way; thread and status answer."""

    async def main() -> None:
        async with agent(root, "alice") as alice, agent(root, "bob") as bob:
            await _exchange(alice, bob, "release-1", "socket")
            thread = await call(bob, "bus_thread", workflow_id="release-1")
            types_seen = [m["type"] for m in thread["messages"]]
            assert types_seen == ["task_assignment", "task_complete"]
            assert thread["truncated"] is False
            status = await call(bob, "bus_status")
            assert status["agent"] == "bob" and status["daemon"]["running"] is True
            assert status["queue"]["ready"] == 0 and "healthy" in status
            empty = await call(bob, "bus_fetch")
            assert empty == {"messages": [], "count": 0}

    anyio.run(main)


@pytest.mark.timeout(90)
def test_nack_redelivers_and_a_stale_receipt_is_refused(root: Path, daemon: Daemon) -> None:
    async def main() -> None:
        async with agent(root, "alice") as alice, agent(root, "bob") as bob:
            await call(alice, "bus_send", to="bob", body="flaky job")
            first = (await call(bob, "bus_fetch", wait_s=10))["messages"][0]
            peek = await call(bob, "bus_peek")
            assert peek["in_flight"] == 1 and peek["ready"] == 0
            await call(bob, "bus_nack", receipt=first["receipt"], reason="try later")
            again = (await call(bob, "bus_fetch", wait_s=10))["messages"][0]
            assert again["message_id"] == first["message_id"]
            assert again["delivery_count"] == 2 and again["receipt"] != first["receipt"]
            error = await refused(bob, "bus_ack", receipts=[first["receipt"]])
            assert error["code"] == "stale_receipt"
            assert error["receipts"] == [first["receipt"]]
            assert "bus_fetch" in error["message"]
            extended = await call(bob, "bus_extend", receipt=again["receipt"], lease_s=600)
            assert extended["lease_expires_at"] > again["lease_expires_at"]
            acked = await call(bob, "bus_ack", receipts=[again["receipt"]])
            assert acked["acked"] == 1
            error = await refused(bob, "bus_nack", receipt=again["receipt"])
            assert error["code"] == "not_found"

    anyio.run(main)


@pytest.mark.timeout(90)
def test_an_invalid_message_is_answered_with_its_path_and_dead_lettered(
    root: Path, daemon: Daemon
) -> None:
    async def main() -> None:
        async with agent(root, "alice") as alice:
            # task_complete needs `status`: the daemon refuses it and keeps the bytes.
            error = await refused(alice, "bus_send", to="bob", body="x", type="task_complete")
            assert error["code"] == "invalid_message"
            assert error["path"] == "$.status" and error["reason"] == "schema"
            records = _dlq_records(root)
            assert [r["reason"] for r in records] == ["schema"]
            # Arguments are checked before anything is sent, with their path too.
            error = await refused(alice, "bus_fetch", max="ten")
            assert error == {
                "code": "invalid_params",
                "message": "$.max must be integer",
                "path": "$.max",
            }
            error = await refused(alice, "bus_send", to="bob", body="x", fields={"agent_id": "eve"})
            assert error["code"] == "invalid_params" and error["path"] == "$.fields.agent_id"
            error = await refused(alice, "bus_nack")
            assert error["code"] == "invalid_params"
            assert len(_dlq_records(root)) == 1

    anyio.run(main)


@pytest.mark.timeout(90)
def test_bus_reject_dead_letters_with_reason_rejected(root: Path, daemon: Daemon) -> None:
    async def main() -> None:
        async with agent(root, "alice") as alice, agent(root, "bob") as bob:
            sent = await call(alice, "bus_send", to="bob", body="rm -rf /")
            got = (await call(bob, "bus_fetch", wait_s=10))["messages"][0]
            done = await call(bob, "bus_reject", receipt=got["receipt"], reason="unsafe")
            assert done["reason"] == "rejected"
            [record] = _dlq_records(root)
            assert record["reason"] == "rejected" and record["detail"] == "unsafe"
            assert record["message_id"] == sent["message_id"] and record["recipient"] == "bob"
            data = json.loads((root / "dlq" / done["dlq_entry"]).read_bytes())
            assert data["body"] == "rm -rf /"
            assert (await call(bob, "bus_fetch"))["count"] == 0

    anyio.run(main)


@pytest.mark.timeout(120)
def test_the_same_flow_through_the_files_then_the_daemon(root: Path) -> None:
    """No daemon: the tools use the file protocol; then a daemon starts and takes over."""

    async def main() -> None:
        async with agent(root, "alice") as alice, agent(root, "bob") as bob:
            await _exchange(alice, bob, "offline-1", "file")
            status = await call(bob, "bus_status")
            assert status["daemon"]["running"] is False
            thread = await call(alice, "bus_thread", workflow_id="offline-1", limit=1)
            assert [m["type"] for m in thread["messages"]] == ["task_complete"]
            assert thread["truncated"] is True
            # A reject through the files: data then record, reason rejected.
            await call(alice, "bus_send", to="bob", body="bad")
            got = (await call(bob, "bus_fetch", wait_s=5))["messages"][0]
            done = await call(bob, "bus_reject", receipt=got["receipt"], reason="nope")
            [record] = _dlq_records(root)
            assert (record["reason"], record["detail"]) == ("rejected", "nope")
            assert record["recipient"] == "bob" and record["delivery_count"] == 1
            assert json.loads((root / "dlq" / done["dlq_entry"]).read_bytes())["body"] == "bad"
            assert files(root / "locks" / "bob") == []
            # Written while the daemon is down, fetched once it runs.
            waiting = await call(alice, "bus_send", to="bob", body="after restart")
            assert waiting["via"] == "file"
            d = Daemon(root).ready()
            try:
                got = await call(bob, "bus_fetch", wait_s=10)
                ids = [m["message_id"] for m in got["messages"]]
                assert ids == [waiting["message_id"]]
                assert got["via"] == "socket"
                await call(bob, "bus_ack", receipts=[got["messages"][0]["receipt"]])
                await _exchange(alice, bob, "online-1", "socket")
            finally:
                d.kill()
            assert waiting["message_id"] in journal_ids(root)

    anyio.run(main)


@pytest.mark.timeout(90)
@pytest.mark.filterwarnings("ignore:resources/subscribe is removed")
def test_a_burst_of_50_is_one_coalesced_resources_updated(root: Path, daemon: Daemon) -> None:
    """One notification until the agent fetches; after the fetch, the next arrival cues again."""
    updates: list[str] = []
    arrived = [anyio.Event(), anyio.Event()]

    async def handler(message: IncomingMessage) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.append(str(message.params.uri))
            arrived[min(len(updates), 2) - 1].set()

    def burst(n: int, first: int) -> None:
        msgs = [
            {"schema_version": "1.0", "message_type": "fact", "workflow_id": "w", "task_id": "t"}
            | {"agent_id": "alice", "to": "bob", "body": f"m{first + i}"}
            for i in range(n)
        ]
        with busclient.Client(root) as c:
            results = c.send_batch(msgs)
        assert all(isinstance(r, busclient.SendResult) for r in results)

    async def main() -> None:
        async with agent(root, "bob", handler=handler) as bob:
            await bob.subscribe_resource("busd://inbox/bob")
            await anyio.to_thread.run_sync(burst, 50, 0)
            with anyio.fail_after(10):
                await arrived[0].wait()
            await anyio.sleep(1.5)  # many polls later: still the one notification
            assert updates == ["busd://inbox/bob"]
            inbox = await bob.read_resource("busd://inbox/bob")
            summary = json.loads(inbox.contents[0].text)  # type: ignore[union-attr]
            assert summary["ready"] == 50 and "body" not in summary["waiting"][0]
            got = await call(bob, "bus_fetch", max=100)
            assert got["count"] == 50
            await call(bob, "bus_ack", receipts=[m["receipt"] for m in got["messages"]])
            await anyio.sleep(1.0)
            assert len(updates) == 1  # nothing waits: nothing to announce
            await anyio.to_thread.run_sync(burst, 3, 50)
            with anyio.fail_after(10):
                await arrived[1].wait()
            await anyio.sleep(1.0)
            assert updates == ["busd://inbox/bob"] * 2

    anyio.run(main)


@pytest.mark.timeout(90)
def test_a_listen_stream_gets_the_inbox_update(root: Path, daemon: Daemon) -> None:
    """The 2026-07-28 generation: subscriptions/listen with the inbox URI."""

    async def main() -> None:
        async with agent(root, "bob", mode="auto") as bob:
            assert bob.protocol_version == "2026-07-28"
            async with bob.listen(resource_subscriptions=["busd://inbox/bob"]) as sub:
                with busclient.Client(root) as c:
                    c.send({"schema_version": "1.0", "message_type": "fact"} | _to_bob())
                with anyio.fail_after(10):
                    event = await sub.__anext__()
                assert getattr(event, "uri", None) == "busd://inbox/bob"

    anyio.run(main)


def _to_bob() -> dict[str, str]:
    return {"workflow_id": "w", "task_id": "t", "agent_id": "alice", "to": "bob", "body": "hi"}


@pytest.mark.timeout(60)
def test_tools_list_stays_small(root: Path) -> None:
    """The whole default tools/list answer is under 8,000 characters; --ops adds four."""

    async def main() -> None:
        async with agent(root, "alice") as alice:
            listed = await alice.list_tools()
            text = json.dumps(listed.model_dump(by_alias=True, mode="json", exclude_none=True))
            assert len(text) < 8000, len(text)
            names = [t.name for t in listed.tools]
            assert names == [
                "bus_send",
                "bus_reply",
                "bus_fetch",
                "bus_peek",
                "bus_ack",
                "bus_nack",
                "bus_extend",
                "bus_reject",
                "bus_status",
                "bus_thread",
            ]
            assert all("agent" not in t.input_schema["properties"] for t in listed.tools)
        async with agent(root, "alice", "--ops") as ops:
            names = [t.name for t in (await ops.list_tools()).tools]
            assert names[-4:] == ["bus_dlq_list", "bus_dlq_show", "bus_replay", "bus_tail"]
            dlq = await call(ops, "bus_dlq_list")
            assert dlq == {"entries": [], "total": 0}
            tail = await call(ops, "bus_tail")
            assert tail == {"entries": []}

    anyio.run(main)
