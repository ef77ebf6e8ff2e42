"""NATS restarted mid-stream, the local daemon stopped, bad inbound messages, the delivery limit."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from bridge_harness import Pair, accepted_once, fact, nats_publish, publish_all, two_buses
from daemon_harness import BUSD, clean_env, drop, wait_for


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """Two buses and a nats-server (bridge_harness.two_buses)."""
    with two_buses(tmp_path) as p:
        yield p


async def _consumer_state(url: str, durable: str) -> tuple[int, int, int]:
    """(num_pending, num_ack_pending, num_redelivered) of the bridge's consumer."""
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info("BUSD", durable)
        return (
            int(info.num_pending or 0),
            int(info.num_ack_pending or 0),
            int(info.num_redelivered or 0),
        )
    finally:
        await nc.close()


@pytest.mark.timeout(90)
def test_nats_stopped_and_started_mid_stream_delivers_everything(pair: Pair) -> None:
    a, b = pair.a, pair.b
    a.start_bridge()
    b.start_bridge()
    n = 400
    threads = [
        threading.Thread(
            target=publish_all,
            args=(a, [fact(i, "alice", "bob@busb", "ab") for i in range(n)]),
            kwargs={"batch": 10, "pause": 0.02},
        ),
        threading.Thread(
            target=publish_all,
            args=(b, [fact(i, "bob", "alice@busa", "ba") for i in range(n)]),
            kwargs={"batch": 10, "pause": 0.02},
        ),
    ]
    for t in threads:
        t.start()
    wait_for(lambda: len(b.inbox("bob")) > 20, timeout=20, what="the stream to flow")
    pair.nats.stop()
    wait_for(lambda: a.status().get("connected") is False, timeout=10, what="a disconnected")
    time.sleep(2.5)  # past busd's 3 s lease: claims must be held, not spent
    pair.nats.start()
    for t in threads:
        t.join()
    wait_for(
        lambda: len(b.inbox("bob")) >= n and len(a.inbox("alice")) >= n,
        timeout=45,
        what="everything delivered after the restart",
    )
    assert sorted(b.inbox("bob")) == [f"ab-{i:06d}" for i in range(n)]
    assert sorted(a.inbox("alice")) == [f"ba-{i:06d}" for i in range(n)]
    assert a.dlq() == [] and b.dlq() == []
    assert set(accepted_once(b.root, "ab").values()) == {1}
    wait_for(lambda: a.status().get("connected") is True, timeout=10, what="a reconnected")
    assert a.status()["last_error"]


@pytest.mark.timeout(90)
def test_local_daemon_stopped_outbound_waits_inbound_falls_back(pair: Pair) -> None:
    a, b = pair.a, pair.b
    a.start_bridge()
    b.start_bridge()
    assert b.daemon is not None
    b.daemon.stop()
    # Outbound waits: files dropped for alice@busa while busb has no daemon stay put.
    for i in range(20):
        drop(b.root, fact(i, "bob", "alice@busa", "ba"), f"ba-{i}.json", agent="bob")
    # Inbound falls back: busa's messages to bob@busb become files in outbox/_bridge/.
    publish_all(a, [fact(i, "alice", "bob@busb", "ab") for i in range(50)])
    outbox = b.root / "outbox" / "_bridge"
    wait_for(
        lambda: outbox.is_dir() and len(list(outbox.iterdir())) >= 50,
        timeout=20,
        what="inbound fallback files",
    )
    wait_for(lambda: "local busd" in str(b.status().get("last_error")), timeout=10)
    assert a.inbox("alice") == []
    pending, unacked, _ = anyio.run(_consumer_state, pair.nats.url, "busd-busb")
    assert pending == 0 and unacked == 0  # acked in NATS only once the files were durable
    b.start_daemon()
    wait_for(lambda: len(b.inbox("bob")) >= 50, timeout=20, what="fallback files routed")
    wait_for(lambda: len(a.inbox("alice")) >= 20, timeout=20, what="outbound after the restart")
    assert sorted(b.inbox("bob")) == [f"ab-{i:06d}" for i in range(50)]
    assert sorted(a.inbox("alice")) == [f"ba-{i:06d}" for i in range(20)]
    assert a.dlq() == [] and b.dlq() == []


def test_too_short_duplicate_window_and_weak_durability_are_refused(pair: Pair) -> None:
    async def make_stream() -> None:
        import nats
        from nats.js.api import StorageType, StreamConfig

        nc = await nats.connect(pair.nats.url)
        try:
            await nc.jetstream().add_stream(
                StreamConfig(
                    name="SHORT",
                    subjects=["busd.>"],
                    storage=StorageType.FILE,
                    duplicate_window=60.0,
                )
            )
        finally:
            await nc.close()

    anyio.run(make_stream)
    short = pair.a.start_bridge("--stream", "SHORT", ready=False)
    assert short.proc.wait(30) == 78
    short.wait_event("unparsed")
    text = " ".join(str(e.get("text")) for e in short.log)
    assert "duplicate window of 60 s" in text

    # A server without sync_interval: always, single replica: refused, unless accepted.
    from nats_harness import NatsServer, nats_binary

    binary = nats_binary()
    assert binary is not None
    weak = NatsServer(pair.nats.dir.parent / "weak", binary, sync_always=False).start()
    try:
        args = ["--monitor-url", str(weak.monitor_url)]
        proc = subprocess.run(
            [BUSD, "bridge", "nats", "--root", str(pair.a.root), "--url", weak.url, *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=clean_env(),
        )
        assert proc.returncode == 78
        assert "sync_interval: always" in proc.stderr and "power cut" in proc.stderr
        pair.a.url = weak.url
        pair.a.bridge_args = args
        bridge = pair.a.start_bridge("--accept-weaker-durability")
        ready = bridge.wait_event("bridge_ready")
        assert ready["weaker_durability_accepted"] is True and ready["sync_always"] is False
        bridge.kill()
    finally:
        weak.close()


def test_invalid_inbound_message_is_dead_lettered_and_terminated(pair: Pair) -> None:
    b = pair.b
    b.start_bridge()
    not_json = b"{this is not json"
    bad_schema = json.dumps(fact(1, "alice", "bob@busb", "bad") | {"message_type": "gossip"})
    url = pair.nats.url
    anyio.run(nats_publish, url, "busd.busb.agent.bob", not_json, {})
    anyio.run(nats_publish, url, "busd.busb.agent.bob", bad_schema.encode(), {})
    wait_for(lambda: len(b.dlq()) >= 2, timeout=15, what="two DLQ entries")
    entries = {e["reason"]: e for e in b.dlq()}
    assert entries["invalid_json"]["data"] == not_json
    assert entries["schema"]["data"] == bad_schema.encode()
    assert {e["sender"] for e in entries.values()} == {"_bridge"}
    time.sleep(4)  # past the ack wait (3 s): a nak or a missing ack would redeliver now
    pending, unacked, redelivered = anyio.run(_consumer_state, url, "busd-busb")
    assert (pending, unacked, redelivered) == (0, 0, 0)
    assert len(b.dlq()) == 2 and b.status()["dead_lettered"] == 2
    assert b.inbox("bob") == []


def test_delivery_limit_exhaustion_becomes_a_dlq_entry_that_replays(pair: Pair) -> None:
    b = pair.b
    b.start_bridge().stop()  # creates the durable consumer, then goes away
    msg = fact(7, "alice", "bob@busb", "lim")
    url = pair.nats.url

    async def fail_twice() -> None:
        # A bridge that crashes on this message twice: NATS counts both deliveries.
        import nats

        await nats_publish(url, "busd.busb.agent.bob", json.dumps(msg).encode(), {})
        nc = await nats.connect(url)
        try:
            sub = await nc.jetstream().pull_subscribe_bind("busd-busb", stream="BUSD")
            for _ in range(2):
                (m,) = await sub.fetch(1, timeout=5)
                await m.nak()
        finally:
            await nc.close()

    anyio.run(fail_twice)
    b.start_bridge("--delivery-limit", "2")
    wait_for(lambda: b.dlq(), timeout=15, what="the DLQ entry")
    (entry,) = b.dlq()
    assert entry["reason"] == "bridge_delivery_limit"
    assert entry["message_id"] == "lim-000007" and json.loads(entry["data"]) == msg
    assert b.inbox("bob") == []
    out = subprocess.run(
        [BUSD, "replay", "--root", str(b.root), entry["name"]],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert out.returncode == 0, out.stderr
    wait_for(lambda: b.inbox("bob") == ["lim-000007"], timeout=15, what="the replayed message")
    assert b.dlq() == []
