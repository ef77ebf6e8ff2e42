"""Tests of busd.store.ledger beyond what the consumer tests cover: the lock file's name,
compaction as a durable replace, and storage failures as StorageError."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from _store_faults import immutable

from busd.errors import StorageError
from busd.store.layout import Layout
from busd.store.ledger import LedgerRecord, ProcessedLedger

_OLD = "2020-01-01T00:00:00.000000Z"
_NEW = "2999-01-01T00:00:00.000000Z"


def _ledger(tmp_path: Path) -> ProcessedLedger:
    layout = Layout(tmp_path)
    layout.processed.mkdir()
    ledger = ProcessedLedger(layout.ledger("bob"))
    assert ledger.lock_path == layout.ledger_lock("bob") == layout.processed / ".bob.lock"
    ledger.add_many(
        [
            LedgerRecord(message_id="old", acked_at=_OLD),
            LedgerRecord(message_id="new", idempotency_key="k", acked_at=_NEW),
        ]
    )
    return ledger


def test_compact_replaces_the_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    """compact drops old records in one replace: the new file, its lock, no staging file."""
    ledger = _ledger(tmp_path)
    assert ledger.compact(older_than_s=3600) == 1
    assert "old" not in ledger and "new" in ledger and "k" in ledger
    assert sorted(os.listdir(tmp_path / "processed")) == [".bob.lock", "bob.jsonl"]
    assert (tmp_path / "processed" / "bob.jsonl").stat().st_mode & 0o777 == 0o600


def test_compact_refused_is_storage_error_and_keeps_the_ledger(tmp_path: Path) -> None:
    """A directory that refuses the rewrite (EPERM) raises StorageError (not a bare
    PermissionError) and keeps every record; no staging file is left behind."""
    ledger = _ledger(tmp_path)
    before = (tmp_path / "processed" / "bob.jsonl").read_bytes()
    with immutable(tmp_path / "processed"), pytest.raises(StorageError) as info:
        ledger.compact(older_than_s=3600)
    assert info.value.context["errno"] == errno.EPERM
    assert (tmp_path / "processed" / "bob.jsonl").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "processed")) == [".bob.lock", "bob.jsonl"]


def test_append_refused_is_storage_error(tmp_path: Path) -> None:
    """A ledger that cannot be created (EPERM) raises StorageError naming it."""
    layout = Layout(tmp_path)
    layout.processed.mkdir()
    (layout.processed / ".bob.lock").touch()  # so only the ledger itself is refused
    ledger = ProcessedLedger(layout.ledger("bob"))
    with immutable(layout.processed), pytest.raises(StorageError) as info:
        ledger.add_many([LedgerRecord(message_id="m", acked_at=_NEW)])
    assert info.value.context == {"path": str(layout.ledger("bob")), "errno": errno.EPERM}


def test_acked_ids_and_keys_are_two_sets(tmp_path: Path) -> None:
    """acked() matches a message's id with acked ids and its key with acked keys, never one
    with the other: a key equal to another message's id settles neither (before, one set
    held both and either message passed for acked). A second reader and compaction agree."""
    ledger = _ledger(tmp_path)  # "old" (no key) and "new" with key "k"
    ledger.add_many([LedgerRecord(message_id="x", acked_at=_NEW)])
    for view in (ledger, ProcessedLedger(ledger.path)):
        assert view.acked("x", None) and view.acked("x", "any") and view.acked("z", "k")
        assert not view.acked("y", "x")  # a key equal to the acked id x
        assert not view.acked("k", None)  # an id equal to the acked key k
        assert view.has_id("new") and view.has_key("k") and not view.has_key("new")
        assert not view.has_id("k")
        assert "k" in view and "x" in view and len(view) == 4  # 3 ids + 1 key
    assert ledger.compact(older_than_s=3600) == 1
    assert not ledger.acked("old", None) and ledger.acked("q", "k") and len(ledger) == 3
