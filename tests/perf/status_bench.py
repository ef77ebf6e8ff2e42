"""How long ``busd status --json`` takes on a big bus (a benchmark, not a test).

Builds a bus with 100,000 journaled messages (written with ``Journal.append`` in
big batches, no fsync), 10,000 ready files spread over 20 inboxes, 1,000 files
waiting in outboxes and 200 DLQ entries, then times ``busd status --json`` as a
subprocess, from the files and through a running daemon, next to ``busd
--version`` (the interpreter and import cost every command pays).

Run: .venv/bin/python tests/perf/status_bench.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from busd.store.journal import Journal, JournalEntry
from busd.store.layout import delivery_name, init_bus

BUSD = str(Path(sys.executable).with_name("busd"))
MESSAGES = 100_000
READY = 10_000
OUTBOX = 1_000
DLQ = 200
AGENTS = 20
BATCH = 10_000
RUNS = 7


def _message(i: int) -> bytes:
    return msgspec.json.encode(
        {
            "message_type": "fact",
            "schema_version": "1.0",
            "message_id": f"m-{i:07d}",
            "created_at": "2026-11-21T12:00:00Z",
            "workflow_id": f"w{i % 50}",
            "task_id": "t1",
            "agent_id": "alice",
            "to": f"agent{i % AGENTS:02d}",
            "body": "x" * 300,
        }
    )


def build(root: Path) -> None:
    """The big bus, written directly (minutes of routing avoided)."""
    layout = init_bus(root)
    now = datetime.now(UTC)
    with Journal(layout.journal, fsync=False) as journal:
        for start in range(0, MESSAGES, BATCH):
            entries = [
                JournalEntry(
                    event="accepted",
                    at=now,
                    message_id=f"m-{i:07d}",
                    agent="alice",
                    to=[f"agent{i % AGENTS:02d}"],
                    source=f"outbox/alice/{i:020d}-m-{i:07d}.json",
                    message=msgspec.Raw(_message(i)),
                )
                for i in range(start, min(start + BATCH, MESSAGES))
            ]
            journal.append(entries)
        end = journal.end_position()
    # Everything above counts as delivered: without a checkpoint a starting daemon
    # would re-deliver every accepted message its recipient lacks.
    (layout.journal / "checkpoint").write_bytes(msgspec.json.encode(end))
    base = time.time_ns() - 3600 * 10**9
    for i in range(READY):
        agent = f"agent{i % AGENTS:02d}"
        inbox = layout.inbox_dir(agent)
        inbox.mkdir(mode=0o700, exist_ok=True)
        layout.locks_dir(agent).mkdir(mode=0o700, exist_ok=True)
        name = delivery_name(f"{base + i:020d}", i % 3, f"m-{i:07d}")
        (inbox / name).write_bytes(_message(i))
    outbox = layout.outbox_dir("alice")
    outbox.mkdir(mode=0o700, exist_ok=True)
    for i in range(OUTBOX):
        (outbox / f"{base + i:020d}-o-{i:07d}.json").write_bytes(_message(MESSAGES + i))
    for i in range(DLQ):
        name = f"{base + i:020d}-bad-{i}.json"
        (layout.dlq / name).write_bytes(b"{not json")
        record = {
            "reason": "invalid_json" if i % 2 else "schema",
            "detail": "bench",
            "first_failure_at": "2026-11-21T12:00:00Z",
            "last_failure_at": "2026-11-21T12:00:00Z",
            "schema": 1,
        }
        (layout.dlq / f"{name}.reason.json").write_bytes(msgspec.json.encode(record) + b"\n")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}


def timed(*args: str) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Wall time of one ``busd`` run."""
    t0 = time.perf_counter()
    proc = subprocess.run([BUSD, *args], capture_output=True, env=_env(), check=False)
    return time.perf_counter() - t0, proc


def series(label: str, *args: str, expect: int) -> float:
    """Median of RUNS runs (after one warm-up), printed."""
    timed(*args)
    times = []
    for _ in range(RUNS):
        took, proc = timed(*args)
        assert proc.returncode == expect, (args, proc.returncode, proc.stderr.decode())
        times.append(took)
    med = statistics.median(times)
    print(f"{label:<34} median {med * 1000:7.0f} ms  (min {min(times) * 1000:.0f}, n={RUNS})")
    return med


def _wait_socket(path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the daemon did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", help="build the bus here and keep it")
    args = parser.parse_args()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="busd-status-bench-")
    root = Path(args.keep or (tmp.name if tmp else ".")) / "bus"
    t0 = time.perf_counter()
    build(root)
    journal_mb = sum(p.stat().st_size for p in (root / "journal").glob("*.ndjson")) / 1e6
    print(
        f"built {MESSAGES} journaled messages ({journal_mb:.0f} MB), {READY} ready files, "
        f"{OUTBOX} outbox files, {DLQ} DLQ entries in {time.perf_counter() - t0:.1f} s"
    )
    series("busd --version (startup floor)", "--version", expect=0)
    series("busd status --json (files)", "status", "--json", "--root", str(root), expect=3)
    _, proc = timed("status", "--json", "--root", str(root))
    data = json.loads(proc.stdout)
    ready = sum(a["ready"] for a in data["agents"].values())
    backlog, dead = data["outbox"]["backlog"], data["dlq"]["entries"]
    print(f"  saw {ready} ready, {backlog} in outboxes, {dead} DLQ entries")
    daemon = subprocess.Popen(
        [BUSD, "run", "--root", str(root), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    try:
        t1 = time.perf_counter()
        _wait_socket(root / "busd.sock")
        # Ready when status answers (start-up recovery routes the outbox first).
        while timed("status", "--json", "--root", str(root))[1].returncode != 0:
            time.sleep(0.2)
        print(f"daemon up in {time.perf_counter() - t1:.1f} s (dedupe index rebuilt)")
        series("busd status --json (daemon)", "status", "--json", "--root", str(root), expect=0)
    finally:
        daemon.terminate()
        try:
            daemon.wait(60)
        finally:
            if tmp is not None:
                tmp.cleanup()


if __name__ == "__main__":
    main()
