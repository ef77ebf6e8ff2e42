"""The file view: a POSIX sh consumer that only reads ``inbox/<agent>/`` gets everything.

The consumer is the recipe of docs/protocol.md section 6.7, taken from the page itself and
run with dash: while a socket subscriber serves another agent from memory (no inbox files
for it), and while no daemon runs at all.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from _rpc import Rpc
from daemon_harness import BUSD, Daemon, clean_env, files, message

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("flock") is None, reason="the recipe needs flock(1)"),
]

REPO = Path(__file__).resolve().parents[2]
SH = shutil.which("dash") or shutil.which("sh") or "sh"


@pytest.fixture
def consume_sh(tmp_path: Path) -> Path:
    """consume.sh exactly as protocol.md 6.7 prints it."""
    page = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    found = re.search(r"```sh\n(#!/bin/sh\n# consume\.sh .*?)```", page, re.DOTALL)
    assert found, "protocol.md no longer holds the consume.sh recipe"
    script = tmp_path / "consume.sh"
    script.write_text(found.group(1), encoding="utf-8")
    return script


def _consume_all(script: Path, root: Path, agent: str, want: int, timeout: float) -> list[str]:
    """Run the recipe until it has printed ``want`` messages (each run claims and acks one)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        proc = subprocess.run(
            [SH, str(script), str(root), agent], capture_output=True, timeout=30, check=False
        )
        assert proc.returncode == 0, proc.stderr.decode()
        out = proc.stdout.strip()
        if out:
            got.append(json.loads(out)["message_id"])
        else:
            time.sleep(0.05)  # inbox empty for now
    return got


def test_a_sh_consumer_gets_every_message_beside_a_socket_consumer_and_without_a_daemon(
    root: Path, consume_sh: Path
) -> None:
    d = Daemon(root).ready()
    try:
        with Rpc(root / "busd.sock") as sub, Rpc(root / "busd.sock") as pub:
            assert sub("subscribe", {"agent_id": "bob"}) == {"subscribed": True}
            for i in range(20):
                pub("publish", {"message": message(i, to="carol" if i % 2 else "bob")})
            carol = _consume_all(consume_sh, root, "carol", 10, timeout=60)
            pushed = {sub.push(timeout=10)["params"]["message"]["message_id"] for _ in range(10)}
        assert sorted(carol) == [f"m-{i:06d}" for i in range(1, 20, 2)]
        assert pushed == {f"m-{i:06d}" for i in range(0, 20, 2)}
        assert files(root / "inbox" / "bob") == []  # bob was served from memory
    finally:
        assert d.stop() == 0
    # No daemon: `busd send` routes what it writes, and the recipe reads the files.
    for i in range(20, 25):
        proc = subprocess.run(
            [BUSD, "send", "--root", str(root), "--from", "alice", "-"],
            input=json.dumps(message(i, to="carol")).encode(),
            capture_output=True,
            env=clean_env(),
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode()
    later = _consume_all(consume_sh, root, "carol", 5, timeout=30)
    assert sorted(later) == [f"m-{i:06d}" for i in range(20, 25)]
    ledger = (root / "processed" / "carol.jsonl").read_text().splitlines()
    acked = [json.loads(line)["message_id"] for line in ledger]
    assert sorted(acked) == sorted(carol + later)  # each acked once, by the recipe
    assert _consume_all(consume_sh, root, "carol", 1, timeout=1) == []  # nothing comes back
