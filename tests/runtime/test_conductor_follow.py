"""``[[conductor.follow]]``: a real daemon follows conductor-loop bus files.

The writer here follows conductor-loop's append rules (``internal/messagebus``):
an entry is ``---\\n`` + the YAML header as yaml.v3 writes it + ``---\\n`` + the
body + ``\\n``; it is appended with O_APPEND under an exclusive ``flock``, after a
``"\\n"`` separator when the file is not empty.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from busd.store.journal import Journal
from daemon_harness import Daemon, delivered_ids, journal_ids, wait_for

pytestmark = pytest.mark.timeout(90)


def conductor_id(i: int, pid: int = 4242) -> str:
    """An id in conductor's MSG-... format (msgid.go), numbered ``i``."""
    return f"MSG-20261201-120000-{i:09d}-PID{pid % 100000:05d}-{i % 10000:04d}"


def entry(i: int, body: str | None = None, *, task: str = "task-1", kind: str = "FACT") -> bytes:
    """One conductor entry, as serializeMessage writes it."""
    text = f"message {i}" if body is None else body
    header = (
        f"msg_id: {conductor_id(i)}\n"
        f"ts: 2026-12-01T12:00:{i % 60:02d}.{i:08d}1Z\n"
        f"type: {kind}\n"
        "project_id: proj\n"
        + (f"task_id: {task}\n" if task else 'task_id: ""\n')
        + "run_id: run-1\n"
    )
    tail = "" if text.endswith("\n") else "\n"
    return f"---\n{header}---\n{text}{tail}".encode()


def append(path: Path, data: bytes) -> None:
    """Append like conductor's appendEntry: O_APPEND, LOCK_EX, separator, one write."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_size > 0:
                os.write(fd, b"\n")
            os.write(fd, data)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def follow_config(root: Path, path: Path | str, to: str = "bob", extra: str = "") -> None:
    """``busd.toml`` with one ``[[conductor.follow]]`` entry (and a quick rescan)."""
    (root / "busd.toml").write_text(
        f"rescan_interval_seconds = 0.5\n{extra}"
        f'[[conductor.follow]]\npath = "{path}"\nto = "{to}"\n'
    )


def inbox(root: Path, agent: str = "bob") -> list[str]:
    return delivered_ids(root / "inbox" / agent)


def journal_events(root: Path, event: str) -> list[str]:
    with Journal(root / "journal") as j:
        return [e.message_id or "" for e in j.read(events=(event,))]


def ids(*numbers: int) -> list[str]:
    return [conductor_id(i) for i in numbers]


def test_follow_routes_each_append_once(root: Path, tmp_path: Path) -> None:
    """Entries appended by a conductor writer arrive once each, in order, as they come."""
    bus = tmp_path / "proj" / "TASK-MESSAGE-BUS.md"
    bus.parent.mkdir()
    append(bus, entry(1))
    follow_config(root, bus)
    d = Daemon(root).ready()
    try:
        wait_for(lambda: inbox(root) == ids(1), what="the entry there before the start")
        append(bus, entry(2, "a body\nof two lines\n"))
        for i in range(3, 6):
            append(bus, entry(i))
        wait_for(lambda: len(inbox(root)) == 5, what="the appended entries")
        got = inbox(root)
        assert got == ids(1, 2, 3, 4, 5)
        assert journal_events(root, "duplicate") == []
        assert sorted(journal_ids(root)) == sorted(got)
        cursor = json.loads((root / "conductor-follow.json").read_bytes())[str(bus)]
        assert cursor["offset"] == bus.stat().st_size
        assert oct((root / "conductor-follow.json").stat().st_mode & 0o777) == "0o600"
        body = json.loads(
            next((root / "inbox" / "bob").glob(f"*{conductor_id(1)}.json")).read_bytes()
        )
        assert body["agent_id"] == "conductor-loop"
        assert body["metadata"]["conductor"]["msg_id"] == conductor_id(1)
    finally:
        assert d.stop() == 0
    assert bus.read_bytes().startswith(entry(1))  # never written to


def test_restart_resumes_from_the_stored_offset(root: Path, tmp_path: Path) -> None:
    """Appends made while the daemon was down arrive after the restart; nothing is read
    twice (no ``duplicate`` in the journal)."""
    bus = tmp_path / "MESSAGE-BUS.md"
    append(bus, entry(1))
    follow_config(root, bus)
    d = Daemon(root).ready()
    try:
        wait_for(lambda: inbox(root) == ids(1), what="first entry")
    finally:
        assert d.stop() == 0
    append(bus, entry(2))
    append(bus, entry(3, task=""))
    d = Daemon(root).ready()
    try:
        wait_for(lambda: len(inbox(root)) == 3, what="the two appended while down")
    finally:
        assert d.stop() == 0
    d = Daemon(root).ready()
    try:
        append(bus, entry(4))
        wait_for(lambda: len(inbox(root)) == 4, what="one more after a second restart")
    finally:
        assert d.stop() == 0
    assert inbox(root) == ids(1, 2, 3, 4)
    assert journal_events(root, "duplicate") == []


def test_truncation_and_replacement_read_again_without_repeats(root: Path, tmp_path: Path) -> None:
    """A truncated file and a file replaced under the same name are read from 0: what was
    routed is a ``duplicate``, the rest arrives. Legacy lines keep their ids (from their
    absolute line numbers, although the follower read the file in pieces)."""
    bus = tmp_path / "MESSAGE-BUS.md"
    bus.write_bytes(b"[2026-12-01 12:00:01] INFO: first legacy line\n")
    follow_config(root, bus)
    d = Daemon(root).ready()
    try:
        wait_for(lambda: len(inbox(root)) == 1, what="legacy line 1")
        with bus.open("ab") as f:
            f.write(b"[2026-12-01 12:00:02] ISSUE: second legacy line\n")
        wait_for(lambda: len(inbox(root)) == 2, what="legacy line 2, read from line 2 on")
        append(bus, entry(3))
        wait_for(lambda: len(inbox(root)) == 3, what="entry 3")
        first = inbox(root)
        assert all(m.startswith("cl-legacy-") for m in first[:2]) and first[2] == conductor_id(3)

        # Replaced: same content plus one more entry, written elsewhere and renamed over.
        copy = tmp_path / "new.md"
        copy.write_bytes(bus.read_bytes())
        append(copy, entry(4))
        os.replace(copy, bus)
        wait_for(lambda: len(inbox(root)) == 4, what="entry 4 from the replaced file")
        wait_for(lambda: len(journal_events(root, "duplicate")) == 3, what="3 duplicates")

        # Truncated: shorter than the offset, new entries only.
        bus.write_bytes(b"")
        append(bus, entry(5))
        wait_for(lambda: len(inbox(root)) == 5, what="entry 5 after the truncation")

        # Replaced by another, longer file: other first bytes, read from 0, not the offset.
        other = tmp_path / "other.md"
        for i in (6, 7, 8):
            append(other, entry(i, f"another file's entry {i}"))
        os.replace(other, bus)
        wait_for(lambda: len(inbox(root)) == 8, what="the other file's entries")
    finally:
        assert d.stop() == 0
    assert inbox(root) == [*first, *ids(4, 5, 6, 7, 8)]
    assert len(journal_ids(root)) == 8


def test_rotated_file_is_read_to_its_end_first(root: Path, tmp_path: Path) -> None:
    """conductor's auto-rotation renames the file to ``<name>.<stamp>.archived``; entries
    appended before the rotation, unread yet, still arrive."""
    bus = tmp_path / "TASK-MESSAGE-BUS.md"
    append(bus, entry(1))
    follow_config(root, bus)
    d = Daemon(root).ready()
    try:
        wait_for(lambda: inbox(root) == ids(1), what="entry 1")
    finally:
        assert d.stop() == 0
    append(bus, entry(2))
    os.rename(bus, bus.with_name(bus.name + ".20261201-120000.archived"))
    append(bus, entry(3))
    d = Daemon(root).ready()
    try:
        wait_for(lambda: len(inbox(root)) == 3, what="entries 2 and 3")
    finally:
        assert d.stop() == 0
    assert inbox(root) == ids(1, 2, 3)


def test_directory_is_searched_for_bus_files(root: Path, tmp_path: Path) -> None:
    """A followed directory: every ``*MESSAGE-BUS.md`` below it, new ones included."""
    runs = tmp_path / "runs"
    (runs / "proj" / "t1").mkdir(parents=True)
    append(runs / "proj" / "PROJECT-MESSAGE-BUS.md", entry(1, task=""))
    (runs / "proj" / "notes.md").write_bytes(entry(99))
    follow_config(root, runs, to="topic:conductor", extra='[subscriptions]\nconductor = ["bob"]\n')
    d = Daemon(root).ready()
    try:
        wait_for(lambda: inbox(root) == ids(1), what="the project bus")
        append(runs / "proj" / "t1" / "TASK-MESSAGE-BUS.md", entry(2))
        (runs / "proj" / "t2").mkdir()
        append(runs / "proj" / "t2" / "TASK-MESSAGE-BUS.md", entry(3))
        wait_for(lambda: sorted(inbox(root)) == ids(1, 2, 3), what="the task buses")
    finally:
        assert d.stop() == 0
    body = json.loads(next((root / "inbox" / "bob").glob(f"*{conductor_id(1)}.json")).read_bytes())
    assert body["task_id"] == "project"  # a project-level message


def test_record_conductor_drops_is_dead_lettered_once(root: Path, tmp_path: Path) -> None:
    """A header conductor cannot decode is dead-lettered with its bytes, its file and
    offset; read again (cursor file lost), it is not dead-lettered a second time.

    conductor drops two records here: the broken header, and the body after it, which
    its reader takes for the next header (the closing ``---`` opens one)."""
    bus = tmp_path / "MESSAGE-BUS.md"
    append(bus, entry(1))
    offset = bus.stat().st_size + 1
    append(bus, b"---\nmsg_id: [unclosed\n---\nbody of a broken entry\n")
    append(bus, entry(3))
    follow_config(root, bus)
    d = Daemon(root).ready()
    try:
        wait_for(lambda: len(inbox(root)) >= 2, what="the good entries")
        records = wait_for(
            lambda: len(r := sorted((root / "dlq").glob("*.reason.json"))) == 2 and r,
            what="two DLQ entries",
        )
    finally:
        assert d.stop() == 0
    assert inbox(root) == ids(1, 3)
    second = offset + len(b"---\nmsg_id: [unclosed\n")
    got = {}
    for path in records:
        record = json.loads(path.read_bytes())
        got[record["original_path"]] = path.with_name(path.name.removesuffix(".reason.json"))
    assert sorted(got) == [f"{bus}@{offset}", f"{bus}@{second}"]
    assert got[f"{bus}@{offset}"].read_bytes() == b"---\nmsg_id: [unclosed\n"
    assert got[f"{bus}@{second}"].read_bytes() == b"---\nbody of a broken entry\n\n"
    (root / "conductor-follow.json").unlink()
    d = Daemon(root).ready()
    try:
        wait_for(lambda: (root / "conductor-follow.json").exists(), what="the file read again")
        wait_for(lambda: len(journal_events(root, "duplicate")) >= 2, what="duplicates")
    finally:
        assert d.stop() == 0
    assert len(list((root / "dlq").glob("*.reason.json"))) == 2
    assert inbox(root) == ids(1, 3)
