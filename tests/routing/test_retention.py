"""Retention: journal pruning, ledger compaction, DLQ expiry, tmp cleanup, ``busd gc``."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from busd.config import load_config
from busd.routing.consumer import Consumer
from busd.routing.retention import TMP_MAX_AGE_S, gc
from busd.routing.router import Router
from busd.store.journal import Journal, JournalEntry, Position
from busd.store.layout import init_bus
from busd.store.ledger import LedgerRecord, ProcessedLedger, rfc3339
from conftest import Bus
from daemon_harness import BUSD, drop, message

pytestmark = pytest.mark.timeout(60)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_ledger_compaction_drops_only_old_records(tmp_path: Path) -> None:
    """Records older than the window go; newer ones and undatable ones stay, keys reload."""
    path = tmp_path / "bob.jsonl"
    now = time.time()
    ledger = ProcessedLedger(path)
    ledger.add_many(
        [
            LedgerRecord(message_id="old", acked_at=rfc3339(now - 100)),
            LedgerRecord(message_id="new", idempotency_key="k", acked_at=rfc3339(now - 1)),
            LedgerRecord(message_id="odd", acked_at="not a time"),
        ]
    )
    assert "old" in ledger
    assert ledger.compact(50, now=now) == 1
    assert "old" not in ledger and "new" in ledger and "k" in ledger and "odd" in ledger
    assert "old" not in ProcessedLedger(path)
    assert ledger.compact(50, now=now) == 0


def test_gc_prunes_journal_and_tmp_and_dlq(tmp_path: Path) -> None:
    """One gc pass applies every rule of the config."""
    root = init_bus(tmp_path / "bus").root
    cfg = load_config(
        root=str(root),
        env={},
        journal_segment_bytes=4096,
        journal_max_bytes=8192,
        dlq_max_age_seconds=10,
    )
    drop(root, b"{broken", "bad.json")
    with Router(cfg) as router:
        for batch in range(6):  # a batch never splits across segments: route several
            for i in range(10):
                drop(root, message(batch * 10 + i), f"{batch}-{i}.json")
            router.route_all()
    segments_before = len(list((root / "journal").glob("*.ndjson")))
    assert segments_before > 3
    stale = root / "tmp" / "abandoned.tmp"
    stale.write_bytes(b"half a message")
    old = time.time() - TMP_MAX_AGE_S - 10
    os.utime(stale, (old, old))
    fresh = root / "tmp" / "in-progress.tmp"
    fresh.write_bytes(b"being written")
    report = gc(cfg, now=time.time() + 60)
    assert report.journal_segments
    total = sum(p.stat().st_size for p in (root / "journal").glob("*.ndjson"))
    newest = max((root / "journal").glob("*.ndjson")).stat().st_size
    assert total <= 8192 + newest
    assert report.tmp_files == ["abandoned.tmp"] and fresh.exists()
    assert len(report.dlq_entries) == 1 and not list((root / "dlq").glob("*.reason.json"))


def test_steady_load_keeps_the_bus_bounded(tmp_path: Path) -> None:
    """Send, route, claim, ack and gc in rounds: the bus size stops growing."""
    root = init_bus(tmp_path / "bus").root
    cfg = load_config(
        root=str(root),
        env={},
        journal_segment_bytes=8192,
        journal_max_bytes=16384,
        dedupe_window_seconds=1,
    )
    sizes = []
    consumer = Consumer(cfg, "bob")
    with Router(cfg) as router:
        for rnd in range(6):
            for i in range(40):
                drop(root, message(rnd * 1000 + i), f"{rnd}-{i}.json")
            router.route_all()
            claims = consumer.claim(100)
            assert len(claims) == 40
            consumer.ack([c.message.message_id for c in claims])
            gc(cfg, journal=router.journal, now=time.time() + 5)
            sizes.append(_tree_bytes(root))
    assert max(sizes[2:]) <= 1.5 * sizes[1], sizes


def test_busd_gc_command(tmp_path: Path) -> None:
    """``busd gc --json`` reports what it removed, with --root after the subcommand."""
    root = init_bus(tmp_path / "bus").root
    out = subprocess.run(
        [BUSD, "gc", "--root", str(root), "--json"], capture_output=True, check=True, timeout=30
    ).stdout
    report = json.loads(out)
    assert report == {
        "journal_segments": [],
        "ledger_records": 0,
        "dlq_entries": [],
        "tmp_files": [],
    }


def _accepted(mid: str) -> JournalEntry:
    body = msgspec.json.encode({"message_id": mid, "body": "x" * 1000})
    return JournalEntry(
        event="accepted",
        at=datetime.now(UTC),
        message_id=mid,
        to=["bob"],
        message=msgspec.Raw(body),
    )


def test_gc_never_deletes_the_segments_the_checkpoint_has_not_passed(bus: Bus) -> None:
    """The journal is the queue: past the size limit, gc deletes old segments only up to
    the checkpoint's, which the daemon never moves past an unsettled memory message."""
    config = bus.with_config(journal_segment_bytes=4096, journal_max_bytes=4096)
    with Journal(bus.layout.journal, segment_bytes=4096) as journal:
        for i in range(12):
            journal.append([_accepted(f"m-{i:02d}")])
        segments = sorted(bus.layout.journal.glob("*.ndjson"))
        assert len(segments) >= 3
        held = int(segments[1].stem)  # a message there is still unsettled: the floor
        bus.layout.checkpoint_file.write_bytes(msgspec.json.encode(Position(held, 0)))
        report = gc(config, journal=journal)
    assert report.journal_segments == [segments[0].name]
    assert all(p.exists() for p in segments[1:])
