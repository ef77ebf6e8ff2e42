"""Tests of busd.routing.dedupe and the rule it states: message ids and idempotency keys
are two key spaces (ids match ids, keys match keys) at commit, at claim and in recovery."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from busd.config import load_config
from busd.routing.consumer import Consumer
from busd.routing.dedupe import DedupeIndex, KeySpaces
from busd.routing.offline import route_pending
from busd.routing.router import Router
from busd.store.journal import Journal
from busd.store.layout import init_bus, parse_delivery_name
from busd.store.mailbox import deliver
from conftest import Bus, message_bytes

pytestmark = pytest.mark.timeout(60)

# (message_id, idempotency_key) pairs, in the order they are published.
Pair = tuple[str, str | None]

_X_THEN_KEYED_Y: list[Pair] = [("x", None), ("y", "x")]
_KEYED_Y_THEN_X: list[Pair] = [("y", "x"), ("x", None)]


def _drop(bus: Bus, n: int, mid: str, key: str | None) -> Path:
    directory = bus.layout.outbox_dir("alice")
    directory.mkdir(exist_ok=True)
    path = directory / f"{n:04d}.json"
    path.write_bytes(message_bytes(mid, idempotency_key=key))
    return path


def _inbox_ids(bus: Bus, agent: str = "bob") -> list[str]:
    directory = bus.layout.inbox_dir(agent)
    names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    ids = []
    for name in names:
        parsed = parse_delivery_name(name)
        assert parsed is not None, name
        ids.append(parsed.message_id)
    return ids


def _events(bus: Bus) -> list[tuple[str, str | None]]:
    with Journal(bus.layout.journal) as journal:
        return [(e.event, e.message_id) for e in journal.read()]


def _expected(pairs: Sequence[Pair]) -> list[bool]:
    """The rule, written out plainly: which of ``pairs`` are accepted."""
    ids: set[str] = set()
    keys: set[str] = set()
    out = []
    for mid, key in pairs:
        duplicate = mid in ids or (key is not None and key in keys)
        out.append(not duplicate)
        if not duplicate:
            ids.add(mid)
            if key is not None:
                keys.add(key)
    return out


@pytest.mark.parametrize("pairs", [_X_THEN_KEYED_Y, _KEYED_Y_THEN_X], ids=["id-first", "key-first"])
@pytest.mark.parametrize("batching", ["one batch", "two batches", "restart between"])
def test_a_key_equal_to_another_messages_id_makes_neither_a_duplicate(
    bus: Bus, pairs: list[Pair], batching: str
) -> None:
    """{"message_id": "y", "idempotency_key": "x"} and {"message_id": "x"}, in either order,
    in one group commit, in two, or with a restart (index rebuilt from the journal) between:
    both accepted and delivered. Before, one set held ids and keys: the second was a duplicate."""
    paths = [_drop(bus, n, mid, key) for n, (mid, key) in enumerate(pairs)]
    if batching == "one batch":
        with Router(bus.config) as router:
            report = router.route(paths)
        assert (report.accepted, report.duplicates) == (2, 0)
    else:
        with Router(bus.config) as router:
            first = router.route(paths[:1])
            if batching == "two batches":
                second = router.route(paths[1:])
        if batching == "restart between":
            with Router(bus.config) as router:
                assert len(router.dedupe) == (1 if pairs[0][1] is None else 2)  # rebuilt
                second = router.route(paths[1:])
        assert (first.accepted + second.accepted, second.duplicates) == (2, 0)
    assert sorted(_inbox_ids(bus)) == ["x", "y"]
    assert _events(bus) == [("accepted", pairs[0][0]), ("accepted", pairs[1][0])]


@pytest.mark.parametrize("restart", [False, True])
def test_each_key_space_still_catches_its_own_duplicates(bus: Bus, restart: bool) -> None:
    """Within each space nothing changed: a retry under a new id with the same key, and a
    reused id (ids are unique: even under a new key, or none), are duplicates, in the same
    router or after a restart (the index rebuilt from the journal)."""
    later = [("m-2", "k"), ("m-1", "k-other"), ("m-1", None)]
    router = Router(bus.config)
    try:
        assert router.route([_drop(bus, 0, "m-1", "k")]).accepted == 1
        if restart:
            router.close()
            router = Router(bus.config)
        for n, (mid, key) in enumerate(later, start=1):
            report = router.route([_drop(bus, n, mid, key)])
            assert (report.accepted, report.duplicates) == (0, 1), (mid, key)
    finally:
        router.close()
    assert _inbox_ids(bus) == ["m-1"]


def test_the_index_rule_expiry_and_rebuild(tmp_path: Path) -> None:
    """find() looks ids up among ids and keys among keys; expire() ages both; rebuild() reads
    both back from the journal's accepted lines, skipping those older than the window."""
    index = DedupeIndex(window_s=10)
    index.add("x", None, "alice/a.json", at=100.0)
    index.add("y", "k", None, at=105.0)
    assert len(index) == 3
    assert index.find("q", "x") is None and index.find("k", None) is None
    assert index.find("x", "new") == ("x", "alice/a.json", 100.0)
    assert index.find("z", "k") == ("y", None, 105.0)
    assert index.has_id("x") and not index.has_key("x") and index.has_key("k")
    assert index.expire(now=112.0) == 1  # x: older than 10 s
    assert index.find("x", None) is None and index.find("y", None) is not None
    assert index.expire(now=200.0) == 2 and len(index) == 0

    bus = init_bus(tmp_path / "bus")
    config = load_config(root=str(bus.root), env={})
    layout = config.layout
    (layout.outbox_dir("alice")).mkdir(exist_ok=True)
    (layout.outbox_dir("alice") / "a.json").write_bytes(message_bytes("y", idempotency_key="x"))
    with Router(config) as router:
        router.route_all()
    with Journal(layout.journal) as journal:
        rebuilt = DedupeIndex.rebuild(journal, 3600)
        assert rebuilt.has_id("y") and rebuilt.has_key("x") and not rebuilt.has_id("x")
        assert rebuilt.find("y", None) is not None and rebuilt.find("x", None) is None
        assert len(DedupeIndex.rebuild(journal, 3600, now=4e9)) == 0  # past the window


_ids = st.sampled_from(["a", "b", "c"])
_pairs = st.lists(st.tuples(_ids, st.none() | _ids), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(pairs=_pairs, cut=st.integers(min_value=0, max_value=8))
def test_property_the_router_follows_the_rule(pairs: list[Pair], cut: int) -> None:
    """Any sequence of ids and keys drawn from one small alphabet (so keys collide with ids
    often), split into two group commits anywhere: exactly the messages the rule accepts are
    journaled `accepted` and delivered, in order."""
    want = [mid for (mid, _), ok in zip(pairs, _expected(pairs), strict=True) if ok]
    with tempfile.TemporaryDirectory() as tmp:
        layout = init_bus(Path(tmp) / "bus")
        bus = Bus(layout.root, layout, load_config(root=str(layout.root), env={}))
        paths = [_drop(bus, n, mid, key) for n, (mid, key) in enumerate(pairs)]
        with Router(bus.config) as router:
            router.route(paths[:cut])
            router.route(paths[cut:])
        assert [mid for event, mid in _events(bus) if event == "accepted"] == want
        assert _inbox_ids(bus) == want


def test_key_spaces_for_one_batch() -> None:
    """KeySpaces: the same rule without times, for the messages of one batch."""
    seen = KeySpaces()
    seen.add("x", None)
    assert not seen.seen("y", "x") and seen.seen("x", "other") and not seen.seen("z", None)
    seen.add("y", "k")
    assert seen.seen("q", "k") and not seen.seen("k", None)


@pytest.mark.parametrize(
    ("acked", "later"),
    [(("x", None), ("y", "x")), (("y", "x"), ("x", None))],
    ids=["id-acked", "key-acked"],
)
def test_claim_guard_matches_ids_with_ids_and_keys_with_keys(
    bus: Bus, acked: Pair, later: Pair
) -> None:
    """Once one of the two messages is acked, the other is still handed out at claim time.
    Before, the ledger's one set made the claim guard drop it silently as processed."""
    consumer = Consumer(bus.config, "bob")
    deliver(bus.layout, "bob", message_bytes(acked[0], idempotency_key=acked[1]), acked[0])
    [claim] = consumer.claim()
    assert consumer.ack([claim.message.message_id]) == 1
    deliver(bus.layout, "bob", message_bytes(later[0], idempotency_key=later[1]), later[0])
    assert [c.message.message_id for c in consumer.claim(5)] == [later[0]]
    record = json.loads(bus.layout.ledger("bob").read_bytes())
    assert (record["message_id"], record["idempotency_key"]) == acked


def test_recovery_redelivers_a_message_whose_key_is_another_acked_messages_id(bus: Bus) -> None:
    """x is acked; y (key "x") is journaled but its inbox file was lost (a power cut).
    route_pending must deliver y again: its key is not an acked *key*. Before, recovery's
    holdings read the ledger's one set, took y for acked, and y was lost."""
    with Router(bus.config) as router:
        router.route([_drop(bus, 0, "x", None)])
    consumer = Consumer(bus.config, "bob")
    assert consumer.ack([c.message.message_id for c in consumer.claim()]) == 1
    with Router(bus.config) as router:
        assert router.route([_drop(bus, 1, "y", "x")]).accepted == 1
    (lost,) = bus.layout.inbox_dir("bob").iterdir()
    lost.unlink()
    assert route_pending(bus.config) is not None
    assert _inbox_ids(bus) == ["y"]
