"""The store is the bottom of the package: it imports only core, errors and logs (and
itself). Checked on the source, so an upward import fails here before it forms a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import busd.store

_ALLOWED = ("busd.errors", "busd.logs", "busd.core", "busd.store")


def _busd_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "busd":  # from busd import config
                found.update(f"busd.{a.name}" for a in node.names)
            elif node.module.startswith("busd."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("busd."))
    return found


def _allowed(module: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in _ALLOWED)


def test_store_imports_nothing_above_it() -> None:
    """No module of busd.store imports config, routing, ops, runtime, rpc or cli."""
    package = Path(busd.store.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert len(modules) >= 8
    upward = {
        f"{path.name}: {name}"
        for path in modules
        for name in _busd_imports(path)
        if not _allowed(name)
    }
    assert upward == set()
