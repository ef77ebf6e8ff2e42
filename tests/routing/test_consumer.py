"""Tests for busd.consumer: claim, ack, release, extend, fail, leases and the ledger."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import portalocker
import pytest

from busd.errors import InvalidName, LockTimeout, NotFound, StaleReceipt
from busd.routing.consumer import Consumer, return_expired
from busd.store import dlq
from busd.store import ledger as ledger_mod
from busd.store.layout import delivery_name, parse_delivery_name
from busd.store.ledger import LedgerRecord, ProcessedLedger
from busd.store.mailbox import deliver
from conftest import Bus, message_bytes, run_python

_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

_WORKER = """
import json, os, sys, time
from busd.config import load_config
from busd.routing.consumer import Consumer
cfg = load_config(root=sys.argv[1], env={})
c = Consumer(cfg, "bob")
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
got = []
while True:
    claims = c.claim(int(sys.argv[3]))
    if not claims:
        break
    ids = [x.message.message_id for x in claims]
    got.extend(ids)
    assert c.ack(ids) == len(ids)
print(json.dumps(got))
"""


def _put(bus: Bus, mid: str, agent: str = "bob", **kwargs: object) -> Path:
    return deliver(bus.layout, agent, message_bytes(mid, **kwargs), mid)


def _names(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def test_claim_renames_into_locks_with_count_and_lease(bus: Bus) -> None:
    """A claim moves the oldest file to locks/ with count+1 and mtime = lease expiry."""
    first = _put(bus, "m-1")
    _put(bus, "m-2")
    before = time.time()
    [claim] = Consumer(bus.config, "bob").claim()
    arrival = parse_delivery_name(first.name).arrival  # type: ignore[union-attr]
    assert claim.name == delivery_name(arrival, 1, "m-1")
    assert claim.path == bus.layout.locks_dir("bob") / claim.name
    assert claim.delivery_count == 1 and claim.message.message_id == "m-1"
    assert claim.raw == message_bytes("m-1")
    expiry = claim.path.stat().st_mtime
    assert before + 60 - 1 < expiry < time.time() + 60 + 1
    assert abs(claim.lease_expires_at.timestamp() - expiry) < 0.01
    assert len(_names(bus.layout.inbox_dir("bob"))) == 1


def test_claim_respects_max_and_skips_hidden_files(bus: Bus) -> None:
    """claim(max) returns at most max claims in arrival order; dot files are left alone."""
    for i in range(5):
        _put(bus, f"m-{i}")
    (bus.layout.inbox_dir("bob") / ".in-progress").write_bytes(b"{")
    c = Consumer(bus.config, "bob")
    assert [x.message.message_id for x in c.claim(3)] == ["m-0", "m-1", "m-2"]
    assert [x.message.message_id for x in c.claim(10)] == ["m-3", "m-4"]
    assert c.claim(10) == []
    assert _names(bus.layout.inbox_dir("bob")) == [".in-progress"]


def test_consumer_checks_the_agent_name(bus: Bus) -> None:
    """An unsafe agent id raises InvalidName."""
    with pytest.raises(InvalidName):
        Consumer(bus.config, "../x")


def test_ack_appends_ledger_then_removes_the_claim(bus: Bus) -> None:
    """ack() writes one JSON line per message (id, key, time) and deletes the claim."""
    _put(bus, "m-1", idempotency_key="k-1")
    _put(bus, "m-2")
    c = Consumer(bus.config, "bob")
    c.claim(2)
    assert c.ack(["m-1", "m-2", "m-unknown"]) == 2
    assert _names(bus.layout.locks_dir("bob")) == []
    lines = bus.layout.ledger("bob").read_bytes().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [(r["message_id"], r["idempotency_key"]) for r in recs] == [
        ("m-1", "k-1"),
        ("m-2", None),
    ]
    assert all(_RFC3339.match(r["acked_at"]) for r in recs)
    assert "k-1" in c.processed() and "m-2" in c.processed()
    assert c.ack(["m-1"]) == 0


def test_same_message_twice_acked_once_has_its_side_effect_once(bus: Bus) -> None:
    """A redelivered copy of an acked message is dropped at claim time."""
    _put(bus, "m-1")
    _put(bus, "m-1")
    c = Consumer(bus.config, "bob")
    effects: list[str] = []
    for _ in range(3):
        for claim in c.claim():
            effects.append(claim.message.message_id)
            c.ack([claim.message.message_id])
    assert effects == ["m-1"]
    assert _names(bus.layout.inbox_dir("bob")) == []
    assert _names(bus.layout.locks_dir("bob")) == []


def test_idempotency_key_dedupes_different_message_ids(bus: Bus) -> None:
    """Two messages sharing an idempotency_key: once one is acked the other is dropped."""
    _put(bus, "m-1", idempotency_key="same")
    _put(bus, "m-2", idempotency_key="same")
    c = Consumer(bus.config, "bob")
    [claim] = c.claim()
    c.ack([claim.message.message_id])
    assert c.claim() == []


def test_ack_drops_duplicate_claims_of_one_id(bus: Bus) -> None:
    """Two claimed copies of one id are both removed by one ack."""
    _put(bus, "m-1")
    _put(bus, "m-1")
    c = Consumer(bus.config, "bob")
    assert len(c.claim(5)) == 2
    assert c.ack(["m-1"]) == 1
    assert _names(bus.layout.locks_dir("bob")) == []


def test_release_returns_the_claim_keeping_its_count(bus: Bus) -> None:
    """release() puts the file back in the inbox; the next claim is delivery 2."""
    _put(bus, "m-1")
    c = Consumer(bus.config, "bob")
    [first] = c.claim()
    c.release("m-1")
    assert _names(bus.layout.inbox_dir("bob")) == [first.name]
    [second] = c.claim()
    assert second.delivery_count == 2
    with pytest.raises(NotFound):
        c.release("m-404")


def test_release_with_delay_waits_for_the_lease_sweep(bus: Bus) -> None:
    """A delayed release stays claimed until return_expired runs after the delay."""
    _put(bus, "m-1")
    c = Consumer(bus.config, "bob")
    [claim] = c.claim()
    now = time.time()
    c.release("m-1", delay_s=30)
    assert abs(claim.path.stat().st_mtime - (now + 30)) < 1
    assert return_expired(bus.config, now=now + 10).returned == []
    assert return_expired(bus.config, now=now + 31).returned == [claim.name]
    assert _names(bus.layout.inbox_dir("bob")) == [claim.name]


def test_extend_moves_the_lease_expiry(bus: Bus) -> None:
    """extend() sets the claimed file's mtime to now + lease_s and returns it."""
    _put(bus, "m-1")
    c = Consumer(bus.config, "bob")
    [claim] = c.claim()
    until = c.extend("m-1", lease_s=500)
    assert abs(claim.path.stat().st_mtime - until.timestamp()) < 0.01
    assert until.timestamp() > time.time() + 490
    with pytest.raises(NotFound):
        c.extend("m-404", lease_s=5)


def _redelivered(bus: Bus) -> tuple[Consumer, str, str]:
    """m-1 claimed (receipt r1), its lease expired and swept, claimed again (receipt r2)."""
    _put(bus, "m-1", idempotency_key="k-1")
    c = Consumer(bus.config, "bob")
    [first] = c.claim()
    assert return_expired(bus.config, now=time.time() + 120).returned == [first.name]
    [second] = c.claim()
    assert second.delivery_count == 2 and second.receipt != first.receipt
    return c, first.receipt, second.receipt


def test_receipt_is_the_claim_name_without_json(bus: Bus) -> None:
    """A claim's receipt is its file name in locks/ minus .json; it parses as a delivery."""
    _put(bus, "m-1")
    [claim] = Consumer(bus.config, "bob").claim()
    assert claim.receipt + ".json" == claim.name == claim.path.name
    parsed = parse_delivery_name(claim.receipt + ".json")
    assert parsed is not None and parsed.message_id == "m-1" and parsed.deliveries == 1


def test_stale_receipt_is_refused_and_the_newer_claim_survives(bus: Bus) -> None:
    """The receipt of an expired, redelivered claim settles, releases and extends nothing."""
    c, r1, r2 = _redelivered(bus)
    locks = bus.layout.locks_dir("bob")
    mtime = (locks / f"{r2}.json").stat().st_mtime_ns
    with pytest.raises(StaleReceipt) as err:
        c.settle(receipts=[r1])
    assert err.value.receipts == [r1] and err.value.code == "stale_receipt"
    assert err.value.rpc_code == -32012 and err.value.to_dict()["receipts"] == [r1]
    with pytest.raises(StaleReceipt):
        c.release(receipt=r1)
    with pytest.raises(StaleReceipt):
        c.extend(receipt=r1, lease_s=900)
    with pytest.raises(StaleReceipt):
        c.settle(message_ids=["m-1"], receipts=[r1])
    assert _names(locks) == [f"{r2}.json"]
    assert (locks / f"{r2}.json").stat().st_mtime_ns == mtime
    assert not bus.layout.ledger("bob").exists() or "m-1" not in c.processed()
    assert c.settle(receipts=[r2]) == (1, [])
    assert _names(locks) == [] and "m-1" in c.processed() and "k-1" in c.processed()


def test_receipt_of_a_released_delivery_is_stale(bus: Bus) -> None:
    """Released (back in the inbox), a delivery's receipt no longer settles the message."""
    _put(bus, "m-1")
    c = Consumer(bus.config, "bob")
    [claim] = c.claim()
    c.release(receipt=claim.receipt)
    assert _names(bus.layout.inbox_dir("bob")) == [claim.name]
    with pytest.raises(StaleReceipt):
        c.settle(receipts=[claim.receipt])
    assert _names(bus.layout.inbox_dir("bob")) == [claim.name]
    assert "m-1" not in c.processed()


def test_one_stale_receipt_makes_the_whole_settle_change_nothing(bus: Bus) -> None:
    """A call with a current and a stale receipt raises before writing the ledger."""
    c, r1, r2 = _redelivered(bus)
    _put(bus, "m-2")
    [other] = c.claim()
    with pytest.raises(StaleReceipt) as err:
        c.settle(receipts=[other.receipt, r1])
    assert err.value.receipts == [r1]
    assert sorted(_names(bus.layout.locks_dir("bob"))) == sorted([f"{r2}.json", other.name])
    assert not bus.layout.ledger("bob").exists() or len(c.processed()) == 0


def test_settle_by_receipts_and_ids_reports_what_is_not_held(bus: Bus) -> None:
    """Receipts and ids mix; garbage, unknown and already-settled ones come back not held."""
    for mid in ("m-1", "m-2", "m-3"):
        _put(bus, mid)
    c = Consumer(bus.config, "bob")
    one, two, three = c.claim(3)
    acked, not_held = c.settle(
        receipts=[one.receipt, "../../etc/passwd", one.receipt], message_ids=["m-2", "m-404"]
    )
    assert (acked, not_held) == (2, ["../../etc/passwd", "m-404"])
    assert _names(bus.layout.locks_dir("bob")) == [three.name]
    assert c.settle(receipts=[one.receipt, two.receipt]) == (0, [one.receipt, two.receipt])
    assert c.settle(receipts=[three.receipt], message_ids=["m-3"]) == (1, [])
    assert [
        r["message_id"] for r in map(json.loads, bus.layout.ledger("bob").read_bytes().splitlines())
    ] == [
        "m-1",
        "m-2",
        "m-3",
    ]


def test_ack_by_message_id_settles_the_current_claim(bus: Bus) -> None:
    """A message id means "the current claim": it settles the redelivered copy."""
    c, _r1, r2 = _redelivered(bus)
    assert c.ack(["m-1"]) == 1
    assert _names(bus.layout.locks_dir("bob")) == []
    assert c.settle(receipts=[r2]) == (0, [r2])


def test_extend_and_release_by_receipt(bus: Bus) -> None:
    """extend/release name one delivery by receipt; unknown or mismatched ones are NotFound."""
    _put(bus, "m-1")
    c = Consumer(bus.config, "bob")
    [claim] = c.claim()
    until = c.extend(receipt=claim.receipt, lease_s=500)
    assert abs(claim.path.stat().st_mtime - until.timestamp()) < 0.01
    with pytest.raises(NotFound):
        c.extend("m-2", receipt=claim.receipt, lease_s=5)
    with pytest.raises(NotFound):
        c.release(receipt=delivery_name("0" * 20, 1, "m-404").removesuffix(".json"))
    c.release("m-1", receipt=claim.receipt, delay_s=30)
    assert claim.path.exists() and claim.path.stat().st_mtime > time.time() + 20
    c.release(receipt=claim.receipt)
    assert _names(bus.layout.inbox_dir("bob")) == [claim.name]


def test_expired_lease_returns_then_delivery_limit_dead_letters(bus: Bus) -> None:
    """Unacked claims come back after the lease; after max_deliveries they go to the DLQ."""
    cfg = bus.with_config(lease_seconds=0.05, max_deliveries=2)
    _put(bus, "m-1")
    c = Consumer(cfg, "bob")
    assert c.claim()[0].delivery_count == 1
    assert return_expired(cfg, now=time.time() - 10).returned == []
    report = return_expired(cfg, now=time.time() + 1)
    assert len(report.returned) == 1 and report.dead_lettered == []
    assert c.claim()[0].delivery_count == 2
    report = return_expired(cfg, "bob", now=time.time() + 1)
    assert report.returned == [] and len(report.dead_lettered) == 1
    [entry] = dlq.list_entries(bus.layout)
    assert entry.name == report.dead_lettered[0]
    assert entry.record.reason == "delivery_limit" and entry.record.delivery_count == 2
    assert entry.record.recipient == "bob" and entry.record.sender == "alice"
    assert entry.data() == message_bytes("m-1")
    assert c.claim() == []


def test_immediate_release_past_the_limit_dead_letters_at_claim(bus: Bus) -> None:
    """A nacked message already delivered max_deliveries times is not handed out again."""
    cfg = bus.with_config(max_deliveries=1)
    _put(bus, "m-1")
    c = Consumer(cfg, "bob")
    c.claim()
    c.release("m-1")
    assert c.claim() == []
    [entry] = dlq.list_entries(bus.layout, reason="delivery_limit")
    assert entry.record.message_id == "m-1"


def test_fail_dead_letters_as_rejected(bus: Bus) -> None:
    """fail() moves the claim to the DLQ with reason rejected and the given detail."""
    _put(bus, "m-1")
    c = Consumer(bus.config, "bob")
    c.claim()
    name = c.fail("m-1", "cannot parse the task")
    entry = dlq.load(bus.layout, name)
    assert entry.record.reason == "rejected" and entry.record.detail == "cannot parse the task"
    assert entry.record.delivery_count == 1
    assert entry.data() == message_bytes("m-1")
    assert _names(bus.layout.locks_dir("bob")) == []
    with pytest.raises(NotFound):
        c.fail("m-1", "again")


def test_invalid_file_is_dead_lettered_and_claim_goes_on(bus: Bus) -> None:
    """An invalid inbox file goes to the DLQ and the next valid one is claimed instead."""
    deliver(bus.layout, "bob", b"{not json", "m-0")
    _put(bus, "m-1")
    [claim] = Consumer(bus.config, "bob").claim()
    assert claim.message.message_id == "m-1"
    [entry] = dlq.list_entries(bus.layout, agent="bob")
    assert entry.record.reason == "invalid_json"


def test_foreign_name_gets_a_canonical_claim_name(bus: Bus) -> None:
    """A file dropped into the inbox under any name is claimed as <arrival>-001-<id>.json."""
    bus.layout.inbox_dir("bob").mkdir(parents=True)
    (bus.layout.inbox_dir("bob") / "hello world.json").write_bytes(message_bytes("m-9"))
    [claim] = Consumer(bus.config, "bob").claim()
    parsed = parse_delivery_name(claim.name)
    assert parsed is not None and parsed.message_id == "m-9" and parsed.deliveries == 1
    assert _names(bus.layout.locks_dir("bob")) == [claim.name]


def test_invalid_foreign_file_records_its_inbox_path(bus: Bus) -> None:
    """An invalid foreign file is dead-lettered under its original inbox path and name."""
    bus.layout.inbox_dir("bob").mkdir(parents=True)
    (bus.layout.inbox_dir("bob") / "junk.txt").write_bytes(b"\xff\xfe")
    assert Consumer(bus.config, "bob").claim() == []
    [entry] = dlq.list_entries(bus.layout)
    assert entry.record.original_path == "inbox/bob/junk.txt"
    assert entry.name.endswith("-junk.txt") and entry.record.reason == "invalid_utf8"
    assert _names(bus.layout.locks_dir("bob")) == []


def test_name_that_lies_about_its_id_is_renamed(bus: Bus) -> None:
    """A delivery name whose id differs from the content is renamed to the real id."""
    path = deliver(bus.layout, "bob", message_bytes("m-real"), "m-fake")
    [claim] = Consumer(bus.config, "bob").claim()
    assert claim.name == delivery_name(path.name[:20], 1, "m-real")
    c = Consumer(bus.config, "bob")
    assert c.ack(["m-real"]) == 1


def test_symlink_in_inbox_is_not_followed(bus: Bus, tmp_path: Path) -> None:
    """A symlink to a secret is dead-lettered as not_a_regular_file; the secret is untouched."""
    secret = tmp_path / "secret.json"
    secret.write_bytes(message_bytes("m-secret"))
    os.utime(secret, (1_000_000, 1_000_000))
    bus.layout.inbox_dir("bob").mkdir(parents=True)
    os.symlink(secret, bus.layout.inbox_dir("bob") / delivery_name(f"{1:020d}", 0, "m-secret"))
    assert Consumer(bus.config, "bob").claim() == []
    [entry] = dlq.list_entries(bus.layout)
    assert entry.record.reason == "not_a_regular_file"
    assert entry.record.sha256 is None and entry.record.size == 0
    assert entry.path.is_symlink()
    assert secret.stat().st_mtime == 1_000_000
    assert secret.read_bytes() == message_bytes("m-secret")


@pytest.mark.timeout(10)
def test_fifo_in_inbox_is_not_opened_blocking(bus: Bus) -> None:
    """A FIFO in the inbox is moved to the DLQ without blocking the consumer."""
    bus.layout.inbox_dir("bob").mkdir(parents=True)
    os.mkfifo(bus.layout.inbox_dir("bob") / "pipe.json")
    _put(bus, "m-1")
    [claim] = Consumer(bus.config, "bob").claim(5)
    assert claim.message.message_id == "m-1"
    [entry] = dlq.list_entries(bus.layout)
    assert entry.record.reason == "not_a_regular_file" and entry.name.endswith("-pipe.json")


def test_directory_in_inbox_is_dead_lettered(bus: Bus) -> None:
    """A directory in the inbox is moved to the DLQ whole."""
    d = bus.layout.inbox_dir("bob") / "sub.json"
    d.mkdir(parents=True)
    (d / "inner").write_bytes(b"x")
    assert Consumer(bus.config, "bob").claim() == []
    [entry] = dlq.list_entries(bus.layout)
    assert entry.record.reason == "not_a_regular_file" and (entry.path / "inner").exists()


def test_crashed_foreign_claim_is_returned_when_its_lease_expires(bus: Bus) -> None:
    """A hidden .claim- file left by a crash goes back to the inbox under its foreign name."""
    locks = bus.layout.locks_dir("bob")
    locks.mkdir(parents=True)
    bus.layout.inbox_dir("bob").mkdir(parents=True)
    (locks / ".claim-0123456789abcdef-drop.json").write_bytes(message_bytes("m-1"))
    report = return_expired(bus.config, now=time.time() + 1)
    assert report.returned == ["drop.json"]
    assert Consumer(bus.config, "bob").claim()[0].message.message_id == "m-1"


def test_ledger_reads_incrementally_and_tolerates_a_torn_line(tmp_path: Path) -> None:
    """The ledger waits for a line's newline, sees later appends, and skips a torn line."""
    path = tmp_path / "bob.jsonl"
    ledger = ProcessedLedger(path)
    assert "m-1" not in ledger and len(ledger) == 0
    path.write_bytes(b'{"message_id":"m-1","acked_at":"x"}\n{"message_id":"m-2","ack')
    assert "m-1" in ledger and "m-2" not in ledger
    with path.open("ab") as f:
        f.write(b'ed_at":"x","idempotency_key":"k"}\n{"message_id":"m-torn"')
    assert "k" in ledger and "m-2" in ledger and len(ledger) == 3
    ledger.add_many([LedgerRecord(message_id="m-4", acked_at="x")])
    for view in (ledger, ProcessedLedger(path)):
        assert "m-4" in view and "m-1" in view and "m-torn" not in view


def test_ack_raises_lock_timeout_when_the_ledger_is_locked(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger lock held elsewhere makes ack raise LockTimeout and keeps the claim."""
    monkeypatch.setattr(ledger_mod, "_LOCK_TIMEOUT_S", 0.2)
    _put(bus, "m-1")
    c = Consumer(bus.config, "bob")
    c.claim()
    with portalocker.Lock(c.processed().lock_path, mode="a", timeout=1), pytest.raises(LockTimeout):
        c.ack(["m-1"])
    assert len(_names(bus.layout.locks_dir("bob"))) == 1


@pytest.mark.parametrize("workers", [2, 4])
def test_concurrent_consumers_claim_each_message_exactly_once(
    bus: Bus, tmp_path: Path, workers: int
) -> None:
    """N consumer processes draining one inbox of 200: every message claimed exactly once."""
    ids = [f"m-{i:03d}" for i in range(200)]
    for mid in ids:
        deliver(bus.layout, "bob", message_bytes(mid), mid)
    go = tmp_path / "go"
    procs = [run_python(_WORKER, str(bus.root), str(go), "3") for _ in range(workers)]
    time.sleep(0.3)
    go.touch()
    got: list[str] = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        got.extend(json.loads(out))
    assert sorted(got) == ids
    assert _names(bus.layout.inbox_dir("bob")) == [] == _names(bus.layout.locks_dir("bob"))
    assert len(bus.layout.ledger("bob").read_bytes().splitlines()) == 200


def test_threads_sharing_one_inbox_claim_each_message_once(bus: Bus) -> None:
    """Four threads, each with its own Consumer, drain 100 messages without a duplicate."""
    for i in range(100):
        _put(bus, f"m-{i:03d}")
    got: list[str] = []

    def drain() -> None:
        c = Consumer(bus.config, "bob")
        while claims := c.claim(2):
            got.extend(x.message.message_id for x in claims)
            c.ack([x.message.message_id for x in claims])

    threads = [threading.Thread(target=drain) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [f"m-{i:03d}" for i in range(100)]


def test_sweep_skips_stray_directories_in_locks(bus: Bus) -> None:
    """A directory in locks/ that is not a valid agent name does not break the sweep."""
    (bus.layout.locks / "not an agent").mkdir()
    _put(bus, "m-1")
    Consumer(bus.config, "bob").claim()
    assert len(return_expired(bus.config, now=time.time() + 100).returned) == 1
    with pytest.raises(InvalidName):
        return_expired(bus.config, "not an agent")
