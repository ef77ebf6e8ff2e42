"""Tests for busd.routing.replay: a dead letter validated again and handed back to the bus."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from busd.core.codec import decode
from busd.errors import NotFound, Reason
from busd.routing.consumer import Consumer, return_expired
from busd.routing.replay import replay
from busd.store import dlq
from busd.store.layout import parse_delivery_name
from busd.store.mailbox import deliver
from conftest import Bus, message_bytes


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


def test_replay_of_a_fixed_message_goes_to_the_outbox_once(bus: Bus) -> None:
    """replay(data=fixed) publishes to outbox/<sender>; a second replay raises NotFound."""
    name = _outbox_entry(bus, b"{broken")
    result = replay(bus.config, name, data=message_bytes("m-1"))
    assert result.status == "replayed" and result.message_id == "m-1"
    assert result.target is not None and result.target.parent == bus.layout.outbox_dir("alice")
    assert result.target.read_bytes() == message_bytes("m-1")
    with pytest.raises(NotFound):
        replay(bus.config, name, data=message_bytes("m-1"))
    assert len(os.listdir(bus.layout.outbox_dir("alice"))) == 1
    assert dlq.list_entries(bus.layout) == []
    assert not (bus.layout.dlq / name).exists()
    sha = hashlib.sha256(message_bytes("m-1")).hexdigest()
    moved = json.loads((bus.layout.dlq / "replayed" / f"{sha}.json").read_bytes())
    assert moved["replays"] == 1 and moved["history"][-1]["event"] == "replayed"


def test_replay_with_to_readdresses_the_message(bus: Bus) -> None:
    """replay(to=...) of a routable failure re-encodes the message addressed to that agent."""
    name = _outbox_entry(bus, message_bytes("m-2", to="nobody"))
    result = replay(bus.config, name, to="carol")
    assert result.target is not None
    assert decode(result.target.read_bytes()).to == "carol"


def test_replay_of_a_free_text_author_without_sender_goes_to_the_outbox_itself(
    bus: Bus,
) -> None:
    """No sender recorded (a socket refusal) and an agent_id that is no directory name
    ("Builder Agent"): replay writes into outbox/ itself; it raised invalid_name before."""
    data = message_bytes("m-3", agent_id="Builder Agent", to="nobody")
    name = dlq.dead_letter(bus.layout, reason=Reason.UNROUTABLE, detail="x", data=data)
    result = replay(bus.config, name, to="carol")
    assert result.target is not None and result.target.parent == bus.layout.outbox
    assert decode(result.target.read_bytes()).agent_id == "Builder Agent"


def test_replay_of_delivery_limit_goes_straight_to_the_inbox(bus: Bus) -> None:
    """An accepted message that hit the limit is redelivered to the inbox with count 0."""
    name = _limit_entry(bus)
    result = replay(bus.config, name)
    assert result.status == "replayed" and result.target is not None
    assert result.target.parent == bus.layout.inbox_dir("bob")
    parsed = parse_delivery_name(result.target.name)
    assert parsed is not None and parsed.deliveries == 0 and parsed.message_id == "m-1"
    with pytest.raises(NotFound):
        replay(bus.config, name)
    assert len(os.listdir(bus.layout.inbox_dir("bob"))) == 1
    [claim] = Consumer(bus.config, "bob").claim()
    assert claim.raw == message_bytes("m-1")


def test_replay_direct_to_another_agent(bus: Bus) -> None:
    """replay(to=...) of a delivery_limit entry delivers into that agent's inbox."""
    name = _limit_entry(bus)
    result = replay(bus.config, name, to="carol")
    assert result.target is not None and result.target.parent == bus.layout.inbox_dir("carol")


def test_replay_of_still_invalid_updates_the_record_in_place(bus: Bus) -> None:
    """A replay that fails again bumps replays and history; nothing moves."""
    name = _outbox_entry(bus, b"{still broken")
    before = dlq.load(bus.layout, name).record
    result = replay(bus.config, name)
    assert result.status == "still_invalid" and result.target is None
    after = dlq.load(bus.layout, name).record
    assert after.replays == 1 and after.first_failure_at == before.first_failure_at
    assert after.last_failure_at >= before.last_failure_at
    assert [h.event for h in after.history] == ["failed", "replay_failed"]
    assert dlq.load(bus.layout, name).data() == b"{still broken"
    assert os.listdir(bus.layout.outbox_dir("alice")) == []
    bad = replay(bus.config, name, data=b'{"message_type": "nope"}')
    assert bad.status == "still_invalid" and dlq.load(bus.layout, name).record.replays == 2


def test_dry_run_moves_nothing(bus: Bus) -> None:
    """dry_run reports the target directory and leaves the entry and record alone."""
    name = _outbox_entry(bus, message_bytes("m-3"))
    result = replay(bus.config, name, dry_run=True)
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
            outcomes.append(replay(bus.config, name).status)
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
    replay(bus.config, name, data=message_bytes("m-5"))
    again = dlq.dead_letter(
        bus.layout, reason=Reason.UNROUTABLE, detail="no route", data=message_bytes("m-5")
    )
    rec = dlq.load(bus.layout, again).record
    assert rec.replays == 1 and rec.first_failure_at == first.first_failure_at
    assert [h.event for h in rec.history] == ["failed", "replayed", "failed"]


def test_replay_of_a_symlink_entry_is_still_invalid(bus: Bus, tmp_path: Path) -> None:
    """A dead-lettered symlink is never followed by replay: it stays, still invalid."""
    target = tmp_path / "secret"
    target.write_bytes(b"top secret")
    link = bus.layout.outbox / "link.json"
    os.symlink(target, link)
    name = dlq.dead_letter(
        bus.layout, reason=Reason.NOT_A_REGULAR_FILE, detail="symlink", source=link
    )
    result = replay(bus.config, name)
    assert result.status == "still_invalid" and "symbolic link" in result.detail
    assert dlq.load(bus.layout, name).path.is_symlink()
    assert target.read_bytes() == b"top secret"
