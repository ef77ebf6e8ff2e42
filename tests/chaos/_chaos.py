"""Shared helpers of the chaos suite: sizes, daemons with wrappers, mounts, probes.

``CHAOS_LONG=1`` (set by ``make chaos``) selects the long versions; without it every
test keeps to the CI budget (the whole of tests/chaos in well under three minutes).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from busd.store.journal import Journal, JournalEntry
from daemon_harness import Daemon

LONG = os.environ.get("CHAOS_LONG", "") not in ("", "0")
"""True under ``make chaos``: run the long versions."""


def scale(ci: int, long: int) -> int:
    """``long`` under CHAOS_LONG, else ``ci``."""
    return long if LONG else ci


def report(title: str, **figures: Any) -> None:
    """Print one line of figures (``pytest -s`` or ``make chaos`` shows them)."""
    text = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[chaos] {title}: {text}", flush=True)
    log = os.environ.get("CHAOS_REPORT")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": title, **figures}) + "\n")


class ChaosDaemon(Daemon):
    """``busd run`` like :class:`daemon_harness.Daemon`, optionally behind a wrapper.

    ``prefix`` goes before the busd command (``setpriv ...``, ``strace ...``);
    ``nofile`` sets the daemon's RLIMIT_NOFILE soft limit.
    """

    def __init__(
        self,
        root: Path,
        *args: str,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        nofile: int | None = None,
    ) -> None:
        preexec: Callable[[], None] | None = None
        if nofile is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

            def preexec() -> None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        super().__init__(root, *args, env=env, prefix=prefix, preexec=preexec)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e.get("event") == name]

    def stderr_text(self) -> str:
        """Every stderr line that was not a JSON log line (tracebacks, CLI errors)."""
        return "".join(e.get("text", "") for e in self.log if e.get("event") == "unparsed")


def journal_entries(root: Path) -> tuple[list[JournalEntry], int]:
    """Every journal entry in order, and how many lines failed to decode."""
    with Journal(root / "journal") as j:
        entries = [e for e, _ in j.read_from()]
        return entries, j.skipped


def accepted_ids(root: Path) -> list[str]:
    """message_id of every ``accepted`` line, in journal order (repeats kept)."""
    entries, _ = journal_entries(root)
    return [e.message_id for e in entries if e.event == "accepted" and e.message_id]


def dlq_records(root: Path) -> list[dict[str, Any]]:
    """The DLQ reason records, by entry name."""
    out = []
    for p in sorted((root / "dlq").glob("*.reason.json")):
        rec = json.loads(p.read_bytes())
        rec["name"] = p.name[: -len(".reason.json")]
        out.append(rec)
    return out


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25
) -> Any:
    """Like ``daemon_harness.wait_for`` but polling every ``interval`` (costly predicates)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    """Number of open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def tree_bytes(root: Path) -> int:
    """Total apparent size of the regular files under ``root``."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, n))
                total += st.st_size
    return total


def _can_mount() -> bool:
    linux = sys.platform.startswith("linux")
    return linux and os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` for the block; skip the test if not allowed."""
    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root on Linux")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"mount refused here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        umount(path)


def remount(path: Path, mode: str) -> None:
    """Remount our tmpfs ``ro`` or ``rw``."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def umount(path: Path) -> None:
    """Unmount ``path``, lazily if something still holds it."""
    if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last block; return the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            block = b"\0" * size
            while True:
                try:
                    f.write(block)
                except OSError:
                    break
    return filler


def hidden_leftovers(root: Path) -> list[str]:
    """Half-written files: anything in tmp/, and hidden names in journal/, outbox/, inbox/.

    The lock files (``journal/.lock``, ``processed/.*.lock``, ``dlq/.lock``) are not
    half files, and neither are the agents' ledger locks.
    """
    found = [f"tmp/{n}" for n in os.listdir(root / "tmp")]
    for top in ("journal", "dlq"):
        names = os.listdir(root / top)
        found += [f"{top}/{n}" for n in names if n.startswith(".") and n != ".lock"]
    for top in ("outbox", "inbox"):
        for dirpath, _, names in os.walk(root / top):
            rel = Path(dirpath).relative_to(root).as_posix()
            found += [f"{rel}/{n}" for n in names if n.startswith(".")]
    return found
