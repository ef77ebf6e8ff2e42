"""Tests of busd.router (sync, no daemon): group commit, dedupe, DLQ, topics, crash redo."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import stat
import subprocess
import threading
from collections import Counter
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from busd.config import Config
from busd.core.codec import decode, encode_json, encode_markdown
from busd.routing.offline import route_pending
from busd.routing.router import Batch, Router
from busd.store import dlq
from busd.store.journal import Journal, JournalEntry, Position
from busd.store.layout import parse_delivery_name
from conftest import Bus, message_bytes, message_dict, run_python

_HOLD_LOCK = """
import sys, time
from pathlib import Path
from busd.store.buslock import BusLock
from busd.store.layout import Layout
lock = BusLock(Layout(Path(sys.argv[1])), role="daemon")
assert lock.acquire(timeout=5)
print("locked", flush=True)
time.sleep(120)
"""

# A routing pass in its own process, for SIGKILL at random points. Small batches
# (the module's batch size, a real code path) put several group commits in one pass.
_ROUTE_PASS = """
import sys
from busd import logs
from busd.routing import router
from busd.config import load_config
from busd.routing.offline import route_pending
logs.configure("error", "json")
router._BATCH = int(sys.argv[2])
cfg = load_config(root=sys.argv[1], env={})
print("ready", flush=True)
report = route_pending(cfg)
assert report is not None
print("done", flush=True)
"""


class CountingJournal(Journal):
    """A real Journal that counts how many times a batch is appended."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.appends = 0
        self.batch_sizes: list[int] = []

    def append_lines(self, lines: Sequence[bytes]) -> Position:
        """Count, then append for real."""
        self.appends += 1
        self.batch_sizes.append(len(lines))
        return super().append_lines(lines)


def drop(bus: Bus, name: str, data: bytes, agent: str = "alice") -> Path:
    """Write ``data`` as outbox/<agent>/<name> (what any producer does)."""
    directory = bus.layout.outbox_dir(agent)
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


def entries(config: Config) -> list[JournalEntry]:
    """Every journal entry of the bus, in order."""
    with Journal(config.layout.journal) as journal:
        return list(journal.read())


def deliveries(bus: Bus, agent: str) -> list[Path]:
    """Files in inbox/<agent>/ (non-hidden), sorted."""
    d = bus.layout.inbox_dir(agent)
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def delivered_ids(bus: Bus, agent: str) -> list[str]:
    """Message ids parsed from the delivery names in inbox/<agent>/ (foreign names fail)."""
    out = []
    for p in deliveries(bus, agent):
        parsed = parse_delivery_name(p.name)
        assert parsed is not None, f"not a delivery name: {p.name}"
        out.append(parsed.message_id)
    return out


def outbox_files(bus: Bus) -> list[Path]:
    """Every file still waiting in outbox/ (any depth)."""
    return sorted(p for p in bus.layout.outbox.rglob("*") if p.is_file())


def test_accepted_message_is_journaled_delivered_and_removed(bus: Bus) -> None:
    """One valid file: an accepted entry with the message, a delivery to bob, source gone."""
    src = drop(bus, "m1.json", message_bytes("m-1"))
    with Router(bus.config) as router:
        report = router.route([src])
    assert (report.accepted, report.delivered, report.duplicates, report.dead_lettered) == (
        1,
        1,
        0,
        0,
    )
    (entry,) = entries(bus.config)
    assert entry.event == "accepted"
    assert entry.message_id == "m-1"
    assert entry.agent == "alice"
    assert entry.to == ["bob"]
    assert entry.source == "outbox/alice/m1.json"
    assert entry.message is not None
    assert decode(bytes(entry.message)) == decode(message_bytes("m-1"))
    (delivered,) = deliveries(bus, "bob")
    parsed = parse_delivery_name(delivered.name)
    assert parsed is not None and parsed.message_id == "m-1" and parsed.deliveries == 0
    assert decode(delivered.read_bytes()) == decode(message_bytes("m-1"))
    assert stat.S_IMODE(delivered.stat().st_mode) == 0o600  # protocol: message files 0600
    assert stat.S_IMODE(delivered.parent.stat().st_mode) == 0o700  # agent directories 0700
    assert not src.exists()
    assert os.listdir(bus.layout.tmp) == []


def test_group_commit_appends_the_journal_once_per_batch(bus: Bus) -> None:
    """route() of 50 files (valid, duplicate, invalid) appends ONE batch of 50 lines."""
    paths = [drop(bus, f"f{i:02d}.json", message_bytes(f"m-{i:02d}")) for i in range(47)]
    paths.append(drop(bus, "dup.json", message_bytes("m-00")))
    paths.append(drop(bus, "bad.json", b"{not json"))
    paths.append(drop(bus, "bad2.json", message_bytes("m-x", to="../evil")))
    journal = CountingJournal(bus.layout.journal)
    with Router(bus.config, journal=journal) as router:
        report = router.route(paths)
    assert journal.appends == 1
    assert journal.batch_sizes == [50]
    assert (report.accepted, report.duplicates, report.dead_lettered) == (47, 1, 2)
    segment_lines = b"".join(p.read_bytes() for p in journal.segments()).count(b"\n")
    assert segment_lines == 50
    assert len(deliveries(bus, "bob")) == 47
    assert outbox_files(bus) == []


def test_commit_removes_the_source_and_finish_writes_the_inbox_file(bus: Bus) -> None:
    """After commit() the message is journaled and its source gone; finish() delivers it."""
    src = drop(bus, "m1.json", message_bytes("m-1"))
    with Router(bus.config) as router:
        batch = router.commit([src])
        assert [e.message_id for e in entries(bus.config)] == ["m-1"]
        assert not src.exists()
        assert deliveries(bus, "bob") == []
        assert router.delivered < batch.position  # a checkpoint may not cover it yet
        router.finish(batch)
        assert router.delivered == batch.position
    assert delivered_ids(bus, "bob") == ["m-1"]


def test_source_seen_again_before_finish_is_a_duplicate_not_a_redo(bus: Bus) -> None:
    """The same file dropped again while its first copy awaits finish() is delivered once."""
    with Router(bus.config) as router:
        first = router.commit([drop(bus, "m1.json", message_bytes("m-1"))])
        again = router.commit([drop(bus, "m1.json", message_bytes("m-1"))])
        assert (again.report.duplicates, again.redo) == (1, [])
        router.finish(first, again)
    assert delivered_ids(bus, "bob") == ["m-1"]
    assert outbox_files(bus) == []


def test_foreign_inbox_file_seen_again_before_finish_is_still_delivered(bus: Bus) -> None:
    """A file written straight into an inbox, scanned twice before finish(), arrives once."""
    path = bus.layout.inbox_dir("bob") / "from-a-script.json"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(message_bytes("m-1"))
    with Router(bus.config) as router:
        first = router.commit([path])
        again = router.commit([path])
        assert path.exists()  # not removed as a duplicate: finish() renames it in place
        router.finish(first, again)
    assert delivered_ids(bus, "bob") == ["m-1"]


def test_finish_of_several_batches_keeps_commit_order(bus: Bus) -> None:
    """Batches finished together are listed in the inbox in the order they were committed."""
    with Router(bus.config) as router:
        batches = [
            router.commit([drop(bus, f"f{i}.json", message_bytes(f"m-{i}"))]) for i in range(5)
        ]
        report = router.finish(*batches)
        assert router.delivered == batches[-1].position
    assert report.recipients == {"bob"}
    assert delivered_ids(bus, "bob") == [f"m-{i}" for i in range(5)]


def test_route_all_commits_once_per_scan_batch(bus: Bus) -> None:
    """route_all over 30 waiting files is a single group commit too."""
    for i in range(30):
        drop(bus, f"f{i:02d}.json", message_bytes(f"m-{i:02d}"))
    journal = CountingJournal(bus.layout.journal)
    with Router(bus.config, journal=journal) as router:
        report = router.route_all()
    assert report.accepted == 30
    assert journal.appends == 1


def test_duplicate_in_one_batch_is_delivered_once(bus: Bus) -> None:
    """The same message_id twice in one batch: one delivery, accepted + duplicate entries."""
    a = drop(bus, "a.json", message_bytes("m-1"))
    b = drop(bus, "b.json", message_bytes("m-1", body="other bytes, same id"))
    with Router(bus.config) as router:
        report = router.route([a, b])
    assert (report.accepted, report.duplicates) == (1, 1)
    assert delivered_ids(bus, "bob") == ["m-1"]
    events = [(e.event, e.message_id, e.source) for e in entries(bus.config)]
    assert events == [
        ("accepted", "m-1", "outbox/alice/a.json"),
        ("duplicate", "m-1", "outbox/alice/b.json"),
    ]
    assert not a.exists() and not b.exists()


def test_duplicate_across_batches_and_restarts_is_delivered_once(bus: Bus) -> None:
    """A repeat in a later batch, and after a new Router (index rebuilt), is a duplicate."""
    with Router(bus.config) as router:
        router.route([drop(bus, "a.json", message_bytes("m-1"))])
        again = router.route([drop(bus, "b.json", message_bytes("m-1"))])
    assert (again.accepted, again.duplicates) == (0, 1)
    with Router(bus.config) as router:
        later = router.route([drop(bus, "c.json", message_bytes("m-1"), agent="carol")])
    assert (later.accepted, later.duplicates) == (0, 1)
    assert delivered_ids(bus, "bob") == ["m-1"]
    assert [e.event for e in entries(bus.config)] == ["accepted", "duplicate", "duplicate"]
    assert outbox_files(bus) == []


def test_idempotency_key_dedupes_different_message_ids(bus: Bus) -> None:
    """Two message ids with one idempotency_key: the second is a duplicate."""
    a = drop(bus, "a.json", message_bytes("m-1", idempotency_key="k"))
    b = drop(bus, "b.json", message_bytes("m-2", idempotency_key="k"))
    with Router(bus.config) as router:
        report = router.route([a, b])
    assert (report.accepted, report.duplicates) == (1, 1)
    assert delivered_ids(bus, "bob") == ["m-1"]
    dup = entries(bus.config)[1]
    assert (dup.event, dup.message_id, dup.idempotency_key) == ("duplicate", "m-2", "k")


def test_topic_goes_to_every_subscriber(bus: Bus) -> None:
    """to: topic:news is expanded with config subscriptions; each subscriber gets one copy."""
    config = bus.with_config(subscriptions={"news": ["bob", "carol", "bob"]})
    src = drop(bus, "t.json", message_bytes("m-t", to="topic:news"))
    with Router(config) as router:
        report = router.route([src])
    assert (report.accepted, report.delivered) == (1, 2)
    assert delivered_ids(bus, "bob") == ["m-t"]
    assert delivered_ids(bus, "carol") == ["m-t"]
    (entry,) = entries(config)
    assert entry.to == ["bob", "carol"]


def test_topic_without_subscribers_is_unroutable(bus: Bus) -> None:
    """A topic nobody subscribes to is dead-lettered as unroutable with the original bytes."""
    config = bus.with_config(subscriptions={"news": ["bob"]})
    raw = message_bytes("m-u", to="topic:sports")
    src = drop(bus, "u.json", raw)
    with Router(config) as router:
        report = router.route([src])
    assert (report.accepted, report.dead_lettered) == (0, 1)
    (entry,) = entries(config)
    assert (entry.event, entry.reason, entry.source) == (
        "dead_lettered",
        "unroutable",
        "outbox/alice/u.json",
    )
    assert "sports" in (entry.detail or "")
    (dead,) = dlq.list_entries(bus.layout)
    assert dead.record.reason == "unroutable"
    assert dead.path.read_bytes() == raw
    assert not src.exists()
    assert bus.layout.agents() == ["alice"]


def test_unknown_recipient_dlq_mode(bus: Bus) -> None:
    """unknown_recipient=dlq: a recipient without an inbox is unroutable; a known one delivers."""
    config = bus.with_config(unknown_recipient="dlq")
    bus.layout.inbox_dir("bob").mkdir()
    known = drop(bus, "k.json", message_bytes("m-k", to="bob"))
    unknown = drop(bus, "u.json", message_bytes("m-u", to=["bob", "zed"]))
    with Router(config) as router:
        report = router.route([known, unknown])
    assert (report.accepted, report.dead_lettered) == (1, 1)
    assert delivered_ids(bus, "bob") == ["m-k"]
    assert not bus.layout.inbox_dir("zed").exists()
    (dead,) = dlq.list_entries(bus.layout)
    assert dead.record.reason == "unroutable"
    assert "zed" in dead.record.detail
    assert dead.path.read_bytes() == message_bytes("m-u", to=["bob", "zed"])


def test_unknown_recipient_create_mode_makes_the_inbox(bus: Bus) -> None:
    """By default a new recipient gets its inbox (and locks) created on first delivery."""
    src = drop(bus, "n.json", message_bytes("m-n", to="newbie"))
    with Router(bus.config) as router:
        router.route([src])
    assert delivered_ids(bus, "newbie") == ["m-n"]
    assert bus.layout.locks_dir("newbie").is_dir()


def test_invalid_file_is_dead_lettered_with_its_bytes(bus: Bus) -> None:
    """A schema-invalid file is journaled dead_lettered (reason schema) and kept byte-exact."""
    raw = json.dumps(message_dict("m-bad", status="nope", message_type="status_update")).encode()
    raw = raw.replace(b'"status": "nope"', b'"status": 42')
    src = drop(bus, "bad.json", raw)
    with Router(bus.config) as router:
        report = router.route([src])
    assert report.dead_lettered == 1
    (entry,) = entries(bus.config)
    assert (entry.event, entry.reason) == ("dead_lettered", "schema")
    (dead,) = dlq.list_entries(bus.layout)
    assert dead.path.read_bytes() == raw
    assert entry.to == [dead.name]


def test_foreign_inbox_files_are_journaled_and_renamed_untouched(bus: Bus) -> None:
    """Files dropped straight into inbox/<a>/ are journaled and get delivery names, bytes as is."""
    inbox = bus.layout.inbox_dir("bob")
    inbox.mkdir()
    spaced = json.dumps(message_dict("m-sp"), indent=2).encode() + b"\n\n"
    plain = message_bytes("m-js")
    (inbox / "spaced.json").write_bytes(spaced)
    (inbox / "plain").write_bytes(plain)
    with Router(bus.config) as router:
        assert sorted(p.name for p in router.scan()) == ["plain", "spaced.json"]
        report = router.route_all()
        assert router.scan() == []
    assert report.accepted == 2
    by_id = {}
    for p in deliveries(bus, "bob"):
        parsed = parse_delivery_name(p.name)
        assert parsed is not None
        by_id[parsed.message_id] = p
    assert set(by_id) == {"m-sp", "m-js"}
    assert by_id["m-sp"].read_bytes() == spaced
    assert by_id["m-js"].read_bytes() == plain
    journal = {e.message_id: e for e in entries(bus.config)}
    assert journal["m-sp"].event == "accepted"
    assert journal["m-sp"].source == "inbox/bob/spaced.json"
    assert journal["m-sp"].to == ["bob"]
    assert journal["m-js"].source == "inbox/bob/plain"


@pytest.mark.parametrize("encoding", ["markdown", "json_with_bom"])
def test_foreign_inbox_file_in_any_encoding_is_readable_in_the_journal(
    bus: Bus, encoding: str
) -> None:
    """A foreign Markdown (or BOM-prefixed JSON) inbox file's accepted entry can be read back."""
    inbox = bus.layout.inbox_dir("bob")
    inbox.mkdir()
    msg = decode(message_bytes("m-f", body="# Title\n\nmarkdown body\n"))
    raw = encode_markdown(msg) if encoding == "markdown" else b"\xef\xbb\xbf" + encode_json(msg)
    (inbox / "note").write_bytes(raw)
    with Router(bus.config) as router:
        assert router.route_all().accepted == 1
    (delivered,) = deliveries(bus, "bob")
    assert delivered.read_bytes() == raw  # the delivery itself is byte-exact
    with Journal(bus.layout.journal) as journal:
        found = list(journal.read())
        assert journal.skipped == 0
    assert [(e.event, e.message_id) for e in found] == [("accepted", "m-f")]
    assert found[0].message is not None
    assert decode(bytes(found[0].message)) == msg


def test_foreign_inbox_file_duplicate_of_a_delivered_message(bus: Bus) -> None:
    """A foreign inbox file repeating an accepted id is a duplicate: removed, not delivered."""
    with Router(bus.config) as router:
        router.route([drop(bus, "a.json", message_bytes("m-1"))])
        (bus.layout.inbox_dir("bob") / "again.json").write_bytes(message_bytes("m-1"))
        report = router.route_all()
    assert report.duplicates == 1
    assert delivered_ids(bus, "bob") == ["m-1"]


def test_scan_skips_hidden_names_and_delivery_names(bus: Bus) -> None:
    """scan() ignores dot files (in-progress writes) and inbox files already named for delivery."""
    drop(bus, ".partial", b"{")
    drop(bus, "ready.json", message_bytes("m-1"))
    inbox = bus.layout.inbox_dir("bob")
    inbox.mkdir()
    (inbox / "00000000000000000001-000-m-9.json").write_bytes(message_bytes("m-9"))
    (inbox / ".claim").write_bytes(b"x")
    with Router(bus.config) as router:
        assert [p.name for p in router.scan()] == ["ready.json"]
        router.route_all()
    assert (bus.layout.outbox_dir("alice") / ".partial").exists()


def test_special_files_in_an_outbox_are_dead_lettered_as_themselves(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A symlink, FIFO, directory and socket in an outbox go to the DLQ unopened, as is."""
    outside = tmp_path / "outside.json"
    outside.write_bytes(message_bytes("m-secret"))
    outbox = bus.layout.outbox_dir("alice")
    outbox.mkdir()
    (outbox / "link.json").symlink_to(outside)
    os.mkfifo(outbox / "fifo.json")
    (outbox / "dir.json").mkdir()
    (outbox / "dir.json" / "inner").write_bytes(b"x")
    monkeypatch.chdir(outbox)  # sun_path is limited to 108 bytes: bind a relative name
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("sock.json")
        with Router(bus.config) as router:
            report = router.route_all()
    finally:
        sock.close()
    assert (report.accepted, report.dead_lettered) == (0, 4)
    assert os.listdir(outbox) == []
    assert deliveries(bus, "bob") == []
    assert outside.read_bytes() == message_bytes("m-secret")
    dead = {e.record.original_path: e for e in dlq.list_entries(bus.layout)}
    assert set(dead) == {
        f"outbox/alice/{n}" for n in ("link.json", "fifo.json", "dir.json", "sock.json")
    }
    assert all(e.record.reason == "not_a_regular_file" for e in dead.values())
    assert os.readlink(dead["outbox/alice/link.json"].path) == str(outside)
    assert stat.S_ISFIFO(os.lstat(dead["outbox/alice/fifo.json"].path).st_mode)
    assert (dead["outbox/alice/dir.json"].path / "inner").read_bytes() == b"x"
    assert stat.S_ISSOCK(os.lstat(dead["outbox/alice/sock.json"].path).st_mode)
    journal = entries(bus.config)
    assert [e.reason for e in journal] == ["not_a_regular_file"] * 4


def test_file_directly_in_the_outbox_root_is_routed(bus: Bus) -> None:
    """A file in outbox/ itself (no sender directory) is routed like any other."""
    (bus.layout.outbox / "loose.json").write_bytes(message_bytes("m-l"))
    with Router(bus.config) as router:
        assert [p.name for p in router.scan()] == ["loose.json"]
        assert router.route_all().accepted == 1
    assert delivered_ids(bus, "bob") == ["m-l"]
    (entry,) = entries(bus.config)
    assert (entry.source, entry.agent) == ("outbox/loose.json", "alice")


def test_too_large_files_are_dead_lettered(bus: Bus) -> None:
    """Over max_message_bytes as stored, or as canonical JSON (Markdown can grow): too_large."""
    config = bus.with_config(max_message_bytes=2000)
    big = drop(bus, "big.json", message_bytes("m-big", body="x" * 3000))
    # 400 control characters: ~0.4 KB raw in Markdown, ~2.4 KB escaped as JSON.
    grows = encode_markdown(decode(message_bytes("m-grows", body="\x01" * 400)))
    assert len(grows) < 2000
    md = drop(bus, "grows.md", grows)
    fits = drop(bus, "fits.json", message_bytes("m-fits"))
    with Router(config) as router:
        report = router.route([big, md, fits])
    assert (report.accepted, report.dead_lettered) == (1, 2)
    assert delivered_ids(bus, "bob") == ["m-fits"]
    reasons = {e.record.original_path: e.record.reason for e in dlq.list_entries(bus.layout)}
    assert reasons == {"outbox/alice/big.json": "too_large", "outbox/alice/grows.md": "too_large"}


def test_same_message_id_under_another_idempotency_key_is_a_duplicate(bus: Bus) -> None:
    """Message ids are unique: a repeat id with a new idempotency_key is still a duplicate."""
    with Router(bus.config) as router:
        router.route([drop(bus, "a.json", message_bytes("m-1", idempotency_key="k1"))])
        same_batch = router.route(
            [
                drop(bus, "b.json", message_bytes("m-2", idempotency_key="k2")),
                drop(bus, "c.json", message_bytes("m-2", idempotency_key="k3")),
            ]
        )
    assert (same_batch.accepted, same_batch.duplicates) == (1, 1)
    with Router(bus.config) as router:  # index rebuilt from the journal
        later = router.route([drop(bus, "d.json", message_bytes("m-1", idempotency_key="k9"))])
    assert later.duplicates == 1
    assert delivered_ids(bus, "bob") == ["m-1", "m-2"]


def test_route_pending_redelivers_an_accepted_message_whose_delivery_was_lost(bus: Bus) -> None:
    """Journaled but missing from the inbox (e.g. a power cut): route_pending delivers it again."""
    with Router(bus.config) as router:
        router.route([drop(bus, "a.json", message_bytes("m-lost", to=["bob", "carol"]))])
    (lost,) = deliveries(bus, "carol")
    lost.unlink()
    assert route_pending(bus.config) is not None
    assert delivered_ids(bus, "carol") == ["m-lost"]
    assert delivered_ids(bus, "bob") == ["m-lost"]
    assert [e.event for e in entries(bus.config)] == ["accepted"]


def test_redo_after_a_pass_died_after_its_journal_append(bus: Bus) -> None:
    """Source left behind after the append: the next pass delivers what is missing, once."""
    raw = message_bytes("m-r", to=["bob", "carol"])
    src = drop(bus, "r.json", raw)
    with Router(bus.config) as router:
        router.route([src])
    # Undo what a crash after the journal append would not have done yet: carol's
    # delivery and the source removal.
    (carol_file,) = deliveries(bus, "carol")
    carol_file.unlink()
    src.write_bytes(raw)
    with Router(bus.config) as router:
        report = router.route_all()
    assert (report.accepted, report.redone, report.duplicates) == (0, 1, 0)
    assert delivered_ids(bus, "bob") == ["m-r"]
    assert delivered_ids(bus, "carol") == ["m-r"]
    assert [e.event for e in entries(bus.config)] == ["accepted"]
    assert not src.exists()


def test_redo_writes_no_file_for_what_the_daemons_memory_holds(bus: Bus) -> None:
    """A source left behind after the append, whose message the daemon's memory holds (or
    held: rebuilt, then acked): the redo writes no second copy, which would be delivered
    again after the memory copy's ack. Other recipients still get what they lack."""
    raw = message_bytes("m-h", to=["bob", "carol"])
    src = drop(bus, "h.json", raw)
    with Router(bus.config) as router:
        router.route([src])
    for path in (*deliveries(bus, "bob"), *deliveries(bus, "carol")):
        path.unlink()  # bob's copy lived in memory; carol's file was lost in the crash
    src.write_bytes(raw)
    asked: list[tuple[str, str]] = []

    def held(agent: str, message_id: str) -> bool:
        asked.append((agent, message_id))
        return agent == "bob"

    with Router(bus.config) as router:
        batch = router.commit(router.scan())
        report = router.finish(batch, held=held)
    assert report.redone == 1
    assert delivered_ids(bus, "bob") == []
    assert delivered_ids(bus, "carol") == ["m-h"]
    assert ("bob", "m-h") in asked
    assert not src.exists()


def test_sigkill_at_random_points_delivers_every_message_exactly_once(bus: Bus) -> None:
    """Routing passes SIGKILLed at random instants, then a clean pass: each message once."""
    rng = random.Random(20240501)
    expected: dict[str, list[str]] = {}

    def drop_wave(wave: int) -> None:
        for i in range(16):
            mid = f"m-{wave:02d}-{i:02d}"
            expected[mid] = ["bob", "carol"] if i % 2 else ["bob"]
            drop(bus, f"{mid}.json", message_bytes(mid, to=expected[mid]), agent=f"a{i % 3}")
        for mid in rng.sample(sorted(expected), 2):  # repeats under other names: duplicates
            drop(bus, f"z-{wave:02d}-{mid}.json", message_bytes(mid, to=expected[mid]))

    kills = waves = 0
    limit = 0.03  # seconds; grows when a loaded machine lets a pass make no progress
    for _ in range(14):
        if not outbox_files(bus):
            drop_wave(waves)
            waves += 1
        before = (len(entries(bus.config)), len(outbox_files(bus)))
        proc = run_python(_ROUTE_PASS, str(bus.root), "5")
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        try:
            proc.wait(timeout=rng.uniform(0.0, limit))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        else:
            assert proc.returncode == 0, err.decode()
        if (len(entries(bus.config)), len(outbox_files(bus))) == before:
            limit *= 1.5
    assert kills >= 5 and waves >= 2, "the kills should land inside routing passes"
    report = route_pending(bus.config)
    assert report is not None
    assert outbox_files(bus) == []
    for agent in ("bob", "carol"):
        got = Counter(delivered_ids(bus, agent))
        want = Counter(mid for mid, to in expected.items() if agent in to)
        assert got == want, agent
    journal = entries(bus.config)
    accepted = Counter(e.message_id for e in journal if e.event == "accepted")
    assert accepted == Counter(expected.keys())
    for e in journal:
        assert e.event in ("accepted", "duplicate")
        if e.event == "accepted":
            assert e.to == expected[e.message_id or ""]
    for p in deliveries(bus, "bob") + deliveries(bus, "carol"):
        decode(p.read_bytes())  # every delivery is whole


def test_route_pending_returns_none_while_another_process_holds_the_lock(bus: Bus) -> None:
    """With busd.lock held elsewhere route_pending does nothing; after SIGKILL it routes."""
    src = drop(bus, "m.json", message_bytes("m-1"))
    holder = run_python(_HOLD_LOCK, str(bus.root))
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        assert route_pending(bus.config) is None
        assert src.exists()
        assert entries(bus.config) == []
        assert deliveries(bus, "bob") == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=10)
    report = route_pending(bus.config)
    assert report is not None and report.accepted == 1
    assert delivered_ids(bus, "bob") == ["m-1"]
    assert not src.exists()


def test_default_recipient_for_a_message_without_to(bus: Bus) -> None:
    """A message without `to` goes to default_recipient (orchestrator by default)."""
    src = drop(bus, "d.json", message_bytes("m-d", to=None))
    with Router(bus.config) as router:
        router.route([src])
    assert delivered_ids(bus, "orchestrator") == ["m-d"]
    config = bus.with_config(default_recipient="boss")
    src = drop(bus, "e.json", message_bytes("m-e", to=None))
    with Router(config) as router:
        router.route([src])
    assert delivered_ids(bus, "boss") == ["m-e"]


def test_vanished_file_is_skipped(bus: Bus) -> None:
    """A path that disappeared since the scan is skipped without an entry or an error."""
    src = drop(bus, "gone.json", message_bytes("m-g"))
    src.unlink()
    with Router(bus.config) as router:
        report = router.route([src])
    assert (report.accepted, report.dead_lettered) == (0, 0)
    assert entries(bus.config) == []


def test_reconfigure_during_a_commit_never_mixes_two_configs(bus: Bus) -> None:
    """A commit in its thread keeps the rules it started with; the next one gets the new ones.

    The commit is held mid-batch (inside the dead-letter log call of its second file)
    while another thread reconfigures: topics, default recipient and size limit all
    change. Every message of the held batch must be routed by the old config, and
    every one of the next batch by the new. A router whose commit reads fields that
    reconfigure assigns one by one routes the held batch's tail by the new config.
    """
    old = bus.with_config(
        subscriptions={"news": ["bob"]}, default_recipient="boss", dedupe_window_seconds=60
    )
    new = bus.with_config(
        subscriptions={"news": ["carol"]},
        default_recipient="chief",
        max_message_bytes=1200,
        dedupe_window_seconds=30,
    )
    paused, resume = threading.Event(), threading.Event()
    held: list[str] = []

    def hold(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if event["event"] == "message_dead_lettered" and not held:
            held.append(threading.current_thread().name)
            paused.set()
            assert resume.wait(10), "never resumed"
        return event

    def wave(n: int) -> list[Path]:
        return [
            drop(bus, f"{n}-1.json", message_bytes(f"t{n}", to="topic:news")),
            drop(bus, f"{n}-2.json", b"{not json"),
            drop(bus, f"{n}-3.json", message_bytes(f"u{n}", to="topic:news")),
            drop(bus, f"{n}-4.json", message_bytes(f"d{n}", to=None)),
            drop(bus, f"{n}-5.json", message_bytes(f"big{n}", to="bob", body="x" * 1500)),
        ]

    first = wave(1)
    with Router(old) as router, structlog.testing.capture_logs(processors=[hold]):
        result: list[Batch] = []
        commit = threading.Thread(target=lambda: result.append(router.commit(first)))
        commit.start()
        assert paused.wait(10), "the commit never reached its second file"
        router.reconfigure(new, {"news": ["carol"]})
        resume.set()
        commit.join(10)
        (held_batch,) = result
        assert held == [commit.name]
        router.finish(held_batch)
        next_batch = router.commit(wave(2))
        router.finish(next_batch)
        assert router.config is new
        assert router.subscriptions == {"news": ["carol"]}
        assert router.dedupe.window_s == 30
    routed = {i.msg.message_id: i.recipients for i in held_batch.accepted}
    assert routed == {"t1": ["bob"], "u1": ["bob"], "d1": ["boss"], "big1": ["bob"]}
    routed = {i.msg.message_id: i.recipients for i in next_batch.accepted}
    assert routed == {"t2": ["carol"], "u2": ["carol"], "d2": ["chief"]}
    assert next_batch.report.dead_lettered == 2  # 2-2.json and the now too large big2
