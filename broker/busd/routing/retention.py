"""Retention: keep a bus bounded under a steady load.

:func:`gc` is what the daemon runs on a timer and ``busd gc`` runs once:

* journal segments are deleted whole, oldest first, past
  ``journal_max_age_seconds`` or beyond ``journal_max_bytes``, but never the
  current segment nor any segment at or after the checkpoint's: the journal is
  the queue, and the checkpoint never passes a message that is neither settled
  nor an inbox file (an agent that never consumes holds its segments);
* each processed ledger drops records older than ``dedupe_window_seconds``
  (past the window a redelivered id is no longer recognised, which is what the
  window means);
* DLQ entries older than ``dlq_max_age_seconds`` are purged (default: never);
* files in ``tmp/`` older than a day are removed: they are what a producer
  killed between write and rename leaves behind, and nobody will finish them.

Safe to run beside a daemon: every step takes the lock of what it rewrites.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

from busd.config import Config
from busd.store import dlq
from busd.store.fsio import scan_entries
from busd.store.journal import START, Journal, Position
from busd.store.ledger import ProcessedLedger

__all__ = ["TMP_MAX_AGE_S", "GcReport", "gc"]

TMP_MAX_AGE_S = 86400.0
"""Age after which a file in ``tmp/`` counts as abandoned."""


class GcReport(msgspec.Struct, kw_only=True):
    """What one :func:`gc` pass removed."""

    journal_segments: list[str] = msgspec.field(default_factory=list)
    ledger_records: int = 0
    dlq_entries: list[str] = msgspec.field(default_factory=list)
    tmp_files: list[str] = msgspec.field(default_factory=list)


def gc(config: Config, *, journal: Journal | None = None, now: float | None = None) -> GcReport:
    """Apply every retention rule of ``config`` once; return what was removed."""
    now = time.time() if now is None else now
    layout = config.layout
    report = GcReport()
    own = journal is None
    j = journal or Journal(layout.journal, segment_bytes=config.journal_segment_bytes)
    try:
        removed = j.prune(
            max_age_seconds=config.journal_max_age_seconds,
            max_total_bytes=config.journal_max_bytes,
            keep_after=_checkpoint(layout.checkpoint_file),
        )
        report.journal_segments = [p.name for p in removed]
    finally:
        if own:
            j.close()
    for entry in scan_entries(layout.processed):
        if entry.name.endswith(".jsonl") and not entry.name.startswith("."):
            ledger = ProcessedLedger(layout.processed / entry.name)
            report.ledger_records += ledger.compact(config.dedupe_window_seconds, now=now)
    if config.dlq_max_age_seconds is not None:
        report.dlq_entries = dlq.purge(layout, older_than_s=config.dlq_max_age_seconds, now=now)
    for entry in scan_entries(layout.tmp):
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime > TMP_MAX_AGE_S:
                os.unlink(entry.path)
                report.tmp_files.append(entry.name)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
    return report


def _checkpoint(path: Path) -> Position | None:
    """The recorded checkpoint; None where no daemon ever wrote one (then every message
    is an inbox file or settled, and the journal holds only history)."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=Position)
    except FileNotFoundError:
        return None
    except msgspec.DecodeError:
        return START  # unreadable: keep everything rather than guess
