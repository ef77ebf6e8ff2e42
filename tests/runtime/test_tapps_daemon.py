"""compat = "tapps" on a running daemon: Tapps' FileMessageBus moves (tests/tapps_driver.py)
against ``busd run`` on one ``.tapps-agents/messages`` root (issue 13 part 2).

Each test plays Tapps' own file moves and looks at the files both sides see: delivery
names and payloads, claims, ledger lines, dead letters, and what a restart after SIGKILL
hands out again.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from _rpc import Rpc
from busd.config import load_config
from busd.ops.doctor import diagnose
from busd.routing.consumer import Consumer
from busd.routing.offline import route_pending
from busd.store.layout import init_bus, parse_delivery_name
from daemon_harness import BUSD, Daemon, clean_env, drop, files, message, wait_for
from tapps_driver import TappsBus, tapps_message, validate

pytestmark = pytest.mark.timeout(120)

_CONFIG = 'compat = "tapps"\nlease_seconds = 30\n'


def _root(tmp_path: Path, extra: str = "") -> Path:
    root = init_bus(tmp_path / ".tapps-agents" / "messages").root
    (root / "busd.toml").write_text(_CONFIG + extra)
    return root


def _busd(root: Path, *args: str, check: bool = True) -> Any:
    out = subprocess.run(
        [BUSD, *args, "--root", str(root), "--json"],
        capture_output=True,
        env=clean_env(),
        check=check,
        timeout=30,
    )
    return json.loads(out.stdout) if out.stdout.strip() else None


def _consumer(root: Path, agent: str) -> Consumer:
    return Consumer(load_config(root=str(root), env={}), agent)


def _ids(n: int, base: int = 0) -> list[str]:
    return [f"00000000-0000-4000-8000-{base + i:012d}" for i in range(n)]


def _names(directory: Path) -> list[str]:
    return [p.name for p in files(directory)]


def _checkpoint(root: Path) -> bytes | None:
    path = root / "journal" / "checkpoint"
    return path.read_bytes() if path.exists() else None


def _put_back(root: Path, saved: bytes | None) -> None:
    """The checkpoint as it was before the messages: a SIGKILL that lands before the
    next checkpoint (1 s apart) leaves exactly this, so recovery folds them all again."""
    path = root / "journal" / "checkpoint"
    if saved is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(saved)


def test_tapps_consumer_gets_tapps_names_acks_and_nothing_comes_back_after_sigkill(
    tmp_path: Path,
) -> None:
    # A short grace: what a restart rebuilds into memory for builder is written out soon.
    root = _root(tmp_path, "serve_grace_seconds = 1\n")
    tapps = TappsBus(root)
    daemon = Daemon(root).ready()
    saved = _checkpoint(root)
    try:
        tasks = _ids(4)
        for mid in tasks:  # routed from the outbox (assigned_to = builder)
            tapps.send_to_outbox("orchestrator", tapps_message(mid))
        updates = _ids(2, 100)
        for mid, kind in zip(updates, ("status_update", "task_complete"), strict=True):
            tapps.send_to_inbox("builder", tapps_message(mid, kind))  # straight into the inbox
        inbox = root / "inbox" / "builder"
        wait_for(
            lambda: all(parse_delivery_name(n) for n in _names(inbox)) and len(files(inbox)) == 6,
            what="all six named as deliveries",
        )
        for name in _names(inbox):
            parsed = parse_delivery_name(name)
            assert parsed is not None and parsed.message_type is not None, name
            assert name.endswith(f"_{parsed.message_id}_{parsed.message_type}.json")
        got = tapps.poll_inbox("builder", max_messages=10)  # validates each as Tapps' models do
        assert sorted(m["message_id"] for m in got) == sorted(tasks + updates)
        for m in got:
            if m["message_type"] == "task_assignment":
                assert m["priority"] == "medium" and m["timeout_seconds"] == 900
            tapps.ack("builder", m)
        # Tapps' ack glob found every claim: nothing left for a sweep to hand out again.
        assert files(root / "locks" / "builder") == []
        lines = (root / "processed" / "builder.jsonl").read_text().splitlines()
        assert set(tasks + updates) <= set(lines)
    finally:
        daemon.kill()  # SIGKILL
    _put_back(root, saved)
    again = Daemon(root).ready()
    try:
        agent = _busd(root, "status")["agents"].get("builder", {})
        assert agent.get("ready", 0) == 0 and agent.get("in_flight", 0) == 0, agent
        time.sleep(2.5)  # past the grace: a write-out, a lease sweep and a checkpoint
        assert files(root / "inbox" / "builder") == [], "a Tapps-acked message came back"
        assert files(root / "locks" / "builder") == []
        assert tapps.poll_inbox("builder") == []
        assert _consumer(root, "builder").claim(max=10) == []
    finally:
        assert again.stop() == 0


def test_busd_native_type_gets_a_busd_name_tapps_skips_and_busd_consumes(tmp_path: Path) -> None:
    root = _root(tmp_path)
    tapps = TappsBus(root)
    daemon = Daemon(root).ready()
    try:
        drop(root, message(1, to="builder"), "fact.json")  # busd's `fact`: no Tapps model
        # busd's task_assignment with fields Tapps' model forbids (to, body, parents)
        busd_task = tapps_message("busd-task-1") | {
            "agent_id": "alice",
            "to": "builder",
            "body": "with a body",
            "parents": ["m-000001"],
        }
        drop(root, busd_task, "task.json")
        inbox = root / "inbox" / "builder"
        wait_for(lambda: len(files(inbox)) == 2, what="both delivered")
        native = [n for n in _names(inbox) if n.endswith(".busd")]
        assert len(native) == 1 and native[0].endswith("-m-000001.busd")
        got = tapps.poll_inbox("builder")
        assert [m["message_id"] for m in got] == ["busd-task-1"]  # the fact is not globbed
        assert not any(p.parent.name == "dlq" for p in tapps.written), "Tapps quarantined one"
        validate(got[0])
        assert got[0]["metadata"]["busd"]["fields"]["body"] == "with a body"
        assert _names(inbox) == native  # the .busd file is still there, untouched
        claims = _consumer(root, "builder").claim(max=5)
        assert [c.message.message_id for c in claims] == ["m-000001"]
        assert type(claims[0].message).__name__ == "Fact"
        assert getattr(claims[0].message, "body", None) == "hello 1"
        _consumer(root, "builder").settle(receipts=[c.receipt for c in claims])
        tapps.ack("builder", got[0])
        assert files(root / "locks" / "builder") == []
    finally:
        assert daemon.stop() == 0


def test_memory_write_out_at_a_graceful_stop_has_tapps_names(tmp_path: Path) -> None:
    root = _root(tmp_path)
    tapps = TappsBus(root)
    daemon = Daemon(root).ready()
    ids = _ids(3)
    try:
        with Rpc(root / "busd.sock") as rpc:
            assert rpc.call("fetch", {"agent_id": "builder"})["result"]["messages"] == []
            for mid in ids:  # served: kept in memory, no inbox file
                tapps.send_to_outbox("orchestrator", tapps_message(mid))
            wait_for(
                lambda: rpc.call("status", {})["result"]["agents"]["builder"]["ready"] == 3,
                what="three in memory",
            )
            assert files(root / "inbox" / "builder") == []
    finally:
        assert daemon.stop() == 0  # graceful: memory is written out as inbox files
    names = _names(root / "inbox" / "builder")
    assert len(names) == 3 and all(n.endswith("_task_assignment.json") for n in names), names
    got = tapps.poll_inbox("builder")
    assert sorted(m["message_id"] for m in got) == ids
    for m in got:
        tapps.ack("builder", m)
    assert files(root / "locks" / "builder") == []


def test_dead_letters_keep_apart_and_every_reader_finds_busds(tmp_path: Path) -> None:
    root = _root(tmp_path)
    tapps = TappsBus(root)
    daemon = Daemon(root).ready()
    try:
        drop(root, b"{not json", "bad.json")  # busd's refusal
        tapps.send_to_inbox("tester", tapps_message("bad-1") | {"unknown": 1})
        assert tapps.poll_inbox("tester") == []  # Tapps' quarantine: dlq/<stem>.<hex>.json
        own = root / "dlq" / "busd"
        wait_for(lambda: list(own.glob("*.reason.json")), what="bad.json dead-lettered")
        # busd's consumer rejects a Tapps task: its entry goes to dlq/busd/ as well
        tapps.send_to_outbox("orchestrator", tapps_message("t-rej"))
        wait_for(lambda: files(root / "inbox" / "builder"), what="t-rej delivered")
        (claim,) = _consumer(root, "builder").claim()
        rejected = _consumer(root, "builder").fail(None, "cannot", receipt=claim.receipt)
        assert (own / rejected).exists() and (own / f"{rejected}.reason.json").exists()
        assert not list((root / "dlq").glob("*.reason.json"))
        listed = _busd(root, "dlq", "list")["entries"]  # through the daemon
        names = [e["name"] for e in listed]
        assert len(names) == len(set(names)) == 3, listed
        foreign = [e for e in listed if e.get("foreign")]
        assert len(foreign) == 1 and "Schema validation failed" in foreign[0]["detail"]
        assert _busd(root, "status", check=False)["dlq"]["entries"] == 2
        shown = _busd(root, "dlq", "show", rejected)
        assert shown["record"]["reason"] == "rejected"
        # Tapps' replay_dlq moves its own dead letter only; busd's are untouched.
        moved = tapps.replay_dlq("tester")
        assert [p.name for p in moved] == [foreign[0]["name"]]
        assert len(list(own.glob("*.reason.json"))) == 2 and (own / rejected).exists()
        # The daemon's replay of busd's entry: delivered again under Tapps' name.
        _busd(root, "replay", rejected)
        wait_for(lambda: files(root / "inbox" / "builder"), what="t-rej replayed")
        (name,) = _names(root / "inbox" / "builder")
        assert name.endswith("_t-rej_task_assignment.json")
        assert [m["message_id"] for m in tapps.poll_inbox("builder")] == ["t-rej"]
        # Tapps' replay put its (still invalid) message back into inbox/tester/: busd refuses
        # it into dlq/busd/ when the watcher reports it, a moment later. The purge must find
        # that entry older than its 1 s too.
        wait_for(lambda: not files(root / "inbox" / "tester"), what="the replayed bad-1 refused")
        time.sleep(1.1)
        old = time.time() - 30 * 86400
        for p in tapps.written:
            if p.exists():
                os.utime(p, (old, old))
        _busd(root, "dlq", "purge", "--older-than", "1s", "--yes")
        assert not list(own.glob("*.reason.json"))  # busd's went
        for p in tapps.written:
            if "dlq" in p.parts:
                assert p.exists() or p.name.endswith(".json"), f"busd removed {p}"
    finally:
        assert daemon.stop() == 0


def test_doctor_moves_busd_entries_left_in_dlq_before_the_switch(tmp_path: Path) -> None:
    root = init_bus(tmp_path / "bus").root
    drop(root, b"{not json", "bad.json")
    route_pending(load_config(root=str(root), env={}))  # compat = "none": into dlq/ itself
    (record,) = (root / "dlq").glob("*.reason.json")
    (root / "busd.toml").write_text(_CONFIG)
    found = {f["check"]: f for f in _busd(root, "doctor", check=False)["findings"]}
    assert found["dlq_location"]["status"] == "warn"
    assert _busd(root, "dlq", "list")["entries"] == []  # not where tapps mode looks
    fixed = {f["check"]: f for f in _busd(root, "doctor", "--fix", check=False)["findings"]}
    assert fixed["dlq_location"]["fixed"]
    assert (root / "dlq" / "busd" / record.name).exists() and not record.exists()
    (entry,) = _busd(root, "dlq", "list")["entries"]
    assert entry["reason"] == "invalid_json" and not entry.get("foreign")


def test_doctor_does_not_call_a_tapps_claim_without_a_lease_expired(tmp_path: Path) -> None:
    root = _root(tmp_path)
    tapps = TappsBus(root)
    written = tapps.send_to_inbox("builder", tapps_message("t-old"))
    long_ago = time.time() - 3600
    os.utime(written, (long_ago, long_ago))  # written an hour ago, claimed just now
    (claimed,) = tapps.poll_inbox("builder")
    cfg = load_config(root=str(root), env={})
    found = {f.check: f for f in diagnose(cfg)}
    assert found["expired_claims"].status == "ok", found["expired_claims"].detail
    assert found["dlq_location"].status == "ok"
    none = {f.check: f for f in diagnose(load_config(root=str(root), env={}, compat="none"))}
    assert none["expired_claims"].status == "warn"  # the rule is tapps mode's
    assert files(root / "locks" / "builder"), claimed
