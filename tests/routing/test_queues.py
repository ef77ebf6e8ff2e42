"""Tests of busd.routing.queues: the in-memory queues and the journal fold (replay)."""

from __future__ import annotations

import gc
import itertools
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busd.errors import NotFound, StaleReceipt
from busd.routing.fold import Pending, acked_entry, delivered_entry, replay
from busd.routing.queues import Delivery, Queues, Ref
from busd.store.journal import JournalEntry, Position, Span
from busd.store.layout import parse_delivery_name

pytestmark = pytest.mark.timeout(60)

AT = datetime(2026, 12, 1, tzinfo=UTC)
_arrivals = itertools.count(10**19)


def ref(i: int, *, key: str | None = None) -> Ref:
    """The ref of message ``m<i>`` whose accepted line starts at offset ``100 * i``."""
    return Ref(f"m{i}", key, Position(1, 100 * i), 100)


def receipt(r: Ref, count: int) -> str:
    """A receipt in the delivery-name grammar, with a fresh arrival key each time."""
    return f"{next(_arrivals):020d}-{count:03d}-{r.message_id}"


def claim(
    q: Queues, agent: str, n: int, *, now: float = 0.0, lease_s: float = 30.0, limit: int = 5
) -> tuple[list[Delivery], list[tuple[Ref, int]]]:
    """``Queues.claim`` with this file's receipts."""
    return q.claim(agent, n, now=now, lease_s=lease_s, max_deliveries=limit, new_receipt=receipt)


def ids(deliveries: list[Delivery]) -> list[str]:
    """The message ids of ``deliveries``."""
    return [d.ref.message_id for d in deliveries]


def test_claims_in_arrival_order_with_counts_and_receipts() -> None:
    """Refs are handed out oldest first; each delivery has a parseable receipt and count 1."""
    q = Queues()
    for i in range(5):
        q.add("bob", ref(i))
    first, exhausted = claim(q, "bob", 2, now=100.0, lease_s=30.0)
    assert ids(first) == ["m0", "m1"] and exhausted == []
    assert [d.count for d in first] == [1, 1] and first[0].lease_until == 130.0
    parsed = parse_delivery_name(first[0].receipt + ".json")
    assert parsed is not None and parsed.message_id == "m0" and parsed.deliveries == 1
    assert ids(claim(q, "bob", 10)[0]) == ["m2", "m3", "m4"]
    assert claim(q, "bob", 1)[0] == [] and claim(q, "nobody", 1) == ([], [])
    assert (q.ready("bob"), q.in_flight("bob"), q.agents()) == (0, 5, ["bob"])


def test_add_is_idempotent_and_out_of_order_adds_keep_arrival_order() -> None:
    """Adding a held id changes nothing; a ref added late but older is claimed first."""
    q = Queues()
    q.add("bob", ref(5))
    q.add("bob", ref(7))
    q.add("bob", ref(5), count=3)
    q.add("bob", ref(1))
    assert q.ready("bob") == 3
    got = claim(q, "bob", 3)[0]
    assert ids(got) == ["m1", "m5", "m7"] and [d.count for d in got] == [1, 1, 1]


def test_release_returns_to_its_arrival_place_and_keeps_the_count() -> None:
    """A released claim is claimed again before younger refs, with its count + 1."""
    q = Queues()
    for i in range(3):
        q.add("bob", ref(i))
    d0, d1 = claim(q, "bob", 2)[0]
    assert q.release("bob", receipt=d1.receipt, now=0.0) is d1
    assert q.release("bob", message_id="m0", now=0.0) is d0
    again = claim(q, "bob", 3)[0]
    assert ids(again) == ["m0", "m1", "m2"] and [d.count for d in again] == [2, 2, 1]


def test_release_with_delay_is_claimable_only_at_not_before() -> None:
    """A delayed release waits until now + delay_s, counted as ready meanwhile."""
    q = Queues()
    q.add("bob", ref(0))
    q.add("bob", ref(1))
    (d,) = claim(q, "bob", 1, now=10.0)[0]
    q.release("bob", receipt=d.receipt, now=10.0, delay_s=5.0)
    assert q.ready("bob") == 2 and q.next_due("bob") == 15.0
    assert ids(claim(q, "bob", 5, now=14.9)[0]) == ["m1"]
    assert q.oldest("bob") == ref(0)
    (late,) = claim(q, "bob", 5, now=15.0)[0]
    assert late.ref == ref(0) and late.count == 2 and q.next_due("bob") is None


def test_lease_expiry_returns_claims_and_extend_moves_the_deadline() -> None:
    """expire() returns due claims to ready; an extended lease is not due at its old time,
    a shortened one is due at its new time."""
    q = Queues()
    for i in range(3):
        q.add("bob", ref(i))
    d0, d1, d2 = claim(q, "bob", 3, now=0.0, lease_s=10.0)[0]
    assert q.next_expiry() == 10.0
    q.extend("bob", receipt=d1.receipt, now=5.0, lease_s=20.0)  # until 25
    q.extend("bob", message_id="m2", now=1.0, lease_s=2.0)  # until 3
    assert q.expire(2.9) == []
    assert q.expire(3.0) == [("bob", d2)]
    assert q.expire(24.0) == [("bob", d0)]
    assert q.next_expiry() == 25.0
    assert (q.ready("bob"), q.in_flight("bob")) == (2, 1)
    assert q.expire(100.0) == [("bob", d1)] and q.next_expiry() is None


def test_a_stale_receipt_never_settles_the_newer_claim() -> None:
    """After a lease expired and the message was claimed again, the old receipt is refused
    by ack, release and extend, and changes nothing; the newer claim then acks."""
    q = Queues()
    q.add("bob", ref(0))
    q.add("bob", ref(1))
    (old,) = claim(q, "bob", 1, now=0.0, lease_s=1.0)[0]
    q.expire(1.0)
    (new,) = claim(q, "bob", 1, now=2.0)[0]
    (other,) = claim(q, "bob", 1, now=2.0)[0]
    assert new.ref == old.ref and new.count == 2 and new.receipt != old.receipt
    with pytest.raises(StaleReceipt) as caught:
        q.ack("bob", receipts=[other.receipt, old.receipt])
    assert caught.value.code == "stale_receipt" and caught.value.rpc_code == -32012
    assert caught.value.context["receipts"] == [old.receipt]
    assert q.in_flight("bob") == 2  # the good receipt in that call was not settled either
    with pytest.raises(StaleReceipt):
        q.release("bob", receipt=old.receipt, now=3.0)
    with pytest.raises(StaleReceipt):
        q.extend("bob", receipt=old.receipt, now=3.0, lease_s=60.0)
    assert new.lease_until == 32.0
    outcome = q.ack("bob", receipts=[new.receipt])
    assert outcome.acked == [new] and outcome.not_held == []
    # Settled now: the old receipt names nothing the agent holds.
    assert q.ack("bob", receipts=[old.receipt]).not_held == [old.receipt]
    with pytest.raises(NotFound):
        q.release("bob", receipt=old.receipt, now=3.0)


def test_a_receipt_of_a_released_claim_is_stale() -> None:
    """Released (back to ready): its receipt no longer names the current claim."""
    q = Queues()
    q.add("bob", ref(0))
    (d,) = claim(q, "bob", 1)[0]
    q.release("bob", receipt=d.receipt, now=0.0)
    with pytest.raises(StaleReceipt):
        q.ack("bob", receipts=[d.receipt])
    assert q.holds("bob", "m0") and q.ready("bob") == 1


def test_ack_by_message_id_settles_the_current_claim_only() -> None:
    """message_ids mean "the current claim": a ready (unclaimed) id and an unknown one are
    not held; duplicates count once."""
    q = Queues()
    for i in range(3):
        q.add("bob", ref(i))
    (d0,) = claim(q, "bob", 1, lease_s=1.0)[0]
    q.expire(1.0)
    (d0b,) = claim(q, "bob", 1)[0]
    outcome = q.ack("bob", message_ids=["m0", "m0", "m1", "zz"])
    assert outcome.acked == [d0b] and outcome.not_held == ["m1", "zz"]
    assert not q.holds("bob", "m0") and q.holds("bob", "m1")
    assert q.ack("alice", message_ids=["m1"]).not_held == ["m1"]
    with pytest.raises(NotFound):
        q.release("bob", message_id="m1", now=0.0)
    assert d0.ref == d0b.ref


def test_exhausted_at_max_deliveries() -> None:
    """A ref already delivered max_deliveries times is removed and reported, not handed
    out, and does not count towards n."""
    q = Queues()
    q.add("bob", ref(0), count=1)
    q.add("bob", ref(1))
    q.add("bob", ref(2))
    (d,) = claim(q, "bob", 1, now=0.0, lease_s=1.0, limit=2)[0]
    assert d.count == 2
    q.expire(5.0)
    got, exhausted = claim(q, "bob", 2, limit=2)
    assert exhausted == [(ref(0), 2)] and ids(got) == ["m1", "m2"]
    assert not q.holds("bob", "m0") and q.ready("bob") == 0


def test_drain_removes_ready_refs_oldest_first_and_keeps_claims() -> None:
    """drain() gives back every ready and delayed ref with its count; in_flight=True takes
    the claims too."""
    q = Queues()
    for i in range(5):
        q.add("bob", ref(i))
    d0, d1 = claim(q, "bob", 2)[0]
    q.release("bob", receipt=d1.receipt, now=0.0, delay_s=60.0)
    assert q.drain("bob") == [(ref(1), 1), (ref(2), 0), (ref(3), 0), (ref(4), 0)]
    assert (q.ready("bob"), q.in_flight("bob")) == (0, 1) and claim(q, "bob", 5)[0] == []
    q.add("bob", ref(9))
    assert q.drain("bob", in_flight=True) == [(ref(0), 1), (ref(9), 0)]
    assert q.agents() == [] and q.oldest("bob") is None and q.drain("nobody") == []
    assert q.ack("bob", receipts=[d0.receipt]).not_held == [d0.receipt]


def test_drop_forgets_ready_and_claimed_refs() -> None:
    """drop() returns the claim it removed, None for a ready ref (skipped by claims), and
    the id may be added again afterwards."""
    q = Queues()
    for i in range(3):
        q.add("bob", ref(i))
    (d0,) = claim(q, "bob", 1)[0]
    assert q.drop("bob", "m0") is d0 and q.drop("bob", "m1") is None
    assert q.drop("bob", "m1") is None and q.drop("nobody", "m1") is None
    assert (q.ready("bob"), q.in_flight("bob")) == (1, 0)
    q.add("bob", ref(1))
    assert ids(claim(q, "bob", 5)[0]) == ["m1", "m2"]


def test_low_water_and_oldest_follow_the_oldest_unsettled_ref() -> None:
    """low_water is the lowest position of any unsettled ref, in flight or ready, any agent."""
    q = Queues()
    assert q.low_water() is None
    q.add("bob", ref(3))
    q.add("bob", ref(4))
    q.add("carol", ref(2))
    q.add("carol", ref(6))
    assert q.low_water() == Position(1, 200)
    (c2,) = claim(q, "carol", 1)[0]
    assert q.low_water() == Position(1, 200) and q.oldest("carol") == ref(2)
    q.ack("carol", receipts=[c2.receipt])
    assert q.low_water() == Position(1, 300) and q.oldest("carol") == ref(6)
    q.drop("bob", "m3")
    assert q.oldest("bob") == ref(4) and q.low_water() == Position(1, 400)
    q.drain("bob")
    assert q.low_water() == Position(1, 600)


def test_100k_ready_refs_fit_well_under_the_memory_budget() -> None:
    """100,000 ready refs with realistic ids (the Refs included) cost under 60 MB of
    Python heap: the daemon's whole budget with them is 150 MB RSS."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        q = Queues()
        for i in range(100_000):
            mid = f"MSG-20261201-094220-{i:09d}-PID16111-{i % 10000:04d}"
            q.add("bob", Ref(mid, None, Position(1 + i // 50_000, 600 * i), 600))
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert q.ready("bob") == 100_000
    assert used < 60 * 2**20, f"{used / 2**20:.1f} MiB"


# -- the fold: replaying any prefix gives the state that prefix describes -------------------

AGENTS = ("a", "b", "c")


class _Journal:
    """Generated journal records, each with its start position and length."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._offset = 0

    def append(self, **fields: object) -> Position:
        entry = JournalEntry(at=AT, **fields)  # type: ignore[arg-type]
        position = Position(1, self._offset)
        length = 50 + len(self.spans) % 7
        self.spans.append((entry, position, length))
        self._offset += length
        return position

    def accepted(self, mid: str, to: list[str], *, source: str | None = None) -> Ref:
        raw = msgspec.Raw(b'{"message_id":"%s"}' % mid.encode())
        pos = self.append(
            event="accepted", message_id=mid, to=to, agent="p", source=source, message=raw
        )
        return Ref(mid, None, pos, self.spans[-1][2])


def _model(spans: list[Span], held: set[tuple[str, str]]) -> dict[str, list[tuple[str, int]]]:
    """What the records say is waiting, per agent: (id, count) in arrival order.

    Written from protocol.md's rules, not from replay(): a list per agent, searched by id.
    """
    state: dict[str, list[list[object]]] = {a: [] for a in AGENTS}
    for entry, _, _ in spans:
        mid, agent = entry.message_id, entry.agent
        if entry.event == "accepted" and not (entry.source or "").startswith("inbox/"):
            for r in entry.to or ():
                if (r, mid) not in held and all(m != mid for m, _ in state[r]):
                    state[r].append([mid, 0])
        elif agent in state and (
            entry.event == "acked"
            or (entry.event == "dead_lettered" and entry.reason in ("delivery_limit", "rejected"))
        ):
            state[agent] = [e for e in state[agent] if e[0] != mid]
        elif entry.event == "delivered" and agent in state:
            for e in state[agent]:
                if e[0] == mid:
                    e[1] = max(int(e[1]), entry.count or 0)  # type: ignore[call-overload]
    return {a: [(str(m), int(c)) for m, c in v] for a, v in state.items() if v}  # type: ignore[call-overload]


def _state(queues: Queues, files: list[Pending]) -> dict[str, list[tuple[str, int]]]:
    """A replay result (or live queues) as the model's shape; files merged by position."""
    out: dict[str, list[tuple[Position, str, int]]] = {}
    for agent in queues.agents():
        out[agent] = [(r.position, r.message_id, c) for r, c in queues.unsettled(agent)]
    for agent, r, c in files:
        out.setdefault(agent, []).append((r.position, r.message_id, c))
    return {a: [(m, c) for _, m, c in sorted(v)] for a, v in out.items()}


History = tuple[
    _Journal, set[tuple[str, str]], set[str], list[tuple[int, dict[str, list[tuple[str, int]]]]]
]


@st.composite
def _histories(draw: st.DrawFn) -> History:
    """A journal written by operating a live Queues as a daemon would, with the live state
    after each operation (at that many records)."""
    journal, live = _Journal(), Queues()
    held = draw(st.sets(st.tuples(st.sampled_from(AGENTS), st.sampled_from(["m0", "m1", "m2"]))))
    memory = draw(st.sets(st.sampled_from(AGENTS)))
    snapshots: list[tuple[int, dict[str, list[tuple[str, int]]]]] = [(0, {})]
    handed: list[tuple[str, Delivery]] = []  # every delivery ever made, stale ones too
    now, next_id, settled = 0.0, 0, [""]
    for _ in range(draw(st.integers(0, 40))):
        op = draw(st.sampled_from(["accept", "claim", "ack", "fail", "expire", "nack", "noise"]))
        agent = draw(st.sampled_from(AGENTS))
        mine = [d for a, d in handed if a == agent]
        if op == "accept":
            again = len(settled) > 1 and draw(st.booleans())  # an id accepted again (replay)
            mid = draw(st.sampled_from(settled[1:])) if again else f"m{next_id}"
            next_id += 0 if again else 1
            to = draw(st.lists(st.sampled_from(AGENTS), min_size=1, max_size=3, unique=True))
            foreign = draw(st.integers(0, 9)) == 0  # delivered in place: a file, never memory
            r = journal.accepted(mid, to, source=f"inbox/{to[0]}/x.json" if foreign else None)
            for recipient in [] if foreign else to:
                if (recipient, mid) not in held:
                    live.add(recipient, r)
        elif op == "claim":
            n = draw(st.integers(1, 3))
            got, exhausted = live.claim(
                agent, n, now=now, lease_s=10.0, max_deliveries=3, new_receipt=receipt
            )
            for d in got:
                handed.append((agent, d))
                journal.append(
                    event="delivered",
                    message_id=d.ref.message_id,
                    agent=agent,
                    receipt=d.receipt,
                    count=d.count,
                )
            for r, _ in exhausted:
                journal.append(
                    event="dead_lettered",
                    message_id=r.message_id,
                    agent=agent,
                    reason="delivery_limit",
                    to=["dlq-entry"],
                )
                settled.append(r.message_id)
        elif op == "ack" and mine:
            d = draw(st.sampled_from(mine))
            try:
                if draw(st.booleans()):
                    outcome = live.ack(agent, receipts=[d.receipt])
                else:
                    outcome = live.ack(agent, message_ids=[d.ref.message_id])
            except StaleReceipt:
                continue  # refused: nothing settled, nothing journaled
            for acked in outcome.acked:
                journal.append(
                    event="acked",
                    message_id=acked.ref.message_id,
                    agent=agent,
                    receipt=acked.receipt,
                )
        elif op == "nack" and mine:
            d = draw(st.sampled_from(mine))
            try:
                live.release(
                    agent, receipt=d.receipt, now=now, delay_s=draw(st.sampled_from([0, 5]))
                )
            except (StaleReceipt, NotFound):
                pass  # not the current claim: nothing changes (and a nack is not journaled)
        elif op == "fail" and mine:
            mid = draw(st.sampled_from(mine)).ref.message_id
            if live.holds(agent, mid):
                live.drop(agent, mid)
                journal.append(
                    event="dead_lettered",
                    message_id=mid,
                    agent=agent,
                    reason="rejected",
                    to=["dlq-entry"],
                )
                settled.append(mid)
        elif op == "expire":
            now += draw(st.sampled_from([1.0, 10.0]))
            live.expire(now)
        elif op == "noise":
            # Records that settle nothing: an intake refusal naming the agent, a duplicate.
            mid = f"m{draw(st.integers(0, next_id))}"
            journal.append(
                event="dead_lettered", message_id=mid, agent=agent, reason="schema", to=["x"]
            )
            journal.append(event="duplicate", message_id=mid, agent=agent, to=[agent])
        snapshots.append((len(journal.spans), _state(live, [])))
    return journal, held, memory, snapshots


def _holds(held: set[tuple[str, str]]) -> Callable[[str, JournalEntry], bool]:
    return lambda agent, entry: (agent, entry.message_id or "") in held


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_histories())
def test_replaying_any_prefix_gives_the_state_it_describes(history: History) -> None:
    """Every prefix replays to the model's state (memory agents in queues, the others in
    files, in journal order); at every operation's end, to the live Queues' state; and
    the replayed queues hand refs out in arrival order with the counts they had."""
    journal, held, memory, snapshots = history
    holds = _holds(held)
    for k in range(len(journal.spans) + 1):
        prefix = journal.spans[:k]
        result = replay(prefix, memory_agents=memory, holds=holds)
        assert _state(result.queues, result.files) == _model(prefix, held)
        assert set(result.queues.agents()) <= memory
        assert all(p.agent not in memory for p in result.files)
        positions = [p.ref.position for p in result.files]
        assert positions == sorted(positions)
        assert result.files_from == (positions[0] if positions else None)
    for k, live_state in snapshots:
        everyone = replay(journal.spans[:k], memory_agents=set(AGENTS), holds=holds)
        assert everyone.files == []
        assert _state(everyone.queues, []) == live_state
        for agent, expected in live_state.items():
            q = everyone.queues
            got, exhausted = q.claim(
                agent, 99, now=0.0, lease_s=1.0, max_deliveries=99, new_receipt=receipt
            )
            assert exhausted == []
            assert [(d.ref.message_id, d.count - 1) for d in got] == expected


def test_replay_by_predicate_and_the_whole_equals_the_live_queues_by_hand() -> None:
    """A hand-written journal: acked, consumer dead letters and a higher count settle or
    update exactly their agent; memory_agents may be a predicate."""
    j = _Journal()
    j.accepted("x", ["a", "b"])
    j.accepted("y", ["a"])
    j.append(event="delivered", message_id="x", agent="a", receipt="r1", count=2)
    j.append(event="delivered", message_id="x", agent="a", receipt="r0", count=1)
    j.append(event="acked", message_id="x", agent="b", receipt="r2")
    j.append(event="dead_lettered", message_id="y", agent="a", reason="schema", to=["n"])
    j.append(event="delivered", message_id="zz", agent="a", receipt="r3", count=5)
    j.append(event="acked", message_id="nope", agent="a", receipt="r4")
    result = replay(j.spans, memory_agents=lambda agent: agent == "a")
    assert _state(result.queues, result.files) == {"a": [("x", 2), ("y", 0)]}
    assert result.files == []
    j.append(event="dead_lettered", message_id="y", agent="a", reason="rejected", to=["n"])
    j.accepted("z", ["b", "c"])
    result = replay(j.spans, memory_agents=["a"], holds=_holds({("c", "z")}))
    assert _state(result.queues, []) == {"a": [("x", 2)]}
    assert [(p.agent, p.ref.message_id, p.deliveries) for p in result.files] == [("b", "z", 0)]


def test_record_builders_fold_as_the_live_queues_settle() -> None:
    """acked_entry / delivered_entry make the lines replay() reads."""
    q = Queues()
    r0, r1 = ref(0), ref(1)
    q.add("bob", r0)
    q.add("bob", r1)
    d0, d1 = claim(q, "bob", 2)[0]
    spans: list[Span] = [
        (JournalEntry(event="accepted", at=AT, message_id=r.message_id, to=["bob"],
                      message=msgspec.Raw(b"{}")), r.position, r.length)
        for r in (r0, r1)
    ]  # fmt: skip
    for entry in (delivered_entry("bob", d0, AT), delivered_entry("bob", d1, AT)):
        spans.append((entry, Position(2, len(spans)), 10))
    spans.append((acked_entry("m0", "bob", d0.receipt, AT), Position(2, 9), 10))
    assert spans[-1][0].receipt == d0.receipt and spans[-2][0].count == 1
    assert replay(spans, memory_agents={"bob"}).queues.unsettled("bob") == [(r1, 1)]
