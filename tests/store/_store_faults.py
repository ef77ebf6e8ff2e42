"""Real filesystem faults for store tests: an immutable directory refuses writes with EPERM."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``chattr +i path`` for the block: creating, renaming or removing entries in it
    fails with EPERM (as root too). Skips where the flag cannot be set (not root, no
    chattr, a filesystem without it)."""
    chattr = shutil.which("chattr")
    if chattr is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root and chattr to make a directory immutable")
    done = subprocess.run([chattr, "+i", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {done.stderr.decode(errors='replace')}")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)
