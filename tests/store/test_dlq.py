"""Tests for busd.store.dlq: entries keep original bytes, records, listing and purge.

Replay (busd.routing.replay) is tested in tests/routing/test_replay.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest

from busd.errors import NotFound, Reason
from busd.routing.consumer import Consumer
from busd.routing.replay import replay
from busd.store import dlq
from busd.store.layout import delivery_name
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


def test_purge_removes_old_entries_only(bus: Bus) -> None:
    """purge() drops entries, orphans and replayed records older than the threshold."""
    old = _outbox_entry(bus, b"{1", "a.json")
    _outbox_entry(bus, message_bytes("m-6"), "b.json")
    replay(bus.config, dlq.list_entries(bus.layout)[1].name)
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


def test_hidden_names_are_never_entries(bus: Bus) -> None:
    """A name starting with '.' is an in-progress write (protocol.md 3), even when it ends
    like a record: a tool staging ``.x.reason.json`` must not show up as an entry."""
    name = _outbox_entry(bus, b"{x")
    record = (bus.layout.dlq / (name + dlq.RECORD_SUFFIX)).read_bytes()
    (bus.layout.dlq / f".{name}.reason.json").write_bytes(record)
    (bus.layout.dlq / f".{name}").write_bytes(b"{x")
    assert [e.name for e in dlq.list_entries(bus.layout)] == [name]


def test_replace_writers_leave_no_staging_files(bus: Bus) -> None:
    """Record updates and replayed records are durable replaces staged in tmp/: after a
    failed and a successful replay nothing is left in tmp/, dlq/ or dlq/replayed/."""
    name = _outbox_entry(bus, b"{broken")
    assert replay(bus.config, name).status == "still_invalid"
    assert replay(bus.config, name, data=message_bytes("m-9")).status == "replayed"
    assert os.listdir(bus.layout.tmp) == []
    assert sorted(os.listdir(bus.layout.dlq)) == [".lock", "replayed"]
    assert len(os.listdir(bus.layout.dlq_replayed)) == 1
