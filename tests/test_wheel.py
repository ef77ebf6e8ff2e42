"""The wheel holds every module and data file the source tree has.

The packages are listed by hand in pyproject.toml, and the editable install the tests
run from reads the source tree, so a package left off the list (or the dashboard's
static files) would be missing only for someone who installs the wheel.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_SOURCES = {
    "busd": REPO / "broker" / "busd",
    "busclient": REPO / "clients" / "python" / "busclient",
}
_KINDS = {".py", ".typed", ".html", ".css", ".js"}


def _expected() -> set[str]:
    """Every file of the two packages a wheel must carry, as wheel paths."""
    out: set[str] = set()
    for top, src in _SOURCES.items():
        for path in src.rglob("*"):
            if path.is_file() and path.suffix in _KINDS and "__pycache__" not in path.parts:
                out.add(f"{top}/{path.relative_to(src).as_posix()}")
    return out


@pytest.mark.timeout(300)
def test_the_wheel_carries_every_module_and_static_file(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    assert "is absent from the `packages` configuration" not in built.stderr, built.stderr
    (wheel,) = tmp_path.glob("busd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    expected = _expected()
    assert {"busd/web/static/index.html", "busd/py.typed", "busclient/py.typed"} <= expected
    assert expected - names == set()
