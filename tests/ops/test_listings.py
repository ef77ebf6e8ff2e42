"""Listings: mailbox summaries, reused only while their directory has not changed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _rpc import Rpc
from busd.ops.listings import SETTLE_S, Listings, Mailbox, Waiting, listed, mailbox, outbox_of
from busd.store.layout import delivery_name, init_bus
from daemon_harness import Daemon, drop, message, wait_for

pytestmark = pytest.mark.timeout(60)


class Counting:
    """``mailbox``, counting how often it had to list."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, names: list[str]) -> Mailbox:
        self.calls += 1
        return mailbox(names)


def _fill(directory: Path, n: int, *, start: int = 0) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    base = 1_700_000_000 * 10**9
    for i in range(start, start + n):
        (directory / delivery_name(f"{base + i:020d}", i % 2, f"m-{i}")).write_bytes(b"{}")


def _age(directory: Path, seconds: float) -> None:
    """Set ``directory``'s mtime ``seconds`` into the past, as if it changed then."""
    t = time.time() - seconds
    os.utime(directory, (t, t))


def test_a_settled_directory_is_listed_once_until_it_changes(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    _fill(inbox, 10)
    _age(inbox, SETTLE_S + 5)
    listings, counting = Listings(), Counting()
    assert listings.get(inbox, counting).total == 10
    assert listings.get(inbox, counting).total == 10
    assert counting.calls == 1
    _fill(inbox, 1, start=10)  # a new entry moves the directory's mtime
    assert listings.get(inbox, counting).total == 11
    (inbox / sorted(listed(inbox))[0]).rename(tmp_path / "claimed")
    assert listings.get(inbox, counting).total == 10
    assert counting.calls == 3


def test_a_listing_taken_close_to_a_change_is_not_reused(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    _fill(inbox, 3)
    _age(inbox, SETTLE_S / 4)
    changed_at = os.stat(inbox).st_mtime_ns
    listings, counting = Listings(), Counting()
    assert listings.get(inbox, counting).total == 3
    # A change in the same timestamp tick leaves the mtime where it was.
    _fill(inbox, 1, start=3)
    os.utime(inbox, ns=(changed_at, changed_at))
    assert listings.get(inbox, counting).total == 4
    assert counting.calls == 2


def test_a_missing_directory_is_empty_and_its_creation_is_seen(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    listings = Listings()
    assert listings.get(inbox, mailbox) == Mailbox(0, 0, None, None)
    _fill(inbox, 2)
    _age(inbox, SETTLE_S + 5)
    assert listings.get(inbox, mailbox).total == 2
    for name in listed(inbox):
        (inbox / name).unlink()
    inbox.rmdir()
    assert listings.get(inbox, mailbox).total == 0


_NAMES = st.lists(
    st.one_of(
        st.builds(
            lambda key, count, mid: delivery_name(f"{key:020d}", count, mid),
            st.integers(0, 10**19),
            st.integers(0, 999),
            st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True),
        ),
        st.text(min_size=1, max_size=40).filter(lambda s: "/" not in s and "\n" not in s),
    ),
    max_size=40,
)


@given(_NAMES)
def test_mailbox_agrees_with_a_plain_reading_of_the_names(names: list[str]) -> None:
    def is_delivery(n: str) -> bool:
        head, _, rest = n.partition("-")
        return len(head) == 20 and head.isdigit() and rest[3:4] == "-" and len(rest) > 4

    deliveries = sorted(n for n in names if is_delivery(n))
    got = mailbox(names)
    assert got.total == len(names)
    assert got.redelivered == sum(1 for n in deliveries if n[21:24] != "000")
    assert got.oldest == (deliveries[0] if deliveries else None)
    assert got.newest == (deliveries[-1] if deliveries else None)


def test_the_daemon_status_follows_a_file_consumer_through_its_kept_listings(
    tmp_path: Path,
) -> None:
    root = init_bus(tmp_path / "bus").root
    inbox, locks = root / "inbox" / "bob", root / "locks" / "bob"
    for i in range(5):
        drop(root, message(i), f"{i}.json")
    daemon = Daemon(root).ready()
    try:
        wait_for(lambda: len(listed(inbox)) == 5, what="five inbox files")
        with Rpc(root / "busd.sock") as rpc:

            def bob() -> tuple[int, int]:
                agent = rpc.call("status", {})["result"]["agents"]["bob"]
                return agent["ready"], agent["in_flight"]

            locks.mkdir(mode=0o700, exist_ok=True)
            for d in (inbox, locks):
                _age(d, SETTLE_S + 5)  # settled: the daemon keeps these listings now
            assert bob() == (5, 0)
            assert bob() == (5, 0)
            # A consumer without the daemon claims one as protocol.md says: by a rename.
            name = sorted(listed(inbox))[0]
            os.rename(inbox / name, locks / name)
            assert bob() == (4, 1)
    finally:
        daemon.stop()


def test_an_outbox_stats_only_the_names_it_has_not_seen(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    for i, age in enumerate((300, 200, 100)):
        (outbox / f"f{i}.json").write_bytes(b"{}")
        t = time.time() - age
        os.utime(outbox / f"f{i}.json", (t, t))
    listings = Listings()
    first = listings.waiting(outbox)
    assert first.total == 3 and first.oldest_mtime is not None
    assert abs(first.oldest_mtime - (time.time() - 300)) < 5
    # A name seen before keeps the mtime it had (outbox files are renamed in whole and
    # left alone): touching one is not seen, a new name and a routed one are.
    os.utime(outbox / "f1.json", (1.0, 1.0))
    (outbox / "f0.json").unlink()
    (outbox / "new.json").write_bytes(b"{}")
    second = listings.waiting(outbox)
    assert second.total == 3 and second.oldest_mtime is not None
    assert abs(second.oldest_mtime - (time.time() - 200)) < 5
    # Without a kept listing every name is stat'ed.
    assert outbox_of(outbox, listed(outbox)).oldest_mtime == 1.0
    for name in listed(outbox):
        (outbox / name).unlink()
    assert listings.waiting(outbox) == Waiting(0, None)
