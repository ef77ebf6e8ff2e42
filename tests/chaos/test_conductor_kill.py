"""Following a conductor-loop bus file under SIGKILL of the daemon: 0 lost, 0 repeated.

A writer thread appends entries the way conductor-loop's agents do (O_APPEND under an
exclusive ``flock``, ``"\\n"`` separator, one entry per write) while the daemon
following the file is SIGKILLed at random moments (start-up included) and
started again. At the end every entry is journaled ``accepted`` exactly once and
its recipient holds exactly one delivery of it.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from _chaos import LONG, ChaosDaemon, report, scale

from busd.store.journal import Journal
from daemon_harness import delivered_ids, wait_for
from runtime.test_conductor_follow import append, conductor_id, entry, follow_config

MESSAGES = scale(500, 5000)
KILLS_EVERY_S = 0.3

pytestmark = pytest.mark.timeout(600 if LONG else 120)


def _writer(bus: Path, n: int, done: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    i = 0
    while i < n:
        burst = rng.randint(1, 20)  # conductor agents write in bursts, too
        for _ in range(min(burst, n - i)):
            append(bus, entry(i))
            i += 1
        time.sleep(rng.uniform(0.1, 0.4))
    done.set()


def test_follow_under_sigkill_loses_and_repeats_nothing(root: Path, tmp_path: Path) -> None:
    """500 entries appended while the daemon is killed every ~0.3 s: each routed once."""
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    bus = tmp_path / "TASK-MESSAGE-BUS.md"
    follow_config(root, bus)
    done = threading.Event()
    writer = threading.Thread(target=_writer, args=(bus, MESSAGES, done, seed), daemon=True)
    kills = before_ready = 0
    started = time.monotonic()
    writer.start()
    d: ChaosDaemon | None = None
    try:
        while not done.is_set() or kills < 15:
            d = ChaosDaemon(root)
            if kills % 2:
                try:
                    d.ready(timeout=15)
                except AssertionError:
                    pass
            time.sleep(rng.uniform(0.02, KILLS_EVERY_S))
            before_ready += not d.events("daemon_ready")
            assert d.alive(), d.stderr_text()[-2000:]
            d.kill()
            kills += 1
        writer.join(30)
        d = ChaosDaemon(root)
        d.ready()
        wanted = {conductor_id(i) for i in range(MESSAGES)}
        wait_for(
            lambda: wanted <= set(delivered_ids(root / "inbox" / "bob")),
            timeout=60,
            what="every entry delivered",
        )
        time.sleep(0.5)
        assert d.stop() == 0
    finally:
        if d is not None:
            d.kill()
    with Journal(root / "journal") as j:
        events = list(j.read(events=("accepted", "duplicate")))
    accepted = Counter(e.message_id or "" for e in events if e.event == "accepted")
    deliveries = Counter(delivered_ids(root / "inbox" / "bob"))
    twice = sorted(m for m, c in accepted.items() if c > 1)
    repeated = sorted(m for m, c in deliveries.items() if c > 1)
    lost = sorted(wanted - set(accepted))
    report(
        "conductor follow kill -9",
        seed=seed,
        messages=MESSAGES,
        kills=kills,
        kills_before_ready=before_ready,
        duplicates_answered=sum(1 for e in events if e.event == "duplicate"),
        lost=len(lost),
        journaled_twice=len(twice),
        delivered_twice=len(repeated),
        seconds=round(time.monotonic() - started, 1),
    )
    assert lost == [] and twice == [] and repeated == []
    assert set(deliveries) == wanted
