"""``busd top``: a live rich view under a pty (``q`` quits), plain blocks when piped."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

from _rpc import Rpc
from daemon_harness import BUSD, Daemon, message


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}
    env.update(TERM="xterm-256color", COLUMNS="160", LINES="40")
    return env


def _read_until(fd: int, needles: list[bytes], timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(n in out for n in needles):
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the pty
                break
            if not chunk:
                break
            out += chunk
    return out


@pytest.mark.timeout(60)
def test_top_under_a_pty_shows_the_agents_and_quits_on_q(daemon: Daemon, root: Path) -> None:
    with Rpc(root / "busd.sock") as c:
        for i in range(3):
            c("publish", {"message": message(i, to="bob")})
        c("publish", {"message": message(9, to="carol")})
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [BUSD, "top", "--root", str(root)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=_env(),
        close_fds=True,
    )
    os.close(slave)
    try:
        screen = _read_until(master, [b"bob", b"carol", b"q quits"], 20)
        text = screen.decode("utf-8", "replace")
        assert "bob" in text and "carol" in text, text[-2000:]
        assert "daemon pid" in text and "accepted/min" in text
        # Sorted by backlog: bob (3 ready) before carol (1).
        assert text.index("bob") < text.index("carol")
        os.write(master, b"q")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)


def test_top_piped_prints_plain_blocks(root: Path) -> None:
    """Not a terminal: one plain block a refresh, no escape codes; works with no daemon."""
    for agent, n in (("carol", 1), ("bob", 2)):
        inbox = root / "inbox" / agent
        inbox.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"{1_700_000_000_000_000_000 + i:020d}-000-m{i}.json"
            (inbox / name).write_text("{}")
    proc = subprocess.run(
        [BUSD, "top", "--root", str(root), "--count", "2", "--interval", "0.1"],
        capture_output=True,
        env=_env(),
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "\x1b[" not in out
    assert out.count("daemon DOWN (files)") == 2
    first = out.split("\n\n")[0].splitlines()
    assert first[1].split()[0] == "agent"
    assert [line.split()[:2] for line in first[2:]] == [["bob", "2"], ["carol", "1"]]
