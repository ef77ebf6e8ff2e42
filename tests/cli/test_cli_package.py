"""The shape of the busd.cli package: commands never import main, no cycle, a lean start-up."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import busd.cli

_PACKAGE = Path(busd.cli.__file__).parent
_MODULES = sorted(p.stem for p in _PACKAGE.glob("*.py") if p.stem != "__init__")


def _cli_imports(module: str) -> set[str]:
    """The busd.cli modules that ``busd.cli.<module>`` imports (any form, at any depth)."""
    tree = ast.parse((_PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                base = "busd.cli" + (f".{base}" if base else "")
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n.removeprefix("busd.cli.") for n in names if n.startswith("busd.cli.")}
    return found & set(_MODULES)


def test_the_package_has_its_command_modules() -> None:
    """The split exists: the scan below would pass vacuously on an empty package."""
    assert {
        "main",
        "common",
        "render",
        "messages",
        "run",
        "status",
        "dlq",
        "tail",
        "doctor",
    } <= set(_MODULES)


def test_no_module_but_main_imports_main() -> None:
    """Command modules register on the app main hands them; they never import main."""
    offenders = {m: sorted(_cli_imports(m)) for m in _MODULES if m != "main"}
    assert {m: i for m, i in offenders.items() if "main" in i} == {}


def test_the_cli_modules_import_without_a_cycle() -> None:
    """The import graph among busd.cli modules is acyclic (a DFS finds no back edge)."""
    graph = {m: _cli_imports(m) - {m} for m in _MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join([*path, m, n])}"
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in _MODULES:
        if m not in state:
            visit(m, [])


def test_each_module_imports_alone_without_main() -> None:
    """In a fresh interpreter every command module imports first, and main stays unloaded."""
    code = (
        "import importlib, json, sys\n"
        "name = sys.argv[1]\n"
        "importlib.import_module('busd.cli.' + name)\n"
        "print(json.dumps('busd.cli.main' in sys.modules))\n"
    )
    for module in _MODULES:
        proc = subprocess.run(
            [sys.executable, "-c", code, module], capture_output=True, timeout=60, check=False
        )
        assert proc.returncode == 0, (module, proc.stderr.decode())
        assert json.loads(proc.stdout) is (module == "main"), module


def test_the_cli_keeps_heavy_imports_lazy() -> None:
    """Importing the app loads no daemon, server, file watcher or progress bar.

    (structlog already loads rich's console and tables; its progress bar is ours to avoid.)
    """
    code = (
        "import json, sys\n"
        "import busd.cli.main\n"
        "heavy = ('rich.progress', 'watchfiles', 'busd.app', 'busd.runtime', 'busd.rpc.server')\n"
        "print(json.dumps(sorted(\n"
        "    m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=True)
    assert json.loads(proc.stdout) == []
