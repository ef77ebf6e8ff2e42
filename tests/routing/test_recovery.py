"""Tests of busd.routing.recovery: the journal fold decides what becomes a file again."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
import structlog

from busd.routing.consumer import Consumer
from busd.routing.offline import route_pending
from busd.routing.queues import Queues, Ref
from busd.routing.recovery import read_checkpoint, rebuild, recover_deliveries, write_out
from busd.routing.router import Router
from busd.store.journal import START, Journal, JournalEntry, Position
from busd.store.layout import parse_delivery_name
from busd.store.mailbox import deliver
from conftest import Bus, message_bytes

pytestmark = pytest.mark.timeout(60)


def _journal(bus: Bus) -> Journal:
    return Journal(bus.layout.journal, fsync=False)


def accept(journal: Journal, mid: str, to: list[str], *, key: str | None = None) -> Ref:
    """Journal an accepted message (as a commit for a memory-served agent: no file)."""
    body = message_bytes(mid, to=to if len(to) > 1 else to[0], idempotency_key=key)
    entry = JournalEntry(
        event="accepted",
        at=datetime.now(UTC),
        message_id=mid,
        idempotency_key=key,
        agent="alice",
        to=to,
        message=msgspec.Raw(body),
    )
    ((position, length),) = journal.append_at([entry])
    return Ref(mid, key, position, length)


def record(journal: Journal, event: str, mid: str, agent: str, **fields: object) -> None:
    """Journal one acked / delivered / dead_lettered line."""
    entry = JournalEntry(event=event, at=datetime.now(UTC), message_id=mid, agent=agent, **fields)  # type: ignore[arg-type]
    journal.append([entry])


def inbox(bus: Bus, agent: str) -> list[tuple[str, int]]:
    """(message id, delivery count) of each file in the agent's inbox, in name order."""
    out = []
    for name in sorted(os.listdir(bus.layout.inbox_dir(agent))):
        parsed = parse_delivery_name(name)
        assert parsed is not None, name
        out.append((parsed.message_id, parsed.deliveries))
    return out


def test_an_acked_record_after_the_checkpoint_keeps_route_pending_from_writing_it(
    bus: Bus,
) -> None:
    """A memory delivery acked over the socket exists only as an `acked` line: route_pending
    (after a SIGKILL of the daemon) must not bring it back as a file. Before the fold,
    recovery wrote m1 to bob's inbox again: a delivery after a confirmed ack."""
    with _journal(bus) as j:
        accept(j, "m1", ["bob"])
        accept(j, "m2", ["bob"])
        record(j, "acked", "m1", "bob", receipt="00000000000000000001-001-m1")
    with Router(bus.config) as router:
        assert read_checkpoint(router) == START  # nothing checkpointed: all of it is replayed
    assert route_pending(bus.config) is not None
    assert inbox(bus, "bob") == [("m2", 0)]
    # Checkpointed: a second pass has nothing to do.
    assert route_pending(bus.config) is not None
    assert inbox(bus, "bob") == [("m2", 0)]


def test_a_consumer_dead_letter_settles_only_its_agent_and_intake_refusals_settle_none(
    bus: Bus,
) -> None:
    """`dead_lettered` (rejected / delivery_limit) for bob settles bob's copy; carol still
    gets hers; a `schema` refusal naming bob (an intake refusal: agent = the sender) and
    an ack by another agent settle nothing."""
    with _journal(bus) as j:
        accept(j, "m1", ["bob", "carol"])
        accept(j, "m2", ["bob"])
        accept(j, "m3", ["bob"])
        record(j, "dead_lettered", "m1", "bob", reason="rejected", detail="no", to=["x"])
        record(j, "dead_lettered", "m2", "bob", reason="schema", detail="bad", to=["y"])
        record(j, "dead_lettered", "m3", "bob", reason="delivery_limit", to=["z"])
        record(j, "acked", "m2", "carol", receipt="00000000000000000001-001-m2")
    assert route_pending(bus.config) is not None
    assert inbox(bus, "bob") == [("m2", 0)]
    assert inbox(bus, "carol") == [("m1", 0)]


def test_a_delivered_records_count_survives_in_the_file_name(bus: Bus) -> None:
    """Handed out twice from memory before the crash: the file says 002, the next claim is
    delivery 3, and with max_deliveries=3 the one after is dead-lettered."""
    with _journal(bus) as j:
        accept(j, "m1", ["bob"])
        record(j, "delivered", "m1", "bob", receipt="00000000000000000001-001-m1", count=1)
        record(j, "delivered", "m1", "bob", receipt="00000000000000000002-002-m1", count=2)
    assert route_pending(bus.config) is not None
    assert inbox(bus, "bob") == [("m1", 2)]
    (claim,) = Consumer(bus.with_config(max_deliveries=3), "bob").claim()
    assert claim.delivery_count == 3 and claim.message.message_id == "m1"


def test_files_consumers_made_are_honoured(bus: Bus) -> None:
    """A message the recipient holds as a file (inbox, a claim in locks/, its ledger) is
    not written again, while one it lacks is."""
    with _journal(bus) as j:
        for i in range(4):
            accept(j, f"m{i}", ["bob"])
    for i in range(3):
        deliver(bus.layout, "bob", message_bytes(f"m{i}"), f"m{i}")
    consumer = Consumer(bus.config, "bob")
    first, second = consumer.claim(2)
    assert consumer.ack([first.message.message_id]) == 1
    assert recover_deliveries(Router(bus.config)) == 1
    assert inbox(bus, "bob") == [("m2", 0), ("m3", 0)]
    assert os.listdir(bus.layout.locks_dir("bob")) == [second.name]


def test_a_file_consumers_dead_letter_keeps_only_its_own_copy_back(bus: Bus) -> None:
    """bob failed m1 (a DLQ entry with recipient bob); carol's file was lost in a power cut.
    Recovery gives carol hers again and bob nothing. Before, any DLQ entry with that id
    kept the message from every recipient: carol's copy was lost."""
    with Router(bus.config) as router:
        path = bus.layout.outbox_dir("alice")
        path.mkdir(parents=True, exist_ok=True)
        (path / "m1.json").write_bytes(message_bytes("m1", to=["bob", "carol"]))
        assert router.route_all().accepted == 1
    (bob,) = Consumer(bus.config, "bob").claim()
    Consumer(bus.config, "bob").fail(bob.message.message_id, "cannot")
    for name in os.listdir(bus.layout.inbox_dir("carol")):
        os.unlink(bus.layout.inbox_dir("carol") / name)
    bus.layout.checkpoint_file.unlink(missing_ok=True)
    assert recover_deliveries(Router(bus.config)) == 1
    assert inbox(bus, "carol") == [("m1", 0)] and inbox(bus, "bob") == []


def test_rebuild_splits_memory_and_files_and_writes_nothing(bus: Bus) -> None:
    """rebuild keeps the served agents' unsettled messages in memory (all ready, with their
    counts) and lists the others' as Pending files, in journal order; write_out writes
    those with their counts and bytes from the journal, synced."""
    with _journal(bus) as j:
        r1 = accept(j, "m1", ["bob", "carol"])
        r2 = accept(j, "m2", ["bob"], key="k2")
        r3 = accept(j, "m3", ["carol"])
        record(j, "delivered", "m1", "bob", receipt="00000000000000000001-001-m1", count=1)
        record(j, "delivered", "m3", "carol", receipt="00000000000000000002-001-m3", count=1)
    router = Router(bus.config)
    with structlog.testing.capture_logs() as logs:
        result = rebuild(router, served={"bob"})
    assert next(e for e in logs if e["event"] == "queues_rebuilt")["memory"] == 2
    q = result.queues
    assert q.agents() == ["bob"] and q.unsettled("bob") == [(r1, 1), (r2, 0)]
    assert [tuple(p) for p in result.files] == [("carol", r1, 0), ("carol", r3, 1)]
    assert result.files_from == r1.position
    assert not bus.layout.inbox_dir("carol").exists() or inbox(bus, "carol") == []
    written = write_out(router, result.files)
    assert inbox(bus, "carol") == [("m1", 0), ("m3", 1)]
    assert sorted(p.read_bytes() for p in written) == sorted(
        [message_bytes("m1", to=["bob", "carol"]), message_bytes("m3", to="carol")]
    )
    # Written out: the next rebuild holds them as files, so nothing is pending twice.
    again = rebuild(router, served=lambda agent: agent == "bob")
    assert again.files == [] and again.queues.unsettled("bob") == [(r1, 1), (r2, 0)]
    router.close()


def test_recover_deliveries_leaves_what_the_live_queues_hold(bus: Bus) -> None:
    """In a running daemon (a failed pass recovered), messages in its memory queues are held:
    no file for them."""
    with _journal(bus) as j:
        r1 = accept(j, "m1", ["bob"])
        accept(j, "m2", ["bob"])
    live = Queues()
    live.add("bob", r1)
    assert recover_deliveries(Router(bus.config), live=live) == 1
    assert inbox(bus, "bob") == [("m2", 0)]


def test_write_out_skips_an_entry_whose_segment_is_gone(bus: Bus, tmp_path: Path) -> None:
    """A Pending whose journal line no longer exists is logged and skipped, not fatal."""
    with _journal(bus) as j:
        ref = accept(j, "m1", ["bob"])
    router = Router(bus.config)
    gone = Ref("m9", None, Position(ref.position.segment + 5, 0), ref.length)
    with structlog.testing.capture_logs() as logs:
        written = write_out(router, [("bob", gone, 0), ("bob", ref, 0)])  # type: ignore[list-item]
    assert [p.name.endswith("-000-m1.json") for p in written] == [True]
    assert [e["message_id"] for e in logs if e["event"] == "journal_entry_skipped"] == ["m9"]
    router.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_rebuild_of_100k_journaled_messages(bus: Bus) -> None:
    """100,000 accepted messages, a tenth of them acked: rebuild holds exactly the rest, in
    order (tests/perf or /tmp scripts measure its time; this checks the result)."""
    n = 100_000
    lines: list[bytes] = []
    for i in range(n):
        mid = f"MSG-20261201-094220-{i:09d}-PID16111-0000"
        entry = JournalEntry(
            event="accepted",
            at=datetime.now(UTC),
            message_id=mid,
            agent="alice",
            to=["bob"],
            message=msgspec.Raw(message_bytes(mid)),
        )
        lines.append(msgspec.json.encode(entry))
        if i % 10 == 0:
            ack = JournalEntry(event="acked", at=entry.at, message_id=mid, agent="bob")
            lines.append(msgspec.json.encode(ack))
    with _journal(bus) as j:
        for i in range(0, len(lines), 10_000):
            j.append_lines(lines[i : i + 10_000])
    router = Router(bus.config)
    result = rebuild(router, served={"bob"})
    kept = result.queues.unsettled("bob")
    assert len(kept) == n - n // 10 and result.files == []
    assert [r.position for r, _ in kept] == sorted(r.position for r, _ in kept)
    assert router.journal.read_at(kept[-1][0].position, kept[-1][0].length).message_id == (
        f"MSG-20261201-094220-{n - 1:09d}-PID16111-0000"
    )
    router.close()
