"""The systemd units pass `systemd-analyze verify` and keep their hardening."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
SYSTEM_UNIT = UNITS / "busd.service"
USER_UNIT = UNITS / "busd-user.service"
BUSD = Path(sys.executable).parent / "busd"

# The busd paths each unit assumes; the test swaps them for the venv's executable,
# because `systemd-analyze verify` checks that Exec*= binaries exist.
ASSUMED_BINARY = {SYSTEM_UNIT: "/usr/local/bin/busd", USER_UNIT: "%h/.local/bin/busd"}

COMMON = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "Restart": "on-failure",
    "WatchdogSec": "30",
    "TimeoutStopSec": "30",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "UMask": "0077",
    "RestrictAddressFamilies": "AF_UNIX",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectControlGroups": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictRealtime": "yes",
    "SystemCallArchitectures": "native",
}
SYSTEM_ONLY = {
    "ExecStart": "/usr/local/bin/busd run --root /var/lib/busd",
    "User": "busd",
    "Group": "busd",
    "ReadWritePaths": "/var/lib/busd",
    "StateDirectory": "busd",
    "StateDirectoryMode": "0700",
    "ProtectHome": "yes",
}
USER_ONLY = {
    "ExecStart": "%h/.local/bin/busd run --root %h/.local/state/busd",
    "ReadWritePaths": "%h/.local/state/busd",
}


def _service_section(path: Path) -> dict[str, list[str]]:
    """Directives of [Service] (comments dropped), each key mapped to all its values."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _verify(unit: Path, tmp_path: Path, *, user: bool) -> None:
    """Run `systemd-analyze verify` on a copy of ``unit`` that execs the venv's busd."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (CI installs the systemd package)")
    assert BUSD.is_file(), f"{BUSD} missing: is busd installed in this venv?"
    copy = tmp_path / unit.name
    text = unit.read_text(encoding="utf-8")
    assumed = ASSUMED_BINARY[unit]
    assert assumed in text
    copy.write_text(text.replace(assumed, str(BUSD)), encoding="utf-8")
    cmd = [analyze]
    env = dict(os.environ)
    if user:
        # The user manager needs a runtime directory, which a CI container may lack.
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(runtime)
        cmd.append("--user")
    cmd += ["verify", "--man=no", str(copy)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    output = proc.stdout + proc.stderr
    # verify also reports on (and may fail over) unrelated units of the host, so only
    # lines naming our unit count; a missing Exec binary or a bad directive names it.
    ours = [line for line in output.splitlines() if unit.name in line]
    assert not ours, f"exit status {proc.returncode}:\n" + "\n".join(ours)


def test_system_unit_verifies(tmp_path: Path) -> None:
    """systemd/busd.service passes `systemd-analyze verify`."""
    _verify(SYSTEM_UNIT, tmp_path, user=False)


def test_user_unit_verifies(tmp_path: Path) -> None:
    """systemd/busd-user.service passes `systemd-analyze --user verify`."""
    _verify(USER_UNIT, tmp_path, user=True)


@pytest.mark.parametrize(
    ("unit", "expected"),
    [(SYSTEM_UNIT, {**COMMON, **SYSTEM_ONLY}), (USER_UNIT, {**COMMON, **USER_ONLY})],
    ids=["system", "user"],
)
def test_unit_has_required_directives(unit: Path, expected: dict[str, str]) -> None:
    """Each unit carries Type=notify, the watchdog and the required hardening."""
    directives = _service_section(unit)
    for key, value in expected.items():
        assert value in directives.get(key, []), f"{unit.name}: missing {key}={value}"


def test_units_init_the_bus_before_running() -> None:
    """ExecStartPre runs the idempotent `busd init` on the root that ExecStart serves."""
    for unit in (SYSTEM_UNIT, USER_UNIT):
        directives = _service_section(unit)
        (start,) = directives["ExecStart"]
        root = re.search(r"--root (\S+)", start)
        assert root is not None
        assert any(
            pre.lstrip("+-@:!").endswith(f"busd init {root.group(1)}")
            for pre in directives.get("ExecStartPre", [])
        ), unit.name


def test_user_unit_has_no_system_only_settings() -> None:
    """The user unit sets no User=/Group= and does not hide the home it lives in."""
    directives = _service_section(USER_UNIT)
    for key in ("User", "Group", "DynamicUser", "ProtectHome", "StateDirectory"):
        assert key not in directives, f"busd-user.service must not set {key}="


def test_watchdog_and_stop_timeout_fit_the_daemon() -> None:
    """TimeoutStopSec leaves room for busd's own shutdown_timeout_seconds default."""
    from busd.config import Config

    default_shutdown = Config(root="/").shutdown_timeout_seconds
    for unit in (SYSTEM_UNIT, USER_UNIT):
        directives = _service_section(unit)
        assert int(directives["TimeoutStopSec"][0]) > default_shutdown


def test_socket_unit_verifies(tmp_path: Path) -> None:
    """systemd/busd.socket verifies beside the service it activates."""
    service = tmp_path / "busd.service"
    service.write_text(
        SYSTEM_UNIT.read_text(encoding="utf-8").replace(ASSUMED_BINARY[SYSTEM_UNIT], str(BUSD)),
        encoding="utf-8",
    )
    socket_unit = UNITS / "busd.socket"
    text = socket_unit.read_text(encoding="utf-8")
    assert "ListenStream=/var/lib/busd/busd.sock" in text and "SocketMode=0600" in text
    copy = tmp_path / "busd.socket"
    copy.write_text(text, encoding="utf-8")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (CI installs the systemd package)")
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "busd." in line]
    assert not ours, "\n".join(ours)
