"""Tests of busd.journal: NDJSON segments, locked appends, readers, repair, rotation, prune."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import portalocker
import pytest
from _store_faults import immutable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busd.errors import InvalidMessage, LockTimeout, NotFound, StorageError
from busd.store.journal import (
    START,
    Journal,
    JournalEntry,
    Position,
    decode_entry,
    encode_entry,
)

WRITER = Path(__file__).with_name("_journal_writer.py")


def payload(message_id: str, size: int) -> str:
    """Same as _journal_writer.payload (kept here so the test needs no import path tricks)."""
    unit = f"<{message_id}>"
    return (unit * (size // len(unit) + 1))[:size]


def ent(i: int | str, event: str = "accepted", **kw: object) -> JournalEntry:
    """A small entry with message id ``m<i>`` (unless ``message_id`` is given)."""
    kw.setdefault("message_id", f"m{i}")
    return JournalEntry(event=event, at=datetime.now(UTC), **kw)  # type: ignore[arg-type]


def spawn(directory: Path, mode: str, *args: str) -> subprocess.Popen[str]:
    """Start the writer helper in its own process."""
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(directory), mode, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """Wait for a helper, assert it succeeded, return its stdout."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


def check_whole(entries: Iterable[JournalEntry]) -> list[JournalEntry]:
    """Assert each helper-written entry is intact (detail and raw message match its id)."""
    result = list(entries)
    for e in result:
        assert e.message_id is not None and e.detail is not None and e.message is not None
        assert e.detail == payload(e.message_id, len(e.detail))
        assert json.loads(bytes(e.message))["message_id"] == e.message_id
    return result


def by_writer(entries: Iterable[JournalEntry]) -> dict[str, list[int]]:
    """Sequence numbers seen per writer, in reading order."""
    seen: dict[str, list[int]] = {}
    for e in entries:
        assert e.message_id is not None
        w, n = e.message_id.split("-")
        seen.setdefault(w, []).append(int(n))
    return seen


def test_round_trip_and_format(tmp_path: Path) -> None:
    """Entries read back equal, one JSON line each, in 000000000001.ndjson."""
    j = Journal(tmp_path / "journal")
    raw = msgspec.Raw(b'{"message_id": "m1", "body": "x"}')
    entries = [
        ent(1, agent="a", to=["b", "c"], source="cli", idempotency_key="k", message=raw),
        ent(2, "dead_lettered", reason="schema", detail="bad\nline"),
    ]
    pos = j.append(entries)
    seg = tmp_path / "journal" / "000000000001.ndjson"
    assert j.segments() == [seg]
    data = seg.read_bytes()
    assert pos == Position(1, len(data)) and data.count(b"\n") == 2 and data.endswith(b"\n")
    assert list(j.read()) == entries
    assert [p for _, p in j.read_from(START)][-1] == pos
    assert j.size_bytes() == len(data) and j.end_position() == pos
    assert j.append([]) == pos and j.skipped == 0
    j.close()
    j.close()


def test_encode_decode_contract() -> None:
    """Raw newlines are flattened, unknown fields ignored, null message is None, junk raises."""
    e = ent(1, message=msgspec.Raw(b'{\n  "a": [1,\n 2]\n}'))
    line = encode_entry(e)
    assert b"\n" not in line
    assert json.loads(bytes(decode_entry(line).message or b"")) == {"a": [1, 2]}
    d = decode_entry(b'{"event":"acked","at":"2024-01-01T00:00:00Z","future":1,"message":null}\n')
    assert d.event == "acked" and d.message is None and d.at == datetime(2024, 1, 1, tzinfo=UTC)
    assert b"message" not in encode_entry(d) and b"agent" not in encode_entry(d)
    for junk in (b'{"event": "x"', b'{"event": 1, "at": "2024-01-01T00:00:00Z"}', b""):
        with pytest.raises(InvalidMessage):
            decode_entry(junk)


def test_undecodable_lines_skipped_and_counted(tmp_path: Path) -> None:
    """A garbage line in the middle is skipped and counted; neighbours are read."""
    j = Journal(tmp_path, fsync=False)
    j.append([ent(1)])
    j.append_lines([b"not json", b'{"no": "event"}'])
    j.append([ent(2)])
    assert [e.message_id for e in j.read()] == ["m1", "m2"]
    assert j.skipped == 2
    with pytest.raises(ValueError):
        j.append_lines([b"a\nb"])


def test_since_events_and_poll_for_new(tmp_path: Path) -> None:
    """since= yields entries after the first match; unknown ids raise NotFound."""
    j = Journal(tmp_path, fsync=False)
    j.append([ent(1), ent(2, "acked"), ent(3), ent(2, "redelivered"), ent(4, "acked")])
    ids = [(e.message_id, e.event) for e in j.read(since="m2")]
    assert ids == [("m3", "accepted"), ("m2", "redelivered"), ("m4", "acked")]
    assert [e.message_id for e in j.read(events={"acked"})] == ["m2", "m4"]
    assert [e.message_id for e in j.read(since="m1", events=("acked",))] == ["m2", "m4"]
    assert len(j.poll_for_new(None)) == 5
    assert [e.message_id for e in j.poll_for_new("m3")] == ["m2", "m4"]
    assert j.poll_for_new("m4") == []
    with pytest.raises(NotFound):
        j.poll_for_new("nope")
    with pytest.raises(NotFound):
        list(j.read(since="nope"))
    assert list(Journal(tmp_path / "missing").read()) == []


def test_follow_other_process_across_rotation(tmp_path: Path) -> None:
    """follow() sees a subprocess's appends in order, across several rotations."""
    j = Journal(tmp_path)
    done = threading.Event()
    got: list[JournalEntry] = []

    def run() -> None:
        for e in j.follow(poll_interval=0.01, stop=done.is_set):
            got.append(e)
            if len(got) == 60:
                done.set()

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.05)  # the follower starts before the journal exists
    p = spawn(tmp_path, "append", "--count", "60", "--size", "300", "--segment-bytes", "2000")
    finish(p)
    t.join(10)
    done.set()
    assert not t.is_alive()
    assert by_writer(check_whole(got)) == {"w0": list(range(60))}
    assert len(j.segments()) >= 10
    # since= resumes after that id and stop() ends the generator once caught up.
    rest = list(j.follow("w0-000057", poll_interval=0.01, stop=lambda: True))
    assert [e.message_id for e in rest] == ["w0-000058"]


def test_concurrent_processes(tmp_path: Path) -> None:
    """10 processes x 100 locked appends: each entry once, whole, per-writer order kept."""
    procs = [
        spawn(
            tmp_path,
            "append",
            "--writer",
            str(w),
            "--count",
            "100",
            "--size",
            "80",
            "--segment-bytes",
            "16384",
        )
        for w in range(10)
    ]
    for p in procs:
        finish(p, timeout=60)
    j = Journal(tmp_path)
    entries = check_whole(j.read())
    assert len(entries) == 1000 and j.skipped == 0
    assert by_writer(entries) == {f"w{w}": list(range(100)) for w in range(10)}
    segs = j.segments()
    assert [int(s.stem) for s in segs] == list(range(1, len(segs) + 1)) and len(segs) > 5
    for s in segs:
        data = s.read_bytes()
        assert data.endswith(b"\n") and len(data) <= 16384


def test_threads_share_one_journal(tmp_path: Path) -> None:
    """Threads appending through one instance do not interleave or lose entries."""
    j = Journal(tmp_path, segment_bytes=4096, fsync=False)

    def run(t: int) -> None:
        for i in range(50):
            j.append([ent(f"{t}-{i}"), ent(f"{t}-{i}b")])

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ids = [e.message_id for e in j.read()]
    assert len(ids) == 400 and j.skipped == 0
    for t in range(4):
        mine = [i for i in ids if i and i.startswith(f"m{t}-")]
        assert mine == [f"m{t}-{i}{s}" for i in range(50) for s in ("", "b")]


def test_lock_timeout(tmp_path: Path) -> None:
    """A lock held by another process makes append raise LockTimeout after lock_timeout."""
    holder = spawn(tmp_path, "hold")
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        j = Journal(tmp_path, lock_timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            j.append([ent(1)])
        assert 0.3 <= time.monotonic() - t0 < 3
        assert str(tmp_path / ".lock") in str(info.value) and "0.3" in str(info.value)
        assert info.value.code == "lock_timeout" and info.value.context["timeout"] == 0.3
    finally:
        holder.kill()
        holder.communicate()
    assert j.append([ent(1)]) == Position(1, len(encode_entry(ent(1))) + 1)


def test_lock_timeout_other_fd_same_process(tmp_path: Path) -> None:
    """The lock also excludes another descriptor of the same process."""
    j = Journal(tmp_path, lock_timeout=0.3)
    j.append([ent(0)])
    with (tmp_path / ".lock").open("a") as f:
        portalocker.lock(f, portalocker.LockFlags.EXCLUSIVE)
        with pytest.raises(LockTimeout):
            j.append([ent(1)])
        portalocker.unlock(f)
    j.append([ent(1)])
    assert len(list(j.read())) == 2


def test_sigkill_mid_write_leaves_no_partial_entry(tmp_path: Path) -> None:
    """SIGKILLed writers never expose a partial entry; the next append cuts the torn tail."""
    rng = random.Random(1234)
    j = Journal(tmp_path, segment_bytes=8 << 20)
    total = 0
    for _ in range(6):
        p = spawn(
            tmp_path,
            "loop",
            "--batch",
            "16",
            "--size",
            "32768",
            "--no-fsync",
            "--segment-bytes",
            str(8 << 20),
            "--writer",
            str(total),
        )
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 0.03))
        p.send_signal(signal.SIGKILL)
        p.communicate()
        entries = check_whole(j.read())
        assert j.skipped == 0 and len(entries) >= total + 16
        last = j.segments()[-1].read_bytes()
        torn = len(last) - (last.rfind(b"\n") + 1)
        if rng.random() < 0.5:
            assert j.repair() == torn
        else:
            mid = f"after-{total}"
            raw = msgspec.Raw(json.dumps({"message_id": mid}).encode())
            j.append([ent(0, message_id=mid, detail=payload(mid, 50), message=raw)])
        # Whole lines only; a segment the writer had just rotated to may still be empty.
        tail = j.segments()[-1].read_bytes()
        assert tail == b"" or tail.endswith(b"\n")
        after = list(j.read())
        assert after[: len(entries)] == entries and j.skipped == 0
        total = len(after)
    assert j.repair() == 0


def test_hand_truncated_tail(tmp_path: Path) -> None:
    """A tail cut by hand is invisible to readers; append truncates it before writing."""
    j = Journal(tmp_path, fsync=False)
    j.append([ent(1), ent(2, detail="x" * 100)])
    seg = j.segments()[0]
    size = seg.stat().st_size
    os.truncate(seg, size - 10)
    assert [e.message_id for e in j.read()] == ["m1"]
    pos = j.append([ent(3)])
    assert [e.message_id for e in j.read()] == ["m1", "m3"] and j.skipped == 0
    assert pos == Position(1, seg.stat().st_size)
    with seg.open("ab") as f:
        f.write(b'{"event":"acc')
    assert j.repair() == len(b'{"event":"acc') and j.repair() == 0


def test_reading_while_writers_append(tmp_path: Path) -> None:
    """Readers polling during 3 writers' appends only see whole entries, each a prefix."""
    procs = [
        spawn(
            tmp_path,
            "append",
            "--writer",
            str(w),
            "--count",
            "150",
            "--batch",
            "5",
            "--size",
            "6000",
            "--vary",
            "--segment-bytes",
            str(256 << 10),
        )
        for w in range(3)
    ]
    j = Journal(tmp_path)
    snapshots: list[list[JournalEntry]] = []
    followed: list[JournalEntry] = []
    pos = START
    while any(p.poll() is None for p in procs):
        for e, after in j.read_from(pos):
            followed.append(e)
            pos = after
        snapshots.append(list(j.read()))
    for p in procs:
        finish(p)
    followed.extend(e for e, _ in j.read_from(pos))
    final = check_whole(j.read())
    assert j.skipped == 0 and len(snapshots) > 3
    assert followed == final
    for snap in snapshots:
        assert snap == final[: len(snap)]
    counts = {w: len(s) for w, s in by_writer(final).items()}
    assert by_writer(final) == {w: list(range(n)) for w, n in counts.items()}


def test_rotation_by_size(tmp_path: Path) -> None:
    """Segments rotate before passing segment_bytes; an oversize batch gets its own segment."""
    j = Journal(tmp_path, segment_bytes=1000, fsync=False)
    for i in range(30):
        j.append([ent(i, detail="x" * 150)])
    segs = j.segments()
    assert [s.name for s in segs[:2]] == ["000000000001.ndjson", "000000000002.ndjson"]
    assert all(s.stat().st_size <= 1000 for s in segs) and len(segs) >= 5
    before = len(segs)
    pos = j.append([ent("big", detail="y" * 5000)])
    assert pos == Position(before + 1, j.segments()[-1].stat().st_size) and pos.offset > 5000
    assert j.append([ent("next")]).segment == before + 2
    assert [e.message_id for e in j.read()] == [f"m{i}" for i in range(30)] + ["mbig", "mnext"]
    assert Position(1, 999) < Position(2, 0) < Position(2, 1)


def test_prune(tmp_path: Path) -> None:
    """prune deletes old segments oldest first, honours keep_after, never the newest."""
    j = Journal(tmp_path, segment_bytes=500, fsync=False)
    for i in range(40):
        j.append([ent(i, detail="z" * 100)])
    segs = j.segments()
    n = len(segs)
    assert n >= 8
    assert j.prune(max_age_seconds=3600, max_total_bytes=None) == []
    old = time.time() - 7200
    for s in segs[:5]:
        os.utime(s, (old, old))
    assert (
        j.prune(max_age_seconds=3600, max_total_bytes=None, keep_after=Position(3, 0)) == segs[:2]
    )
    assert j.prune(max_age_seconds=3600, max_total_bytes=None) == segs[2:5]
    # Positions inside pruned segments continue at the oldest remaining one.
    first = next(iter(j.read_from(Position(2, 17))))[0]
    assert first == next(iter(j.read()))
    limit = j.size_bytes() - segs[5].stat().st_size
    assert j.prune(max_age_seconds=None, max_total_bytes=limit) == [segs[5]]
    assert j.prune(max_age_seconds=0, max_total_bytes=0) == segs[6:-1]
    assert j.segments() == [segs[-1]]
    j.append([ent("after")])
    assert [e.message_id for e in j.read()][-1] == "mafter"


def _case(n: int, sizes: list[int], seg_bytes: int, cut_frac: float) -> None:
    with tempfile.TemporaryDirectory() as d:
        j = Journal(Path(d), segment_bytes=seg_bytes, fsync=False)
        written = [ent(i, detail="é\n" * sizes[i]) for i in range(n)]
        ends = [j.append([e]) for e in written]
        last = j.segments()[-1]
        size = last.stat().st_size
        cut = round(cut_frac * size)
        os.truncate(last, cut)
        index = int(last.stem)
        alive = [
            e for e, p in zip(written, ends, strict=True) if p.segment < index or p.offset <= cut
        ]
        assert list(j.read()) == alive and j.skipped == 0
        whole = max((p.offset for p in ends if p.segment == index and p.offset <= cut), default=0)
        assert j.repair() == cut - whole
        extra = ent("new")
        j.append([extra])
        assert list(j.read()) == [*alive, extra] and j.skipped == 0


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 12),
    sizes=st.lists(st.integers(0, 80), min_size=12, max_size=12),
    seg_bytes=st.sampled_from([150, 600, 1 << 20]),
    cut_frac=st.floats(0, 1),
)
def test_property_truncate_anywhere(
    n: int, sizes: list[int], seg_bytes: int, cut_frac: float
) -> None:
    """Truncating the last segment anywhere leaves exactly the whole lines readable."""
    _case(n, sizes, seg_bytes, cut_frac)


def test_truncate_every_offset_exhaustively(tmp_path: Path) -> None:
    """Every cut of the last of three segments reads back exactly the surviving entries."""
    j = Journal(tmp_path, segment_bytes=200, fsync=False)
    ends = [j.append([ent(i, detail="q" * i)]) for i in range(6)]
    last = j.segments()[-1]
    original = last.read_bytes()
    for cut in range(len(original) + 1):
        last.write_bytes(original[:cut])
        idx = int(last.stem)
        want = [i for i, p in enumerate(ends) if p.segment < idx or p.offset <= cut]
        assert [e.message_id for e in j.read()] == [f"m{i}" for i in want]
    assert j.skipped == 0


def test_disk_full_rolls_back_and_raises_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write failing midway (ENOSPC) raises StorageError and leaves no half batch."""
    j = Journal(tmp_path, fsync=False)
    j.append([ent(1)])
    before = j.segments()[0].read_bytes()
    real_write = os.write
    calls = 0

    def flaky_write(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", flaky_write)
    with pytest.raises(StorageError) as info:
        j.append([ent(2, detail="d" * 1000), ent(3)])
    assert info.value.code == "storage_error" and calls == 2
    monkeypatch.undo()
    assert j.segments()[0].read_bytes() == before
    j.append([ent(4)])
    assert [e.message_id for e in j.read()] == ["m1", "m4"]


def test_refused_write_eperm_is_storage_error_like_every_store_write(tmp_path: Path) -> None:
    """EPERM (an immutable journal directory) is a StorageError here as in fsio (one errno
    set for the whole store), naming the path and errno; the journal works once allowed."""
    directory = tmp_path / "journal"
    directory.mkdir()
    j = Journal(directory, fsync=False)
    with immutable(directory), pytest.raises(StorageError) as info:
        j.append([ent(1)])
    assert info.value.code == "storage_error"
    assert info.value.context["errno"] == errno.EPERM
    assert info.value.context["path"].startswith(str(directory))
    j.append([ent(1)])
    assert [e.message_id for e in j.read()] == ["m1"]


# -- issue 11: addressed entries (append_at, read_spans, read_at) and the new fields -------


def test_new_fields_round_trip_and_old_lines_stay_byte_identical(tmp_path: Path) -> None:
    """``receipt`` and ``count`` encode when set, and a line without them is unchanged."""
    at = datetime(2026, 11, 21, 21, 45, 25, 609732, tzinfo=UTC)
    old = JournalEntry(event="accepted", at=at, message_id="m1", agent="a", to=["b"])
    assert encode_entry(old) == (
        b'{"event":"accepted","at":"2026-11-21T21:45:25.609732Z","message_id":"m1",'
        b'"agent":"a","to":["b"]}'
    )
    new = JournalEntry(event="delivered", at=at, message_id="m1", agent="b", receipt="r-1", count=3)
    line = encode_entry(new)
    assert b'"receipt":"r-1"' in line and b'"count":3' in line
    assert decode_entry(line) == new


def test_append_at_gives_each_lines_start_and_length(tmp_path: Path) -> None:
    """Spans cover the segment exactly, line by line; read_at reads each entry back."""
    j = Journal(tmp_path / "journal")
    first = [ent(i, message=msgspec.Raw(b'{"n": %d}' % i)) for i in range(3)]
    second = [ent(i, "acked", agent="b", receipt=f"r{i}") for i in range(3, 5)]
    spans = j.append_at(first) + j.append_at(second)
    data = (tmp_path / "journal" / "000000000001.ndjson").read_bytes()
    offset = 0
    for (pos, length), entry in zip(spans, first + second, strict=True):
        assert pos == Position(1, offset)
        assert data[offset : offset + length] == encode_entry(entry) + b"\n"
        assert j.read_at(pos, length) == entry
        offset += length
    assert offset == len(data)
    assert [(p, n) for _, p, n in j.read_spans()] == spans
    assert [p for _, p, _ in j.read_spans(spans[2][0])] == [s[0] for s in spans[2:]]
    assert j.append_at([]) == []
    j.close()


def test_append_at_across_rotation_and_read_at_after_prune(tmp_path: Path) -> None:
    """A batch that rotates starts at offset 0 of the new segment; a pruned segment is
    NotFound, also through a descriptor read_at had cached; a wrong length is NotFound."""
    j = Journal(tmp_path / "journal", segment_bytes=200)
    big = msgspec.Raw(b'"' + b"x" * 150 + b'"')
    (a,) = j.append_at([ent(1, message=big)])
    (b,) = j.append_at([ent(2, message=big)])
    assert a[0] == Position(1, 0) and b[0] == Position(2, 0)
    assert j.read_at(*a).message_id == "m1"  # its descriptor is now cached
    pruned = j.prune(max_age_seconds=None, max_total_bytes=1)
    assert pruned == [tmp_path / "journal" / "000000000001.ndjson"]
    with pytest.raises(NotFound):
        j.read_at(*a)
    with pytest.raises(NotFound):
        j.read_at(b[0], b[1] + 1)  # past the end
    other = Journal(tmp_path / "journal")  # another reader whose segment is removed under it
    assert other.read_at(*b).message_id == "m2"
    j.close()
    other.close()


def test_read_at_a_wrong_position_is_invalid_not_another_entry(tmp_path: Path) -> None:
    """Bytes that are not one whole entry never decode as some entry."""
    j = Journal(tmp_path / "journal")
    ((pos, length),) = j.append_at([ent(1)])
    with pytest.raises((InvalidMessage, NotFound)):
        j.read_at(Position(1, 1), length - 1)
    with pytest.raises(ValueError):
        j.read_at(pos, 0)
    j.close()


def test_read_at_from_many_threads(tmp_path: Path) -> None:
    """read_at is thread-safe: concurrent readers of many segments always get their entry
    (the descriptor cache evicts while others read)."""
    j = Journal(tmp_path / "journal", segment_bytes=120)
    spans = [j.append_at([ent(i, detail="d" * 60)])[0] for i in range(80)]
    assert len(j.segments()) > 40  # more segments than read_at keeps descriptors for
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(400):
                i = rng.randrange(len(spans))
                assert j.read_at(*spans[i]).message_id == f"m{i}"
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    j.close()
