"""Two buses over one NATS server: ``alice@busa`` and ``bob@busb`` talk; a shared topic."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from bridge_harness import Pair, Side, accepted_once, fact, nats_publish, two_buses
from busd.config import load_config
from busd.rpc.client import call
from daemon_harness import BUSD, wait_for


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """Two buses and a nats-server (bridge_harness.two_buses)."""
    with two_buses(tmp_path) as p:
        yield p


def publish(side: Side, msg: dict[str, Any]) -> dict[str, Any]:
    cfg = load_config(root=str(side.root), env={})
    result: dict[str, Any] = call(cfg, "publish", {"message": msg})
    return result


def fetch(side: Side, agent: str, wait_s: float = 10.0) -> list[dict[str, Any]]:
    cfg = load_config(root=str(side.root), env={})
    out = call(cfg, "fetch", {"agent_id": agent, "max": 100, "wait_s": wait_s}, timeout=wait_s + 5)
    msgs: list[dict[str, Any]] = out["messages"]
    if msgs:
        call(cfg, "ack", {"agent_id": agent, "receipts": [m["receipt"] for m in msgs]})
    return [m["message"] for m in msgs]


def task(mid: str, to: str, sender: str) -> dict[str, Any]:
    return {
        "schema_version": "1.0",
        "message_id": mid,
        "message_type": "task_assignment",
        "created_at": "2026-12-01T12:00:00Z",
        "workflow_id": "w1",
        "task_id": "t1",
        "agent_id": sender,
        "to": to,
        "assigned_to": "bob",
        "priority": "high",
        "body": "build it",
    }


def test_task_and_reply_cross_buses_and_a_topic_is_shared(pair: Pair) -> None:
    a, b = pair.a, pair.b
    a.start_bridge()
    b.start_bridge()

    publish(a, task("task-1", "bob@busb", "alice"))
    got = fetch(b, "bob")
    assert [m["message_id"] for m in got] == ["task-1"]
    assert got[0]["to"] == "bob@busb" and got[0]["priority"] == "high"

    reply = {
        "schema_version": "1.0",
        "message_id": "done-1",
        "message_type": "task_complete",
        "created_at": "2026-12-01T12:01:00Z",
        "workflow_id": "w1",
        "task_id": "t1",
        "agent_id": "bob",
        "to": "alice@busa",
        "parents": ["task-1"],
        "status": "completed",
        "body": "built",
    }
    publish(b, reply)
    back = fetch(a, "alice")
    assert [m["message_id"] for m in back] == ["done-1"]
    assert back[0]["parents"] == ["task-1"]

    news = {
        "schema_version": "1.0",
        "message_id": "news-1",
        "message_type": "fact",
        "created_at": "2026-12-01T12:02:00Z",
        "workflow_id": "w1",
        "task_id": "t1",
        "agent_id": "alice",
        "to": "topic:news",
        "body": "released",
    }
    publish(a, news)
    assert [m["message_id"] for m in fetch(a, "alice")] == ["news-1"]  # local subscriber
    assert [m["message_id"] for m in fetch(b, "bob")] == ["news-1"]  # remote subscriber
    # No loop: busb delivered it locally only, nothing came back to alice.
    assert fetch(a, "alice", wait_s=2.0) == []

    def counted() -> bool:
        sa, sb = a.status(), b.status()
        return bool(sa.get("published", 0) >= 2 and sb.get("delivered", 0) >= 2)

    wait_for(counted, timeout=10, what="bridge counts in the status files")
    sa = a.status()
    assert sa["connected"] is True and sa["publish_duplicates"] == 0
    out = subprocess.run(
        [BUSD, "status", "--json", "--root", str(a.root)], capture_output=True, timeout=30
    )
    report = json.loads(out.stdout)
    assert report["bridge"]["connected"] is True and report["bridge"]["stale"] is False
    assert "_bridge" in report["agents"]
    human = subprocess.run(
        [BUSD, "status", "--root", str(a.root)], capture_output=True, timeout=30, text=True
    ).stdout
    assert "bridge" in human and "connected to nats://" in human


def test_ordered_bridges_deliver_in_publish_order_across_a_bridge_crash(pair: Pair) -> None:
    import threading

    from bridge_harness import fact, publish_all

    a, b = pair.a, pair.b
    a.start_bridge("--ordered")
    b.start_bridge("--ordered")
    n = 150
    producer = threading.Thread(
        target=publish_all,
        args=(a, [fact(i, "alice", "bob@busb", "o") for i in range(n)]),
        kwargs={"batch": 5, "pause": 0.03},
    )
    producer.start()
    wait_for(lambda: len(b.inbox("bob")) >= 30, timeout=20, what="the stream to flow")
    assert a.bridge is not None
    a.bridge.kill()  # it held a claim: the next bridge must not let newer ones overtake it
    a.start_bridge("--ordered")
    producer.join()
    wait_for(lambda: len(b.inbox("bob")) >= n, timeout=40, what="all in bob's inbox")
    assert b.inbox("bob") == [f"o-{i:06d}" for i in range(n)]  # listing order = arrival order


def test_a_copy_already_in_jetstream_or_in_busd_is_stored_once_and_counted(pair: Pair) -> None:
    """The two states a bridge SIGKILLed between its steps leaves, made on purpose."""
    from busd.bridge.names import HDR_MSG_ID, HDR_ORIGIN, Destination, msg_id

    a, b = pair.a, pair.b
    b.start_bridge()
    # Outbound: busa's bridge died after JetStream's PubAck and before its ack in busd.
    first = fact(1, "alice", "bob@busb", "dup")
    dest = Destination("busd.busb.agent.bob", "bus:busb")
    headers = {HDR_MSG_ID: msg_id("busa", dest, first["message_id"]), HDR_ORIGIN: "busa"}
    anyio.run(nats_publish, pair.nats.url, dest.subject, json.dumps(first).encode(), headers)
    wait_for(lambda: b.inbox("bob") == ["dup-000001"], timeout=15, what="the first copy")
    publish(a, first)
    a.start_bridge()
    wait_for(lambda: a.status().get("publish_duplicates") == 1, timeout=15, what="a duplicate")
    # Inbound: busb's bridge died after busd accepted and before its ack to NATS.
    second = fact(2, "alice", "bob@busb", "dup")
    publish(b, second)
    anyio.run(nats_publish, pair.nats.url, dest.subject, json.dumps(second).encode(), {})
    wait_for(lambda: b.status().get("busd_duplicates") == 1, timeout=15, what="a redelivery")
    assert b.inbox("bob") == ["dup-000001", "dup-000002"]
    assert accepted_once(b.root, "dup") == {"dup-000001": 1, "dup-000002": 1}
    sa, sb = a.status(), b.status()
    assert (sa["published"], sa["publish_duplicates"]) == (1, 1)
    assert (sb["delivered"], sb["busd_duplicates"]) == (1, 1)
    assert a.dlq() == [] and b.dlq() == []
