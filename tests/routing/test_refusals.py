"""Tests of busd.routing.refusals: the one way out for the router, the socket and the consumer."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from _rpc import Rpc, RpcFailure
from busd.errors import InvalidMessage, Reason
from busd.routing import refusals
from busd.routing.consumer import Consumer
from busd.routing.intake import Origin, Refused
from busd.routing.router import Incoming, Router, RouteReport
from busd.store import dlq
from busd.store.journal import Journal, JournalEntry
from conftest import Bus, message_bytes
from daemon_harness import Daemon, wait_for

# Valid JSON, one unknown field: every door refuses it the same way (schema, `$.colour`).
_INVALID = message_bytes("m-bad", colour="blue")


def _journal(bus: Bus, event: str = "dead_lettered") -> list[JournalEntry]:
    with Journal(bus.layout.journal) as journal:
        return list(journal.read(events=(event,)))


def _records(bus: Bus) -> dict[str, dlq.ReasonRecord]:
    return {e.name: e.record for e in dlq.list_entries(bus.layout)}


def test_a_socket_refusal_is_journaled_and_counted_in_its_batch(bus: Bus) -> None:
    """Refused at commit: DLQ entry, a dead_lettered journal line and a count in the report."""
    bad = Incoming(raw=_INVALID, sender="alice")
    good = Incoming(raw=message_bytes("m-good"), sender="alice")
    with Router(bus.config) as router:
        batch = router.commit([], [bad, good])
        router.finish(batch)
    assert (batch.report.accepted, batch.report.dead_lettered) == (1, 1)
    assert isinstance(bad.outcome, InvalidMessage)
    # What rpc/methods raises to the client: same code and data as a decode on the loop gave.
    assert bad.outcome.to_dict() == {
        "code": "invalid_message",
        "message": bad.outcome.message,
        "reason": "schema",
        "path": "$.colour",
    }
    assert bad.message is None
    assert good.outcome == "accepted"
    assert good.message is not None and good.message.message_id == "m-good"
    (name,) = _records(bus)
    (line,) = _journal(bus)
    assert (line.agent, line.to, line.source, line.reason) == ("alice", [name], None, "schema")
    assert line.detail == bad.outcome.detail
    assert line.message_id is None
    assert line.at == _journal(bus, "accepted")[0].at  # one batch, one write


def test_the_three_paths_write_the_same_record_fields(bus: Bus) -> None:
    """Router, socket and consumer: the same bytes give the same reason, detail, size, hash.

    The fields that say where it came from follow one rule (refusals' contract), and
    the two journal writers' lines have the same fields.
    """
    outbox = bus.layout.outbox_dir("alice")
    outbox.mkdir(exist_ok=True)
    (outbox / "x.json").write_bytes(_INVALID)
    inbox = bus.layout.inbox_dir("bob")
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "y.json").write_bytes(_INVALID)  # foreign: claimed straight from the inbox
    consumer = Consumer(bus.config, "bob")
    assert consumer.claim() == []  # the consumer first: the router would route y.json
    with Router(bus.config) as router:
        router.route([outbox / "x.json"], [Incoming(raw=_INVALID, sender="alice")])
    by_path = {r.original_path: r for r in _records(bus).values()}
    assert set(by_path) == {"outbox/alice/x.json", "socket", "inbox/bob/y.json"}
    same = {(r.reason, r.detail, r.size, r.sha256, r.message_id) for r in by_path.values()}
    sha = hashlib.sha256(_INVALID).hexdigest()
    assert len(same) == 1
    assert same.pop()[2:] == (len(_INVALID), sha, None)
    where = {p: (r.sender, r.recipient, r.delivery_count) for p, r in by_path.items()}
    assert where == {
        "outbox/alice/x.json": ("alice", None, 0),
        "socket": ("alice", None, 0),
        "inbox/bob/y.json": (None, "bob", 1),
    }
    assert consumer.dead_lettered == 1
    lines = _journal(bus)  # the consumer is no journal writer: two lines, not three
    assert [line.source for line in lines] == ["outbox/alice/x.json", None]
    shapes = {(line.agent, line.reason, line.detail, line.message_id) for line in lines}
    assert shapes == {("alice", "schema", by_path["socket"].detail, None)}


def test_every_socket_refusal_records_the_socket_as_its_origin(bus: Bus) -> None:
    """Undecodable or unroutable, a publish's record says `socket` and names its sender."""
    config = bus.with_config(subscriptions={})
    unroutable = Incoming(raw=message_bytes("m-topic", to="topic:nobody"))
    with Router(config) as router:
        router.route([], [Incoming(raw=_INVALID, sender="alice"), unroutable])
    records = sorted(_records(bus).values(), key=lambda r: r.reason)
    assert [(r.reason, r.original_path, r.sender) for r in records] == [
        ("schema", "socket", "alice"),
        # no sender given: the message's agent_id (protocol.md section 7)
        ("unroutable", "socket", "alice"),
    ]
    assert records[1].message_id == "m-topic"
    assert [line.reason for line in _journal(bus)] == ["schema", "unroutable"]


def test_every_path_logs_its_refusal_once(bus: Bus) -> None:
    """message_dead_lettered, with the entry's name, from the router, socket and consumer."""
    outbox = bus.layout.outbox_dir("alice")
    outbox.mkdir(exist_ok=True)
    (outbox / "x.json").write_bytes(_INVALID)
    inbox = bus.layout.inbox_dir("bob")
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "y.json").write_bytes(_INVALID)
    with structlog.testing.capture_logs() as logs:
        Consumer(bus.config, "bob").claim()
        with Router(bus.config) as router:
            router.route([outbox / "x.json"], [Incoming(raw=_INVALID, sender="alice")])
    events = [e for e in logs if e["event"] == "message_dead_lettered"]
    assert sorted(e["source"] for e in events) == [
        "inbox/bob/y.json",
        "outbox/alice/x.json",
        "socket",
    ]
    assert {e["log_level"] for e in events} == {"warning"}
    assert sorted(e["name"] for e in events) == sorted(_records(bus))


def test_dead_letter_counts_and_journals_only_what_it_is_given(bus: Bus) -> None:
    """Without entries nothing is journaled; with counts the count goes up; the entry is built."""
    refused = Refused(Origin.socket("alice"), InvalidMessage(Reason.SCHEMA, "bad"), data=b"{}")
    report = RouteReport()
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = refusals.dead_letter(bus.layout, refused, at=at, counts=report)
    entries: list[JournalEntry] = []
    second = refusals.dead_letter(bus.layout, refused, entries=entries)
    assert report.dead_lettered == 1
    assert entries == [second.entry]
    assert first.entry.at == at
    assert (first.entry.event, first.entry.to, first.entry.agent) == (
        "dead_lettered",
        [first.name],
        "alice",
    )
    assert _journal(bus) == []  # dead_letter never appends to the journal itself
    assert sorted(_records(bus)) == sorted([first.name, second.name])


def test_a_consumer_side_dead_letter_names_the_agent_that_held_it(bus: Bus) -> None:
    """A claim-time refusal journals the claiming agent (the journal fold settles the
    message for that agent on it), a router refusal its sender."""
    path = bus.layout.locks_dir("bob") / "x.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_INVALID)
    claimed = Refused(Origin.claim(bus.layout, "bob", path), InvalidMessage(Reason.SCHEMA, "bad"))
    published = Refused(Origin.socket("alice"), InvalidMessage(Reason.SCHEMA, "bad"), data=b"{}")
    assert refusals.dead_letter(bus.layout, claimed).entry.agent == "bob"
    assert refusals.dead_letter(bus.layout, published).entry.agent == "alice"


def _status(rpc: Rpc) -> dict[str, Any]:
    status: dict[str, Any] = rpc("status")
    return status


def test_a_daemon_journals_and_rates_a_socket_refusal(daemon: Daemon, root: Path) -> None:
    """End to end: the client gets -32602 with the path; journal, totals and rates all see it."""
    with Rpc(root / "busd.sock") as rpc:
        try:
            rpc("publish", {"message": json.loads(_INVALID), "sender": "alice"})
        except RpcFailure as exc:
            assert exc.code == -32602
            assert (exc.data["reason"], exc.data["path"]) == ("schema", "$.colour")
        else:
            raise AssertionError("an invalid publish was accepted")
        with Journal(root / "journal") as journal:
            (line,) = list(journal.read(events=("dead_lettered",)))
        assert (line.agent, line.reason, line.source) == ("alice", "schema", None)
        status = _status(rpc)
    assert status["totals"]["dead_lettered"] == 1
    assert status["rates_per_min"]["dead_lettered"]["1m"] > 0
    wait_for(lambda: len(list((root / "dlq").glob("*.reason.json"))) == 1, what="dlq entry")
