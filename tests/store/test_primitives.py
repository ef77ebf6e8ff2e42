"""Tests of the store primitives written once in busd.store.fsio: file_lock,
replace_durable, list_names, STORAGE_ERRNOS / storage_error, and that every lock
file of a bus is that one lock (protocol.md 6.3 and 9: what flock(1) takes)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from _store_faults import immutable

from busd.errors import LockTimeout, StorageError
from busd.store import dlq
from busd.store import ledger as ledger_mod
from busd.store.buslock import BusLock
from busd.store.fsio import (
    STORAGE_ERRNOS,
    file_lock,
    list_names,
    replace_durable,
    storage_error,
)
from busd.store.journal import Journal, JournalEntry
from busd.store.ledger import LedgerRecord, ProcessedLedger
from conftest import Bus

FLOCK = shutil.which("flock")
STRACE = shutil.which("strace")
_needs_flock = pytest.mark.skipif(FLOCK is None, reason="flock(1) is not installed")


def _hold(path: Path, *, shared: bool = False) -> subprocess.Popen[bytes]:
    """``flock(1)`` holding ``path`` in another process until killed (what a shell does)."""
    assert FLOCK is not None
    mode = "-s" if shared else "-x"
    proc = subprocess.Popen(
        [FLOCK, mode, str(path), "sh", "-c", "echo held; exec sleep 30"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
    return proc


@pytest.fixture
def held() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def _free(path: Path) -> bool:
    """True when another process could take ``path`` exclusively right now."""
    assert FLOCK is not None
    return subprocess.run([FLOCK, "-n", "-x", str(path), "true"], check=False).returncode == 0


# ------------------------------------------------------------------ file_lock


@_needs_flock
def test_file_lock_waits_for_flock_then_times_out(
    tmp_path: Path, held: list[subprocess.Popen[bytes]]
) -> None:
    """An exclusive flock(1) elsewhere: file_lock gives up after timeout with LockTimeout."""
    path = tmp_path / "x.lock"
    held.append(_hold(path))
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as info, file_lock(path, timeout=0.3, what="the thing"):
        pass
    assert 0.3 <= time.monotonic() - t0 < 3
    assert info.value.code == "lock_timeout"
    assert info.value.context == {"path": str(path), "timeout": 0.3}
    assert "the thing" in str(info.value) and str(path) in str(info.value)


@_needs_flock
def test_file_lock_is_an_exclusive_flock_released_on_exit(tmp_path: Path) -> None:
    """Held: flock(1) -n fails on the same file; after the block it succeeds."""
    path = tmp_path / "x.lock"
    with file_lock(path, timeout=0) as fh:
        assert not _free(path)
        fh.write(b"info")  # the holder may write into it (the bus lock does)
    assert _free(path)
    assert path.read_bytes() == b"info"


@_needs_flock
def test_file_lock_shared_coexists_with_shared_only(
    tmp_path: Path, held: list[subprocess.Popen[bytes]]
) -> None:
    """Shared locks coexist; an exclusive one waits for them."""
    path = tmp_path / "x.lock"
    held.append(_hold(path, shared=True))
    with file_lock(path, timeout=0, shared=True):
        pass
    with pytest.raises(LockTimeout), file_lock(path, timeout=0.1):
        pass


def test_file_lock_excludes_a_second_open_in_the_same_process(tmp_path: Path) -> None:
    """Each use opens the file afresh, so two threads or objects of one process exclude."""
    path = tmp_path / "x.lock"
    with file_lock(path, timeout=0), pytest.raises(LockTimeout), file_lock(path, timeout=0):
        pass


def test_file_lock_creates_the_file_with_the_umask_default(tmp_path: Path) -> None:
    """A missing lock file is created; its mode is what the umask leaves of 0666."""
    old = os.umask(0o022)
    try:
        with file_lock(tmp_path / "new.lock", timeout=0):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "new.lock").stat().st_mode & 0o777 == 0o644


@_needs_flock
def test_every_lock_of_a_bus_is_the_protocol_flock_with_one_error_shape(
    bus: Bus, held: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """journal/.lock, processed/.<a>.lock, dlq/.lock and busd.lock: each is blocked by
    flock(1) on its protocol path, and each timeout is LockTimeout naming that path."""
    layout = bus.layout
    monkeypatch.setattr(ledger_mod, "_LOCK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(dlq, "_LOCK_TIMEOUT_S", 0.2)
    for path in (layout.journal_lock, layout.ledger_lock("bob"), layout.dlq_lock, layout.bus_lock):
        held.append(_hold(path))

    attempts: dict[Path, Callable[[], object]] = {
        layout.journal_lock: lambda: Journal(layout.journal, lock_timeout=0.2).append(
            [JournalEntry(event="accepted", at=datetime.now(UTC))]
        ),
        layout.ledger_lock("bob"): lambda: ProcessedLedger(layout.ledger("bob")).add_many(
            [LedgerRecord(message_id="m-1", acked_at="2024-01-01T00:00:00.000000Z")]
        ),
        layout.dlq_lock: lambda: dlq.purge(layout, older_than_s=1),
    }
    for path, attempt in attempts.items():
        with pytest.raises(LockTimeout) as info:
            attempt()
        assert info.value.context.get("path") == str(path), path
        assert info.value.context.get("timeout") == 0.2, path
    assert not BusLock(layout, "cli").acquire(timeout=0.1)


# ------------------------------------------------------------------ replace_durable


def test_replace_durable_creates_and_replaces(tmp_path: Path) -> None:
    """Creates, then replaces atomically; mode 0600; no temporary file left anywhere."""
    path = tmp_path / "state.json"
    replace_durable(path, b"one")
    assert path.read_bytes() == b"one" and path.stat().st_mode & 0o777 == 0o600
    replace_durable(path, b"two", mode=0o640)
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["state.json"]


def test_replace_durable_with_tmp_dir_stages_there(tmp_path: Path) -> None:
    """With tmp_dir the staging file lives (briefly) there; both directories end clean."""
    (tmp_path / "tmp").mkdir()
    path = tmp_path / "rec.json"
    replace_durable(path, b"x", tmp_dir=tmp_path / "tmp")
    assert path.read_bytes() == b"x"
    assert os.listdir(tmp_path / "tmp") == []


def test_replace_durable_failure_leaves_no_tmp(tmp_path: Path) -> None:
    """A failing replace (the target is a directory) raises and removes its staging file."""
    (tmp_path / "target").mkdir()
    with pytest.raises(IsADirectoryError):
        replace_durable(tmp_path / "target", b"x")
    assert os.listdir(tmp_path) == ["target"]


def test_replace_durable_refused_write_is_storage_error(tmp_path: Path) -> None:
    """EPERM (an immutable directory) is a StorageError naming the path; the old file stays."""
    path = tmp_path / "d" / "state.json"
    path.parent.mkdir()
    path.write_bytes(b"old")
    with immutable(path.parent), pytest.raises(StorageError) as info:
        replace_durable(path, b"new")
    assert info.value.context == {"path": str(path), "errno": errno.EPERM}
    assert path.read_bytes() == b"old" and os.listdir(path.parent) == ["state.json"]


_STRACED = """
import sys
from pathlib import Path
from busd.store.fsio import replace_durable
replace_durable(Path(sys.argv[1]) / "state.json", b"x" * 10, fsync=sys.argv[2] == "1")
"""
_SYSCALL_RE = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)\)\s+=\s+(-?\d+)")


def _strace(tmp_path: Path, fsync: bool) -> list[tuple[str, str]]:
    if STRACE is None:
        pytest.skip("strace is not installed")
    work = tmp_path / "w"
    work.mkdir()
    log = tmp_path / "strace.log"
    argv = [
        STRACE,
        "-f",
        "-y",
        "-o",
        str(log),
        "-e",
        "trace=fsync,fdatasync,rename,renameat,renameat2",
    ]
    argv += [sys.executable, "-c", _STRACED, str(work), "1" if fsync else "0"]
    proc = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    if proc.returncode != 0 and not log.exists():
        pytest.skip(f"strace cannot trace here: {proc.stderr.decode(errors='replace')[:200]}")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert (work / "state.json").read_bytes() == b"x" * 10
    calls: list[tuple[str, str]] = []
    for line in log.read_text().splitlines():
        m = _SYSCALL_RE.match(line)
        if m and m.group(3) == "0" and str(work) in m.group(2):
            calls.append((m.group(1), m.group(2)))
    return calls


def test_replace_durable_syscall_order_under_strace(tmp_path: Path) -> None:
    """fsync(staging file) before the rename over the target, fsync(directory) after it."""
    calls = _strace(tmp_path, fsync=True)
    work = re.escape(str(tmp_path / "w"))
    names = [c for c, _ in calls]
    fsync_tmp = next(i for i, (c, a) in enumerate(calls) if c == "fsync" and ".tmp>" in a)
    rename = next(i for i, (c, _) in enumerate(calls) if c.startswith("rename"))
    assert re.search(rf'"{work}/\.[^"]+\.tmp".*"{work}/state\.json"', calls[rename][1])
    directory = f"<{tmp_path / 'w'}>"
    fsync_dir = next(i for i, (c, a) in enumerate(calls) if c == "fsync" and a.endswith(directory))
    assert fsync_tmp < rename < fsync_dir, names


def test_replace_durable_without_fsync_issues_none(tmp_path: Path) -> None:
    """fsync=False (a bus configured without fsync): the rename, and no fsync at all."""
    calls = _strace(tmp_path, fsync=False)
    assert [c for c, _ in calls if c in ("fsync", "fdatasync")] == []
    assert any(c.startswith("rename") for c, _ in calls)


# ------------------------------------------------------------------ list_names


def test_list_names_visible_sorted_missing_is_empty(tmp_path: Path) -> None:
    """Hidden names are left out, the rest sorted; a missing directory or a file lists empty."""
    for name in ("b", ".lock", "a", ".x.tmp", "c"):
        (tmp_path / name).write_bytes(b"")
    assert list_names(tmp_path) == ["a", "b", "c"]
    assert list_names(tmp_path / "missing") == []
    assert list_names(tmp_path / "a") == []


# ------------------------------------------------------------------ storage errors


def test_storage_errnos_are_one_set() -> None:
    """Disk full, read-only, quota and permission errnos are storage errors; others not."""
    assert {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM} <= STORAGE_ERRNOS
    assert errno.ENOENT not in STORAGE_ERRNOS and errno.EINVAL not in STORAGE_ERRNOS


def test_storage_error_names_the_path_and_errno() -> None:
    """storage_error keeps the OS reason, the path and the errno; without a path, the bus."""
    exc = OSError(errno.ENOSPC, "No space left on device", "/bus/journal/x")
    err = storage_error(exc)
    assert err.code == "storage_error"
    assert str(err) == "cannot write /bus/journal/x: No space left on device"
    assert err.context == {"path": "/bus/journal/x", "errno": errno.ENOSPC}
    assert storage_error(exc, path=Path("/bus/p")).context["path"] == "/bus/p"
    bare = storage_error(OSError(errno.EROFS, "Read-only file system"))
    assert str(bare) == "the bus cannot be written: Read-only file system"
    assert bare.context == {"errno": errno.EROFS}
