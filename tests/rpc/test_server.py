"""The socket server of ``busd run``: JSON-RPC over ``<root>/busd.sock`` with a real daemon.

Round trips for every method, bad requests of every kind (each followed by a
ping on the same connection), disconnects, peer credentials, the connection
limit, socket activation, concurrent load and SIGTERM under load.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from _rpc import Rpc, RpcFailure
from busd import __version__
from busd.rpc.server import ENVELOPE_BYTES
from busd.store.journal import Journal
from busd.store.layout import init_bus
from daemon_harness import (
    BUSD,
    Daemon,
    build_slow_fsync,
    delivered_ids,
    files,
    journal_ids,
    message,
    wait_for,
)

SMALL_MAX = 65536  # BUSD_MAX_MESSAGE_BYTES of the shared daemon: keeps "huge" lines small
LINE_LIMIT = SMALL_MAX + ENVELOPE_BYTES


# -- fixtures and helpers -------------------------------------------------------------


@pytest.fixture
def rpc(daemon: Daemon, root: Path) -> Iterator[Rpc]:
    """A connection to the daemon of ``root``."""
    with Rpc(root / "busd.sock") as c:
        yield c


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon (max_message_bytes 64 KiB) for the tests that leave no state that matters."""
    root = init_bus(tmp_path_factory.mktemp("shared") / "bus").root
    d = Daemon(root, env={"BUSD_MAX_MESSAGE_BYTES": str(SMALL_MAX)}).ready()
    yield d
    d.kill()


@pytest.fixture
def conn(shared: Daemon) -> Iterator[Rpc]:
    """A connection to the shared daemon."""
    with Rpc(shared.root / "busd.sock") as c:
        yield c


_ids = delivered_ids
_journal_ids = journal_ids


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _ids_of(fetched: dict[str, Any]) -> list[str]:
    return [m["message"]["message_id"] for m in fetched["messages"]]


def _request(method: str, params: Any = None, rid: Any = 1) -> bytes:
    req: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        req["params"] = params
    return json.dumps(req).encode() + b"\n"


def _assert_alive(c: Rpc) -> None:
    result = c("ping")
    assert result["version"] == __version__


# -- round trips ----------------------------------------------------------------------


def test_socket_is_private_and_removed_on_stop(root: Path) -> None:
    """The socket is created 0600 in the root and unlinked by a clean stop."""
    d = Daemon(root).ready()
    try:
        sock = root / "busd.sock"
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert d.stop() == 0
        assert not sock.exists()
    finally:
        d.kill()


def test_ping_round_trip(daemon: Daemon, rpc: Rpc) -> None:
    """ping answers version, the daemon's pid and its uptime, echoing a string id."""
    obj = rpc.answer(rpc.send("ping", request_id="abc"))
    assert obj["jsonrpc"] == "2.0"
    assert obj["id"] == "abc"
    result = obj["result"]
    assert result["version"] == __version__
    assert result["pid"] == daemon.proc.pid
    assert result["uptime_s"] >= 0


def test_publish_is_journaled_before_the_answer(root: Path, rpc: Rpc) -> None:
    """publish answers after the journal fsync; the inbox file follows from the journal."""
    result = rpc("publish", {"message": message(1), "sender": "alice"})
    assert result == {"message_id": "m-000001", "duplicate": False}
    # No waiting: the answer comes after the group commit.
    assert _journal_ids(root) == ["m-000001"]
    wait_for(lambda: _ids(root / "inbox" / "bob") == ["m-000001"], what="delivery")


def test_duplicate_publish_is_reported_and_delivered_once(root: Path, rpc: Rpc) -> None:
    """Publishing an id, or an idempotency key, again answers duplicate and delivers nothing."""
    assert rpc("publish", {"message": message(1)})["duplicate"] is False
    assert rpc("publish", {"message": message(1)})["duplicate"] is True
    keyed = message(2, idempotency_key="k1")
    assert rpc("publish", {"message": keyed})["duplicate"] is False
    again = rpc("publish", {"message": message(3, idempotency_key="k1")})
    assert again == {"message_id": "m-000003", "duplicate": True}
    wait_for(lambda: _ids(root / "inbox" / "bob") == ["m-000001", "m-000002"], what="deliveries")
    assert _journal_ids(root) == ["m-000001", "m-000002"]
    assert sorted(_journal_ids(root, "duplicate")) == ["m-000001", "m-000003"]


def test_publish_batch_answers_per_message(root: Path, rpc: Rpc) -> None:
    """publish_batch gives one result or error per message, in order; the valid ones flow."""
    batch = [message(1), message(2, status="x"), message(1), message(3), [1, 2]]
    results = rpc("publish_batch", {"messages": batch, "sender": "alice"})["results"]
    assert len(results) == 5
    assert results[0] == {"result": {"message_id": "m-000001", "duplicate": False}}
    err = results[1]["error"]
    assert err["code"] == -32602
    assert err["data"]["reason"] == "schema"
    assert err["data"]["error"] == "invalid_message"
    assert err["data"]["path"] == "$.status"
    assert results[2] == {"result": {"message_id": "m-000001", "duplicate": True}}
    assert results[3] == {"result": {"message_id": "m-000003", "duplicate": False}}
    assert results[4]["error"]["data"]["reason"] == "schema"
    wait_for(lambda: _ids(root / "inbox" / "bob") == ["m-000001", "m-000003"], what="deliveries")
    assert _journal_ids(root) == ["m-000001", "m-000003"]
    entries = rpc("dlq.list")["entries"]
    assert [e["sender"] for e in entries] == ["alice", "alice"]
    assert [e["reason"] for e in entries] == ["schema", "schema"]


def test_fetch_long_polls_until_a_message_arrives(root: Path, rpc: Rpc) -> None:
    """fetch with wait_s answers as soon as a message published elsewhere arrives."""

    def publish_later() -> None:
        time.sleep(0.3)
        with Rpc(root / "busd.sock") as other:
            other("publish", {"message": message(1)})

    t = threading.Thread(target=publish_later)
    start = time.monotonic()
    t.start()
    try:
        fetched = rpc("fetch", {"agent_id": "bob", "max": 5, "wait_s": 10})
    finally:
        t.join()
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 3.0, elapsed
    assert _ids_of(fetched) == ["m-000001"]
    m = fetched["messages"][0]
    assert m["delivery_count"] == 1
    assert m["message"] == {**message(1)}
    assert _ts(m["lease_expires_at"]) > time.time() + 30
    # bob fetched: served from memory, no claim file (issue 11); the receipt names it
    assert m["receipt"].endswith("-001-m-000001")
    assert _ids(root / "locks" / "bob") == []


def test_fetch_wait_expires_empty(rpc: Rpc) -> None:
    """fetch with wait_s and nothing to claim answers an empty list after about wait_s."""
    start = time.monotonic()
    assert rpc("fetch", {"agent_id": "bob", "wait_s": 0.5}) == {"messages": []}
    assert 0.45 <= time.monotonic() - start < 3.0


def test_fetch_respects_max(rpc: Rpc) -> None:
    """fetch claims at most max messages, oldest first."""
    for i in range(5):
        rpc("publish", {"message": message(i)})
    assert _ids_of(rpc("fetch", {"agent_id": "bob", "max": 3})) == [
        "m-000000",
        "m-000001",
        "m-000002",
    ]
    assert _ids_of(rpc("fetch", {"agent_id": "bob", "max": 3})) == ["m-000003", "m-000004"]


def test_ack_settles_claims(root: Path, rpc: Rpc) -> None:
    """ack removes the claim and records the id in the ledger; an unheld id counts 0."""
    rpc("publish", {"message": message(1)})
    # a file delivery (bob fetched nothing yet): its ack goes to the ledger
    wait_for(lambda: files(root / "inbox" / "bob"), what="the inbox file")
    rpc("fetch", {"agent_id": "bob"})
    assert rpc("ack", {"agent_id": "bob", "message_ids": ["m-000001"]}) == {
        "acked": 1,
        "not_held": [],
    }
    assert files(root / "locks" / "bob") == []
    assert files(root / "inbox" / "bob") == []
    ledger = (root / "processed" / "bob.jsonl").read_text()
    assert [json.loads(line)["message_id"] for line in ledger.splitlines()] == ["m-000001"]
    assert rpc("ack", {"agent_id": "bob", "message_ids": ["m-000001", "nope"]}) == {
        "acked": 0,
        "not_held": ["m-000001", "nope"],
    }


def test_nack_makes_the_message_fetchable_again(rpc: Rpc) -> None:
    """nack puts the claim back at once; the next fetch gets it with delivery_count 2."""
    rpc("publish", {"message": message(1)})
    assert rpc("fetch", {"agent_id": "bob"})["messages"][0]["delivery_count"] == 1
    assert rpc("nack", {"agent_id": "bob", "message_id": "m-000001"}) == {}
    again = rpc("fetch", {"agent_id": "bob"})
    assert _ids_of(again) == ["m-000001"]
    assert again["messages"][0]["delivery_count"] == 2
    with pytest.raises(RpcFailure) as exc:
        rpc("nack", {"agent_id": "bob", "message_id": "never-claimed"})
    assert exc.value.code == -32004
    assert exc.value.data["reason"] == "not_found"
    _assert_alive(rpc)


def test_nack_with_delay_returns_the_message_later(rpc: Rpc) -> None:
    """nack with delay_s keeps the message away for about delay_s, then it comes back."""
    rpc("publish", {"message": message(1)})
    rpc("fetch", {"agent_id": "bob"})
    start = time.monotonic()
    assert rpc("nack", {"agent_id": "bob", "message_id": "m-000001", "delay_s": 1.0}) == {}
    assert rpc("fetch", {"agent_id": "bob"}) == {"messages": []}
    again = rpc("fetch", {"agent_id": "bob", "wait_s": 8})
    assert time.monotonic() - start >= 0.9
    assert _ids_of(again) == ["m-000001"]
    assert again["messages"][0]["delivery_count"] == 2


def test_extend_moves_the_lease(root: Path, rpc: Rpc) -> None:
    """extend pushes lease_expires_at (and the claim file's mtime) to now + lease_s."""
    rpc("publish", {"message": message(1)})
    # bob is no socket consumer yet, so the message becomes an inbox file (a fetch made
    # before the delivery lane wrote it would make bob socket-served: a memory claim)
    wait_for(lambda: files(root / "inbox" / "bob"), what="the inbox file")
    first = _ts(rpc("fetch", {"agent_id": "bob"})["messages"][0]["lease_expires_at"])
    before = time.time()
    result = rpc("extend", {"agent_id": "bob", "message_id": "m-000001", "lease_s": 600})
    extended = _ts(result["lease_expires_at"])
    assert extended >= first + 500
    assert before + 599 <= extended <= time.time() + 601
    (claim,) = files(root / "locks" / "bob")
    assert abs(claim.stat().st_mtime - extended) < 1.0
    with pytest.raises(RpcFailure) as exc:
        rpc("extend", {"agent_id": "bob", "message_id": "nope", "lease_s": 10})
    assert exc.value.code == -32004


def test_subscribe_receives_pushes(root: Path, rpc: Rpc) -> None:
    """After subscribe, a message published elsewhere is pushed as a ``message`` notification."""
    assert rpc("subscribe", {"agent_id": "bob"}) == {"subscribed": True}
    with Rpc(root / "busd.sock") as other:
        other("publish", {"message": message(1)})
    push = rpc.push(timeout=5)
    assert push["jsonrpc"] == "2.0"
    assert push["method"] == "message"
    assert "id" not in push
    assert push["params"]["message"]["message_id"] == "m-000001"
    assert push["params"]["delivery_count"] == 1
    assert _ids(root / "locks" / "bob") == []  # a subscriber is served from memory
    assert rpc("ack", {"agent_id": "bob", "receipts": [push["params"]["receipt"]]}) == {
        "acked": 1,
        "not_held": [],
    }


def test_subscribe_with_topics_joins_them(root: Path, rpc: Rpc) -> None:
    """subscribe with topics routes topic messages to the agent and persists the subscription."""
    rpc("subscribe", {"agent_id": "carol", "topics": ["news"]})
    with Rpc(root / "busd.sock") as other:
        result = other("publish", {"message": message(1, to="topic:news")})
    assert result["duplicate"] is False
    assert rpc.push(timeout=5)["params"]["message"]["message_id"] == "m-000001"
    saved = json.loads((root / "subscriptions.json").read_text())
    assert saved == {"news": ["carol"]}


def test_max_in_flight_stops_pushes_until_acks(rpc: Rpc) -> None:
    """With max_in_flight 2, two messages are pushed, and one more only after an ack."""
    for i in range(5):
        rpc("publish", {"message": message(i)})
    rpc("subscribe", {"agent_id": "bob", "max_in_flight": 2})
    first = [rpc.push(timeout=5)["params"]["message"]["message_id"] for _ in range(2)]
    assert first == ["m-000000", "m-000001"]
    with pytest.raises(TimeoutError):
        rpc.push(timeout=1.2)
    assert rpc("ack", {"agent_id": "bob", "message_ids": ["m-000000"]})["acked"] == 1
    assert rpc.push(timeout=5)["params"]["message"]["message_id"] == "m-000002"
    with pytest.raises(TimeoutError):
        rpc.push(timeout=1.2)


def test_two_subscribers_of_one_agent_share_the_work(root: Path, rpc: Rpc) -> None:
    """Two subscribers of one agent get disjoint pushes that together hold every message once."""
    with Rpc(root / "busd.sock") as second:
        rpc("subscribe", {"agent_id": "bob"})
        second("subscribe", {"agent_id": "bob"})
        with Rpc(root / "busd.sock") as producer:
            for i in range(40):
                producer("publish", {"message": message(i)})
        seen: list[str] = []
        for c in (rpc, second):
            while True:
                try:
                    seen.append(c.push(timeout=1.0)["params"]["message"]["message_id"])
                except TimeoutError:
                    break
    assert sorted(seen) == [f"m-{i:06d}" for i in range(40)]
    assert files(root / "inbox" / "bob") == []


def test_status_shape(root: Path, daemon: Daemon, rpc: Rpc) -> None:
    """status reports the daemon, agents, DLQ and journal."""
    rpc("publish", {"message": message(1)})
    with pytest.raises(RpcFailure):
        rpc("publish", {"message": {"nope": 1}})
    status = rpc("status")
    assert {"root", "version", "daemon", "agents", "dlq", "journal"} <= set(status)
    assert status["root"] == str(root)
    assert status["version"] == __version__
    info = status["daemon"]
    assert info["running"] is True
    assert info["pid"] == daemon.proc.pid
    assert info["socket"] == str(root / "busd.sock")
    assert status["totals"]["accepted"] == 1
    assert status["totals"]["delivered"] == 1
    assert status["agents"]["bob"]["ready"] == 1
    assert status["dlq"]["entries"] == 1
    assert status["dlq"]["by_reason"] == {"schema": 1}
    assert status["journal"]["segments"] == 1


def test_invalid_publish_is_refused_and_dead_lettered_byte_for_byte(root: Path, rpc: Rpc) -> None:
    """An invalid message gets -32602 with the DLQ reason, and its exact bytes land in the DLQ."""
    original = (
        b'{ "schema_version":"1.0",  "message_id":"m-1", "message_type":"fact",'
        b' "created_at":"2026-01-01T00:00:00Z","workflow_id":"w","task_id":"t",'
        b'\t"agent_id":"alice", "to":"bob", "colour":  "blue" }'
    )
    line = (
        b'{"jsonrpc":"2.0","id":7,"method":"publish","params":{"sender":"alice","message":'
        + original
        + b"}}\n"
    )
    rpc.send_raw(line)
    obj = rpc.answer(7)
    err = obj["error"]
    assert err["code"] == -32602
    assert err["data"]["reason"] == "schema"
    assert err["data"]["error"] == "invalid_message"
    assert err["data"]["path"] == "$.colour"
    (entry,) = rpc("dlq.list")["entries"]
    assert entry["reason"] == "schema"
    assert entry["original_path"] == "socket"
    assert entry["sender"] == "alice"
    assert entry["size"] == len(original)
    assert entry["sha256"] == hashlib.sha256(original).hexdigest()
    assert (root / "dlq" / entry["name"]).read_bytes() == original
    shown = rpc("dlq.show", {"name": entry["name"]})
    assert shown["name"] == entry["name"]
    assert shown["data"].encode() == original
    assert shown["record"]["reason"] == "schema"
    assert [e["name"] for e in rpc("dlq.list", {"reason": "schema"})["entries"]] == [entry["name"]]
    assert rpc("dlq.list", {"reason": "too_large"})["entries"] == []
    assert _journal_ids(root) == []
    assert files(root / "inbox" / "bob") == []


def test_non_utf8_message_is_dead_lettered_byte_for_byte(root: Path, rpc: Rpc) -> None:
    """A published message holding invalid UTF-8 answers invalid_utf8 and keeps its bytes."""
    original = json.dumps(message(1)).encode().replace(b"hello 1", b"caf\xe9")
    rpc.send_raw(b'{"jsonrpc":"2.0","id":3,"method":"publish","params":{"message":')
    rpc.send_raw(original + b"}}\n")
    err = rpc.answer(3)["error"]
    assert err["code"] == -32602
    assert err["data"]["reason"] == "invalid_utf8"
    assert err["data"]["error"] == "invalid_message"
    (entry,) = rpc("dlq.list", {"reason": "invalid_utf8"})["entries"]
    assert (root / "dlq" / entry["name"]).read_bytes() == original
    assert files(root / "inbox" / "bob") == []


def test_unroutable_publish_is_refused_and_dead_lettered(root: Path, rpc: Rpc) -> None:
    """A message to a topic nobody follows answers unroutable and is journaled as dead-lettered."""
    with pytest.raises(RpcFailure) as exc:
        rpc("publish", {"message": message(1, to="topic:nobody")})
    assert exc.value.code == -32007
    assert exc.value.data["reason"] == "unroutable"
    (entry,) = rpc("dlq.list", {"reason": "unroutable"})["entries"]
    assert entry["message_id"] == "m-000001"
    with Journal(root / "journal") as j:
        (line,) = list(j.read(events=("dead_lettered",)))
    assert line.to == [entry["name"]]
    assert _journal_ids(root) == []


def test_dlq_show_of_unknown_entry_is_not_found(rpc: Rpc) -> None:
    """dlq.show of a name with no entry answers not_found, and the connection goes on."""
    with pytest.raises(RpcFailure) as exc:
        rpc("dlq.show", {"name": "01234567890123456789-nothing"})
    assert exc.value.code == -32004
    assert exc.value.data["reason"] == "not_found"
    _assert_alive(rpc)


def test_replay_of_a_still_invalid_entry(rpc: Rpc) -> None:
    """replay of an entry that is still invalid leaves it in the DLQ and counts the attempt."""
    with pytest.raises(RpcFailure):
        rpc("publish", {"message": message(1, status="x")})
    (entry,) = rpc("dlq.list")["entries"]
    name = entry["name"]
    dry = rpc("replay", {"names": [name], "dry_run": True})["replayed"]
    assert [(r["name"], r["status"]) for r in dry] == [(name, "still_invalid")]
    assert rpc("dlq.show", {"name": name})["record"]["replays"] == 0
    done = rpc("replay", {"reason": "schema"})["replayed"]
    assert [(r["name"], r["status"]) for r in done] == [(name, "still_invalid")]
    record = rpc("dlq.show", {"name": name})["record"]
    assert record["replays"] == 1
    assert record["history"][-1]["event"] == "replay_failed"
    missing = rpc("replay", {"names": ["01234567890123456789-gone"]})["replayed"]
    assert [r["status"] for r in missing] == ["not_found"]
    with pytest.raises(RpcFailure) as exc:
        rpc("replay", {})
    assert exc.value.code == -32602
    assert exc.value.data["reason"] == "invalid_params"


def _unroutable_entry(rpc: Rpc) -> str:
    with pytest.raises(RpcFailure):
        rpc("publish", {"message": message(1, to="topic:nobody"), "sender": "alice"})
    (entry,) = rpc("dlq.list")["entries"]
    return str(entry["name"])


def test_replay_dry_run_of_a_fixed_entry(root: Path, rpc: Rpc) -> None:
    """A dry-run replay of an entry that is valid once readdressed answers would_replay."""
    name = _unroutable_entry(rpc)
    (result,) = rpc("replay", {"names": [name], "to": "carol", "dry_run": True})["replayed"]
    assert result["status"] == "would_replay"
    assert result["message_id"] == "m-000001"
    assert result["target"] == str(root / "outbox" / "alice")
    assert [e["name"] for e in rpc("dlq.list")["entries"]] == [name]


def test_replay_of_a_fixed_entry_delivers_it(root: Path, rpc: Rpc) -> None:
    """replay with ``to`` sends a fixed entry to its new recipient and empties the DLQ."""
    name = _unroutable_entry(rpc)
    (result,) = rpc("replay", {"names": [name], "to": "carol"})["replayed"]
    assert result["status"] == "replayed"
    assert result["message_id"] == "m-000001"
    assert Path(result["target"]).parent == root / "outbox" / "alice"
    wait_for(lambda: _ids(root / "inbox" / "carol") == ["m-000001"], what="replayed delivery")
    assert rpc("dlq.list")["entries"] == []


# -- bad requests: answered, and the connection goes on --------------------------------

_NESTED = b"[" * 100_000

BAD_REQUESTS = {
    "invalid json": (b"{not json}", -32700, "parse_error", None),
    "truncated json": (b'{"jsonrpc":"2.0","id":1,"method":"pi', -32700, "parse_error", None),
    "non-utf8": (b"\xc3\x28\xa0\xa1", -32700, "invalid_utf8", None),
    "non-utf8 after json": (
        b'{"jsonrpc":"2.0","id":1,"method":"ping"}\xff',
        -32700,
        "invalid_utf8",
        None,
    ),
    "array (batch)": (
        b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]',
        -32600,
        "invalid_request",
        None,
    ),
    "string": (b'"ping"', -32600, "invalid_request", None),
    "number": (b"42", -32600, "invalid_request", None),
    "null": (b"null", -32600, "invalid_request", None),
    "deep nesting": (_NESTED, None, None, None),
    "missing jsonrpc": (b'{"id":5,"method":"ping"}', -32600, "invalid_request", 5),
    "wrong jsonrpc": (b'{"jsonrpc":"1.0","id":5,"method":"ping"}', -32600, "invalid_request", 5),
    "missing method": (b'{"jsonrpc":"2.0","id":5}', -32600, "invalid_request", 5),
    "method not a string": (b'{"jsonrpc":"2.0","id":5,"method":3}', -32600, "invalid_request", 5),
    "id an object": (b'{"jsonrpc":"2.0","id":{},"method":"ping"}', -32600, "invalid_request", None),
    "unknown method": (
        b'{"jsonrpc":"2.0","id":"u","method":"nope"}',
        -32601,
        "method_not_found",
        "u",
    ),
    "params an array": (
        b'{"jsonrpc":"2.0","id":6,"method":"ping","params":[1]}',
        -32602,
        "invalid_params",
        6,
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_request_is_answered_and_connection_kept(conn: Rpc, case: str) -> None:
    """Each kind of malformed request gets its error answer; a ping on the same connection works."""
    line, code, reason, rid = BAD_REQUESTS[case]
    conn.send_raw(line + b"\n")
    obj = conn.read()
    assert "result" not in obj
    err = obj["error"]
    if code is None:  # deep nesting: any parse or request error will do, but an answer
        assert err["code"] in (-32700, -32600)
    else:
        assert err["code"] == code
        assert err["data"]["reason"] == reason
        assert obj["id"] == rid
    _assert_alive(conn)


@pytest.mark.parametrize(
    "line",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"ping\xff\xfe"}',
        b'{"jsonrpc":"2.0","id":"caf\xe9","method":"ping"}',
    ],
    ids=["in method", "in id"],
)
def test_non_utf8_inside_a_request_string_is_a_parse_error(conn: Rpc, line: bytes) -> None:
    """Invalid UTF-8 inside a string of the envelope gives -32700 invalid_utf8, not -32603."""
    conn.send_raw(line + b"\n")
    err = conn.read()["error"]
    assert err["code"] == -32700
    assert err["data"]["reason"] == "invalid_utf8"
    _assert_alive(conn)


WRONG_PARAMS = {
    "wrong type": ("fetch", {"agent_id": "bob", "max": "3"}, "$.max"),
    "out of range": ("fetch", {"agent_id": "bob", "max": 0}, "$.max"),
    "negative wait": ("fetch", {"agent_id": "bob", "wait_s": -1}, "$.wait_s"),
    "unknown param": ("ping", {"verbose": True}, "$"),
    "unknown publish param": ("publish", {"message": message(1), "urgent": True}, "$"),
    "missing param": ("ack", {"agent_id": "bob"}, "$"),
    "agent id too long": ("fetch", {"agent_id": "a" * 65}, "$.agent_id"),
    "empty batch": ("publish_batch", {"messages": []}, "$.messages"),
    "subscribe window 0": ("subscribe", {"agent_id": "bob", "max_in_flight": 0}, "$.max_in_flight"),
    "topic not a string": ("subscribe", {"agent_id": "bob", "topics": [1]}, "$.topics[0]"),
    "lease not positive": (
        "extend",
        {"agent_id": "b", "message_id": "m", "lease_s": 0},
        "$.lease_s",
    ),
    "params not an object": ("status", 7, "$"),
}


@pytest.mark.parametrize("case", list(WRONG_PARAMS), ids=list(WRONG_PARAMS))
def test_wrong_params_are_answered_with_their_path(conn: Rpc, case: str) -> None:
    """Params that do not fit the method give -32602 invalid_params with data.path; then a ping."""
    method, params, path = WRONG_PARAMS[case]
    obj = conn.call(method, params)
    err = obj["error"]
    assert err["code"] == -32602
    assert err["data"]["reason"] == "invalid_params"
    assert err["data"]["path"] == path
    _assert_alive(conn)


def test_invalid_agent_name_is_answered(conn: Rpc) -> None:
    """An agent id that is not a safe name gives -32602 invalid_name; the connection goes on."""
    for agent in ("../etc", "con", "a."):
        err = conn.call("fetch", {"agent_id": agent})["error"]
        assert err["code"] == -32602
        assert err["data"]["reason"] == "invalid_name"
    _assert_alive(conn)


def test_over_long_line_is_too_large_and_the_connection_closed(shared: Daemon, conn: Rpc) -> None:
    """A line far over max_message_bytes + 64 KiB is answered too_large (id null), then the
    connection is closed; a new connection is served."""
    pad = b" " * (3 * LINE_LIMIT)
    line = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{' + pad + b"}}\n"

    def send() -> None:
        with suppress(BrokenPipeError, ConnectionResetError):
            conn.send_raw(line)  # the daemon closes before it has read it all

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    obj = conn.read()
    assert obj["id"] is None
    err = obj["error"]
    assert err["code"] == -32600
    assert err["data"]["reason"] == "too_large"
    assert err["data"]["limit"] == LINE_LIMIT
    assert conn.closed_by_peer()
    sender.join(5)
    with Rpc(shared.root / "busd.sock") as fresh:
        _assert_alive(fresh)


def _publish_line_of(size: int) -> bytes:
    """A valid publish request line (no newline) padded with JSON whitespace to ``size`` bytes."""
    head = b'{"jsonrpc":"2.0","id":"edge","method":"publish","params":{"message":'
    body = json.dumps(message(int(time.time_ns() % 1_000_000))).encode()
    line = head + body + b"}}"
    return head + body + b" " * (size - len(line)) + b"}}"


def test_line_of_exactly_the_limit_is_accepted(shared: Daemon, conn: Rpc) -> None:
    """A request line of exactly max_message_bytes + 64 KiB is read and served."""
    line = _publish_line_of(LINE_LIMIT)
    assert len(line) == LINE_LIMIT
    conn.send_raw(line + b"\n")
    obj = conn.answer("edge")
    assert obj["result"]["duplicate"] is False


def test_line_one_byte_over_the_limit_is_too_large(shared: Daemon, conn: Rpc) -> None:
    """A request line of max_message_bytes + 64 KiB + 1 bytes is refused too_large as soon
    as its last byte comes, before any newline."""
    line = _publish_line_of(LINE_LIMIT + 1)
    conn.send_raw(line[:LINE_LIMIT])
    time.sleep(0.3)
    with pytest.raises(TimeoutError):
        conn.read_line(timeout=0.2)  # exactly the limit: still waiting for more
    conn.send_raw(line[LINE_LIMIT:])
    err = conn.read(timeout=2)["error"]
    assert err["data"]["reason"] == "too_large"
    assert conn.closed_by_peer()
    with Rpc(shared.root / "busd.sock") as fresh:
        _assert_alive(fresh)


def test_too_large_message_is_refused_and_dead_lettered(shared: Daemon, conn: Rpc) -> None:
    """A message over max_message_bytes inside an acceptable line answers too_large (-32602)."""
    big = message(1, message_id="big-one", body="x" * (SMALL_MAX + 100))
    err = conn.call("publish", {"message": big})["error"]
    assert err["code"] == -32602
    assert err["data"]["reason"] == "too_large"
    assert err["data"]["error"] == "invalid_message"
    entries = conn("dlq.list", {"reason": "too_large"})["entries"]
    assert any(e["size"] > SMALL_MAX for e in entries)
    _assert_alive(conn)


def test_notification_gets_no_answer_but_is_executed(root: Path, rpc: Rpc) -> None:
    """A request without id is executed and never answered; blank lines are ignored."""
    rpc.notify("ping")
    rpc.notify("publish", {"message": message(1)})
    rpc.send_raw(b"\n  \n\r\n")
    rid = rpc.send("ping")
    obj = rpc.answer()
    assert obj["id"] == rid
    assert "result" in obj
    wait_for(lambda: _ids(root / "inbox" / "bob") == ["m-000001"], what="notified publish")


@pytest.mark.parametrize(
    "notification",
    [
        {"jsonrpc": "2.0", "method": "nope"},
        {"jsonrpc": "2.0", "method": "fetch", "params": {"agent_id": 3}},
    ],
    ids=["unknown method", "invalid params"],
)
def test_failing_notification_gets_no_answer(conn: Rpc, notification: dict[str, Any]) -> None:
    """A notification that fails is not answered either (JSON-RPC 2.0, section 4.1)."""
    conn.send_raw(json.dumps(notification).encode() + b"\n")
    rid = conn.send("ping")
    assert conn.read()["id"] == rid


def test_pipelined_requests_are_answered_in_order(conn: Rpc) -> None:
    """Many requests in one write are each answered, in order."""
    conn.send_raw(b"".join(_request("ping", rid=f"r{i}") for i in range(50)))
    assert [conn.read()["id"] for _ in range(50)] == [f"r{i}" for i in range(50)]


# -- disconnects ------------------------------------------------------------------------


def test_client_gone_right_after_publish_loses_nothing(root: Path, daemon: Daemon) -> None:
    """Publishes whose clients close before reading the answer are still delivered and journaled."""
    expected = []
    for i in range(20):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(root / "busd.sock"))
            s.sendall(_request("publish", {"message": message(i)}))
        expected.append(f"m-{i:06d}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(root / "busd.sock"))
        batch = [message(i) for i in range(20, 30)]
        s.sendall(_request("publish_batch", {"messages": batch}))
        s.shutdown(socket.SHUT_RDWR)
    expected += [f"m-{i:06d}" for i in range(20, 30)]
    wait_for(lambda: sorted(_ids(root / "inbox" / "bob")) == expected, what="all deliveries")
    assert sorted(_journal_ids(root)) == expected
    with Rpc(root / "busd.sock") as c:
        _assert_alive(c)


def test_half_closed_client_gets_every_answer(root: Path, daemon: Daemon) -> None:
    """A client that sends its requests and shuts down its write side still gets all answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(root / "busd.sock"))
        requests = [_request("publish", {"message": message(i)}, rid=i) for i in range(5)]
        s.sendall(b"".join(requests) + _request("ping", rid="last"))
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    answers = [json.loads(line) for line in data.splitlines()]
    assert [a["id"] for a in answers] == [0, 1, 2, 3, 4, "last"]
    assert all("result" in a for a in answers)
    want = [f"m-{i:06d}" for i in range(5)]
    wait_for(lambda: _ids(root / "inbox" / "bob") == want, what="deliveries")


def test_unterminated_request_at_disconnect_is_not_executed(root: Path, daemon: Daemon) -> None:
    """A request line cut off by the client closing (no newline) is discarded, not executed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(root / "busd.sock"))
        s.sendall(_request("publish", {"message": message(1)}).rstrip(b"\n"))
    time.sleep(0.3)
    with Rpc(root / "busd.sock") as c:
        c("publish", {"message": message(2)})
    wait_for(lambda: _ids(root / "inbox" / "bob") == ["m-000002"], what="deliveries")
    assert _journal_ids(root) == ["m-000002"]


def test_message_claimed_by_a_vanished_long_poll_comes_back(root: Path) -> None:
    """A fetch whose client left claims the message anyway; it returns when its lease expires."""
    d = Daemon(root, env={"BUSD_LEASE_SECONDS": "1"}).ready()
    try:
        gone = Rpc(root / "busd.sock")
        gone.send("fetch", {"agent_id": "bob", "wait_s": 5})
        time.sleep(0.1)
        gone.close()
        with Rpc(root / "busd.sock") as c:
            c("publish", {"message": message(1)})
            time.sleep(0.3)  # the stray claim is a memory delivery now: no file to wait for
            again = c("fetch", {"agent_id": "bob", "wait_s": 8})
            assert _ids_of(again) == ["m-000001"]
            assert again["messages"][0]["delivery_count"] == 2
    finally:
        d.kill()


def test_subscriber_that_disconnects_during_pushes_does_not_kill_the_daemon(
    root: Path, daemon: Daemon
) -> None:
    """A subscriber closing while pushes are in flight leaves the daemon serving others."""
    with Rpc(root / "busd.sock") as c:
        c("publish_batch", {"messages": [message(i) for i in range(600)]})
    for _ in range(3):
        sub = Rpc(root / "busd.sock")
        sub("subscribe", {"agent_id": "bob", "max_in_flight": 1000})
        sub.push(timeout=5)
        sub.close()
        time.sleep(0.3)
        assert daemon.proc.poll() is None
        with Rpc(root / "busd.sock") as c:
            _assert_alive(c)


def test_subscribe_with_an_invalid_agent_id_is_refused(root: Path, rpc: Rpc) -> None:
    """subscribe with an unsafe agent id or topic answers invalid_name; the daemon keeps serving."""
    for params in ({"agent_id": "con"}, {"agent_id": "bob", "topics": ["../news"]}):
        err = rpc.call("subscribe", params)["error"]
        assert err["code"] == -32602
        assert err["data"]["reason"] == "invalid_name"
        _assert_alive(rpc)
    assert not (root / "subscriptions.json").exists()


# -- peers and limits -----------------------------------------------------------------

_PEER = r"""
import json, os, socket, sys
os.chdir(sys.argv[1])  # reach the socket relative to the root: no search right needed above it
os.setgroups([])
os.setgid(int(sys.argv[3]))
os.setuid(int(sys.argv[2]))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect("busd.sock")
buf = b""
def line():
    global buf
    while b"\n" not in buf:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        buf += chunk
    out, _, buf = buf.partition(b"\n")
    return json.loads(out)
answers = []
for i in (1, 2):
    try:
        s.sendall(b'{"jsonrpc":"2.0","id":%d,"method":"ping"}\n' % i)
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = line()
    answers.append(answer)
    if answer is None or "error" in answer:
        break
# After a refusal the daemon must close the connection; after two answers, stay open.
closed = answers[-1] is None or ("error" in answers[-1] and line() is None)
print(json.dumps({"uid": os.geteuid(), "answers": answers, "closed": closed}))
"""

_needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to setuid a peer"
)


def _peer(root: Path, uid: int, gid: int) -> dict[str, Any]:
    """Open up the root and socket, then talk to the daemon as ``uid``/``gid``."""
    os.chmod(root, 0o755)
    os.chmod(root / "busd.sock", 0o666)
    out = subprocess.run(
        [sys.executable, "-c", _PEER, str(root), str(uid), str(gid)],
        capture_output=True,
        timeout=20,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    assert result["uid"] == uid
    return result


@_needs_root
def test_peer_with_another_uid_is_refused(root: Path, daemon: Daemon) -> None:
    """A client of another uid is answered forbidden (-32003) and disconnected."""
    result = _peer(root, 65534, 65534)
    first = result["answers"][0]
    assert first is not None, result
    assert first["error"]["code"] == -32003
    assert first["error"]["data"]["reason"] == "forbidden"
    assert first["id"] is None
    assert result["closed"] is True
    events = [e for e in daemon.log if e.get("event") == "connection_refused"]
    assert events and events[-1]["reason"] == "forbidden" and events[-1]["uid"] == 65534
    with Rpc(root / "busd.sock") as c:
        _assert_alive(c)


@_needs_root
@pytest.mark.parametrize(
    ("env", "gid"),
    [({"BUSD_ALLOWED_UIDS": "[65534]"}, 65534), ({"BUSD_ALLOWED_GIDS": "[4242]"}, 4242)],
    ids=["allowed uid", "allowed gid"],
)
def test_allowed_peer_is_served(root: Path, env: dict[str, str], gid: int) -> None:
    """A client of another uid is served when its uid or gid is allowed."""
    d = Daemon(root, env=env).ready()
    try:
        result = _peer(root, 65534, gid)
        assert [a["id"] for a in result["answers"]] == [1, 2]
        assert result["closed"] is False
        assert all(a["result"]["pid"] == d.proc.pid for a in result["answers"])
    finally:
        d.kill()


def test_connection_limit(root: Path) -> None:
    """With max_connections 5 the 6th client is told overloaded and closed; the 5 go on."""
    d = Daemon(root, env={"BUSD_MAX_CONNECTIONS": "5"}).ready()
    clients = [Rpc(root / "busd.sock") for _ in range(5)]
    try:
        for c in clients:
            _assert_alive(c)
        with Rpc(root / "busd.sock") as sixth:
            obj = sixth.read()
            assert obj["id"] is None
            assert obj["error"]["code"] == -32008
            assert obj["error"]["data"]["reason"] == "overloaded"
            assert sixth.closed_by_peer()
        for c in clients:
            _assert_alive(c)
        # A freed slot is usable again.
        clients.pop().close()

        def seventh_served() -> bool:
            with Rpc(root / "busd.sock") as c:
                try:
                    c.send("ping")
                    return "result" in c.read()
                except (OSError, EOFError):
                    return False  # refused before our request got through: not yet freed

        wait_for(seventh_served, timeout=5, what="a free slot")
    finally:
        for c in clients:
            c.close()
        d.kill()


# -- socket activation -------------------------------------------------------------------

_ACTIVATE = r"""
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = sys.argv[2] or str(os.getpid())
os.execv(sys.argv[3], sys.argv[3:])
"""


class _Activated(Daemon):
    """``busd run`` started with a listening socket as fd 3, as systemd does."""

    def __init__(self, root: Path, listener: socket.socket, listen_pid: str = "") -> None:
        self.root = root
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BUSD_", "LISTEN_"))}
        fd = listener.fileno()
        cmd = [BUSD, "run", "--root", str(root), "--log-format", "json"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ACTIVATE, str(fd), listen_pid, *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            pass_fds=(fd,),
        )
        self.lines = queue.Queue()
        self.log = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


def test_socket_activation_with_an_inherited_fd(root: Path, tmp_path: Path) -> None:
    """With LISTEN_FDS/LISTEN_PID the daemon serves on fd 3 and leaves that socket file alone."""
    path = tmp_path / "act.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    d = _Activated(root, listener)
    listener.close()
    try:
        d.ready()
        assert d.wait_event("socket_listening")["path"] == str(path)
        with Rpc(path) as c:
            assert c("ping")["pid"] == d.proc.pid
            c("publish", {"message": message(1)})
            assert c("status")["daemon"]["socket"] == str(path)
        assert not (root / "busd.sock").exists()
        wait_for(lambda: _ids(root / "inbox" / "bob") == ["m-000001"], what="delivery")
        assert d.stop() == 0
        assert path.exists()  # not ours to remove: systemd owns it
    finally:
        d.kill()


def test_listen_pid_of_another_process_is_ignored(root: Path, tmp_path: Path) -> None:
    """LISTEN_FDS meant for another pid is ignored: the daemon binds its own socket."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "act.sock"))
    listener.listen(16)
    d = _Activated(root, listener, listen_pid="1")
    listener.close()
    try:
        d.ready()
        with Rpc(root / "busd.sock") as c:
            assert c("ping")["pid"] == d.proc.pid
    finally:
        d.kill()


# -- load and shutdown -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_concurrent_publishers_exactly_once(root: Path, daemon: Daemon) -> None:
    """8 clients x 500 publishes, 2 consumers fetch and ack: each delivered once, all journaled."""
    clients, per_client = 8, 500
    total = clients * per_client
    got: list[str] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    published = threading.Event()

    def producer(k: int) -> None:
        try:
            with Rpc(root / "busd.sock", timeout=30) as c:
                for i in range(per_client):
                    msg = message(0, message_id=f"c{k}-{i:04d}", body=f"{k}/{i}")
                    assert c("publish", {"message": msg})["duplicate"] is False
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    def consumer() -> None:
        try:
            with Rpc(root / "busd.sock", timeout=30) as c:
                deadline = None
                while True:
                    fetched = c("fetch", {"agent_id": "bob", "max": 100, "wait_s": 0.5})
                    ids = _ids_of(fetched)
                    if ids:
                        assert c("ack", {"agent_id": "bob", "message_ids": ids}) == {
                            "acked": len(ids),
                            "not_held": [],
                        }
                        with lock:
                            got.extend(ids)
                        continue
                    if published.is_set():
                        deadline = deadline or time.monotonic() + 5
                        with lock:
                            if len(got) >= total or time.monotonic() > deadline:
                                return
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    producers = [threading.Thread(target=producer, args=(k,)) for k in range(clients)]
    consumers = [threading.Thread(target=consumer) for _ in range(2)]
    start = time.monotonic()
    for t in (*producers, *consumers):
        t.start()
    for t in producers:
        t.join(90)
    elapsed = time.monotonic() - start
    published.set()
    for t in consumers:
        t.join(60)
    assert not failures, failures
    print(f"\n{total} publishes by {clients} clients in {elapsed:.2f} s: {total / elapsed:.0f}/s")  # noqa: T201 - a benchmark figure for -s runs
    expected = {f"c{k}-{i:04d}" for k in range(clients) for i in range(per_client)}
    counts = Counter(got)
    assert set(counts) == expected
    assert max(counts.values()) == 1
    journaled = _journal_ids(root)
    assert len(journaled) == total
    assert set(journaled) == expected
    assert files(root / "inbox" / "bob") == []
    assert files(root / "locks" / "bob") == []


@pytest.mark.timeout(120)
def test_group_commit_gathers_concurrent_publishers_on_a_slow_disk(
    root: Path, tmp_path: Path
) -> None:
    """Every fsync 5 ms slower: 8 clients share each flush (mean batch >= 5), not half each."""
    lib, why = build_slow_fsync(tmp_path)
    if lib is None:
        pytest.skip(why)
    clients, rounds = 8, 40
    env = {"LD_PRELOAD": str(lib), "SLOW_FSYNC_US": "5000"}
    d = Daemon(root, "--log-level", "debug", env=env).ready(timeout=60)
    failures: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with Rpc(root / "busd.sock", timeout=30) as c:
                for i in range(rounds):
                    c("publish", {"message": message(0, message_id=f"g{k}-{i:03d}")})
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
    finally:
        d.stop()
    assert not failures, failures[:1]
    sizes = [e["accepted"] for e in d.log if e.get("event") == "batch_committed"]
    assert sum(sizes) == clients * rounds
    assert len(sizes) <= clients * rounds / 5, f"{len(sizes)} commits, sizes {sizes[:20]}"


@pytest.mark.timeout(120)
def test_fetch_sees_every_publish_answered_before_it(root: Path, daemon: Daemon) -> None:
    """Read your writes: while 4 clients publish, a fetch right after an answer finds it."""
    failures: list[BaseException] = []

    def client(k: int) -> None:
        agent = f"rw{k}"
        try:
            with Rpc(root / "busd.sock", timeout=30) as c:
                for i in range(150):
                    msg = message(0, message_id=f"rw{k}-{i:03d}", to=[agent])
                    c("publish", {"message": msg})
                    fetched = c("fetch", {"agent_id": agent, "max": 10, "wait_s": 0})
                    assert _ids_of(fetched) == [msg["message_id"]], (i, fetched)
                    c("ack", {"agent_id": agent, "message_ids": _ids_of(fetched)})
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not failures, failures[:1]


@pytest.mark.timeout(90)
def test_sigterm_while_publishing_keeps_every_answered_publish(root: Path, daemon: Daemon) -> None:
    """SIGTERM under load: every publish answered with success is journaled and delivered."""
    ok: list[str] = []
    refusals: list[dict[str, Any]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def publisher(k: int) -> None:
        try:
            with Rpc(root / "busd.sock", timeout=20) as c:
                for i in range(100_000):
                    mid = f"p{k}-{i:06d}"
                    obj = c.call("publish", {"message": message(0, message_id=mid)})
                    if "error" in obj:
                        refusals.append(obj["error"])
                        return
                    assert obj["result"] == {"message_id": mid, "duplicate": False}
                    with lock:
                        ok.append(mid)
        except (EOFError, ConnectionError):
            return  # the daemon closed the connection: that request was not answered
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    # Bystanders that must not hold the shutdown up: idle, subscribed, long-polling.
    idle = Rpc(root / "busd.sock")
    subscriber = Rpc(root / "busd.sock")
    subscriber("subscribe", {"agent_id": "carol"})
    poller = Rpc(root / "busd.sock")
    poller.send("fetch", {"agent_id": "dave", "wait_s": 600})
    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(ok) >= 300, timeout=30, what="publishes under way")
    stopping = time.monotonic()
    daemon.signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert daemon.proc.wait(20) == 0
    assert time.monotonic() - stopping < 8  # well inside shutdown_timeout_seconds (10)
    for c in (idle, subscriber, poller):
        assert c.closed_by_peer(timeout=2)
        c.close()
    assert not failures, failures
    assert all(e["data"]["reason"] == "shutting_down" for e in refusals), refusals
    journaled = set(_journal_ids(root))
    missing = [m for m in ok if m not in journaled]
    assert not missing, f"{len(missing)} answered publishes not journaled: {missing[:5]}"
    delivered = set(_ids(root / "inbox" / "bob"))
    assert set(ok) <= delivered
    assert not (root / "busd.sock").exists()
