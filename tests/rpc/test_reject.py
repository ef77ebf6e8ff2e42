"""The ``reject`` socket method against a real daemon: file claims and memory deliveries.

A reject dead-letters the held delivery with reason ``rejected`` and the consumer's
text as ``detail``, the message's bytes in the DLQ; it is never delivered again,
not even after a SIGKILL and a restart (the journal's ``dead_lettered`` line
settles a memory delivery).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import busclient
from daemon_harness import Daemon, files, message, wait_for


def _record(root: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "dlq" / f"{name}.reason.json").read_text())
    return data


def _events(root: Path, event: str) -> list[dict[str, Any]]:
    out = []
    for seg in sorted((root / "journal").glob("*.ndjson")):
        for line in seg.read_text().splitlines():
            entry = json.loads(line)
            if entry["event"] == event:
                out.append(entry)
    return out


@pytest.mark.timeout(60)
def test_reject_a_file_claim_over_the_socket(root: Path, daemon: Daemon) -> None:
    with busclient.Client(root) as c:
        c.send(message(1))  # bob is not socket-served yet: an inbox file
        wait_for(lambda: files(root / "inbox" / "bob"), what="the inbox file")
        [d] = c.fetch("bob", max=1)
        assert d.via == "socket" and d.receipt is not None
        name = c.call("reject", {"agent_id": "bob", "receipt": d.receipt, "reason": "bad input"})
        assert set(name) == {"name"}
        record = _record(root, name["name"])
        assert (record["reason"], record["detail"]) == ("rejected", "bad input")
        assert record["recipient"] == "bob" and record["message_id"] == "m-000001"
        assert record["delivery_count"] == 1
        assert json.loads((root / "dlq" / name["name"]).read_bytes())["body"] == "hello 1"
        assert files(root / "locks" / "bob") == []
        with pytest.raises(busclient.NotFound):
            c.reject("bob", receipt=d.receipt, reason="again")


@pytest.mark.timeout(90)
def test_reject_a_memory_delivery_survives_a_kill(root: Path) -> None:
    d = Daemon(root).ready()
    try:
        with busclient.Client(root) as c:
            assert c.fetch("bob") == []  # bob is socket-served from now on: memory
            c.send(message(2))
            [first] = c.fetch("bob", max=1, wait_s=5)
            c.nack("bob", receipt=first.receipt)
            [second] = c.fetch("bob", max=1, wait_s=5)
            with pytest.raises(busclient.StaleReceipt):
                c.reject("bob", receipt=first.receipt, reason="stale")
            name = c.reject("bob", receipt=second.receipt, reason="cannot do it")
            record = _record(root, name)
            assert (record["reason"], record["detail"]) == ("rejected", "cannot do it")
            assert record["delivery_count"] == 2 and record["recipient"] == "bob"
            body = json.loads((root / "dlq" / name).read_bytes())
            assert body["message_id"] == "m-000002"
            [line] = _events(root, "dead_lettered")
            assert (line["agent"], line["reason"], line["message_id"]) == (
                "bob",
                "rejected",
                "m-000002",
            )
            with pytest.raises(busclient.NotFound):
                c.call("reject", {"agent_id": "bob", "message_id": "m-000002", "reason": "x"})
            with pytest.raises(busclient.InvalidRequest):
                c.call("reject", {"agent_id": "bob", "message_id": "m-000002", "reason": ""})
        d.kill()  # no graceful write-out: only the journal says it was settled
        d = Daemon(root).ready()
        with busclient.Client(root) as c:
            assert c.fetch("bob", max=10, wait_s=1) == []
        assert files(root / "inbox" / "bob") == []
    finally:
        d.kill()


@pytest.mark.timeout(60)
def test_reject_through_the_files_without_a_daemon(root: Path) -> None:
    with busclient.Client(root) as c:
        c.send(message(3))  # into the outbox: nobody routes without a daemon
    from busd.config import load_config
    from busd.routing.offline import route_pending

    route_pending(load_config(root=str(root), env={}))
    with busclient.Client(root) as c:
        [d] = c.fetch("bob")
        assert d.via == "file"
        name = c.reject("bob", d.message_id, reason="by id")
    record = _record(root, name)
    assert (record["reason"], record["detail"], record["schema"]) == ("rejected", "by id", 1)
    assert record["original_path"] == f"locks/bob/{d.receipt}.json"
    data = (root / "dlq" / name).read_bytes()
    assert record["size"] == len(data) and json.loads(data)["message_id"] == "m-000003"
    # busd reads the entry busclient wrote: it lists and replays like its own.
    from busd.config import load_config as load
    from busd.store import dlq

    [entry] = dlq.list_entries(load(root=str(root), env={}).layout, reason="rejected")
    assert entry.name == name and entry.record.message_id == "m-000003"
