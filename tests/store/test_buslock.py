"""Tests of busd.buslock: one holder per bus across processes; the OS drops it on SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from busd.store.buslock import BusLock
from busd.store.layout import Layout, init_bus
from conftest import run_python

_HOLDER = """
import sys, time
from pathlib import Path
from busd.store.buslock import BusLock
from busd.store.layout import Layout
lock = BusLock(Layout(Path(sys.argv[1])), role=sys.argv[2])
if not lock.acquire(timeout=float(sys.argv[3])):
    print("refused", flush=True)
    sys.exit(3)
print("locked", flush=True)
if sys.argv[4] == "hold":
    time.sleep(120)
else:
    time.sleep(float(sys.argv[4]))
    lock.release()
    print("released", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """A fresh bus layout."""
    return init_bus(tmp_path / "bus")


def start_holder(
    layout: Layout, role: str = "daemon", then: str = "hold", timeout: float = 5.0
) -> subprocess.Popen[bytes]:
    """A subprocess that takes the bus lock, says "locked", then holds it (or releases later)."""
    proc = run_python(_HOLDER, str(layout.root), role, str(timeout), then)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != b"locked\n":
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"holder did not lock: {line!r} {err.decode()}")
    return proc


def reap(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL (if alive) and wait."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)


def test_acquire_release_and_holder_record(layout: Layout) -> None:
    """acquire writes {pid, role, since} into busd.lock; release is idempotent, the file stays."""
    lock = BusLock(layout, role="cli")
    assert not lock.held
    before = time.time()
    assert lock.acquire(timeout=0)
    assert lock.held
    record = lock.holder()
    assert record is not None
    assert record["pid"] == os.getpid() and record["role"] == "cli"
    assert before <= record["since"] <= time.time()
    assert json.loads(layout.lock_file.read_text()) == record
    lock.release()
    lock.release()
    assert not lock.held
    assert layout.lock_file.exists()
    assert lock.acquire(timeout=0)
    lock.release()


def test_second_lock_in_the_same_process_is_refused(layout: Layout) -> None:
    """The lock is not reentrant: another BusLock object, even in this process, is refused."""
    first = BusLock(layout, role="daemon")
    second = BusLock(layout, role="cli")
    assert first.acquire(timeout=0)
    try:
        assert not second.acquire(timeout=0)
        assert not second.held
        assert second.is_held_elsewhere()
        assert not first.is_held_elsewhere()
    finally:
        first.release()
    assert second.acquire(timeout=0)
    second.release()


def test_lock_held_by_another_process_is_exclusive(layout: Layout) -> None:
    """While a subprocess holds the lock, acquire fails and holder() names its pid and role."""
    proc = start_holder(layout, role="daemon")
    try:
        lock = BusLock(layout, role="cli")
        assert not lock.acquire(timeout=0)
        assert not lock.held
        start = time.monotonic()
        assert not lock.acquire(timeout=0.3)
        assert time.monotonic() - start >= 0.3
        assert lock.is_held_elsewhere()
        record = lock.holder()
        assert record is not None
        assert record["pid"] == proc.pid
        assert record["role"] == "daemon"
        # A refused attempt must not clobber what the holder wrote.
        assert json.loads(layout.lock_file.read_text())["pid"] == proc.pid
    finally:
        reap(proc)


def test_sigkilled_holder_releases_the_lock(layout: Layout) -> None:
    """SIGKILL of the holder frees the lock at once (the OS drops it); the next taker records."""
    proc = start_holder(layout)
    lock = BusLock(layout, role="cli")
    assert not lock.acquire(timeout=0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    stale = lock.holder()  # what the dead holder wrote is still readable, though stale
    assert stale is not None and stale["pid"] == proc.pid
    assert not lock.is_held_elsewhere()
    assert lock.acquire(timeout=0)
    try:
        assert lock.holder() is not None and lock.holder()["pid"] == os.getpid()  # type: ignore[index]
    finally:
        lock.release()
    proc.communicate(timeout=10)


def test_acquire_waits_for_a_release_within_its_timeout(layout: Layout) -> None:
    """acquire(timeout=5) succeeds once the holder releases after ~0.3 s, not before."""
    proc = start_holder(layout, then="0.3")
    try:
        lock = BusLock(layout, role="cli")
        start = time.monotonic()
        assert lock.acquire(timeout=5)
        waited = time.monotonic() - start
        assert 0.1 <= waited < 5
        assert lock.holder()["pid"] == os.getpid()  # type: ignore[index]
        lock.release()
    finally:
        reap(proc)


def test_a_process_waiting_on_the_lock_gets_it_when_the_holder_is_killed(layout: Layout) -> None:
    """A second process blocked in acquire(timeout=10) takes over once the first is SIGKILLed."""
    first = start_holder(layout, role="daemon")
    waiter = run_python(_HOLDER, str(layout.root), "cli", "10", "hold")
    got: list[bytes] = []
    assert waiter.stdout is not None
    stdout = waiter.stdout
    reader = threading.Thread(target=lambda: got.append(stdout.readline()), daemon=True)
    reader.start()
    try:
        time.sleep(0.3)
        assert got == []  # still waiting
        first.send_signal(signal.SIGKILL)
        reader.join(timeout=10)
        assert got == [b"locked\n"]
        assert BusLock(layout, role="cli").holder()["pid"] == waiter.pid  # type: ignore[index]
    finally:
        reap(first)
        reap(waiter)


def test_holder_of_a_garbled_or_missing_file_is_none(layout: Layout) -> None:
    """holder() returns None when busd.lock is missing, empty, not JSON, or not an object."""
    lock = BusLock(layout, role="cli")
    assert lock.holder() is None
    for content in ("", "not json", "[1, 2]", "null"):
        layout.lock_file.write_text(content)
        assert lock.holder() is None, content
