"""Shared pieces of the benchmark: messages, a raw JSON-RPC client, the daemon, stats.

Stdlib only, so that worker processes start fast and the client side stays thin.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import multiprocessing
import os
import queue
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MSG_BYTES = 500
BUSD = str(Path(sys.executable).with_name("busd"))
REPO = Path(__file__).resolve().parents[2]


# -- messages -----------------------------------------------------------------


def envelope(
    mid: str,
    *,
    to: str = "bob",
    sender: str = "alice",
    size: int = MSG_BYTES,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """A valid busd ``fact`` message, compact JSON, padded with its body to ``size`` bytes."""
    base: dict[str, Any] = {
        "schema_version": "1.0",
        "message_type": "fact",
        "message_id": mid,
        "created_at": "2026-11-21T12:00:00Z",
        "workflow_id": "bench",
        "task_id": "t1",
        "agent_id": sender,
        "to": to,
        "body": "",
    }
    if metadata is not None:
        base["metadata"] = metadata
    bare = len(json.dumps(base, separators=(",", ":")).encode())
    base["body"] = "x" * max(1, size - bare)
    return json.dumps(base, separators=(",", ":")).encode()


def request_line(method: str, params: dict[str, Any], rid: int = 1) -> bytes:
    """One JSON-RPC request line."""
    return (
        json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode()
        + b"\n"
    )


def publish_line(env: bytes, rid: int = 1) -> bytes:
    """A ``publish`` request around an already encoded envelope (no re-encoding)."""
    return b'{"jsonrpc":"2.0","id":%d,"method":"publish","params":{"message":%s}}\n' % (rid, env)


def publish_batch_line(envs: Sequence[bytes], rid: int = 1) -> bytes:
    """A ``publish_batch`` request around encoded envelopes."""
    return b'{"jsonrpc":"2.0","id":%d,"method":"publish_batch","params":{"messages":[%s]}}\n' % (
        rid,
        b",".join(envs),
    )


# -- the raw JSON-RPC client ----------------------------------------------------


class RpcError(Exception):
    """An error answer from the daemon."""


class Rpc:
    """A blocking JSON-RPC connection to the daemon's Unix socket; one request at a time."""

    def __init__(self, path: Path | str, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.rid = 0

    def close(self) -> None:
        self.sock.close()

    def read_line(self) -> bytes:
        """The next line (without its newline); EOFError if the daemon hung up."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 1 :]
                return line
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("the daemon closed the connection")
            self.buf += chunk

    def read(self) -> dict[str, Any]:
        obj = json.loads(self.read_line())
        assert isinstance(obj, dict)
        return obj

    def send_line(self, line: bytes) -> Any:
        """Send a pre-built request line; return its result (RpcError on an error answer)."""
        self.sock.sendall(line)
        while True:
            obj = self.read()
            if "id" in obj:  # skip pushes that arrive on a subscribed connection
                break
        if "error" in obj:
            raise RpcError(obj["error"])
        return obj["result"]

    def __call__(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self.rid += 1
        return self.send_line(request_line(method, params or {}, self.rid))


def wait_socket(path: Path, timeout: float = 30.0) -> None:
    """Wait until ``path`` accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            Rpc(path, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# -- the daemon -----------------------------------------------------------------


class BusdDaemon:
    """``busd run --log-format json`` on ``root``; stderr read in a thread, ready detected."""

    def __init__(
        self, root: Path, *args: str, log_level: str | None = None, wrap: Sequence[str] = ()
    ) -> None:
        self.root = root
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}
        # ``wrap``: a launcher such as ``py-spy record ... --``; ``pid`` is then the launcher's.
        cmd = [*wrap, BUSD, "run", "--root", str(root), "--log-format", "json", *args]
        if log_level:
            cmd += ["--log-level", log_level]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        self.ready_at: float | None = None
        self.ready_event = threading.Event()
        self.lines = 0
        self.tail: collections.deque[bytes] = collections.deque(maxlen=30)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket(self) -> Path:
        return self.root / "busd.sock"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines += 1
            if b'"message_accepted"' not in raw:  # keep what explains a failure
                self.tail.append(raw)
            if self.ready_at is None and b'"daemon_ready"' in raw:
                self.ready_at = time.monotonic()
                self.ready_event.set()

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from the start of the process to its ``daemon_ready`` line."""
        if not self.ready_event.wait(timeout) or self.ready_at is None:
            self.kill()
            tail = b"".join(self.tail).decode(errors="replace")
            raise RuntimeError(f"busd did not become ready in {timeout}s:\n{tail}")
        return self.ready_at - self.started

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def log_tail(self, n: int = 15) -> str:
        """The last log lines other than ``message_accepted``, and the exit code if it died."""
        tail = b"".join(list(self.tail)[-n:]).decode(errors="replace")
        rc = self.proc.poll()
        return tail + (f"[busd exited with {rc}]\n" if rc is not None else "")

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reader.join(timeout=5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def busd_init(root: Path) -> None:
    subprocess.run([BUSD, "init", str(root)], check=True, capture_output=True)


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MB (from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class ThreadStates:
    """Samples the state (R running/runnable, D disk wait, ...) and kernel wait channel of
    every thread of ``pid`` every few ms, in a thread, until :meth:`stop`."""

    def __init__(self, pid: int, period: float = 0.004) -> None:
        self.pid = pid
        self.period = period
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        base = Path(f"/proc/{self.pid}/task")
        while not self._stop.wait(self.period):
            try:
                tids = os.listdir(base)
            except OSError:
                return
            for tid in tids:
                try:
                    state = (base / tid / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    wchan = (base / tid / "wchan").read_text().strip()
                except (OSError, IndexError):
                    continue
                # S: asleep (waiting for work); t: stopped by py-spy's own sampling.
                if state not in ("S", "t"):
                    self.counts[(state, wchan if wchan not in ("", "0") else "-")] += 1

    def stop(self) -> str:
        """A one-line summary: share of samples per state, and the top wait channels."""
        self._stop.set()
        self._thread.join(5)
        total = sum(self.counts.values())
        if not total:
            return ""
        states: collections.Counter[str] = collections.Counter()
        for (state, _), n in self.counts.items():
            states[state] += n
        names = {"R": "on a CPU or runnable", "D": "in uninterruptible (disk) wait"}
        parts = [f"{names.get(st, st)} {n / total:.0%}" for st, n in states.most_common()]
        waits = [
            f"{w} {n / total:.0%}"
            for (st, w), n in self.counts.most_common()
            if st == "D" and w != "-"
        ][:3]
        return "; ".join(parts) + (f" (top disk waits: {', '.join(waits)})" if waits else "")


# -- worker processes -----------------------------------------------------------


@dataclass
class GroupResult:
    """What a group of worker processes did: total count over the common wall time."""

    count: int
    seconds: float
    extra: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("nan")


def _worker_entry(
    fn: Callable[..., dict[str, Any]], args: dict[str, Any], barrier: Any, out: Any
) -> None:
    try:
        out.put(fn(args, barrier))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        with contextlib.suppress(Exception):
            barrier.abort()
        out.put({"error": traceback.format_exc()})


def _context() -> Any:
    # A fork server: each worker is forked from one clean, single-threaded process that
    # already imported the workers, so starting 8 of them costs milliseconds, not the
    # seconds that spawning fresh interpreters takes on a busy 2-core machine.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.perf.workers"])
    return ctx


def run_group(
    fn: Callable[..., dict[str, Any]], arg_list: Sequence[dict[str, Any]], timeout: float = 600
) -> GroupResult:
    """Run ``fn(args, barrier)`` in one process per ``args`` (forked from a fork server).

    Each worker connects, waits on the barrier, then times its own loop and returns
    ``{"start", "end", "count", ...}`` (``time.monotonic()`` is system-wide on Linux).
    The group's rate is the total count over max(end) - min(start).
    """
    ctx = _context()
    barrier = ctx.Barrier(len(arg_list))
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker_entry, args=(fn, a, barrier, out)) for a in arg_list]
    for p in procs:
        p.start()
    results: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout
        while len(results) < len(procs):
            try:
                results.append(out.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty as exc:
                raise TimeoutError(f"workers did not finish in {timeout}s") from exc
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError("a worker failed:\n" + errors[0])
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    return GroupResult(sum(r["count"] for r in results), end - start, results)


# -- inotify (ctypes; the stdlib has none) --------------------------------------

IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class Inotify:
    """A non-blocking inotify descriptor watching directories; :meth:`read` parses events."""

    def __init__(self, dirs: Iterable[Path], mask: int = IN_MOVED_TO | IN_CREATE) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.dirs: dict[int, Path] = {}
        for d in dirs:
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(d), mask)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {d} failed")
            self.dirs[wd] = d

    def fileno(self) -> int:
        return int(self.fd)

    def read(self) -> list[tuple[Path, str]]:
        """Every pending event as (directory, name); [] when none is pending."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        events = []
        i = 0
        while i < len(data):
            wd, _mask, _cookie, length = _EVENT.unpack_from(data, i)
            name = data[i + _EVENT.size : i + _EVENT.size + length].rstrip(b"\0")
            events.append((self.dirs[wd], os.fsdecode(name)))
            i += _EVENT.size + length
        return events

    def close(self) -> None:
        os.close(self.fd)


# -- statistics -------------------------------------------------------------------


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def count_files(directory: Path) -> int:
    """Non-hidden entries in ``directory`` (0 if missing)."""
    try:
        with os.scandir(directory) as it:
            return sum(1 for e in it if not e.name.startswith("."))
    except FileNotFoundError:
        return 0
