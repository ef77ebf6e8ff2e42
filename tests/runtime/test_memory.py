"""Socket consumers served from memory (issue 11): no per-message file, receipts, write-out.

Real ``busd run`` processes on real files: an inotify watch proves no file is made for a
subscribed consumer, a stale receipt never settles the newer claim, and the daemon-less
``busd recv`` sees every unacked memory message after a graceful stop and after a SIGKILL.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import watchfiles

from _rpc import Rpc, RpcFailure
from busd.store.journal import Journal
from daemon_harness import BUSD, Daemon, clean_env, delivered_ids, drop, files, message, wait_for

pytestmark = pytest.mark.timeout(90)


def _events(root: Path, event: str) -> list[dict[str, Any]]:
    """The journal lines of ``event``, as JSON objects, in append order."""
    with Journal(root / "journal") as j:
        return [msgspec.json.decode(msgspec.json.encode(e)) for e in j.read(events=(event,))]


def _recv_all(root: Path) -> list[dict[str, Any]]:
    """Daemon-less ``busd recv --json``: every message it can claim for bob."""
    proc = subprocess.run(
        [BUSD, "recv", "bob", "--max", "1000", "--json", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(),
    )
    assert proc.returncode in (0, 4), proc.stderr  # 4: nothing to receive
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


class _Watch:
    """An inotify watch (watchfiles) of directories, armed before the test acts."""

    def __init__(self, *paths: Path) -> None:
        self.changes: list[tuple[watchfiles.Change, str]] = []
        self._stop = threading.Event()
        self._paths = paths
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        probe = paths[0] / ".probe"
        # Armed once it reports a change: touch a dot file until one is seen.
        deadline = time.monotonic() + 10
        while not self.changes:
            assert time.monotonic() < deadline, "the watch never armed"
            probe.write_bytes(b"x")
            probe.unlink()
            time.sleep(0.05)
        time.sleep(0.2)
        self.changes.clear()

    def _run(self) -> None:
        for batch in watchfiles.watch(
            *self._paths,
            watch_filter=None,
            stop_event=self._stop,
            debounce=20,
            step=5,
            rust_timeout=100,
            yield_on_timeout=True,
            force_polling=False,
        ):
            self.changes.extend(batch)

    def stop(self) -> list[tuple[watchfiles.Change, str]]:
        time.sleep(0.3)  # let the last events arrive
        self._stop.set()
        self._thread.join(5)
        return self.changes


def test_a_subscriber_takes_1000_messages_and_no_file_is_made(root: Path) -> None:
    """1,000 messages published to a subscribed agent: pushed from memory, acked by
    receipt, and nothing is created, renamed or unlinked under inbox/ or locks/."""
    for d in ("inbox", "locks"):
        (root / d / "bob").mkdir(parents=True, exist_ok=True)
    daemon = Daemon(root).ready()
    try:
        with Rpc(root / "busd.sock", timeout=20) as sub, Rpc(root / "busd.sock") as pub:
            sub("subscribe", {"agent_id": "bob", "max_in_flight": 1000})
            watch = _Watch(root / "inbox", root / "locks")
            for k in range(10):
                pub("publish_batch", {"messages": [message(k * 100 + i) for i in range(100)]})
            pushed = [sub.push(timeout=20)["params"] for _ in range(1000)]
            receipts = [p["receipt"] for p in pushed]
            for i in range(0, 1000, 250):
                answer = sub("ack", {"agent_id": "bob", "receipts": receipts[i : i + 250]})
                assert answer == {"acked": 250, "not_held": []}
            changes = watch.stop()
        assert changes == [], changes[:5]
        assert sorted(p["message"]["message_id"] for p in pushed) == [
            f"m-{i:06d}" for i in range(1000)
        ]
        assert files(root / "inbox" / "bob") == [] and files(root / "locks" / "bob") == []
        wait_for(lambda: len(_events(root, "delivered")) == 1000, what="delivered records")
        acked = _events(root, "acked")
        assert sorted(a["receipt"] for a in acked) == sorted(receipts)
        assert {a["agent"] for a in acked} == {"bob"}
    finally:
        assert daemon.stop() == 0
    assert files(root / "inbox" / "bob") == []  # all acked: nothing to write out


def test_a_stale_receipt_is_refused_and_the_newer_claim_survives(root: Path) -> None:
    """A receipt whose lease expired and was delivered again answers stale_receipt and
    settles nothing; the newer receipt, and ack by message id, still work."""
    daemon = Daemon(root, env={"BUSD_LEASE_SECONDS": "0.4"}).ready()
    try:
        with Rpc(root / "busd.sock") as c:
            assert c("fetch", {"agent_id": "bob"}) == {"messages": []}  # bob is served now
            c("publish", {"message": message(1)})
            c("publish", {"message": message(2)})
            (first,) = c("fetch", {"agent_id": "bob"})["messages"]
            assert first["message"]["message_id"] == "m-000001"
            assert first["delivery_count"] == 1
            time.sleep(1.0)  # the lease ends; m-000001 is ready again
            (second,) = c("fetch", {"agent_id": "bob"})["messages"]
            assert second["message"]["message_id"] == "m-000001"
            assert second["delivery_count"] == 2
            assert second["receipt"] != first["receipt"]
            with pytest.raises(RpcFailure) as refused:
                c("ack", {"agent_id": "bob", "receipts": [first["receipt"]]})
            assert refused.value.code == -32012
            assert refused.value.data["reason"] == "stale_receipt"
            assert refused.value.data["receipts"] == [first["receipt"]]
            with pytest.raises(RpcFailure) as stale_nack:
                c("nack", {"agent_id": "bob", "receipt": first["receipt"]})
            assert stale_nack.value.data["reason"] == "stale_receipt"
            # The newer claim survived all of that: extend it, then settle it by receipt.
            c("extend", {"agent_id": "bob", "receipt": second["receipt"], "lease_s": 30})
            assert c("ack", {"agent_id": "bob", "receipts": [second["receipt"]]}) == {
                "acked": 1,
                "not_held": [],
            }
            (third,) = c("fetch", {"agent_id": "bob", "wait_s": 2})["messages"]
            assert third["message"]["message_id"] == "m-000002"
            assert c("ack", {"agent_id": "bob", "message_ids": ["m-000002"]}) == {
                "acked": 1,
                "not_held": [],
            }
            assert c("fetch", {"agent_id": "bob"}) == {"messages": []}
        assert [a["message_id"] for a in _events(root, "acked")] == ["m-000001", "m-000002"]
        assert files(root / "inbox" / "bob") == [] and files(root / "locks" / "bob") == []
    finally:
        assert daemon.stop() == 0


def _serve_and_leave_unacked(root: Path) -> set[str]:
    """bob is served; 10 messages, 3 claimed of which 1 acked: return the unacked ids."""
    with Rpc(root / "busd.sock") as c:
        c("fetch", {"agent_id": "bob"})
        c("publish_batch", {"messages": [message(i) for i in range(10)]})
        claimed = c("fetch", {"agent_id": "bob", "max": 3})["messages"]
        assert [m["message"]["message_id"] for m in claimed] == ["m-000000", "m-000001", "m-000002"]
        assert c("ack", {"agent_id": "bob", "receipts": [claimed[1]["receipt"]]})["acked"] == 1
    assert files(root / "inbox" / "bob") == []  # all in memory
    return {f"m-{i:06d}" for i in range(10)} - {"m-000001"}


def test_graceful_stop_writes_every_memory_message_for_the_daemon_less_tools(root: Path) -> None:
    """After SIGTERM, every unacked memory message (ready and in flight) is an inbox file
    with its delivery count, and a daemon-less ``busd recv`` gets each of them once."""
    daemon = Daemon(root).ready()
    unacked = _serve_and_leave_unacked(root)
    assert daemon.stop() == 0
    assert set(delivered_ids(root / "inbox" / "bob")) == unacked
    counts = {n.name.split("-")[1] for n in files(root / "inbox" / "bob")}
    assert counts == {"000", "001"}  # in-flight ones keep their count
    got = _recv_all(root)
    assert sorted(m["message_id"] for m in got) == sorted(unacked)
    assert all("receipt" in m for m in got)


def test_a_long_write_out_at_stop_is_not_cut_by_the_shutdown_timeout(root: Path) -> None:
    """8,000 memory messages and a 1 s shutdown timeout: the write-out takes longer than
    that, but each 256 files re-arm the timer, so the stop is graceful (exit 0, every
    message a file), not forced (exit 130 with part of the queue written)."""
    n = 8000
    daemon = Daemon(root, env={"BUSD_SHUTDOWN_TIMEOUT_SECONDS": "1"}).ready()
    with Rpc(root / "busd.sock") as sub, Rpc(root / "busd.sock") as pub:
        sub("subscribe", {"agent_id": "bob", "max_in_flight": 1})
        for start in range(0, n, 1000):
            batch = [message(i) for i in range(start, start + 1000)]
            pub("publish_batch", {"messages": batch}, timeout=60)
        started = time.monotonic()
        assert daemon.stop(timeout=120) == 0, "forced out before the write-out finished"
        took = time.monotonic() - started
    assert len(files(root / "inbox" / "bob")) == n
    print(f"\n{n} memory messages written out at stop in {took:.1f} s")  # noqa: T201


def test_after_sigkill_the_daemon_less_recv_rebuilds_every_unacked_message(root: Path) -> None:
    """SIGKILL with messages only in memory: the daemon-less pass rebuilds them from the
    journal (the checkpoint never passed them), and the acked one never comes back."""
    daemon = Daemon(root).ready()
    unacked = _serve_and_leave_unacked(root)
    time.sleep(1.5)  # a checkpoint or two: they must not pass the memory messages
    daemon.kill()
    assert files(root / "inbox" / "bob") == []
    got = _recv_all(root)
    assert sorted(m["message_id"] for m in got) == sorted(unacked)


def test_a_restart_after_sigkill_serves_the_rebuilt_messages_from_memory(root: Path) -> None:
    """The next ``busd run`` keeps rebuilt messages in memory (no file), delivery counts
    included, and writes an unserved agent's out once ``serve_grace_seconds`` passed."""
    env = {"BUSD_SERVE_GRACE_SECONDS": "3"}
    daemon = Daemon(root, env=env).ready()
    unacked = _serve_and_leave_unacked(root)
    time.sleep(0.3)  # the `delivered` records ride the next commit
    daemon.kill()
    daemon = Daemon(root, env=env).ready()
    try:
        assert files(root / "inbox" / "bob") == []
        with Rpc(root / "busd.sock") as c:
            got = c("fetch", {"agent_id": "bob", "max": 100})["messages"]
            assert sorted(m["message"]["message_id"] for m in got) == sorted(unacked)
            counts = {m["message"]["message_id"]: m["delivery_count"] for m in got}
            assert counts["m-000000"] == 2 and counts["m-000003"] == 1
            c("nack", {"agent_id": "bob", "message_id": "m-000003"})
        assert files(root / "inbox" / "bob") == []
        # bob stops fetching: after the grace its ready message becomes a normal file.
        wait_for(
            lambda: delivered_ids(root / "inbox" / "bob") == ["m-000003"],
            timeout=15,
            what="the write-out",
        )
        (name,) = files(root / "inbox" / "bob")
        assert name.name.split("-")[1] == "001"
    finally:
        assert daemon.stop() == 0


def test_an_agent_without_a_socket_consumer_keeps_getting_inbox_files(root: Path) -> None:
    """While bob is served from memory, carol (nobody on the socket) gets inbox files,
    from outbox drops and socket publishes alike."""
    daemon = Daemon(root).ready()
    try:
        with Rpc(root / "busd.sock") as sub, Rpc(root / "busd.sock") as pub:
            sub("subscribe", {"agent_id": "bob"})
            drop(root, message(1, to=["bob", "carol"]), "one.json")
            pub("publish", {"message": message(2, to="carol")})
            wait_for(
                lambda: sorted(delivered_ids(root / "inbox" / "carol")) == ["m-000001", "m-000002"],
                what="carol's files",
            )
            assert sub.push(timeout=5)["params"]["message"]["message_id"] == "m-000001"
            assert files(root / "inbox" / "bob") == []
            status = pub("status", {})
            assert status["agents"]["carol"]["ready"] == 2
    finally:
        assert daemon.stop() == 0


def test_status_shows_how_each_agent_is_served(root: Path) -> None:
    """``status`` counts memory messages and names the served mode, connections and the
    oldest unsettled message of each agent."""
    daemon = Daemon(root).ready()
    try:
        with Rpc(root / "busd.sock") as sub, Rpc(root / "busd.sock") as c:
            sub("subscribe", {"agent_id": "bob", "max_in_flight": 1})
            c("publish_batch", {"messages": [message(i, to=["bob", "carol"]) for i in range(3)]})
            first = sub.push(timeout=5)["params"]
            assert first["message"]["message_id"] == "m-000000"
            wait_for(lambda: len(files(root / "inbox" / "carol")) == 3, what="carol's files")
            bob = c("status", {})["agents"]["bob"]
            assert (bob["served"], bob["connections"]) == ("socket", 1)
            assert (bob["ready"], bob["in_flight"]) == (2, 1)
            assert bob["oldest_unsettled"] == "m-000000"
            carol = c("status", {})["agents"]["carol"]
            assert (carol["served"], carol["connections"], carol["ready"]) == ("files", 0, 3)
    finally:
        assert daemon.stop() == 0


def test_a_memory_delivery_past_max_deliveries_is_dead_lettered_with_its_bytes(
    root: Path,
) -> None:
    """Delivered max_deliveries times and never acked: the next claim dead-letters it
    (reason delivery_limit, the DLQ data = the journaled bytes) and journals it for bob."""
    env = {"BUSD_LEASE_SECONDS": "0.3", "BUSD_MAX_DELIVERIES": "1"}
    daemon = Daemon(root, env=env).ready()
    try:
        with Rpc(root / "busd.sock") as c:
            c("fetch", {"agent_id": "bob"})
            c("publish", {"message": message(1)})
            (first,) = c("fetch", {"agent_id": "bob"})["messages"]
            assert first["delivery_count"] == 1
            time.sleep(0.8)  # the lease ends: back to ready, delivered once already
            assert c("fetch", {"agent_id": "bob"}) == {"messages": []}
            c("publish", {"message": message(2)})  # a commit carries the dead letter's line
        wait_for(lambda: _events(root, "dead_lettered"), what="the dead_lettered line")
        (line,) = _events(root, "dead_lettered")
        assert (line["agent"], line["reason"], line["message_id"]) == (
            "bob",
            "delivery_limit",
            "m-000001",
        )
        (record,) = (root / "dlq").glob("*.reason.json")
        data = record.with_name(record.name.removesuffix(".reason.json")).read_bytes()
        (accepted,) = [e for e in _events(root, "accepted") if e["message_id"] == "m-000001"]
        assert json.loads(data) == accepted["message"]
        assert json.loads(record.read_text())["recipient"] == "bob"
    finally:
        assert daemon.stop() == 0
