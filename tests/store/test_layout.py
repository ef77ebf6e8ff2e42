"""Tests of busd.layout: init_bus, the delivery-name grammar, Layout paths and agents()."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from busd.store import fsio
from busd.store.layout import (
    DIR_MODE,
    Layout,
    delivery_name,
    ensure_dir,
    init_bus,
    outbox_name,
    parse_delivery_name,
)

SUBDIRS = ("tmp", "outbox", "inbox", "locks", "processed", "dlq", "journal")
message_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True)
arrivals = st.integers(min_value=0, max_value=10**20 - 1).map(lambda n: f"{n:020d}")


def mode(path: Path) -> int:
    """Permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


def test_init_bus_creates_every_directory_0700(tmp_path: Path) -> None:
    """The root and each top-level directory exist with mode 0700 (even with a lax umask)."""
    old = os.umask(0o000)
    try:
        layout = init_bus(tmp_path / "deep" / "bus")
    finally:
        os.umask(old)
    assert layout.root == tmp_path / "deep" / "bus"
    assert mode(layout.root) == DIR_MODE == 0o700
    for sub in SUBDIRS:
        assert (layout.root / sub).is_dir(), sub
        assert mode(layout.root / sub) == 0o700, sub
    assert sorted(os.listdir(layout.root)) == sorted(SUBDIRS)
    assert layout.is_initialized()


def test_init_bus_is_idempotent_and_keeps_content(tmp_path: Path) -> None:
    """A second init_bus succeeds, returns the same layout and leaves existing files alone."""
    first = init_bus(tmp_path / "bus")
    (first.inbox / "bob").mkdir()
    (first.inbox / "bob" / "keep.json").write_bytes(b"{}")
    (first.journal / "000000000001.ndjson").write_bytes(b"line\n")
    second = init_bus(tmp_path / "bus")
    assert second == first
    assert (first.inbox / "bob" / "keep.json").read_bytes() == b"{}"
    assert (first.journal / "000000000001.ndjson").read_bytes() == b"line\n"
    assert mode(first.root / "dlq") == 0o700


def test_init_bus_completes_a_partial_layout(tmp_path: Path) -> None:
    """A root missing some directories is not initialised; init_bus adds only what is missing."""
    root = tmp_path / "bus"
    root.mkdir()
    (root / "inbox").mkdir(mode=0o755)
    assert not Layout(root).is_initialized()
    layout = init_bus(root)
    assert layout.is_initialized()
    assert mode(root / "outbox") == 0o700
    (root / "dlq").rmdir()
    assert not layout.is_initialized()


def test_init_bus_makes_a_relative_root_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative root is resolved against the current directory."""
    monkeypatch.chdir(tmp_path)
    layout = init_bus(Path("rel"))
    assert layout.root.is_absolute()
    assert layout.root == tmp_path / "rel"


def test_init_bus_over_a_file_fails(tmp_path: Path) -> None:
    """A root that is a regular file is refused, not silently replaced."""
    (tmp_path / "bus").write_bytes(b"not a dir")
    with pytest.raises(FileExistsError):
        init_bus(tmp_path / "bus")
    assert (tmp_path / "bus").read_bytes() == b"not a dir"


def _top_dir_flag(path: Path) -> bool:
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, fsio._FS_IOC_GETFLAGS, buf)
    finally:
        os.close(fd)
    return bool(int.from_bytes(buf[:4], sys.byteorder) & fsio._FS_TOPDIR_FL)


def test_init_bus_marks_the_root_top_of_hierarchy(tmp_path: Path) -> None:
    """On ext4 the root gets the T attribute before its subdirectories are made."""
    probe = tmp_path / "probe"
    probe.mkdir()
    if not fsio.mark_top_dir(probe):
        pytest.skip("this filesystem has no top-of-hierarchy attribute (not ext2/3/4)")
    assert _top_dir_flag(probe)
    root = init_bus(tmp_path / "bus").root
    assert _top_dir_flag(root)
    assert fsio.mark_top_dir(root)  # idempotent


def test_mark_top_dir_is_only_a_hint(tmp_path: Path) -> None:
    """Where the flag cannot be set (a file, a missing path, tmpfs), it says False, no error."""
    (tmp_path / "file").write_text("x")
    assert fsio.mark_top_dir(tmp_path / "file") is False
    assert fsio.mark_top_dir(tmp_path / "missing") is False
    if Path("/dev/shm").is_dir():
        shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
        try:
            assert fsio.mark_top_dir(shm) is False
        finally:
            shm.rmdir()


def test_ensure_dir_reports_creation(tmp_path: Path) -> None:
    """ensure_dir returns True once, then False, and the directory is 0700."""
    assert ensure_dir(tmp_path / "d") is True
    assert ensure_dir(tmp_path / "d") is False
    assert mode(tmp_path / "d") == 0o700
    with pytest.raises(FileNotFoundError):
        ensure_dir(tmp_path / "no" / "parent")


def test_layout_paths() -> None:
    """Layout is pure and names every path of the documented layout."""
    layout = Layout(Path("/nonexistent/bus"))
    r = Path("/nonexistent/bus")
    assert layout.inbox_dir("bob") == r / "inbox" / "bob"
    assert layout.outbox_dir("alice") == r / "outbox" / "alice"
    assert layout.locks_dir("bob") == r / "locks" / "bob"
    assert layout.ledger("bob") == r / "processed" / "bob.jsonl"
    assert layout.lock_file == r / "busd.lock"
    assert (layout.tmp, layout.dlq, layout.journal) == (r / "tmp", r / "dlq", r / "journal")
    assert not layout.is_initialized()
    assert not r.exists()


def test_layout_names_every_file_of_the_protocol() -> None:
    """Every file name of protocol.md section 2 (and the socket files) comes from Layout."""
    r = Path("/nonexistent/bus")
    layout = Layout(r)
    assert layout.config_file == r / "busd.toml"
    assert layout.bus_lock == layout.lock_file == r / "busd.lock"
    assert layout.socket == r / "busd.sock"
    assert layout.socket_path_file == r / "busd.sock.path"
    assert layout.subscriptions_file == r / "subscriptions.json"
    assert layout.checkpoint_file == r / "journal" / "checkpoint"
    assert layout.journal_lock == r / "journal" / ".lock"
    assert layout.dlq_lock == r / "dlq" / ".lock"
    assert layout.dlq_replayed == r / "dlq" / "replayed"
    assert layout.ledger_lock("bob") == r / "processed" / ".bob.lock"
    assert not r.exists()


@given(arrivals, st.integers(min_value=0, max_value=999), message_ids)
def test_delivery_name_round_trip(arrival: str, deliveries: int, message_id: str) -> None:
    """Every valid (arrival, count, id) formats to a name that parses back to the same parts."""
    name = delivery_name(arrival, deliveries, message_id)
    assert len(name) == 20 + 1 + 3 + 1 + len(message_id) + len(".json")
    parsed = parse_delivery_name(name)
    assert parsed is not None
    assert parsed == (arrival, deliveries, message_id)
    assert (parsed.arrival, parsed.deliveries, parsed.message_id) == (
        arrival,
        deliveries,
        message_id,
    )


@given(st.lists(st.tuples(arrivals, st.integers(0, 999), message_ids), min_size=2, max_size=20))
def test_delivery_names_sort_by_arrival(parts: list[tuple[str, int, str]]) -> None:
    """Listing order of delivery names is arrival order (fixed-width prefix)."""
    names = [delivery_name(*p) for p in parts]
    by_name = [parse_delivery_name(n) for n in sorted(names)]
    arrivals_in_order = [p.arrival for p in by_name if p is not None]
    assert arrivals_in_order == sorted(a for a, _, _ in parts)


def test_delivery_count_is_capped_at_999() -> None:
    """Counts above 999 keep the 3-digit width (capped), so the name still parses."""
    name = delivery_name("0" * 20, 1234, "m")
    assert name == "00000000000000000000-999-m.json"
    assert parse_delivery_name(name) == ("0" * 20, 999, "m")


@pytest.mark.parametrize(
    "name",
    [
        "m-1.json",
        "message.md",
        "",
        ".00000000000000000001-000-m.json",
        "0000000000000000001-000-m.json",  # 19-digit arrival
        "000000000000000000001-000-m.json",  # 21-digit arrival
        "00000000000000000001-00-m.json",  # 2-digit count
        "00000000000000000001-0000-m.json",  # 4-digit count
        "00000000000000000001-000-.json",  # empty id
        "00000000000000000001-000-.m.json",  # id starting with '.'
        "00000000000000000001-000-m.json.tmp",
        "00000000000000000001-000-m.JSON",
        "00000000000000000001-000-m",
        "00000000000000000001-000-m/x.json",
        "00000000000000000001-000-m x.json",
        "00000000000000000001-000-" + "a" * 129 + ".json",  # id over 128 characters
        "0000000000000000000a-000-m.json",
        "00000000000000000001_000_m.json",
    ],
)
def test_foreign_names_parse_to_none(name: str) -> None:
    """Names outside the grammar are foreign: parse_delivery_name returns None."""
    assert parse_delivery_name(name) is None


def test_a_trailing_newline_makes_a_name_foreign() -> None:
    """'<valid delivery name>\\n' (a legal Linux file name) is foreign, not a delivery name."""
    assert parse_delivery_name("00000000000000000001-000-m.json\n") is None


def test_non_ascii_digits_make_a_name_foreign() -> None:
    """Arrival keys and counts are ASCII digits only; other Unicode digits make a name foreign."""
    arabic = "".join(chr(0x660 + i % 10) for i in range(20))
    assert parse_delivery_name(f"{arabic}-000-m.json") is None
    assert parse_delivery_name("00000000000000000001-\u0661\u0662\u0663-m.json") is None


@given(st.text(alphabet=st.characters(max_codepoint=127, exclude_characters="\n"), max_size=200))
@example("00000000000000000001-000-a.b-c_d.json")
@example("00000000000000000001-000-m.json.json")
def test_parse_is_exact(name: str) -> None:
    """Whenever a name parses, formatting its parts gives back exactly that name."""
    parsed = parse_delivery_name(name)
    if parsed is not None:
        assert delivery_name(*parsed) == name


def test_outbox_name_is_foreign_to_the_delivery_grammar() -> None:
    """busd's own outbox names (<arrival>-<id>.json) never parse as delivery names."""
    assert outbox_name("0" * 20, "m-1") == "00000000000000000000-m-1.json"
    assert parse_delivery_name(outbox_name("0" * 20, "m-1")) is None


def test_agents_lists_inbox_outbox_and_locks_dirs(tmp_path: Path) -> None:
    """agents() is the sorted union of directories in inbox/, outbox/, locks/, no files or dots."""
    layout = init_bus(tmp_path / "bus")
    assert layout.agents() == []
    (layout.inbox / "bob").mkdir()
    (layout.outbox / "alice").mkdir()
    (layout.locks / "carol").mkdir()
    (layout.inbox / "alice").mkdir()
    (layout.inbox / ".hidden").mkdir()
    (layout.inbox / "stray-file.json").write_bytes(b"{}")
    (layout.outbox / "x.json").write_bytes(b"{}")
    (layout.dlq / "dave").mkdir()  # not an agent directory
    (layout.processed / "erin.jsonl").write_bytes(b"")
    assert layout.agents() == ["alice", "bob", "carol"]


def test_agents_of_a_missing_root_is_empty(tmp_path: Path) -> None:
    """A layout whose directories do not exist lists no agents instead of raising."""
    assert Layout(tmp_path / "nothing").agents() == []
