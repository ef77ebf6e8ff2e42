"""systemd/busd-bridge.service: verifies, runs the bridge as busd's user, no restart on exit 78."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from daemon_harness import BUSD

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "busd-bridge.service"


def test_bridge_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (CI installs the systemd package)")
    copy = tmp_path / UNIT.name
    text = UNIT.read_text(encoding="utf-8")
    assert "/usr/local/bin/busd bridge nats" in text
    copy.write_text(text.replace("/usr/local/bin/busd", BUSD), encoding="utf-8")
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if UNIT.name in line]
    assert not ours, "\n".join(ours)


def test_bridge_unit_matches_the_daemon_unit_and_stops_on_refusal() -> None:
    text = UNIT.read_text(encoding="utf-8")
    assert "User=busd" in text and "ReadWritePaths=/var/lib/busd" in text
    assert "RestartPreventExitStatus=78" in text  # a refused NATS setting is not retried
    assert "AF_INET" in text
