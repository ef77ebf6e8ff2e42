"""The Windows transport's platform-independent parts (the rest needs Windows)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from busd.rpc.winpipe import PipeListener, owner_sddl, pipe_name


def test_pipe_name_is_stable_per_root_and_case_insensitive(tmp_path: Path) -> None:
    """One root gives one pipe name, whatever the case; two roots give two."""
    a = pipe_name(tmp_path / "Bus")
    assert a.startswith("\\\\.\\pipe\\busd-") and len(a) == len("\\\\.\\pipe\\busd-") + 16
    assert a == pipe_name(tmp_path / "bus")
    assert a != pipe_name(tmp_path / "other")


def test_owner_sddl_grants_only_system_and_the_user() -> None:
    """The DACL is protected and names exactly SYSTEM and the given user SID."""
    sddl = owner_sddl("S-1-5-21-1004336348-1177238915-682003330-512")
    assert sddl == "D:P(A;;GA;;;SY)(A;;GA;;;S-1-5-21-1004336348-1177238915-682003330-512)"


@pytest.mark.parametrize("bad", ["", "WD", "S-1-5-21-x", "S-1-1-0)(A;;GA;;;WD"])
def test_owner_sddl_refuses_anything_but_a_sid(bad: str) -> None:
    """A string that is not a SID cannot smuggle extra ACEs (e.g. Everyone) into the DACL."""
    with pytest.raises(ValueError):
        owner_sddl(bad)


@pytest.mark.skipif(sys.platform == "win32", reason="checks the POSIX stub")
def test_listener_refuses_to_run_off_windows(tmp_path: Path) -> None:
    """Off Windows the pipe calls raise instead of pretending to work."""
    import anyio

    async def main() -> None:
        async def handler(_: object) -> None:
            await anyio.lowlevel.checkpoint()

        await PipeListener(tmp_path).serve(handler)

    with pytest.raises(OSError, match="Windows"):
        anyio.run(main)
