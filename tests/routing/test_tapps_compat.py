"""Tapps' FileMessageBus moves and busd on one root (issue 13 part 2), in process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from busd.core.codec import decode, encode_json
from busd.errors import Reason
from busd.routing.consumer import Consumer, return_expired
from busd.routing.replay import replay
from busd.routing.retention import gc
from busd.routing.router import Router
from busd.store import dlq, foreign
from busd.store.layout import Layout, delivery_name, parse_delivery_name
from busd.store.ledger import LedgerRecord, ProcessedLedger
from busd.store.mailbox import deliver
from busd.store.tapps import deliver_tapps, from_tapps, to_tapps
from conftest import Bus, message_bytes
from tapps_driver import TappsBus, tapps_message, validate

FIXTURES = Path(__file__).parent.parent / "fixtures" / "tapps"
pytestmark = pytest.mark.timeout(60)


def test_fixtures_decode_unchanged_with_their_fields() -> None:
    """Tapps' three types as FileMessageBus writes them: accepted, fields kept."""
    files = sorted(FIXTURES.glob("*.json"))
    assert len(files) == 3
    for f in files:
        msg = decode(f.read_bytes())
        assert msg.agent_id == "Builder Agent"
    ta = decode(next(FIXTURES.glob("*_task_assignment.json")).read_bytes())
    out = json.loads(encode_json(ta))
    assert out["priority"] == "medium"
    assert out["timeout_seconds"] == 900 and isinstance(out["timeout_seconds"], int)


def test_tapps_delivery_names_parse_back_and_keep_ack_glob() -> None:
    name = delivery_name("1" * 20, 2, "a_task_complete", "task_complete")
    assert name.endswith("_a_task_complete_task_complete.json")
    parsed = parse_delivery_name(name)
    assert parsed == ("1" * 20, 2, "a_task_complete")
    assert parsed is not None and parsed.message_type == "task_complete"
    assert parse_delivery_name(delivery_name("1" * 20, 2, "x", "fact")) == ("1" * 20, 2, "x")


def _deliver_tapps(bus: Bus, mid: str) -> Path:
    """A delivery in the Tapps form holding Tapps' own bytes (what the router leaves when a
    Tapps producer writes straight into the inbox: tests/runtime/test_tapps_daemon.py)."""
    inbox = bus.layout.inbox_dir("builder")
    inbox.mkdir(exist_ok=True)
    arrival = f"{time.time_ns():020d}"
    path = inbox / delivery_name(arrival, 0, mid, "task_assignment")
    path.write_text(json.dumps(tapps_message(mid)))
    return path


def _tapps_claim(bus: Bus, tapps: TappsBus, mode: str) -> tuple[Path, list[str]]:
    cfg = bus.with_config(compat=mode, lease_seconds=30)
    deliver(bus.layout, "builder", json.dumps(tapps_message("m-1")).encode(), "m-1")
    time.sleep(0.02)  # the claim happens after the write, as it would in real life
    got = tapps.poll_inbox("builder")
    assert [m["message_id"] for m in got] == ["m-1"]
    report = return_expired(cfg)
    return bus.root / "locks" / "builder", report.returned


def test_sweep_stamps_an_unstamped_tapps_claim_instead_of_returning_it(bus: Bus) -> None:
    tapps = TappsBus(bus.root)
    locks, returned = _tapps_claim(bus, tapps, "tapps")
    assert returned == []
    (claim,) = list(locks.iterdir())
    assert claim.stat().st_mtime > time.time() + 20  # a lease from when the sweep saw it
    assert return_expired(bus.with_config(compat="tapps")).returned == []  # stamped stays
    assert tapps.poll_inbox("builder") == []  # a second Tapps consumer gets nothing


def test_without_tapps_mode_the_sweep_takes_the_claim_back(bus: Bus) -> None:
    """What busd did in every mode before: the double delivery of issue 13."""
    _, returned = _tapps_claim(bus, TappsBus(bus.root), "none")
    assert len(returned) == 1


def test_bare_id_lines_are_acks_and_tapps_mode_writes_them(bus: Bus) -> None:
    tapps = TappsBus(bus.root)
    for mid in ("m-1", "m-2"):
        _deliver_tapps(bus, mid)
    for msg in tapps.poll_inbox("builder"):
        tapps.ack("builder", msg)
    assert list((bus.root / "locks" / "builder").iterdir()) == []
    ledger = ProcessedLedger(bus.layout.ledger("builder"))
    assert ledger.acked("m-1", None) and ledger.acked("m-2", None)
    # A redelivery of an acked id (recovery, a replay) is dropped by busd's consumer.
    _deliver_tapps(bus, "m-1")
    consumer = Consumer(bus.with_config(compat="tapps"), "builder")
    assert consumer.claim() == []
    # busd's ack in tapps mode: Tapps' reader (stripped lines) sees the id.
    _deliver_tapps(bus, "m-3")
    (claim,) = consumer.claim()
    consumer.settle(receipts=[claim.receipt])
    lines = bus.layout.ledger("builder").read_text().splitlines()
    assert "m-3" in lines
    assert tapps.poll_inbox("builder") == []


def test_bare_ids_are_kept_by_compaction(bus: Bus) -> None:
    path = bus.layout.ledger("a")
    ProcessedLedger(path).add_many(
        [LedgerRecord(message_id="old", acked_at="2000-01-01T00:00:00Z")], bare_ids=True
    )
    assert ProcessedLedger(path).compact(60) == 1
    assert path.read_text() == "old\n"


def test_busd_claims_and_settles_tapps_form_names(bus: Bus) -> None:
    cfg = bus.with_config(compat="tapps")
    body = json.dumps(tapps_message("m-9", "status_update")).encode()
    inbox = bus.layout.inbox_dir("builder")
    inbox.mkdir(exist_ok=True)
    (inbox / delivery_name("0" * 19 + "1", 0, "m-9", "status_update")).write_bytes(body)
    consumer = Consumer(cfg, "builder")
    (claim,) = consumer.claim()
    assert claim.name.endswith("-001_m-9_status_update.json")
    consumer.release(receipt=claim.receipt)
    (claim,) = consumer.claim()
    assert claim.delivery_count == 2
    assert consumer.ack(["m-9"]) == 1


def test_tapps_dead_letters_are_listed_foreign_and_never_purged(bus: Bus) -> None:
    """Before: `busd gc` with dlq_max_age_seconds deleted them as orphan data."""
    tapps = TappsBus(bus.root)
    deliver(bus.layout, "builder", b"{not json", "bad")
    assert tapps.poll_inbox("builder") == []
    tapps.send_to_inbox("builder", tapps_message("m-5"))
    (msg,) = tapps.poll_inbox("builder")
    tapps.fail("builder", msg, "boom")
    listed = foreign.list_foreign(bus.layout)
    assert len(listed) == 2
    assert {e.reason for e in listed} >= {"boom"}
    old = time.time() - 10 * 86400
    for p in (bus.root / "dlq").iterdir():
        os.utime(p, (old, old))
    cfg = bus.with_config(dlq_max_age_seconds=1)
    gc(cfg, now=time.time() + 86400)
    dlq.purge(bus.layout, older_than_s=1, now=time.time() + 86400)
    for p in tapps.written:
        if "dlq" in p.parts:
            assert p.exists(), p
    assert dlq.list_entries(bus.layout) == []  # not busd entries either


def test_tapps_replay_never_moves_busd_entries_in_the_busd_subdir(bus: Bus) -> None:
    layout = Layout(bus.root, dlq_subdir="busd")
    name = dlq.dead_letter(
        layout, reason=Reason.SCHEMA, detail="x", data=b"{}", original_path="outbox/a/x.json"
    )
    assert (bus.root / "dlq" / "busd" / (name + dlq.RECORD_SUFFIX)).exists()
    assert TappsBus(bus.root).replay_dlq("builder") == []
    assert [e.name for e in dlq.list_entries(layout)] == [name]
    assert foreign.list_foreign(layout) == []


def _busd_task(**extra: object) -> bytes:
    data: dict[str, object] = {
        "schema_version": "1.0",
        "message_type": "task_assignment",
        "message_id": "t-1",
        "created_at": "2026-03-01T09:00:00Z",
        "workflow_id": "wf",
        "task_id": "t",
        "agent_id": "orchestrator",
        "to": "builder",
        "parents": ["p-1"],
        "body": "build it",
        "priority": "medium",
        "inputs": {"ref": "v4"},
        "timeout_seconds": 1.5,
        "metadata": {"busd": "mine", "k": 1},
    }
    data.update(extra)
    return json.dumps(data).encode()


def test_tapps_payload_is_accepted_by_tapps_and_restored_by_busd(bus: Bus) -> None:
    msg = decode(_busd_task())
    payload = json.loads(to_tapps(msg))
    validate(payload)  # Tapps' rules: no unknown field, ints, nested shapes
    assert payload["priority"] == "medium" and "to" not in payload
    assert from_tapps(decode(to_tapps(msg))) == msg
    bare = decode(_busd_task(metadata=None, inputs=None, timeout_seconds=900))
    assert json.loads(to_tapps(bare))["timeout_seconds"] == 900
    assert from_tapps(decode(to_tapps(bare))) == bare
    # Delivered in tapps mode: Tapps' consumer takes it, busd's gets the original back.
    path = deliver_tapps(bus.layout, "builder", msg)
    assert path.name.endswith("_t-1_task_assignment.json")
    (claim,) = Consumer(bus.with_config(compat="tapps"), "builder").claim()
    assert claim.message == msg


def test_native_types_are_out_of_tapps_glob_and_claimed_by_busd(bus: Bus) -> None:
    fact = decode(message_bytes("f-1"))
    path = deliver_tapps(bus.layout, "bob", fact)
    assert path.suffix == ".busd"
    assert TappsBus(bus.root).poll_inbox("bob") == []
    assert path.exists()  # Tapps did not quarantine it
    consumer = Consumer(bus.with_config(compat="tapps"), "bob")
    (claim,) = consumer.claim()
    assert claim.message == fact and claim.name.endswith("-001-f-1.busd")
    consumer.release(receipt=claim.receipt)
    (claim,) = consumer.claim()
    assert claim.delivery_count == 2
    assert consumer.settle(receipts=[claim.receipt]) == (1, [])


def test_tapps_mode_replay_delivers_in_tapps_form(bus: Bus) -> None:
    cfg = bus.with_config(compat="tapps")
    body = json.dumps(tapps_message("r-1")).encode()
    name = dlq.dead_letter(
        cfg.layout,
        reason=Reason.DELIVERY_LIMIT,
        detail="x",
        data=body,
        recipient="builder",
        message_id="r-1",
        original_path="locks/builder/x.json",
    )
    result = replay(cfg, name)
    assert result.target is not None
    assert result.target.name.endswith("_r-1_task_assignment.json")
    assert [m["message_id"] for m in TappsBus(bus.root).poll_inbox("builder")] == ["r-1"]


def test_router_names_inbox_drops_for_tapps_and_a_redo_leaves_one_copy(bus: Bus) -> None:
    """Straight into a Tapps consumer's inbox: Tapps' own bytes are renamed as they are;
    busd fields Tapps forbids are rewritten as its payload (the source removed), and a
    crash before that removal (the source seen again) leaves one delivery, not two."""
    cfg = bus.with_config(compat="tapps")
    inbox = bus.layout.inbox_dir("builder")
    inbox.mkdir()
    own = json.dumps(tapps_message("t-own"), indent=2, sort_keys=True).encode()
    (inbox / "20260301T090000_123Z_t-own_task_assignment.json").write_bytes(own)
    busd_task = tapps_message("t-busd") | {"agent_id": "alice", "to": "builder", "body": "b"}
    source = inbox / "t-busd.json"
    source.write_bytes(json.dumps(busd_task).encode())
    with Router(cfg) as router:
        router.route_all()
    by_id = {p.name.split("_")[1]: p for p in inbox.iterdir()}
    assert sorted(by_id) == ["t-busd", "t-own"] and not source.exists()
    assert by_id["t-own"].read_bytes() == own  # renamed, bytes kept
    payload = json.loads(by_id["t-busd"].read_bytes())
    validate(payload)
    assert payload["metadata"]["busd"]["fields"]["body"] == "b"
    source.write_bytes(json.dumps(busd_task).encode())  # as if the removal never happened
    with Router(cfg) as router:
        assert router.route_all().redone == 1
    assert sorted(p.name.split("_")[1] for p in inbox.iterdir()) == ["t-busd", "t-own"]
    claims = Consumer(cfg, "builder").claim(max=5)
    got = {c.message.message_id: c.message for c in claims}
    assert getattr(got["t-busd"], "body", None) == "b" and got["t-busd"].to == "builder"
