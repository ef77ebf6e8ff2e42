"""busclient's file mode (no daemon) on a compat = "tapps" root: it claims, acks and rejects
the deliveries busd writes there (Tapps form, ``.busd`` form) as busd's consumer does, and
leaves Tapps' claims and dead letters alone (issue 13 part 2)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from busclient import Client
from busd.config import load_config
from busd.core.codec import decode
from busd.store.dlq import list_entries
from busd.store.tapps import deliver_tapps
from daemon_harness import files, message
from tapps_driver import TappsBus, tapps_message

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_busd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("BUSD_"):
            monkeypatch.delenv(key)


def _tapps_root(root: Path) -> Path:
    (root / "busd.toml").write_text('compat = "tapps"\nlease_seconds = 30\n')
    return root


def test_file_mode_claims_both_forms_restores_and_acks_for_tapps_too(root: Path) -> None:
    layout = load_config(root=str(_tapps_root(root)), env={}).layout
    task = tapps_message("t-1") | {"agent_id": "alice", "to": "bob", "body": "with a body"}
    deliver_tapps(layout, "bob", decode(json.dumps(task).encode()))
    deliver_tapps(layout, "bob", decode(json.dumps(message(1)).encode()))
    names = sorted(p.name for p in files(root / "inbox" / "bob"))
    assert names[0].endswith("_t-1_task_assignment.json") and names[1].endswith("-m-000001.busd")
    with Client(root) as bus:
        got = bus.fetch("bob", max=5)
        assert [(d.message_id, d.via) for d in got] == [("t-1", "file"), ("m-000001", "file")]
        assert got[0].message["body"] == "with a body" and got[0].message["to"] == "bob"
        assert "busd" not in got[0].message["metadata"]
        assert got[1].message["message_type"] == "fact"
        assert all(d.receipt and not d.receipt.endswith((".json", ".busd")) for d in got)
        assert bus.ack("bob", receipts=[d.receipt for d in got if d.receipt]) == 2
    assert files(root / "locks" / "bob") == []
    lines = (root / "processed" / "bob.jsonl").read_text().splitlines()
    assert {"t-1", "m-000001"} <= set(lines)  # the bare ids Tapps' reader matches


def test_file_mode_reject_goes_to_dlq_busd_and_sweep_stamps_tapps_claims(root: Path) -> None:
    cfg = load_config(root=str(_tapps_root(root)), env={})
    tapps = TappsBus(root)
    deliver_tapps(cfg.layout, "bob", decode(json.dumps(tapps_message("t-2")).encode()))
    deliver_tapps(cfg.layout, "bob", decode(json.dumps(tapps_message("t-3")).encode()))
    time.sleep(0.02)  # Tapps' claim comes after the write, as in real life
    (held,) = tapps.poll_inbox("bob", max_messages=1)  # a bare rename: no lease on it
    with Client(root) as bus:
        (d,) = bus.fetch("bob")  # its sweep stamps Tapps' claim instead of returning it
        assert d.message_id != held["message_id"]
        name = bus.reject("bob", receipt=d.receipt, reason="cannot")
        assert bus.fetch("bob") == []
    assert (root / "dlq" / "busd" / name).exists()
    assert [e.name for e in list_entries(cfg.layout)] == [name]
    assert not list((root / "dlq").glob("*.reason.json"))
    (claim,) = files(root / "locks" / "bob")
    assert claim.stat().st_mtime > time.time() + 20  # a lease from when the sweep saw it
    assert tapps.replay_dlq("tester") == []  # nothing of busd's in Tapps' glob
