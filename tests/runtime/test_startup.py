"""Ready fast (issue 11 item 6): start-up on a bus with a large journal and outbox backlog.

Measured, never asserted on time: ``-m slow -s`` prints the figure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from _rpc import Rpc
from busd.config import load_config
from busd.routing.router import Incoming, Router
from daemon_harness import Daemon, drop, files, message, wait_for

_JOURNALED = 100_000
_WAITING = 10_000


def _journal(root: Path, n: int) -> None:
    """``n`` accepted messages for bob, journaled and never delivered (as memory holds them)."""
    with Router(load_config(root=str(root), env={})) as router:
        for k in range(0, n, 1000):
            items = [
                Incoming(raw=json.dumps(message(i, message_id=f"j-{i:06d}")).encode())
                for i in range(k, min(n, k + 1000))
            ]
            router.commit([], items)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ready_within_seconds_on_100k_journaled_and_10k_waiting(root: Path) -> None:
    """daemon_ready comes before the backlog is routed; the backlog drains after it, in
    arrival order, and every journaled message is served from memory."""
    _journal(root, _JOURNALED)
    for i in range(_WAITING):
        drop(root, message(i, to="carol"), f"{i:06d}.json")
    started = time.monotonic()
    # A graceful stop writes the 90,000 unacked memory messages out as files: give it time.
    daemon = Daemon(root, env={"BUSD_SHUTDOWN_TIMEOUT_SECONDS": "300"})
    try:
        daemon.ready(timeout=120)
        ready_s = time.monotonic() - started
        with Rpc(root / "busd.sock", timeout=60) as c:
            backlog = c("status", {})["outbox"]["backlog"]
            got = c("fetch", {"agent_id": "bob", "max": 10_000})["messages"]
            assert len(got) == 10_000
            assert got[0]["message"]["message_id"] == "j-000000"
        wait_for(lambda: len(files(root / "inbox" / "carol")) == _WAITING, timeout=300)
        drained_s = time.monotonic() - started
        names = [p.name for p in files(root / "inbox" / "carol")]
        assert [n.split("-", 2)[2] for n in names] == [f"m-{i:06d}.json" for i in range(_WAITING)]
        print(  # noqa: T201 - the measurement this test exists for
            f"\nready in {ready_s:.2f} s ({_JOURNALED} journaled, {_WAITING} waiting; "
            f"backlog at first status {backlog}); backlog drained at {drained_s:.1f} s"
        )
    finally:
        assert daemon.stop(timeout=300) == 0
