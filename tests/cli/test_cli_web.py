"""``busd web`` and ``busd top`` on the command line: the extra is imported by the command
only, a missing extra is one clear error, a non-loopback ``--bind`` is said loudly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_harness import BUSD

_PROBE = (
    "import sys; import busd.cli.main as m; "
    "sys.modules['starlette'] = None; sys.argv = ['busd', *sys.argv[1:]]; m.main()"
)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}


def test_help_lists_web_and_top_without_loading_starlette() -> None:
    code = (
        "import sys; import busd.cli.main as m; sys.argv = ['busd', '--help']\n"
        "try:\n    m.main()\nexcept SystemExit:\n    pass\n"
        "assert 'starlette' not in sys.modules and 'uvicorn' not in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert " web " in proc.stdout and " top " in proc.stdout


def test_without_the_extra_web_says_what_to_install(root: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, "web", "--root", str(root)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 2 and "install busd[web]" in proc.stderr
    assert not (root / "web-token").exists()


def test_a_bad_port_is_a_usage_error(root: Path) -> None:
    proc = subprocess.run(
        [BUSD, "web", "--root", str(root), "--port", "0"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 2 and "--port" in proc.stderr


@pytest.mark.timeout(60)
def test_a_non_loopback_bind_is_said_loudly(root: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [BUSD, "web", "--root", str(root), "--bind", "0.0.0.0", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline()
        assert url.startswith(f"http://0.0.0.0:{port}/?token=")
        time.sleep(0.5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert "WARNING" in err and "NOT a loopback address" in err
