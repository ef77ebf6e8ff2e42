"""Tests of busd.ops.host: one inotify budget, so ``busd doctor`` reports not-ok exactly
when the daemon's watcher falls back to polling (they used to compute it apart)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import anyio
import pytest
from structlog.testing import capture_logs

from busd.config import Config
from busd.ops import host
from busd.ops.doctor import diagnose
from busd.ops.host import InotifyBudget, InotifyLimits, inotify_budget
from busd.runtime.watcher import watch
from conftest import Bus

_AGENTS = 6
_NEEDED = 2 + _AGENTS  # outbox/ and inbox/ themselves, and one per agent directory


def _agents(bus: Bus) -> None:
    for a in range(_AGENTS):
        (bus.layout.outbox / f"agent{a}").mkdir()


def test_budget_counts_the_watched_directories(bus: Bus) -> None:
    """outbox/, inbox/ and every directory in them; nothing else of the bus."""
    _agents(bus)
    (bus.layout.inbox / "bob").mkdir()
    (bus.layout.locks / "bob").mkdir()  # locks/ is not watched
    (bus.layout.outbox / "file.json").write_bytes(b"{}")
    assert inotify_budget(bus.layout).needed_watches == _NEEDED + 1


@pytest.mark.parametrize(
    ("watches", "instances", "native", "tight"),
    [
        (None, None, True, False),  # not Linux: nothing to check
        (_NEEDED, 128, True, True),
        (_NEEDED - 1, 128, False, True),
        (4 * _NEEDED, 128, True, False),
        (4 * _NEEDED, 0, False, False),
    ],
)
def test_budget_verdicts(
    watches: int | None, instances: int | None, native: bool, tight: bool
) -> None:
    """native is False past the watch limit or with no instance allowed; tight past half."""
    budget = InotifyBudget(_NEEDED, InotifyLimits(watches, instances))
    assert (budget.native, budget.tight) == (native, tight)


def test_limits_are_the_smaller_of_user_and_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """max_user_watches and the user namespace's max_inotify_watches: the smaller wins."""
    values = {
        "/proc/sys/fs/inotify/max_user_watches": 100,
        "/proc/sys/user/max_inotify_watches": 7,
        "/proc/sys/fs/inotify/max_user_instances": 3,
    }
    monkeypatch.setattr(host, "_read_proc_int", values.get)
    assert host.read_inotify_limits() == InotifyLimits(max_watches=7, max_instances=3)


def _doctor_status(config: Config) -> str:
    [finding] = [f for f in diagnose(config) if f.check == "inotify"]
    return finding.status


def _watcher_mode(config: Config) -> str:
    """Run the real watcher until it has chosen a mode; return the one it settled on."""

    async def main() -> None:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, config, lambda hints: None, stop)
            await anyio.sleep(1.0)
            stop.set()

    with capture_logs() as logs:
        anyio.run(main)
    # A native watcher that fails to start (no instance left) falls back to polling.
    if any(e["event"] == "watcher_failed" for e in logs):
        return "polling"
    modes = [e["mode"] for e in logs if e["event"] == "watcher_starting"]
    assert modes, logs
    return str(modes[-1])


@pytest.mark.parametrize(
    ("watches", "instances"),
    [(_NEEDED - 1, 128), (_NEEDED, 128), (1 << 20, 128), (1 << 20, 0)],
)
def test_doctor_is_not_ok_exactly_when_the_watcher_polls(
    bus: Bus, monkeypatch: pytest.MonkeyPatch, watches: int, instances: int
) -> None:
    """Both read the same limits (only the /proc values are faked): doctor says error
    exactly when the watcher, run for real, falls back to polling."""
    _agents(bus)
    values = {
        "/proc/sys/fs/inotify/max_user_watches": watches,
        "/proc/sys/fs/inotify/max_user_instances": instances,
    }
    monkeypatch.setattr(host, "_read_proc_int", values.get)
    status, mode = _doctor_status(bus.config), _watcher_mode(bus.config)
    assert (status == "error") == (mode == "polling"), (status, mode)
    assert mode == ("native" if watches >= _NEEDED and instances > 0 else "polling")


_PROBE = """
import json, sys
import anyio
from structlog.testing import capture_logs
from busd.config import load_config
from busd.ops.doctor import diagnose
from busd.runtime.watcher import watch
config = load_config(root=sys.argv[1], env={})
[finding] = [f for f in diagnose(config) if f.check == "inotify"]

async def main():
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, config, lambda hints: None, stop)
        await anyio.sleep(1.0)
        stop.set()

with capture_logs() as logs:
    anyio.run(main)
modes = [e["mode"] for e in logs if e["event"] == "watcher_starting"]
failed = any(e["event"] == "watcher_failed" for e in logs)
print(json.dumps([finding.status, "polling" if failed else modes[-1]]))
"""


def _in_userns(name: str, value: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a private user namespace whose inotify sysctl ``name`` is ``value``
    (lowered there only; the host is untouched)."""
    script = f'echo {value} > /proc/sys/user/{name} && exec "$0" "$@"'
    unshare = ["unshare", "--user", "--map-root-user", "sh", "-c", script]
    return subprocess.run([*unshare, *argv], capture_output=True, text=True, timeout=60)


def _userns_ok() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return _in_userns("max_inotify_watches", 5, ["true"]).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _userns_ok(), reason="needs unprivileged user namespaces")
@pytest.mark.parametrize(
    ("name", "value", "mode"),
    [
        ("max_inotify_watches", 3, "polling"),
        ("max_inotify_watches", 1000, "native"),
        ("max_inotify_instances", 0, "polling"),
    ],
)
def test_doctor_agrees_with_the_watcher_under_real_namespace_limits(
    bus: Bus, name: str, value: int, mode: str
) -> None:
    """Real limits, nothing faked: a user namespace lowers its own inotify sysctl. Doctor
    used to read max_user_watches only, and said ok while the watcher polled."""
    _agents(bus)
    done = _in_userns(name, value, [sys.executable, "-c", _PROBE, str(bus.root)])
    assert done.returncode == 0, done.stderr[-2000:]
    status, seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == mode
    assert (status == "error") == (seen == "polling"), (status, seen)
