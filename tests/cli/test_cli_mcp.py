"""``busd mcp`` on the command line: its usage errors, and the SDK imported lazily."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon_harness import clean_env

BUSD = str(Path(sys.executable).with_name("busd"))


def _run(*args: str, python: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", python, *args] if python else [BUSD, *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=clean_env(), timeout=30, check=False
    )


@pytest.mark.timeout(60)
def test_stdio_needs_an_agent_and_a_bus(root: Path, tmp_path: Path) -> None:
    proc = _run("mcp", "--root", str(root))
    assert proc.returncode == 2 and "--agent is required" in proc.stderr
    proc = _run("mcp", "--root", str(tmp_path / "nothing"), "--agent", "alice")
    assert proc.returncode == 66 and "busd init" in proc.stderr
    proc = _run("mcp", "--root", str(root), "--agent", "no/slash")
    assert proc.returncode == 65 and "invalid_name" in proc.stderr


@pytest.mark.timeout(60)
def test_the_sdk_is_imported_only_by_the_command(root: Path) -> None:
    """`busd --help` never loads the SDK; without it, `busd mcp` says which extra to install."""
    probe = (
        "import sys; import busd.cli.main as m; "
        "assert 'mcp' not in sys.modules, 'the SDK was imported'; "
        "sys.modules['mcp'] = None; sys.argv = ['busd', *sys.argv[1:]]; m.main()"
    )
    proc = _run("--help", python=probe)
    assert proc.returncode == 0 and "mcp" in proc.stdout
    proc = _run("mcp", "--root", str(root), "--agent", "alice", python=probe)
    assert proc.returncode == 2
    assert "install busd[mcp]" in proc.stderr
