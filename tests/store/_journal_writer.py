"""Helper process for tests/test_journal.py: writes to (or locks) a journal directory.

Modes:
  append  ``--count`` appends of ``--batch`` entries, ids ``w<writer>-<seq:06d>``; prints "done".
  loop    appends ``--batch`` entries per call forever (until killed); prints "ready" once.
  hold    takes the journal lock with portalocker, prints "locked", then sleeps until killed.

Every entry's ``detail`` is :func:`payload` of its id, so readers can check it is whole.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import portalocker

from busd.store.journal import Journal, JournalEntry


def payload(message_id: str, size: int) -> str:
    """A deterministic body of exactly ``size`` characters derived from the id."""
    unit = f"<{message_id}>"
    return (unit * (size // len(unit) + 1))[:size]


def entry(writer: int, seq: int, size: int) -> JournalEntry:
    """The ``seq``-th entry of ``writer`` with a ``size``-character detail."""
    mid = f"w{writer}-{seq:06d}"
    raw = msgspec.Raw(json.dumps({"message_id": mid, "n": seq}).encode())
    return JournalEntry(
        event="accepted",
        at=datetime.now(UTC),
        message_id=mid,
        agent=f"w{writer}",
        detail=payload(mid, size),
        message=raw,
    )


def main() -> None:
    """Parse arguments and run one mode."""
    p = argparse.ArgumentParser()
    p.add_argument("directory", type=Path)
    p.add_argument("mode", choices=["append", "loop", "hold"])
    p.add_argument("--writer", type=int, default=0)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--vary", action="store_true", help="vary batch and size per append")
    p.add_argument("--segment-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--no-fsync", action="store_true")
    p.add_argument("--pause", type=float, default=0.0)
    a = p.parse_args()

    if a.mode == "hold":
        a.directory.mkdir(parents=True, exist_ok=True)
        with (a.directory / ".lock").open("a") as f:
            portalocker.lock(f, portalocker.LockFlags.EXCLUSIVE)
            print("locked", flush=True)
            time.sleep(120)
        return

    journal = Journal(a.directory, segment_bytes=a.segment_bytes, fsync=not a.no_fsync)
    seq = 0
    calls = 0
    while a.mode == "loop" or calls < a.count:
        batch, size = a.batch, a.size
        if a.vary:  # deterministic variety: batches of 1..batch, sizes up to 2 * size
            batch = 1 + (calls * 7 + a.writer) % a.batch
            size = (calls * 7919 + a.writer * 104729) % (2 * a.size + 1)
        journal.append([entry(a.writer, seq + i, size) for i in range(batch)])
        seq += batch
        calls += 1
        if calls == 1 and a.mode == "loop":
            print("ready", flush=True)
        if a.pause:
            time.sleep(a.pause)
    journal.close()
    print("done", seq, flush=True)


if __name__ == "__main__":
    main()
