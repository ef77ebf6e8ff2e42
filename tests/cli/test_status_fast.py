"""``busd status`` starts without typer or structlog, and says what the typer command says.

The fast path (:func:`busd.cli.statusview.fast_status`) takes only a plain
``status [--check] [--json]`` with ``--root``/``--config``; anything else goes to the
typer app, so ``--help`` and usage errors are unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from busd.cli import common, statusview
from busd.cli.main import app
from daemon_harness import BUSD

_PROBE = (
    "import sys\n"
    "from busd.cli import main\n"
    "sys.argv = ['busd', *sys.argv[1:]]\n"
    "try:\n"
    "    main.main()\n"
    "finally:\n"
    "    loaded = sorted(m for m in ('typer', 'click', 'structlog', 'rich', 'busd.cli.commands')\n"
    "                    if m in sys.modules)\n"
    "    sys.stderr.write('LOADED ' + ','.join(loaded) + '\\n')\n"
)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}


def _probe(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    loaded = proc.stderr.rsplit("LOADED ", 1)[1].strip()
    return proc.returncode, proc.stdout, loaded


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--json"],
        ["status", "--check", "--json"],
        ["--root", "R", "status"],
        ["status", "--root=R", "--json"],
    ],
)
def test_plain_status_loads_neither_typer_nor_structlog(root: Path, args: list[str]) -> None:
    args = [str(root) if a == "R" else a.replace("=R", f"={root}") for a in args]
    if "--root" not in " ".join(args):
        args += ["--root", str(root)]
    code, out, loaded = _probe(*args)
    assert code == statusview.EXIT_DAEMON_DOWN, out
    assert loaded == "", loaded
    if "--json" in args:
        assert json.loads(out)["daemon"]["running"] is False
    else:
        assert "not running (state read from the files)" in out


def test_help_and_typos_go_to_typer(root: Path) -> None:
    code, out, loaded = _probe("status", "--help")
    assert code == 0 and "--check" in out and "typer" in loaded
    code, _, loaded = _probe("status", "--chek", "--root", str(root))
    assert code == 2 and "typer" in loaded


def test_the_fast_path_prints_what_the_typer_command_prints(root: Path) -> None:
    (root / "inbox" / "bob").mkdir(parents=True, exist_ok=True)
    for args in (["--json"], [], ["--check"]):
        fast = subprocess.run(
            [BUSD, "status", "--root", str(root), *args],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
            check=False,
        )
        typed = CliRunner().invoke(app, ["status", "--root", str(root), *args], env=_env())
        assert fast.returncode == typed.exit_code == statusview.EXIT_DAEMON_DOWN
        if args == ["--json"]:
            a, b = json.loads(fast.stdout), json.loads(typed.stdout)
            a.pop("generated_at"), b.pop("generated_at")
            assert a == b
        else:
            assert fast.stdout.splitlines()[:4] == typed.stdout.splitlines()[:4]
            assert "bob" in fast.stdout and "bob" in typed.stdout


def test_no_bus_is_not_found_either_way(tmp_path: Path) -> None:
    proc = subprocess.run(
        [BUSD, "status", "--root", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 66 and proc.stderr.startswith("busd: not_found: no bus at")


def test_exit_codes_agree_with_the_cli_table() -> None:
    assert statusview.EXIT_DAEMON_DOWN == common.EXIT_DAEMON_DOWN
    assert statusview.EXIT_ATTENTION == common.EXIT_ATTENTION
    for code, exit_code in statusview._EXITS.items():
        assert common.EXIT_CODES[code] == exit_code
