"""Tests of busd.fsio: durable no-replace writes, rename_noreplace, bounded safe reads."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from busd.errors import InvalidMessage, Reason, StorageError
from busd.store import fsio
from busd.store.fsio import read_limited, rename_noreplace, write_durable

STRACE = shutil.which("strace") or "/usr/bin/strace"
GIB = 1 << 30


@pytest.fixture(params=["renameat2", "link_unlink"])
def rename_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once per code path of rename_noreplace (module flag, real syscalls)."""
    if request.param == "renameat2":
        if not fsio._renameat2_works:
            pytest.skip("renameat2(RENAME_NOREPLACE) is not available here")
    else:
        monkeypatch.setattr(fsio, "_renameat2_works", False)
    return str(request.param)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A target directory and a tmp directory on the same filesystem."""
    target, tmp = tmp_path / "out", tmp_path / "tmp"
    target.mkdir()
    tmp.mkdir()
    return target, tmp


# ------------------------------------------------------------------ write_durable


def test_write_durable_creates_the_file_with_the_bytes(dirs: tuple[Path, Path]) -> None:
    """The file appears under its name with exactly the bytes, mode 0600; tmp/ is left empty."""
    target, tmp = dirs
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    path = write_durable(target, "m.json", data, tmp_dir=tmp)
    assert path == target / "m.json"
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp) == []
    assert os.listdir(target) == ["m.json"]


def test_write_durable_empty_and_no_fsync(dirs: tuple[Path, Path]) -> None:
    """Empty data and fsync=False still publish a complete file and clean tmp/."""
    target, tmp = dirs
    assert write_durable(target, "empty", b"", tmp_dir=tmp).read_bytes() == b""
    assert write_durable(target, "nofs", b"abc", tmp_dir=tmp, fsync=False).read_bytes() == b"abc"
    assert os.listdir(tmp) == []


def test_write_durable_never_replaces(dirs: tuple[Path, Path], rename_mode: str) -> None:
    """A name clash raises FileExistsError; the old file is intact and tmp/ holds nothing."""
    target, tmp = dirs
    (target / "m.json").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        write_durable(target, "m.json", b"new", tmp_dir=tmp)
    assert (target / "m.json").read_bytes() == b"old"
    assert os.listdir(tmp) == []
    assert os.listdir(target) == ["m.json"]


def test_write_durable_racing_writers_exactly_one_wins(
    dirs: tuple[Path, Path], rename_mode: str
) -> None:
    """8 threads publish the same name at once: one succeeds, 7 get FileExistsError."""
    target, tmp = dirs
    barrier = threading.Barrier(8)
    outcomes: dict[int, str] = {}

    def writer(i: int) -> None:
        barrier.wait()
        try:
            write_durable(target, "same", f"writer {i}".encode() * 1000, tmp_dir=tmp)
            outcomes[i] = "won"
        except FileExistsError:
            outcomes[i] = "lost"

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    winners = [i for i, o in outcomes.items() if o == "won"]
    assert len(outcomes) == 8 and len(winners) == 1
    assert (target / "same").read_bytes() == f"writer {winners[0]}".encode() * 1000
    assert os.listdir(tmp) == []


def test_write_durable_missing_directory_leaves_no_tmp(tmp_path: Path) -> None:
    """Publishing into a directory that does not exist raises and removes the temp file."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with pytest.raises(FileNotFoundError):
        write_durable(tmp_path / "nope", "m", b"x", tmp_dir=tmp)
    assert os.listdir(tmp) == []


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root bypasses directory permissions; no unprivileged way to make EACCES here",
)
def test_write_durable_read_only_directory_raises_storage_error(dirs: tuple[Path, Path]) -> None:
    """A directory we may not write raises StorageError (code storage_error), tmp/ left empty."""
    target, tmp = dirs
    target.chmod(0o500)
    try:
        with pytest.raises(StorageError) as info:
            write_durable(target, "m", b"x", tmp_dir=tmp)
    finally:
        target.chmod(0o700)
    assert info.value.code == "storage_error"
    assert os.listdir(tmp) == []
    assert os.listdir(target) == []


_STRACED = """
import sys
from pathlib import Path
from busd.store import fsio
base, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "link_unlink":
    fsio._renameat2_works = False
fsio.write_durable(base / "out", "msg.json", b"x" * 100, tmp_dir=base / "tmp",
                   fsync=mode != "nofsync")
"""

_SYSCALL_RE = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)\)\s+=\s+(-?\d+)")


def _strace_write(tmp_path: Path, mode: str) -> list[tuple[str, str]]:
    """Run write_durable under strace; return (syscall, args) of successful relevant calls."""
    if not Path(STRACE).is_file():
        pytest.skip("strace is not installed")
    (tmp_path / "out").mkdir()
    (tmp_path / "tmp").mkdir()
    log = tmp_path / "strace.log"
    calls = "fsync,fdatasync,rename,renameat,renameat2,link,linkat,unlink,unlinkat"
    argv = [STRACE, "-f", "-y", "-s", "4096", "-o", str(log), "-e", f"trace={calls}"]
    argv += [sys.executable, "-c", _STRACED, str(tmp_path), mode]
    proc = subprocess.run(
        argv,
        capture_output=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0 and not log.exists():
        pytest.skip(f"strace cannot trace here: {proc.stderr.decode(errors='replace')[:200]}")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert (tmp_path / "out" / "msg.json").read_bytes() == b"x" * 100
    out: list[tuple[str, str]] = []
    for line in log.read_text().splitlines():
        m = _SYSCALL_RE.match(line)
        if m and m.group(3) == "0" and str(tmp_path) in m.group(2):
            out.append((m.group(1), m.group(2)))
    return out


def _index(calls: list[tuple[str, str]], name: str, pattern: str) -> int:
    """Position of the first call ``name`` whose args match ``pattern``."""
    for i, (call, args) in enumerate(calls):
        if call == name and re.search(pattern, args):
            return i
    raise AssertionError(f"no {name} matching {pattern!r} in {calls}")


@pytest.mark.parametrize("mode", ["renameat2", "link_unlink"])
def test_write_durable_syscall_order_under_strace(tmp_path: Path, mode: str) -> None:
    """strace shows fsync(temp file) before the publish, then fsync(directory) after it."""
    if mode == "renameat2" and not fsio._renameat2_works:
        pytest.skip("renameat2(RENAME_NOREPLACE) is not available here")
    calls = _strace_write(tmp_path, mode)
    tmp_re = re.escape(str(tmp_path / "tmp")) + r"/[^\"<>]+\.tmp"
    out_dir = re.escape(str(tmp_path / "out"))
    fsync_file = _index(calls, "fsync", rf"<{tmp_re}>")
    if mode == "renameat2":
        publish = _index(calls, "renameat2", r"RENAME_NOREPLACE")
        assert re.search(rf'"{tmp_re}".*"{out_dir}/msg\.json"', calls[publish][1])
    else:
        publish = _index(calls, "link", rf'"{tmp_re}", "{out_dir}/msg\.json"')
        unlink = _index(calls, "unlink", rf'"{tmp_re}"')
        assert publish < unlink
    fsync_dir = _index(calls, "fsync", rf"<{out_dir}>")
    assert fsync_file < publish < fsync_dir


def test_write_durable_no_fsync_issues_no_fsync_under_strace(tmp_path: Path) -> None:
    """With fsync=False strace sees the publish but no fsync of the file or the directory."""
    calls = _strace_write(tmp_path, "nofsync")
    assert [c for c, _ in calls if c in ("fsync", "fdatasync")] == []
    assert any(c in ("renameat2", "link") for c, _ in calls)


# ------------------------------------------------------------------ rename_noreplace


def test_rename_noreplace_moves_the_file(tmp_path: Path, rename_mode: str) -> None:
    """The source vanishes and the same inode appears under the new name."""
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"payload")
    ino = src.stat().st_ino
    rename_noreplace(src, dst)
    assert not src.exists()
    assert dst.read_bytes() == b"payload"
    assert dst.stat().st_ino == ino
    assert dst.stat().st_nlink == 1


def test_rename_noreplace_refuses_an_existing_target(tmp_path: Path, rename_mode: str) -> None:
    """An existing destination raises FileExistsError and both files keep their bytes."""
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert src.read_bytes() == b"new"
    assert dst.read_bytes() == b"old"


def test_rename_noreplace_missing_source(tmp_path: Path, rename_mode: str) -> None:
    """A vanished source raises FileNotFoundError and creates nothing."""
    with pytest.raises(FileNotFoundError):
        rename_noreplace(tmp_path / "gone", tmp_path / "b")
    assert os.listdir(tmp_path) == []


def test_rename_noreplace_moves_a_symlink_as_itself(tmp_path: Path, rename_mode: str) -> None:
    """A symlink is moved as a link (never its target), even a dangling one."""
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    for name, points_to in (("live", target), ("dangling", tmp_path / "nowhere")):
        src, dst = tmp_path / f"{name}-src", tmp_path / f"{name}-dst"
        src.symlink_to(points_to)
        rename_noreplace(src, dst)
        assert not os.path.lexists(src)
        assert dst.is_symlink()
        assert os.readlink(dst) == str(points_to)
    assert target.stat().st_nlink == 1


def test_rename_noreplace_moves_a_fifo_without_opening_it(tmp_path: Path, rename_mode: str) -> None:
    """A FIFO is moved as a FIFO (an open would block: the test would time out)."""
    src, dst = tmp_path / "fifo", tmp_path / "moved"
    os.mkfifo(src)
    rename_noreplace(src, dst)
    assert stat.S_ISFIFO(os.lstat(dst).st_mode)
    assert not os.path.lexists(src)


def test_rename_noreplace_moves_a_directory(tmp_path: Path, rename_mode: str) -> None:
    """A directory (dlq moves them in as is) is moved with its content, on both code paths."""
    src, dst = tmp_path / "dir-src", tmp_path / "dir-dst"
    src.mkdir()
    (src / "inner").write_bytes(b"x")
    rename_noreplace(src, dst)
    assert not src.exists()
    assert (dst / "inner").read_bytes() == b"x"


def test_rename_noreplace_refuses_to_replace_with_a_directory(
    tmp_path: Path, rename_mode: str
) -> None:
    """A directory source never replaces an existing file or directory at the target."""
    src = tmp_path / "dir-src"
    src.mkdir()
    (src / "inner").write_bytes(b"x")
    taken_file, taken_dir = tmp_path / "file", tmp_path / "empty-dir"
    taken_file.write_bytes(b"old")
    taken_dir.mkdir()
    for dst in (taken_file, taken_dir):
        with pytest.raises(FileExistsError):
            rename_noreplace(src, dst)
    assert (src / "inner").read_bytes() == b"x"
    assert taken_file.read_bytes() == b"old"
    assert os.listdir(taken_dir) == []


# ------------------------------------------------------------------ read_limited


def test_read_limited_reads_a_regular_file(tmp_path: Path) -> None:
    """A regular file within the limit comes back whole, also exactly at the limit."""
    path = tmp_path / "m"
    data = os.urandom(200_000)
    path.write_bytes(data)
    assert read_limited(path, 1 << 20) == data
    assert read_limited(path, len(data)) == data
    (tmp_path / "empty").write_bytes(b"")
    assert read_limited(tmp_path / "empty", 0) == b""


def test_read_limited_one_byte_over_is_too_large(tmp_path: Path) -> None:
    """A file one byte over the limit raises InvalidMessage too_large."""
    path = tmp_path / "m"
    path.write_bytes(b"x" * 101)
    with pytest.raises(InvalidMessage) as info:
        read_limited(path, 100)
    assert info.value.reason is Reason.TOO_LARGE


def test_read_limited_refuses_a_sparse_gigabyte_instantly(tmp_path: Path) -> None:
    """A 1 GiB sparse file is refused from its size, before any read (well under a second)."""
    path = tmp_path / "huge"
    with open(path, "wb") as f:
        f.truncate(GIB)
    start = time.monotonic()
    with pytest.raises(InvalidMessage) as info:
        read_limited(path, 1 << 20)
    assert time.monotonic() - start < 2.0
    assert info.value.reason is Reason.TOO_LARGE
    # The size check's wording (the read loop would say "still growing" instead).
    assert f"{GIB} bytes is over the limit" in info.value.detail


def test_read_limited_stops_a_file_bigger_than_its_stat_size() -> None:
    """/proc files stat as 0 bytes but hold more: the limit is enforced while reading too."""
    assert os.stat("/proc/self/status").st_size == 0
    assert b"Pid:" in read_limited(Path("/proc/self/status"), 1 << 20)
    with pytest.raises(InvalidMessage) as info:
        read_limited(Path("/proc/self/status"), 10)
    assert info.value.reason is Reason.TOO_LARGE


def test_read_limited_refuses_a_symlink_without_following_it(tmp_path: Path) -> None:
    """Symlinks (to a file, to nothing, to a FIFO) are not_a_regular_file, never followed."""
    real = tmp_path / "real"
    real.write_bytes(b"secret")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for name, target in (("to-file", real), ("dangling", tmp_path / "nowhere"), ("to-fifo", fifo)):
        link = tmp_path / name
        link.symlink_to(target)
        # Following the dangling link would raise FileNotFoundError instead.
        with pytest.raises(InvalidMessage) as info:
            read_limited(link, 1 << 20)
        assert info.value.reason is Reason.NOT_A_REGULAR_FILE
        assert "symbolic link" in info.value.detail


def test_read_limited_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    """A FIFO with no writer is refused at once (run in a thread so a hang fails, not stalls)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[InvalidMessage | OSError | bytes] = []

    def attempt() -> None:
        try:
            result.append(read_limited(fifo, 1 << 20))
        except (InvalidMessage, OSError) as exc:
            result.append(exc)

    start = time.monotonic()
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=5)
    if thread.is_alive():  # unblock it so the process can exit, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(timeout=5)
        pytest.fail("read_limited blocked on a FIFO")
    assert time.monotonic() - start < 2.0
    (exc,) = result
    assert isinstance(exc, InvalidMessage)
    assert exc.reason is Reason.NOT_A_REGULAR_FILE
    assert "FIFO" in exc.detail


def test_read_limited_refuses_a_directory(tmp_path: Path) -> None:
    """A directory is not_a_regular_file."""
    (tmp_path / "d").mkdir()
    with pytest.raises(InvalidMessage) as info:
        read_limited(tmp_path / "d", 1 << 20)
    assert info.value.reason is Reason.NOT_A_REGULAR_FILE
    assert "directory" in info.value.detail


def test_read_limited_refuses_a_device() -> None:
    """A character device (/dev/zero would never end) is not_a_regular_file."""
    for dev in ("/dev/null", "/dev/zero"):
        with pytest.raises(InvalidMessage) as info:
            read_limited(Path(dev), 1 << 20)
        assert info.value.reason is Reason.NOT_A_REGULAR_FILE
        assert "device" in info.value.detail


def test_read_limited_refuses_a_unix_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UNIX socket file (open() fails with ENXIO) is not_a_regular_file, not an OSError."""
    monkeypatch.chdir(tmp_path)  # short relative path: sun_path is limited to 108 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("s")
        with pytest.raises(InvalidMessage) as info:
            read_limited(tmp_path / "s", 1 << 20)
    finally:
        sock.close()
    assert info.value.reason is Reason.NOT_A_REGULAR_FILE
    assert "socket" in info.value.detail


def test_read_limited_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    """A file claimed or removed meanwhile propagates FileNotFoundError (not InvalidMessage)."""
    with pytest.raises(FileNotFoundError):
        read_limited(tmp_path / "gone", 100)


def test_tmp_name_is_unique_per_call() -> None:
    """tmp_name() gives distinct .tmp names that start with this pid."""
    names = {fsio.tmp_name() for _ in range(1000)}
    assert len(names) == 1000
    assert all(n.startswith(f"{os.getpid()}-") and n.endswith(".tmp") for n in names)


def test_fsync_helpers_on_real_paths(tmp_path: Path) -> None:
    """fsync_file and fsync_dir succeed on a file and a directory; a missing path raises."""
    (tmp_path / "f").write_bytes(b"x")
    fsio.fsync_file(tmp_path / "f")
    fsio.fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsio.fsync_dir(tmp_path / "missing")
