"""SIGKILL of both bridges, again and again, while 2,000 messages stream each way."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge_harness import Pair, Side, accepted_once, fact, figure, publish_all, two_buses
from daemon_harness import wait_for

N = 2000
STRANDING_KILLS = 4
"""Kills that must land while the bridge holds claims: a kill of an idle bridge tests nothing."""


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """Two buses and a nats-server (bridge_harness.two_buses)."""
    with two_buses(tmp_path) as p:
        yield p


def _claims_held(side: Side) -> int:
    """How many ``_bridge`` claims of ``side`` are in flight, asked of its daemon."""
    from busd.config import load_config
    from busd.rpc.client import call

    status = call(load_config(root=str(side.root), env={}), "status", {}, timeout=10)
    return int(((status.get("agents") or {}).get("_bridge") or {}).get("in_flight") or 0)


def _kill_holding_claims(side: Side, rng: random.Random, patience: float = 2.0) -> int:
    """SIGKILL ``side``'s bridge, while it holds claims if that comes within ``patience``.

    The bridge is frozen (SIGSTOP) and its daemon asked for the claims it holds; an idle
    bridge is thawed and tried again a moment later. Returns the claims the kill stranded.
    """
    bridge = side.bridge
    assert bridge is not None
    deadline = time.monotonic() + patience
    held = 0
    while True:
        bridge.proc.send_signal(signal.SIGSTOP)
        held = _claims_held(side)
        if held or time.monotonic() > deadline:
            break
        bridge.proc.send_signal(signal.SIGCONT)
        time.sleep(rng.uniform(0.002, 0.02))
    bridge.kill()  # SIGKILL reaches a stopped process too
    return held


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
    # About 10 s of traffic each way, so the kills land while messages still stream.
    producers = [
        threading.Thread(target=publish_all, args=(a, to_b), kwargs={"batch": 50, "pause": 0.25}),
        threading.Thread(target=publish_all, args=(b, to_a), kwargs={"batch": 50, "pause": 0.25}),
    ]
    for t in producers:
        t.start()
    t0 = time.monotonic()
    kills = stranding = stranded = 0
    while (any(t.is_alive() for t in producers) or kills < 8) and kills < 60:
        time.sleep(rng.uniform(0.2, 0.6))
        side = rng.choice([a, b])
        held = _kill_holding_claims(side, rng)
        kills += 1
        stranding += held > 0
        stranded += held
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
        f"{kills} SIGKILLs, {stranding} of them holding claims ({stranded} claims stranded); "
        f"{2 * N} messages, 0 lost, each accepted once remotely; "
        f"{total_dup} re-publishes JetStream reported as duplicates, "
        f"{total_busd_dup} redeliveries busd answered as duplicates"
    )
    assert stranding >= STRANDING_KILLS, f"only {stranding} of {kills} kills hit claims in flight"
