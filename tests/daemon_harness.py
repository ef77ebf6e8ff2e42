"""A real ``busd run`` subprocess for tests, and helpers to drop and wait for files."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

BUSD = str(Path(sys.executable).with_name("busd"))


def message(i: int = 0, **fields: Any) -> dict[str, Any]:
    """A valid ``fact`` message from alice to bob, numbered ``i``."""
    base: dict[str, Any] = {
        "schema_version": "1.0",
        "message_id": f"m-{i:06d}",
        "message_type": "fact",
        "created_at": "2026-11-21T12:00:00Z",
        "workflow_id": "w1",
        "task_id": "t1",
        "agent_id": "alice",
        "to": "bob",
        "body": f"hello {i}",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def drop(root: Path, data: bytes | dict[str, Any], name: str, agent: str = "alice") -> Path:
    """Drop a file the way any producer does: write in tmp/, rename into outbox/<agent>/."""
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    outbox = root / "outbox" / agent
    outbox.mkdir(parents=True, exist_ok=True)
    tmp = root / "tmp" / f"drop-{os.getpid()}-{name}"
    tmp.write_bytes(raw)
    target = outbox / name
    os.rename(tmp, target)
    return target


def files(directory: Path) -> list[Path]:
    """Non-hidden files of ``directory``, sorted (empty if it does not exist)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def delivered_ids(directory: Path) -> list[str]:
    """Message ids of the delivery files in ``directory``, in listing (arrival) order."""
    from busd.store.layout import parse_delivery_name

    out = []
    for p in files(directory):
        parsed = parse_delivery_name(p.name)
        assert parsed is not None, p.name
        out.append(parsed.message_id)
    return out


def journal_ids(root: Path, event: str = "accepted") -> list[str]:
    """Message ids of the journal entries of ``event``, in append order."""
    from busd.store.journal import Journal

    with Journal(root / "journal") as j:
        return [e.message_id for e in j.read(events=(event,)) if e.message_id]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def build_slow_fsync(out_dir: Path) -> tuple[Path | None, str]:
    """Compile tests/slowfsync.c into ``out_dir``; (library, "") or (None, why not)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None, "no C compiler to build the fsync-delay shim"
    lib = out_dir / "slowfsync.so"
    src = Path(__file__).with_name("slowfsync.c")
    proc = subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        return None, f"building the fsync-delay shim failed: {proc.stderr[-200:]}"
    return lib, ""


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without any BUSD_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}
    env.update(extra or {})
    return env


class LogProcess:
    """A busd process whose JSON log lines on stderr are read in a thread: ``log`` holds
    every line seen, :meth:`wait_event` waits for one."""

    def __init__(
        self, argv: list[str], env: dict[str, str] | None, preexec: Callable[[], None] | None
    ) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=clean_env(env),
            preexec_fn=preexec,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"event": "unparsed", "text": raw.decode(errors="replace")}
            self.log.append(event)
            self.lines.put(event)

    def wait_event(self, name: str, timeout: float = 15.0) -> dict[str, Any]:
        """Block until a log line with ``event == name`` (one already seen counts); fail
        once ``timeout`` passes or the process exits without it."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.log[seen:]:
                if event.get("event") == name:
                    return event
            seen = len(self.log)
            if time.monotonic() > deadline or (
                self.proc.poll() is not None and self.lines.empty() and seen == len(self.log)
            ):
                raise AssertionError(f"no {name!r} log line; saw {self.log[-5:]}")
            with contextlib.suppress(queue.Empty):
                self.lines.get(timeout=0.2)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._reader.join(timeout=2)
        return rc

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(timeout=2)


class Daemon(LogProcess):
    """``busd run`` on ``root`` with JSON logs read from stderr in a thread.

    ``prefix`` goes before the busd command (``setpriv ...``, ``strace ...``);
    ``preexec`` runs in the child before it becomes busd.
    """

    def __init__(
        self,
        root: Path,
        *args: str,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.root = root
        argv = [*(prefix or []), BUSD, "run", "--root", str(root), "--log-format", "json", *args]
        super().__init__(argv, env, preexec)

    def ready(self, timeout: float = 15.0) -> Self:
        """Wait for ``daemon_ready``."""
        self.wait_event("daemon_ready", timeout)
        return self

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the daemon."""
        self.proc.send_signal(signum)
