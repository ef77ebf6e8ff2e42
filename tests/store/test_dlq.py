"""Tests for busd.dlq: entries keep original bytes, records, listing, replay and purge."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from busd.core.codec import decode
from busd.errors import NotFound, Reason
from busd.routing.consumer import Consumer, return_expired
from busd.store import dlq
from busd.store.layout import delivery_name, parse_delivery_name
from busd.store.mailbox import deliver
from conftest import Bus, message_bytes, message_dict

_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

_INVALID = {
    "invalid_json": b'{"message_type": "fact", ',
    "invalid_utf8": b'{"body": "\xff\xfe"}',
    "schema": json.dumps({k: v for k, v in message_dict().items() if k != "task_id"}).encode(),
    "unsupported_schema_version": message_bytes(schema_version="2.0"),
    "too_large": message_bytes(body="x" * 2000),
}


def _outbox_entry(bus: Bus, data: bytes, name: str = "x.json") -> str:
    src = bus.layout.outbox_dir("alice")
    src.mkdir(parents=True, exist_ok=True)
    (src / name).write_bytes(data)
    return dlq.dead_letter(
        bus.layout, reason=Reason.INVALID_JSON, detail="bad", source=src / name, sender="alice"
    )


def _limit_entry(bus: Bus) -> str:
    cfg = bus.with_config(max_deliveries=1)
    deliver(bus.layout, "bob", message_bytes("m-1"), "m-1")
    Consumer(cfg, "bob").claim()
    [name] = return_expired(cfg, now=time.time() + 100).dead_lettered
    return name


@pytest.mark.parametrize("reason", sorted(_INVALID))
def test_invalid_inbox_file_keeps_bytes_and_reason(bus: Bus, reason: str) -> None:
    """Each kind of invalid file lands in the DLQ byte-identical, with the right reason code."""
    data = _INVALID[reason]
    cfg = bus.with_config(max_message_bytes=1024)
    path = deliver(bus.layout, "bob", data, "m-bad")
    assert Consumer(cfg, "bob").claim() == []
    [entry] = dlq.list_entries(bus.layout)
    rec = entry.record
    assert rec.reason == reason
    assert entry.path.read_bytes() == data == entry.data()
    assert rec.sha256 == hashlib.sha256(data).hexdigest() and rec.size == len(data)
    assert rec.recipient == "bob" and rec.delivery_count == 1
    assert rec.original_path is not None and rec.original_path.startswith("locks/bob/")
    assert entry.name[21:] == delivery_name(path.name[:20], 1, "m-bad")
    raw = json.loads((bus.layout.dlq / (entry.name + ".reason.json")).read_bytes())
    assert raw["schema"] == 1 and raw["replays"] == 0
    assert _RFC3339.match(raw["first_failure_at"]) and _RFC3339.match(raw["last_failure_at"])
    assert [h["event"] for h in raw["history"]] == ["failed"]


def test_entry_names_are_sanitised_and_bounded(bus: Bus) -> None:
    """Unsafe characters become _, leading dots go, names stay <= 150 chars."""
    odd = dlq.dead_letter(
        bus.layout, reason=Reason.SCHEMA, detail="d", data=b"x", original_path="a/..héllo wörld?"
    )
    assert re.fullmatch(r"\d{20}-h_llo_w_rld_", odd)
    long = dlq.dead_letter(
        bus.layout, reason=Reason.SCHEMA, detail="d", data=b"y", original_path="a/" + "z" * 400
    )
    assert len(long) == 150
    tricky = dlq.dead_letter(
        bus.layout, reason=Reason.SCHEMA, detail="d", data=b"z", original_path="a/x.reason.json"
    )
    assert not tricky.endswith(".reason.json")
    assert sorted(e.name for e in dlq.list_entries(bus.layout)) == sorted([odd, long, tricky])


def test_listing_filters_and_skips_entries_in_progress(bus: Bus) -> None:
    """list_entries filters by reason and agent and ignores data without a record."""
    a = _outbox_entry(bus, b"{")
    b = dlq.dead_letter(bus.layout, reason=Reason.REJECTED, detail="no", data=b"q", recipient="bob")
    (bus.layout.dlq / f"{1:020d}-half-written").write_bytes(b"data")
    assert [e.name for e in dlq.list_entries(bus.layout)] == [a, b]
    assert [e.name for e in dlq.list_entries(bus.layout, reason=Reason.REJECTED)] == [b]
    assert [e.name for e in dlq.list_entries(bus.layout, agent="alice")] == [a]
    assert dlq.load(bus.layout, b).data() == b"q"
    for bad in ("nope", "../etc/passwd", ""):
        with pytest.raises(NotFound):
            dlq.load(bus.layout, bad)


def test_vanished_source_without_data_is_not_found(bus: Bus) -> None:
    """A source that is gone raises NotFound, or falls back to the given data."""
    missing = bus.layout.outbox / "gone.json"
    with pytest.raises(NotFound):
        dlq.dead_letter(bus.layout, reason=Reason.SCHEMA, detail="d", source=missing)
    name = dlq.dead_letter(bus.layout, reason=Reason.SCHEMA, detail="d", source=missing, data=b"k")
    assert dlq.load(bus.layout, name).data() == b"k"
    assert dlq.load(bus.layout, name).record.original_path == "outbox/gone.json"


def test_replay_of_a_fixed_message_goes_to_the_outbox_once(bus: Bus) -> None:
    """replay(data=fixed) publishes to outbox/<sender>; a second replay raises NotFound."""
    name = _outbox_entry(bus, b"{broken")
    result = dlq.replay(bus.config, name, data=message_bytes("m-1"))
    assert result.status == "replayed" and result.message_id == "m-1"
    assert result.target is not None and result.target.parent == bus.layout.outbox_dir("alice")
    assert result.target.read_bytes() == message_bytes("m-1")
    with pytest.raises(NotFound):
        dlq.replay(bus.config, name, data=message_bytes("m-1"))
    assert len(os.listdir(bus.layout.outbox_dir("alice"))) == 1
    assert dlq.list_entries(bus.layout) == []
    assert not (bus.layout.dlq / name).exists()
    sha = hashlib.sha256(message_bytes("m-1")).hexdigest()
    moved = json.loads((bus.layout.dlq / "replayed" / f"{sha}.json").read_bytes())
    assert moved["replays"] == 1 and moved["history"][-1]["event"] == "replayed"


def test_replay_with_to_readdresses_the_message(bus: Bus) -> None:
    """replay(to=...) of a routable failure re-encodes the message addressed to that agent."""
    name = _outbox_entry(bus, message_bytes("m-2", to="nobody"))
    result = dlq.replay(bus.config, name, to="carol")
    assert result.target is not None
    assert decode(result.target.read_bytes()).to == "carol"


def test_replay_of_delivery_limit_goes_straight_to_the_inbox(bus: Bus) -> None:
    """An accepted message that hit the limit is redelivered to the inbox with count 0."""
    name = _limit_entry(bus)
    result = dlq.replay(bus.config, name)
    assert result.status == "replayed" and result.target is not None
    assert result.target.parent == bus.layout.inbox_dir("bob")
    parsed = parse_delivery_name(result.target.name)
    assert parsed is not None and parsed.deliveries == 0 and parsed.message_id == "m-1"
    with pytest.raises(NotFound):
        dlq.replay(bus.config, name)
    assert len(os.listdir(bus.layout.inbox_dir("bob"))) == 1
    [claim] = Consumer(bus.config, "bob").claim()
    assert claim.raw == message_bytes("m-1")


def test_replay_direct_to_another_agent(bus: Bus) -> None:
    """replay(to=...) of a delivery_limit entry delivers into that agent's inbox."""
    name = _limit_entry(bus)
    result = dlq.replay(bus.config, name, to="carol")
    assert result.target is not None and result.target.parent == bus.layout.inbox_dir("carol")


def test_replay_of_still_invalid_updates_the_record_in_place(bus: Bus) -> None:
    """A replay that fails again bumps replays and history; nothing moves."""
    name = _outbox_entry(bus, b"{still broken")
    before = dlq.load(bus.layout, name).record
    result = dlq.replay(bus.config, name)
    assert result.status == "still_invalid" and result.target is None
    after = dlq.load(bus.layout, name).record
    assert after.replays == 1 and after.first_failure_at == before.first_failure_at
    assert after.last_failure_at >= before.last_failure_at
    assert [h.event for h in after.history] == ["failed", "replay_failed"]
    assert dlq.load(bus.layout, name).data() == b"{still broken"
    assert os.listdir(bus.layout.outbox_dir("alice")) == []
    bad = dlq.replay(bus.config, name, data=b'{"message_type": "nope"}')
    assert bad.status == "still_invalid" and dlq.load(bus.layout, name).record.replays == 2


def test_dry_run_moves_nothing(bus: Bus) -> None:
    """dry_run reports the target directory and leaves the entry and record alone."""
    name = _outbox_entry(bus, message_bytes("m-3"))
    result = dlq.replay(bus.config, name, dry_run=True)
    assert result.status == "would_replay"
    assert result.target == bus.layout.outbox_dir("alice")
    assert os.listdir(bus.layout.outbox_dir("alice")) == []
    assert dlq.load(bus.layout, name).record.replays == 0


def test_concurrent_replays_deliver_once(bus: Bus) -> None:
    """Four threads replaying one entry: exactly one replays, the others get NotFound."""
    name = _limit_entry(bus)
    outcomes: list[str] = []

    def run() -> None:
        try:
            outcomes.append(dlq.replay(bus.config, name).status)
        except NotFound:
            outcomes.append("not_found")

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["not_found"] * 3 + ["replayed"]
    assert len(os.listdir(bus.layout.inbox_dir("bob"))) == 1


def test_failing_again_after_replay_carries_history(bus: Bus) -> None:
    """The same bytes failing after a replay keep replays, first failure time and history."""
    name = _outbox_entry(bus, b"{broken")
    first = dlq.load(bus.layout, name).record
    dlq.replay(bus.config, name, data=message_bytes("m-5"))
    again = dlq.dead_letter(
        bus.layout, reason=Reason.UNROUTABLE, detail="no route", data=message_bytes("m-5")
    )
    rec = dlq.load(bus.layout, again).record
    assert rec.replays == 1 and rec.first_failure_at == first.first_failure_at
    assert [h.event for h in rec.history] == ["failed", "replayed", "failed"]


def test_purge_removes_old_entries_only(bus: Bus) -> None:
    """purge() drops entries, orphans and replayed records older than the threshold."""
    old = _outbox_entry(bus, b"{1", "a.json")
    _outbox_entry(bus, message_bytes("m-6"), "b.json")
    dlq.replay(bus.config, dlq.list_entries(bus.layout)[1].name)
    orphan = bus.layout.dlq / f"{2:020d}-orphan"
    orphan.write_bytes(b"o")
    assert dlq.purge(bus.layout, older_than_s=100) == []
    assert dlq.purge(bus.layout, older_than_s=100, now=time.time() + 200) == [old]
    assert orphan.exists()
    dlq.purge(bus.layout, older_than_s=100, now=time.time() + 7200)
    assert sorted(os.listdir(bus.layout.dlq)) == [".lock", "replayed"]
    assert os.listdir(bus.layout.dlq / "replayed") == []


def test_symlink_source_is_moved_not_followed(bus: Bus, tmp_path: Path) -> None:
    """dead_letter moves a symlink itself; its target is neither read nor moved."""
    target = tmp_path / "secret"
    target.write_bytes(b"top secret")
    link = bus.layout.outbox / "link.json"
    os.symlink(target, link)
    name = dlq.dead_letter(
        bus.layout, reason=Reason.NOT_A_REGULAR_FILE, detail="symlink", source=link
    )
    entry = dlq.load(bus.layout, name)
    assert entry.path.is_symlink() and os.readlink(entry.path) == str(target)
    assert entry.record.sha256 is None and entry.record.size == 0
    assert target.read_bytes() == b"top secret"
    result = dlq.replay(bus.config, name)
    assert result.status == "still_invalid" and "symbolic link" in result.detail
