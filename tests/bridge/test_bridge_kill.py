"""SIGKILL of both bridges, again and again, while 2,000 messages stream each way."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge_harness import Pair, accepted_once, fact, figure, publish_all, two_buses
from daemon_harness import wait_for

N = 2000


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """Two buses and a nats-server (bridge_harness.two_buses)."""
    with two_buses(tmp_path) as p:
        yield p


@pytest.mark.timeout(150)
def test_kill_9_loop_of_both_bridges_loses_nothing_and_delivers_once(pair: Pair) -> None:
    a, b = pair.a, pair.b
    a.start_bridge()
    b.start_bridge()
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 100_000))
    figure(f"kill loop seed {seed}")
    rng = random.Random(seed)
    to_b = [fact(i, "alice", "bob@busb", "ab") for i in range(N)]
    to_a = [fact(i, "bob", "alice@busa", "ba") for i in range(N)]
    producers = [
        threading.Thread(target=publish_all, args=(a, to_b), kwargs={"batch": 200, "pause": 0.15}),
        threading.Thread(target=publish_all, args=(b, to_a), kwargs={"batch": 200, "pause": 0.15}),
    ]
    for t in producers:
        t.start()
    t0 = time.monotonic()
    kills = 0
    while any(t.is_alive() for t in producers) or kills < 8:
        time.sleep(rng.uniform(0.3, 1.0))
        side = rng.choice([a, b])
        assert side.bridge is not None
        side.bridge.kill()
        kills += 1
        side.start_bridge()
    figure(f"kill phase {time.monotonic() - t0:.1f} s")
    for t in producers:
        t.join()
    produced_at = time.monotonic()

    def all_there() -> bool:
        return len(b.inbox("bob")) >= N and len(a.inbox("alice")) >= N

    wait_for(all_there, timeout=60, what="every message in the remote inbox")
    figure(f"drained {time.monotonic() - produced_at:.1f} s after the producers")
    time.sleep(1.0)  # anything still in flight would show up as an extra copy now
    for side, agent, prefix in ((b, "bob", "ab"), (a, "alice", "ba")):
        ids = side.inbox(agent)
        assert sorted(ids) == [f"{prefix}-{i:06d}" for i in range(N)], "lost or doubled"
        counts = accepted_once(side.root, prefix)
        assert len(counts) == N and set(counts.values()) == {1}
        assert side.dlq() == []
    total_dup = sum(s.logged("bridge_publish_duplicate") for s in (a, b))
    total_busd_dup = sum(s.logged("bridge_busd_duplicate") for s in (a, b))
    figure(
        f"{kills} SIGKILLs; {2 * N} messages, 0 lost, each accepted once remotely; "
        f"{total_dup} re-publishes JetStream reported as duplicates, "
        f"{total_busd_dup} redeliveries busd answered as duplicates"
    )
    assert total_dup + total_busd_dup > 0, "the kills never hit a message in flight"
