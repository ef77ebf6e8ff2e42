"""Tapps' FileMessageBus moves against a running daemon on one root (issue 13 part 2)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from busd.config import load_config
from busd.routing.consumer import Consumer
from busd.store.layout import init_bus
from daemon_harness import BUSD, Daemon, clean_env, files, wait_for
from tapps_driver import TappsBus, tapps_message

pytestmark = pytest.mark.timeout(90)


def _busd(root: Path, *args: str) -> dict[str, object]:
    out = subprocess.run(
        [BUSD, *args, "--root", str(root), "--json"],
        capture_output=True,
        env=clean_env(),
        check=True,
        timeout=30,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize("mode", ["tapps", "none"])
def test_tapps_and_busd_consumers_share_a_root(tmp_path: Path, mode: str) -> None:
    root = init_bus(tmp_path / ".tapps-agents" / "messages").root
    (root / "busd.toml").write_text(f'compat = "{mode}"\nlease_seconds = 30\n')
    tapps = TappsBus(root)
    daemon = Daemon(root).ready()
    try:
        n = 12
        ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(n)]
        for mid in ids:  # Tapps' producer, unchanged: "Builder Agent" and all
            tapps.send_to_outbox("orchestrator", tapps_message(mid))
        inbox = root / "inbox" / "builder"
        wait_for(lambda: len(files(inbox)) == n, what="all routed")
        got: list[str] = []
        first = tapps.poll_inbox("builder", max_messages=4)  # consumer A: holds its claims
        got += [m["message_id"] for m in first]
        time.sleep(3)  # several lease sweeps of the daemon
        second = tapps.poll_inbox("builder", max_messages=4)  # consumer B
        got += [m["message_id"] for m in second]
        consumer = Consumer(load_config(root=str(root), env={}), "builder")
        claims = consumer.claim(max=n)
        got += [c.message.message_id for c in claims]
        if mode == "none":
            return  # the sweep's rule is tapps mode's: see test_tapps_compat for "none"
        assert sorted(got) == sorted(ids), "each message delivered exactly once"
        for m in first + second:
            assert m["priority"] == "medium" and m["timeout_seconds"] == 900
            tapps.ack("builder", m)
        consumer.settle(receipts=[c.receipt for c in claims])
        # Acks count both ways: busd's consumer and Tapps' reader see every id as acked.
        lines = set((root / "processed" / "builder.jsonl").read_text().splitlines())
        assert set(ids) <= lines
        assert all(consumer.processed().acked(mid, None) for mid in ids)
        # Tapps' dead letter: listed as foreign, never removed by gc (any mode).
        tapps.send_to_inbox("tester", tapps_message("bad-1") | {"unknown": 1})
        assert tapps.poll_inbox("tester") == []
        old = time.time() - 30 * 86400
        for p in tapps.written:
            if "dlq" in p.parts:
                os.utime(p, (old, old))
        listed = _busd(root, "dlq", "list")["entries"]
        assert isinstance(listed, list)
        foreign = [e for e in listed if e.get("foreign")]
        assert len(foreign) == 1 and "Schema validation failed" in foreign[0]["detail"]
        (root / "busd.toml").write_text(
            f'compat = "{mode}"\nlease_seconds = 30\ndlq_max_age_seconds = 1\n'
        )
        _busd(root, "gc")
        for p in tapps.written:
            if "dlq" in p.parts or "processed" in p.parts:
                assert p.exists(), f"busd removed {p}, which Tapps wrote"
    finally:
        daemon.kill()
