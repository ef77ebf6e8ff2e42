"""``busd run`` as a real process: routing, DLQ, recovery, leases, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from daemon_harness import BUSD, Daemon, delivered_ids, drop, files, journal_ids, message, wait_for

pytestmark = pytest.mark.timeout(120)


_ids = delivered_ids
_journal_ids = journal_ids


def test_shell_drop_is_routed(root: Path, daemon: Daemon) -> None:
    """A file written and renamed by a POSIX shell lands in the recipient's inbox."""
    (root / "outbox" / "alice").mkdir(exist_ok=True)
    body = json.dumps(message(1))
    script = (
        f"printf '%s' '{body}' > {root}/tmp/x.$$ && mv {root}/tmp/x.$$ {root}/outbox/alice/x.json"
    )
    subprocess.run(["sh", "-c", script], check=True, timeout=10)
    wait_for(lambda: _ids(root / "inbox" / "bob") == ["m-000001"], what="delivery")
    # The source goes only after the delivery is durable, so it may linger a moment.
    wait_for(lambda: files(root / "outbox" / "alice") == [], what="source removal")
    assert _journal_ids(root) == ["m-000001"]


def test_invalid_files_are_dead_lettered_and_daemon_stays_up(root: Path, daemon: Daemon) -> None:
    """Each kind of bad file gets its reason code; a good file after them still flows."""
    cases = {
        "bad-json.json": (b"{not json", "invalid_json"),
        "bad-utf8.json": (b'{"a": "\xff\xfe"}', "invalid_utf8"),
        "bad-schema.json": (json.dumps(message(2, status="x")).encode(), "schema"),
        "v2.json": (
            json.dumps(message(3, schema_version="2.0")).encode(),
            "unsupported_schema_version",
        ),
        "huge.json": (b" " * (1 << 20 + 1), "too_large"),
    }
    for name, (data, _) in cases.items():
        drop(root, data, name)
    drop(root, message(4), "good.json")
    wait_for(lambda: _ids(root / "inbox" / "bob") == ["m-000004"], what="good message")
    records = wait_for(
        lambda: (r := sorted((root / "dlq").glob("*.reason.json"))) and len(r) == 5 and r,
        what="5 DLQ records",
    )
    got = {}
    for rec in records:
        data = json.loads(rec.read_bytes())
        got[data["original_path"].rsplit("/", 1)[-1]] = data["reason"]
        original = rec.with_name(rec.name.removesuffix(".reason.json")).read_bytes()
        assert original == cases[data["original_path"].rsplit("/", 1)[-1]][0]
    assert got == {name: reason for name, (_, reason) in cases.items()}
    assert daemon.proc.poll() is None


def test_files_dropped_while_down_are_delivered_at_start(root: Path) -> None:
    """Messages that waited in outbox/ (and foreign files in inbox/) are routed once ready.

    The backlog is routed after ready (issue 11 item 6), in arrival order.
    """
    for i in range(20):
        drop(root, message(i), f"{i:02d}.json")
    (root / "inbox" / "carol").mkdir()
    (root / "inbox" / "carol" / "direct.json").write_text(json.dumps(message(99, to="carol")))
    d = Daemon(root).ready()
    try:
        wait_for(lambda: len(_ids(root / "inbox" / "bob")) == 20, what="the backlog routed")
        assert _ids(root / "inbox" / "bob") == [f"m-{i:06d}" for i in range(20)]
        wait_for(lambda: _ids(root / "inbox" / "carol") == ["m-000099"], what="the foreign file")
        assert sorted(_journal_ids(root)) == sorted([f"m-{i:06d}" for i in [*range(20), 99]])
    finally:
        assert d.stop() == 0


def test_duplicate_message_id_is_delivered_once(root: Path, daemon: Daemon) -> None:
    """The same message_id dropped twice is delivered once and journaled as a duplicate."""
    drop(root, message(7), "a.json")
    wait_for(lambda: _ids(root / "inbox" / "bob") == ["m-000007"], what="first copy")
    drop(root, message(7), "b.json")
    wait_for(lambda: _journal_ids(root, "duplicate") == ["m-000007"], what="duplicate entry")
    assert _ids(root / "inbox" / "bob") == ["m-000007"]
    wait_for(lambda: files(root / "outbox" / "alice") == [], what="source removal")


def test_expired_lease_is_redelivered_then_dead_lettered(root: Path) -> None:
    """An unacked claim returns after its lease; past max_deliveries it goes to the DLQ."""
    settings = {"BUSD_LEASE_SECONDS": "0.3", "BUSD_MAX_DELIVERIES": "2"}
    d = Daemon(root, env=settings).ready()
    # The claimer stamps the lease (the claimed file's mtime), so recv needs it too.
    env = {**os.environ, **settings}
    try:
        drop(root, message(5), "x.json")
        wait_for(lambda: _ids(root / "inbox" / "bob"), what="delivery")
        for attempt in (1, 2):
            out = subprocess.run(
                [BUSD, "--root", str(root), "recv", "bob", "--json"],
                capture_output=True,
                check=True,
                timeout=30,
                env=env,
            ).stdout
            if attempt == 1:
                assert json.loads(out)["message_id"] == "m-000005"
            wait_for(lambda: not files(root / "locks" / "bob"), what=f"lease {attempt} expiry")
        record = wait_for(lambda: list((root / "dlq").glob("*.reason.json")), what="DLQ entry")
        data = json.loads(record[0].read_bytes())
        assert data["reason"] == "delivery_limit"
        assert data["delivery_count"] == 2
    finally:
        d.kill()


def test_sigterm_exits_cleanly(root: Path) -> None:
    """SIGTERM stops the daemon with exit code 0 and a stop log line."""
    d = Daemon(root).ready()
    assert d.stop() == 0
    d.wait_event("daemon_stopped")


def test_second_instance_is_refused(root: Path, daemon: Daemon) -> None:
    """A second ``busd run`` on the same root exits non-zero at once, naming the pid."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [BUSD, "run", "--root", str(root)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 75
    assert str(daemon.proc.pid) in proc.stderr
    assert time.monotonic() - t0 < 10


def test_sd_notify_ready(root: Path, tmp_path: Path) -> None:
    """With NOTIFY_SOCKET set, the daemon sends READY=1 once it is ready."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(15)
        d = Daemon(root, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        try:
            got = b""
            while b"READY=1" not in got:
                got += sock.recv(4096) + b"\n"
            while b"WATCHDOG=1" not in got:
                got += sock.recv(4096) + b"\n"
        finally:
            assert d.stop() == 0
        assert b"STATUS=" in got


def test_sighup_reloads_config(root: Path) -> None:
    """SIGHUP re-reads <root>/busd.toml: a new topic subscription takes effect."""
    d = Daemon(root).ready()
    try:
        (root / "busd.toml").write_text('[subscriptions]\nnews = ["dave", "erin"]\n')
        d.signal(signal.SIGHUP)
        d.wait_event("config_reloaded")
        drop(root, message(8, to="topic:news"), "n.json")
        wait_for(lambda: _ids(root / "inbox" / "erin") == ["m-000008"], what="topic delivery")
        assert _ids(root / "inbox" / "dave") == ["m-000008"]
    finally:
        assert d.stop() == 0


@pytest.mark.slow
def test_sigkill_during_load_loses_nothing(root: Path) -> None:
    """SIGKILL in the middle of a 2000-message load; after restart all are delivered once."""
    d = Daemon(root).ready()
    n = 2000
    for i in range(n):
        drop(root, message(i), f"{i:05d}.json")
        if i == n // 2:
            d.kill()
            d = Daemon(root).ready()
        if i == 3 * n // 4:
            d.kill()
    d = Daemon(root).ready()
    try:
        wait_for(lambda: len(files(root / "inbox" / "bob")) >= n, timeout=60, what="all delivered")
        delivered = _ids(root / "inbox" / "bob")
        assert sorted(delivered) == [f"m-{i:06d}" for i in range(n)]
        assert sorted(set(_journal_ids(root))) == [f"m-{i:06d}" for i in range(n)]
        assert files(root / "outbox" / "alice") == []
    finally:
        assert d.stop() == 0


@pytest.mark.slow
def test_ten_thousand_waiting_files_are_drained(root: Path) -> None:
    """A bus with 10,000 files waiting in outboxes is fully routed after start."""
    n = 10_000
    for i in range(n):
        drop(root, message(i), f"{i:05d}.json", agent=f"agent{i % 4}")
    d = Daemon(root).ready(timeout=90)
    try:
        wait_for(lambda: len(files(root / "inbox" / "bob")) == n, timeout=60, what="drained")
        assert all(files(root / "outbox" / f"agent{k}") == [] for k in range(4))
    finally:
        assert d.stop() == 0


def test_journal_torn_tail_is_repaired_at_start(root: Path) -> None:
    """A journal ending in a torn line (a writer killed mid-append) is repaired on start."""
    d = Daemon(root).ready()
    drop(root, message(1), "1.json")
    wait_for(lambda: _ids(root / "inbox" / "bob"), what="delivery")
    assert d.stop() == 0
    segment = sorted((root / "journal").glob("*.ndjson"))[-1]
    with segment.open("ab") as f:
        f.write(b'{"event":"accepted","at":"2026-')
    d = Daemon(root).ready()
    try:
        d.wait_event("journal_tail_repaired")
        assert segment.read_bytes().endswith(b"\n")
        assert os.path.getsize(segment) > 0
    finally:
        assert d.stop() == 0
