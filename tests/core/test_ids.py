"""Tests of busd.ids: message id format, uniqueness (threads, processes, fork), arrival keys."""

from __future__ import annotations

import calendar
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from itertools import pairwise
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from busd.core.ids import ArrivalClock, IdGenerator, new_message_id, pid_field

ID_RE = re.compile(r"^MSG-\d{8}-\d{6}-\d{9}-PID[0-9A-Z]{5}-\d{4}$")
WRITER = Path(__file__).with_name("_id_writer.py")
# 2024-05-01T12:00:00Z plus 123456789 ns: an arbitrary, fixed instant.
FROZEN_NS = 1_714_564_800_123_456_789
PID_MAX_LINUX = 2**22


def frozen(ns: int = FROZEN_NS) -> Callable[[], int]:
    """A clock that never moves."""
    return lambda: ns


def scripted(values: Iterable[int]) -> Callable[[], int]:
    """A clock returning ``values`` in order, then repeating the last one forever."""
    it = iter(values)
    last = [0]

    def clock() -> int:
        last[0] = next(it, last[0])
        return last[0]

    return clock


def id_ns(message_id: str) -> int:
    """The instant (ns since the epoch) encoded in an id's date, time and nanosecond fields."""
    _, date, hms, frac, _, _ = message_id.split("-")
    secs = calendar.timegm(
        (int(date[:4]), int(date[4:6]), int(date[6:]), int(hms[:2]), int(hms[2:4]), int(hms[4:]))
    )
    return secs * 1_000_000_000 + int(frac)


def id_pid(message_id: str) -> str:
    """The five-character process field of an id."""
    return message_id.split("-")[4].removeprefix("PID")


def assert_strictly_increasing(ids: list[str]) -> None:
    """Each id sorts strictly after the one before it (so all are distinct)."""
    for a, b in pairwise(ids):
        assert a < b, (a, b)


def test_new_message_id_matches_the_seed_format() -> None:
    """The process-wide generator's ids match the seed format and carry this pid."""
    ids = [new_message_id() for _ in range(50)]
    for mid in ids:
        assert ID_RE.match(mid), mid
        assert id_pid(mid) == pid_field(os.getpid())


def test_id_encodes_the_clock_it_was_made_at() -> None:
    """A fresh generator's first id decodes to an instant between the clock reads around it."""
    gen = IdGenerator()
    before = time.time_ns()
    mid = gen.next()
    after = time.time_ns()
    assert before <= id_ns(mid) <= after


def test_frozen_clock_id_fields_are_exact() -> None:
    """With a frozen clock and pid every field is known: date, time, ns, pid, counter."""
    gen = IdGenerator(clock=frozen(), pid=4242)
    assert gen.next() == "MSG-20240501-120000-123456789-PID04242-0000"
    assert gen.next() == "MSG-20240501-120000-123456789-PID04242-0001"


def test_thousand_ids_in_one_process_are_unique_and_sorted_by_time() -> None:
    """1000 ids from the real clock are distinct, sort in creation order, and times never drop."""
    gen = IdGenerator()
    ids = [gen.next() for _ in range(1000)]
    assert all(ID_RE.match(m) for m in ids)
    assert_strictly_increasing(ids)
    assert sorted(ids) == ids
    times = [id_ns(m) for m in ids]
    assert times == sorted(times)


def test_ten_processes_make_ten_thousand_distinct_ids() -> None:
    """10 processes x 1000 ids: all 10,000 distinct, each process's own pid field in its ids."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(WRITER), "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(10)
    ]
    all_ids: list[str] = []
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
        lines = out.decode().splitlines()
        assert lines[0] == f"pid {proc.pid}"
        ids = lines[1:]
        assert len(ids) == 1000
        assert all(ID_RE.match(m) for m in ids)
        assert {id_pid(m) for m in ids} == {pid_field(proc.pid)}
        assert_strictly_increasing(ids)
        all_ids.extend(ids)
    assert len(set(all_ids)) == 10_000


def test_pids_equal_modulo_100000_give_disjoint_ids_with_the_same_clock() -> None:
    """pid 5 and pid 100005 on the same frozen clock never produce the same id."""
    a = IdGenerator(clock=frozen(), pid=5)
    b = IdGenerator(clock=frozen(), pid=100_005)
    ids_a = {a.next() for _ in range(1000)}
    ids_b = {b.next() for _ in range(1000)}
    assert len(ids_a) == len(ids_b) == 1000
    assert ids_a.isdisjoint(ids_b)
    assert pid_field(5) == "00005"
    assert pid_field(100_005) != "00005"


def test_pid_field_is_injective_over_every_linux_pid() -> None:
    """pid_field strictly increases (never repeats) over range(0, 2**22); decimal below 100000."""
    for pid in range(100_000):
        assert pid_field(pid) == f"{pid:05d}"
    # Strictly increasing over the whole range implies injective; one pass, no set of 4M strings.
    assert all(a < b for a, b in pairwise(map(pid_field, range(PID_MAX_LINUX))))
    # Sorted after "99999" and no later than the last field, every field >= 100000 starts with
    # a letter, so no decimal field can equal it.
    assert pid_field(100_000)[0].isalpha()
    assert pid_field(PID_MAX_LINUX - 1)[0] <= "Z"


@given(st.integers(min_value=0, max_value=PID_MAX_LINUX - 1))
def test_pid_field_charset(pid: int) -> None:
    """Every pid Linux can hand out gives five characters of [0-9A-Z], digits only below 100000."""
    field = pid_field(pid)
    assert re.fullmatch(r"[0-9A-Z]{5}", field)
    assert field.isdigit() == (pid < 100_000)


def test_counter_wrap_within_one_tick_stays_unique_and_increasing() -> None:
    """25,000 ids on a frozen clock wrap the 4-digit counter twice and stay strictly increasing."""
    gen = IdGenerator(clock=frozen(), pid=7)
    ids = [gen.next() for _ in range(25_000)]
    assert all(ID_RE.match(m) for m in ids)
    assert_strictly_increasing(ids)
    # The tick advanced one nanosecond at each wrap: three distinct instants.
    assert sorted({id_ns(m) for m in ids}) == [FROZEN_NS, FROZEN_NS + 1, FROZEN_NS + 2]
    assert ids[10_000].endswith("-0000")


def test_counter_wrap_across_a_second_boundary() -> None:
    """A wrap at nanosecond 999999999 carries into the next second and still sorts after."""
    last_ns_of_second = 1_714_564_800_999_999_999
    gen = IdGenerator(clock=frozen(last_ns_of_second), pid=7)
    ids = [gen.next() for _ in range(10_001)]
    assert ids[9_999] == "MSG-20240501-120000-999999999-PID00007-9999"
    assert ids[10_000] == "MSG-20240501-120001-000000000-PID00007-0000"
    assert_strictly_increasing(ids)


def test_clock_stepping_backwards_keeps_ids_unique_and_increasing() -> None:
    """A clock that jumps back (NTP step) never makes an id repeat or sort earlier."""
    second = 1_000_000_000
    steps = [FROZEN_NS, FROZEN_NS - 3600 * second, FROZEN_NS - 1, FROZEN_NS, FROZEN_NS + 5]
    steps += [FROZEN_NS - 1] * 30 + [FROZEN_NS + 10 * second, FROZEN_NS]
    gen = IdGenerator(clock=scripted(steps), pid=9)
    ids = [gen.next() for _ in range(len(steps) + 10)]
    assert len(set(ids)) == len(ids)
    assert_strictly_increasing(ids)
    assert id_ns(ids[-1]) == FROZEN_NS + 10 * second


def test_one_generator_shared_by_threads_never_repeats() -> None:
    """4 threads x 2500 ids from one frozen-clock generator: 10,000 distinct ids."""
    gen = IdGenerator(clock=frozen(), pid=11)
    results: list[list[str]] = [[] for _ in range(4)]

    def work(out: list[str]) -> None:
        out.extend(gen.next() for _ in range(2500))

    threads = [threading.Thread(target=work, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    merged = [m for r in results for m in r]
    assert len(merged) == 10_000
    assert len(set(merged)) == 10_000
    for r in results:
        assert_strictly_increasing(r)


def test_forked_child_ids_carry_the_childs_pid_field() -> None:
    """After os.fork the child's new_message_id() uses the child's pid, not the parent's."""
    before = new_message_id()  # the parent's generator has state the child inherits
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            data = "\n".join(new_message_id() for _ in range(200)).encode()
            while data:
                data = data[os.write(w, data) :]
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while chunk := f.read():
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child_ids = b"".join(chunks).decode().split("\n")
    assert len(child_ids) == 200
    assert {id_pid(m) for m in child_ids} == {pid_field(pid)}
    assert pid_field(pid) != pid_field(os.getpid())
    parent_ids = [before] + [new_message_id() for _ in range(200)]
    assert {id_pid(m) for m in parent_ids} == {pid_field(os.getpid())}
    assert set(child_ids).isdisjoint(parent_ids)


def test_arrival_clock_is_strictly_increasing_when_the_clock_goes_back() -> None:
    """ArrivalClock keys are 20 digits and strictly increase even as the clock steps back."""
    steps = [500, 400, 400, 1000, 999, 1, 0, 2000] + [1500] * 20
    clock = ArrivalClock(scripted(steps))
    keys = [clock.next() for _ in range(len(steps))]
    assert all(re.fullmatch(r"\d{20}", k) for k in keys)
    assert_strictly_increasing(keys)
    values = [int(k) for k in keys]
    assert values[:5] == [500, 501, 502, 1000, 1001]
    assert values[7] == 2000


def test_arrival_clock_real_clock_threads() -> None:
    """Keys from 4 threads sharing one ArrivalClock are all distinct and near the real time."""
    clock = ArrivalClock()
    before = time.time_ns()
    results: list[list[str]] = [[] for _ in range(4)]

    def work(out: list[str]) -> None:
        out.extend(clock.next() for _ in range(2000))

    threads = [threading.Thread(target=work, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    merged = [k for r in results for k in r]
    assert len(set(merged)) == 8000
    for r in results:
        assert_strictly_increasing(r)
    assert min(int(k) for k in merged) >= before
