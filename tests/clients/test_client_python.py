"""The Python client ``busclient`` against a real daemon and against the bare files."""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import busclient
from busclient import (
    AsyncClient,
    BusError,
    Client,
    InvalidMessage,
    InvalidName,
    NotFound,
    StaleReceipt,
    Unavailable,
    validate_message,
)
from busd import errors as busd_errors
from busd.config import load_config
from busd.core import ids as busd_ids
from busd.core.codec import decode
from busd.errors import InvalidMessage as BusdInvalid
from busd.routing.consumer import Consumer, return_expired
from busd.routing.offline import route_pending
from busd.rpc.protocol import error_from_exception
from busd.store.dlq import list_entries
from busd.store.layout import init_bus, parse_delivery_name
from busd.store.ledger import ProcessedLedger
from busd.store.mailbox import deliver
from daemon_harness import Daemon, files, message, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_busd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Discovery must not pick up the developer's own bus."""
    for key in list(os.environ):
        if key.startswith("BUSD_"):
            monkeypatch.delenv(key)


@contextmanager
def running(root: Path, **env: str) -> Iterator[Daemon]:
    """A daemon on ``root`` for the duration of the block."""
    d = Daemon(root, env=env).ready()
    try:
        yield d
    finally:
        d.kill()


def _deliver(root: Path, i: int, agent: str = "bob", deliveries: int = 0, **fields: Any) -> str:
    """Put message ``i`` in ``inbox/<agent>/`` the way the router does."""
    msg = message(i, **fields)
    deliver(
        init_bus(root), agent, json.dumps(msg).encode(), msg["message_id"], deliveries=deliveries
    )
    return str(msg["message_id"])


# ---------------------------------------------------------------- through the daemon


def test_send_fetch_ack_round_trip_through_socket(root: Path) -> None:
    """send, fetch and ack go through the daemon; the ack lands in the ledger."""
    with running(root), Client(root) as bus:
        assert bus.ping()["pid"] > 0
        sent = bus.send({k: v for k, v in message(1).items() if k != "message_id"})
        assert sent.via == "socket" and not sent.duplicate and sent.path is None
        assert re.fullmatch(r"MSG-\d{8}-\d{6}-\d{9}-PID.{5}-\d{4}", sent.message_id)
        assert bus.send(message(2)).message_id == "m-000002"
        assert bus.send(message(2)).duplicate
        # bob fetched nothing yet: both are inbox files, so the ack lands in the ledger
        wait_for(lambda: len(files(root / "inbox" / "bob")) == 2, what="two inbox files")
        got = bus.fetch("bob", max=10, wait_s=5)
        if len(got) < 2:
            got += bus.fetch("bob", max=10, wait_s=5)
        assert [d.message_id for d in got] == [sent.message_id, "m-000002"]
        d = got[0]
        assert d.via == "socket" and d.delivery_count == 1 and d.message["body"] == "hello 1"
        assert d.lease_expires_at.tzinfo is not None
        assert d.extend(120) > d.lease_expires_at
        assert d.ack() is True and d.ack() is False
        got[1].nack()
        assert [x.delivery_count for x in bus.fetch("bob", wait_s=5)] == [2]
        assert sent.message_id in ProcessedLedger(root / "processed" / "bob.jsonl")
        assert bus.status()["daemon"]["running"] is True


def test_socket_deliveries_carry_receipts_and_a_stale_one_is_refused(root: Path) -> None:
    """Fetched and pushed deliveries carry receipts; ack settles by receipt; the receipt
    of a delivery whose lease ran out and that was fetched again raises StaleReceipt."""
    with running(root, BUSD_LEASE_SECONDS="0.5"), Client(root, fallback=False) as bus:
        bus.send(message(1))
        (old,) = bus.fetch("bob", wait_s=5)
        assert old.via == "socket" and old.receipt is not None
        parsed = parse_delivery_name(f"{old.receipt}.json")
        assert parsed is not None and parsed.message_id == "m-000001"
        (new,) = bus.fetch("bob", wait_s=5)
        assert new.delivery_count == 2 and new.receipt not in (None, old.receipt)
        with pytest.raises(StaleReceipt) as err:
            old.ack()
        assert err.value.code == -32012 and err.value.reason == "stale_receipt"
        with pytest.raises(StaleReceipt):
            old.extend(60)
        assert new.extend(60) > new.lease_expires_at
        assert new.ack() is True
        bus.send(message(2))
        with bus.subscribe("bob") as sub:
            pushed = sub.next(timeout=5)
            assert pushed is not None and pushed.receipt is not None
            assert bus.ack("bob", ["m-000002"]) == 1  # a message id: the current claim
        assert bus.fetch("bob") == []


def test_invalid_publish_raises_typed_errors(root: Path) -> None:
    """The daemon's refusal becomes InvalidMessage with reason and path; others map too."""
    with running(root), Client(root, fallback=False) as bus:
        with pytest.raises(InvalidMessage) as err:
            bus.send(message(1, status="done"))
        assert err.value.reason == "schema" and err.value.path == "$.status"
        assert err.value.code == -32602 and err.value.data["error"] == "invalid_message"
        with pytest.raises(NotFound):
            bus.nack("bob", "no-such-id")
        with pytest.raises(InvalidName):
            bus.send(message(2), sender="not/a/name")
        with pytest.raises(BusError) as generic:
            bus.call("no.such.method")
        assert generic.value.reason == "method_not_found"
        results = bus.send_batch([message(3), {"schema_version": "2.0"}])
        assert isinstance(results[0], busclient.SendResult)
        assert isinstance(results[1], InvalidMessage)
        assert results[1].reason == "unsupported_schema_version"


def test_send_without_daemon_writes_outbox_then_daemon_delivers(root: Path) -> None:
    """No daemon: send writes outbox/<sender>/ durably; a daemon started later delivers it."""
    with Client(root) as bus:
        sent = bus.send(message(1), sender="carol")
        assert sent.via == "file" and sent.path is not None
        assert sent.path.parent == root / "outbox" / "carol"
        assert re.fullmatch(r"\d{20}-m-000001\.json", sent.path.name)
        assert decode(sent.path.read_bytes()).message_id == "m-000001"
        assert files(root / "tmp") == []
        with pytest.raises(InvalidMessage) as err:
            bus.send(message(2, to=["topic:x"]))
        assert err.value.path == "$.to[0]" and files(root / "outbox" / "alice") == []
        with running(root):
            got = bus.fetch("bob", wait_s=5)
            assert [(d.message_id, d.via) for d in got] == [("m-000001", "socket")]


def test_free_text_agent_id_sends_without_daemon(root: Path) -> None:
    """An agent_id that is no directory name ("Builder Agent") drops into outbox/ itself
    and is delivered with its fields as written (explicit default, integer)."""
    msg = message(1, agent_id="Builder Agent", metadata={"n": 900})
    with Client(root) as bus:
        sent = bus.send(msg)
        assert sent.via == "file" and sent.path is not None and sent.path.parent == root / "outbox"
        assert route_pending(load_config(root=str(root), env={})) is not None
        (d,) = bus.fetch("bob")
        assert d.message["agent_id"] == "Builder Agent"
        assert d.message["metadata"] == {"n": 900} and isinstance(d.message["metadata"]["n"], int)


def test_file_send_is_routed_by_busd_without_daemon(root: Path) -> None:
    """A file-sent message is routed by any busd routing pass, then fetched from the files."""
    with Client(root) as bus:
        bus.send(message(1))
        assert route_pending(load_config(root=str(root), env={})) is not None
        (d,) = bus.fetch("bob")
        assert d.via == "file" and d.message["body"] == "hello 1"


def test_fetch_ack_nack_extend_without_daemon(root: Path) -> None:
    """Daemon-less claim/ack/nack/extend on inbox files, readable by busd's own consumer."""
    for i in (1, 2, 3):
        _deliver(root, i, idempotency_key=f"key-{i}")
    with Client(root) as bus:
        got = bus.fetch("bob", max=2)
        assert [(d.message_id, d.via, d.delivery_count) for d in got] == [
            ("m-000001", "file", 1),
            ("m-000002", "file", 1),
        ]
        claimed = {parse_delivery_name(p.name) for p in files(root / "locks" / "bob")}
        assert {(c.message_id, c.deliveries) for c in claimed if c} == {
            ("m-000001", 1),
            ("m-000002", 1),
        }
        expiry = got[0].extend(300)
        lock = next(p for p in files(root / "locks" / "bob") if "m-000001" in p.name)
        assert abs(lock.stat().st_mtime - expiry.timestamp()) < 0.01
        assert got[0].ack() is True
        ledger = ProcessedLedger(root / "processed" / "bob.jsonl")
        assert "m-000001" in ledger and "key-1" in ledger
        line = json.loads((root / "processed" / "bob.jsonl").read_text())
        assert list(line) == ["message_id", "idempotency_key", "acked_at"]
        got[1].nack()
        assert [p.name[21:24] for p in files(root / "inbox" / "bob")] == ["001", "000"]
        (again, third) = bus.fetch("bob", max=5)
        assert (again.message_id, again.delivery_count) == ("m-000002", 2)
        # busd's consumer settles what the client claimed
        config = load_config(root=str(root), env={})
        assert Consumer(config, "bob").ack([third.message_id]) == 1
        with pytest.raises(NotFound):
            third.nack()
        assert bus.ack("bob", ["m-000002", "unknown"]) == 1
        assert files(root / "locks" / "bob") == [] and files(root / "inbox" / "bob") == []


def test_file_fallback_receipts_are_claim_names_and_a_stale_one_is_refused(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file delivery's receipt is its claim name; once redelivered the old one is stale.

    The stale receipt settles, releases and extends nothing: the newer claim keeps
    its file and its lease, and settles by its own receipt.
    """
    monkeypatch.setenv("BUSD_LEASE_SECONDS", "0.2")
    _deliver(root, 1, idempotency_key="k-1")
    locks = root / "locks" / "bob"
    with Client(root) as bus:
        (old,) = bus.fetch("bob")
        assert old.receipt is not None and [p.name for p in files(locks)] == [f"{old.receipt}.json"]
        time.sleep(0.3)
        (new,) = bus.fetch("bob")  # the sweep returned it, then it was claimed again
        assert new.delivery_count == 2 and new.receipt != old.receipt
        mtime = (locks / f"{new.receipt}.json").stat().st_mtime_ns
        with pytest.raises(StaleReceipt) as err:
            old.ack()
        assert err.value.reason == "stale_receipt" and err.value.receipts == [old.receipt]
        with pytest.raises(StaleReceipt):
            old.nack()
        with pytest.raises(StaleReceipt):
            old.extend(60)
        with pytest.raises(StaleReceipt):
            bus.ack("bob", ["m-000001"], receipts=[old.receipt])
        assert [p.name for p in files(locks)] == [f"{new.receipt}.json"]
        assert (locks / f"{new.receipt}.json").stat().st_mtime_ns == mtime
        assert not (root / "processed" / "bob.jsonl").exists()
        assert new.ack() is True and new.ack() is False
        assert files(locks) == []
        assert "k-1" in ProcessedLedger(root / "processed" / "bob.jsonl")


def test_file_receipts_interoperate_with_busd_consumer(root: Path) -> None:
    """busd's consumer settles a client receipt, and the client settles a busd receipt."""
    _deliver(root, 1)
    _deliver(root, 2)
    config = load_config(root=str(root), env={})
    with Client(root) as bus:
        (d,) = bus.fetch("bob")
        assert d.receipt is not None
        assert Consumer(config, "bob").settle(receipts=[d.receipt]) == (1, [])
        (claim,) = Consumer(config, "bob").claim()
        assert bus.ack("bob", receipts=[claim.receipt, "not-a-receipt"]) == 1
        assert bus.ack("bob", ["m-000002"]) == 0  # by id: nothing left to settle
    assert files(root / "locks" / "bob") == [] and files(root / "inbox" / "bob") == []


def test_error_classes_by_code_match_busd_errors() -> None:
    """Every busclient error named like a busd error maps from that error's code, and
    every code busd answers over the socket has a class of its own or the base class."""
    clients = {
        name: getattr(busclient, name)
        for name in busclient.__all__
        if isinstance(getattr(busclient, name), type)
        and issubclass(getattr(busclient, name), BusError)
    }
    served = [
        cls
        for name in busd_errors.__all__
        if isinstance(cls := getattr(busd_errors, name), type)
        and issubclass(cls, busd_errors.BusdError)
        and cls.rpc_code != busd_errors.BusdError.rpc_code  # answered by the daemon
    ]
    assert busd_errors.StaleReceipt in served
    for cls in served:
        mine = clients.get(cls.__name__)
        if mine is None:
            assert cls.code not in busclient._ERRORS, cls.code
            continue
        assert busclient._ERRORS[cls.code] is mine, cls.code
        err = busclient._error_from(
            {"code": cls.rpc_code, "message": "m", "data": {"reason": cls.code, "error": cls.code}}
        )
        assert type(err) is mine and err.code == cls.rpc_code
    answer = error_from_exception(busd_errors.StaleReceipt("gone", receipts=["r1"]))
    body = {"code": answer.code, "message": answer.message, "data": answer.data}
    stale = busclient._error_from(body)
    assert isinstance(stale, StaleReceipt) and stale.receipts == ["r1"] and stale.code == -32012


def test_fallback_sweep_returns_expired_and_leaves_exhausted_to_busd(root: Path) -> None:
    """Delayed nacks come back via the client's sweep; exhausted messages go to busd's DLQ."""
    _deliver(root, 1)
    _deliver(root, 2, deliveries=5)
    with Client(root) as bus:
        (d,) = bus.fetch("bob", max=5)
        d.nack(delay_s=0.3)
        assert bus.fetch("bob") == []
        (again,) = bus.fetch("bob", wait_s=3)
        assert (again.message_id, again.delivery_count) == ("m-000001", 2)
    report = return_expired(load_config(root=str(root), env={}), "bob")
    assert len(report.dead_lettered) == 1
    (entry,) = list_entries(init_bus(root))
    assert entry.record.reason == "delivery_limit"


def test_fallback_skips_acked_copies_and_foreign_names(root: Path) -> None:
    """A second copy of an acked message is dropped at claim time; foreign names stay."""
    _deliver(root, 1)
    _deliver(root, 1)  # a redelivered copy (e.g. after a crash)
    (root / "inbox" / "bob" / "dropped.json").write_text(json.dumps(message(9)))
    with Client(root) as bus:
        (first,) = bus.fetch("bob")
        first.ack()
        assert bus.fetch("bob", max=5) == []
    assert [p.name for p in files(root / "inbox" / "bob")] == ["dropped.json"]


def test_ledger_lock_interoperates_with_busd(root: Path) -> None:
    """The client's ack waits for the ledger lock busd (portalocker) holds; torn lines end."""
    _deliver(root, 1)
    (root / "processed" / "bob.jsonl").write_bytes(b'{"message_id":"torn"')
    with Client(root) as bus:
        (d,) = bus.fetch("bob")
        ledger = ProcessedLedger(root / "processed" / "bob.jsonl")
        done = threading.Event()
        with ledger._locked():

            def ack() -> None:
                d.ack()
                done.set()

            t = threading.Thread(target=ack)
            t.start()
            time.sleep(0.3)
            assert not done.is_set()
        t.join(5)
        assert done.is_set() and "m-000001" in ledger and "torn" not in ledger
        lines = (root / "processed" / "bob.jsonl").read_bytes().split(b"\n")
        assert lines[0] == b'{"message_id":"torn"' and lines[2] == b""


def test_no_daemon_without_fallback_raises_unavailable(root: Path) -> None:
    """fallback=False, and daemon-only calls, raise Unavailable when nothing listens."""
    (root / "busd.sock").write_text("stale")  # a leftover that is not a socket
    with Client(root, fallback=False) as bus, pytest.raises(Unavailable):
        bus.send(message(1))
    with Client(root) as bus:
        with pytest.raises(Unavailable):
            bus.ping()
        assert bus.status()["daemon"] == {"running": False}
    with Client(root.parent / "nowhere") as bus, pytest.raises(Unavailable):
        bus.send(message(1))


def test_reconnects_after_daemon_restart(root: Path) -> None:
    """One Client keeps working across a daemon stop and start, using it again when back."""
    with Client(root) as bus:
        with running(root):
            assert bus.send(message(1)).via == "socket"
        assert bus.send(message(2)).via == "file"
        with running(root):
            assert bus.send(message(3)).via == "socket"
            ids: list[str] = []

            def three() -> bool:
                ids.extend(d.message_id for d in bus.fetch("bob", 10))
                return len(ids) == 3

            wait_for(three)
            assert sorted(ids) == ["m-000001", "m-000002", "m-000003"]
            assert bus.ack("bob", ids) == 3


def test_socket_found_through_path_file(root: Path, tmp_path: Path) -> None:
    """A daemon listening elsewhere is found through <root>/busd.sock.path."""
    sock = tmp_path / "elsewhere.sock"
    with running(root, BUSD_SOCKET_PATH=str(sock)):
        assert (root / "busd.sock.path").read_text().strip() == str(sock)
        with Client(root, fallback=False) as bus:
            assert bus.send(message(1)).via == "socket"


def test_root_discovery(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Explicit root > BUSD_ROOT > nearest .busd in cwd or parents > ./.busd."""
    nested = tmp_path / "project" / ".busd"
    (tmp_path / "project" / "src" / "deep").mkdir(parents=True)
    nested.mkdir()
    monkeypatch.chdir(tmp_path / "project" / "src" / "deep")
    assert busclient.find_root() == nested
    monkeypatch.chdir(tmp_path)
    assert busclient.find_root() == tmp_path / ".busd"
    monkeypatch.setenv("BUSD_ROOT", str(root))
    assert Client().root == root
    assert busclient.find_root("x") == tmp_path / "x"


# ---------------------------------------------------------------- subscriptions


def test_subscribe_receives_pushes_and_acks(root: Path) -> None:
    """Pushed deliveries arrive on the subscription; acking them empties locks/."""
    with running(root), Client(root) as bus, bus.subscribe("bob") as sub:
        assert sub.next(0.3) is None
        for i in range(3):
            bus.send(message(i))
        got = [sub.next(5) for _ in range(3)]
        assert [d.message_id for d in got if d] == ["m-000000", "m-000001", "m-000002"]
        for d in got:
            assert d is not None and d.via == "socket" and d.ack()
        assert files(root / "locks" / "bob") == []


def test_subscribe_max_in_flight_holds(root: Path) -> None:
    """No more than max_in_flight unacked pushes; an ack opens the window again."""
    with running(root), Client(root) as bus:
        for i in range(5):
            bus.send(message(i))
        with bus.subscribe("bob", max_in_flight=2) as sub:
            first = [sub.next(5), sub.next(5)]
            assert all(first)
            assert sub.next(0.6) is None
            assert len(files(root / "locks" / "bob")) == 2
            assert first[0] is not None and first[0].ack()
            third = sub.next(5)
            assert third is not None and third.message_id == "m-000002"
            assert sub.next(0.3) is None


def test_subscribe_polls_files_without_daemon_then_switches(root: Path) -> None:
    """Without a daemon the subscription polls the inbox; it uses the daemon once it is up."""
    _deliver(root, 1)
    with Client(root) as bus, bus.subscribe("bob", poll_interval=0.05) as sub:
        d = sub.next(2)
        assert d is not None and (d.message_id, d.via) == ("m-000001", "file")
        assert d.ack()
        with running(root):
            bus.send(message(2))
            d = sub.next(5)
            assert d is not None and (d.message_id, d.via) == ("m-000002", "socket")


# ---------------------------------------------------------------- idempotent processing


def test_processing_after_the_lease_ran_out_is_a_stale_receipt(root: Path) -> None:
    """A consumer that finishes after its lease ran out (the message was delivered again)
    gets StaleReceipt from processing(); the newer claim survives and is settled by its
    own consumer, and the late client itself knows the message is no longer fresh."""
    (root / "busd.toml").write_text("lease_seconds = 0.5\n")
    effects: list[str] = []
    with running(root), Client(root) as a, Client(root) as b:
        a.send(message(1))
        (first,) = a.fetch("bob", wait_s=5)
        (second,) = b.fetch("bob", wait_s=5)  # the lease ran out: delivered again
        assert (first.message_id, second.message_id) == ("m-000001", "m-000001")
        assert second.delivery_count == 2
        with pytest.raises(StaleReceipt), a.processing(first) as fresh:
            assert fresh
            effects.append(first.message_id)
        with b.processing(second) as fresh:
            assert fresh  # the stale ack settled nothing: at least once, never lost
            effects.append(second.message_id)
        assert effects == ["m-000001", "m-000001"]
        assert a._fresh(first) is False  # a itself remembers it finished the message
        assert b.fetch("bob", wait_s=0.8) == []
        assert files(root / "locks" / "bob") == []


def test_processing_nacks_and_reraises_on_error(root: Path) -> None:
    """An exception in the block nacks the delivery (it comes back) and propagates."""
    _deliver(root, 1)
    with Client(root) as bus:
        (d,) = bus.fetch("bob")
        with pytest.raises(RuntimeError), bus.processing(d):
            raise RuntimeError("handler failed")
        (again,) = bus.fetch("bob")
        with bus.processing(again) as fresh:
            assert fresh and again.delivery_count == 2
        with bus.processing(again) as fresh:  # this client finished it already
            assert not fresh


# ---------------------------------------------------------------- asyncio


def test_async_round_trip_and_subscribe(root: Path) -> None:
    """AsyncClient sends, fetches, acks and subscribes through the daemon."""

    async def scenario() -> None:
        async with AsyncClient(root) as bus:
            assert (await bus.send(message(1))).via == "socket"
            (d,) = await bus.fetch("bob", wait_s=5)
            assert d.message_id == "m-000001" and await d.ack()
            async with bus.subscribe("bob", max_in_flight=1) as sub:
                await bus.send(message(2))
                pushed = await sub.next(5)
                assert pushed is not None and pushed.via == "socket"
                async with bus.processing(pushed) as fresh:
                    assert fresh
                assert await sub.next(0.3) is None
            assert (await bus.status())["daemon"]["running"] is True

    with running(root):
        asyncio.run(scenario())
    assert files(root / "locks" / "bob") == []


def test_async_fallback_without_daemon(root: Path) -> None:
    """AsyncClient writes and claims through the files when no daemon runs."""

    async def scenario() -> None:
        bus = AsyncClient(root)
        sent = await bus.send(message(1))
        assert sent.via == "file"
        _deliver(root, 2)
        (d,) = await bus.fetch("bob")
        assert (d.message_id, d.via) == ("m-000002", "file")
        await d.nack()
        async for again in bus.subscribe("bob", poll_interval=0.05):
            assert again.delivery_count == 2 and await again.ack()
            break
        with pytest.raises(Unavailable):
            await bus.ping()

    asyncio.run(scenario())


# ---------------------------------------------------------------- ids


def test_ids_format_unique_and_same_as_busd() -> None:
    """Ids follow the seed format, never repeat, and match busd's generator exactly."""
    made = [busclient.new_message_id() for _ in range(20_000)]
    assert len(set(made)) == len(made) and made == sorted(made)
    pattern = r"MSG-\d{8}-\d{6}-\d{9}-PID[0-9A-Z]{5}-\d{4}"
    assert all(re.fullmatch(pattern, m) for m in made[:100])
    for pid in (1, 4242, 99_999, 100_000, 123_456, 4_194_304, 43_000_000):
        assert busclient._pid_field(pid) == busd_ids.pid_field(pid)
    ticks = iter([5, 5, 3, 10**18, 10**18] + [10**18 + 1] * 10_001)
    ticks2 = iter([5, 5, 3, 10**18, 10**18] + [10**18 + 1] * 10_001)
    mine = busclient._IdGenerator(clock=lambda: next(ticks), pid=123_456)
    theirs = busd_ids.IdGenerator(clock=lambda: next(ticks2), pid=123_456)
    assert [mine.next() for _ in range(10_006)] == [theirs.next() for _ in range(10_006)]


# ---------------------------------------------------------------- the validator


def _base(mtype: str = "fact", **fields: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "schema_version": "1.0",
        "message_type": mtype,
        "message_id": "m-1",
        "created_at": "2026-03-01T10:00:00+01:00",
        "workflow_id": "w",
        "task_id": "t",
        "agent_id": "alice",
    }
    if mtype in ("status_update", "task_complete"):
        msg["status"] = "completed"
    msg.update(fields)
    return msg


def _nest(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    for _ in range(depth - 1):
        node = {"a": node}
    return node


_VALID = [
    _base(),
    _base(to="bob", body="", parents=["a", "b.c"], metadata={"k": [1, {"x": None}]}),
    _base(to="topic:news", idempotency_key="é" * 256, project_id="", run_id="r"),
    _base(to=["bob", "carol"] * 128, attachment_path="a/b..c/d.txt"),
    _base(created_at="2026-03-01t10:00:00.123456789z", schema_version="1.7"),
    _base(created_at="2026-03-01 10:00:00-00:00", metadata=_nest(64)),
    _base(agent_id="_" + "a" * 63, message_id="A" * 128, body=None, to=None),
    _base(agent_id="Builder Agent"),
    _base(agent_id="a/b.CON"),
    _base(
        "task_assignment",
        assigned_to="builder",
        priority="high",
        inputs={"ref": "v4"},
        timeout_seconds=0.5,
        retry_policy={"max": 3},
    ),
    _base("task_assignment", priority=None, inputs=None, timeout_seconds=900),
    _base("status_update", status="in_progress", progress_percent=0, current_step="x"),
    _base("status_update", status="queued", progress_percent=100.0),
    _base("task_complete", status="failed", results={"a": 1}),
    *(_base(t, body="x") for t in ("progress", "decision", "review", "error")),
]

_INVALID: list[tuple[dict[str, Any] | Any, str, str | None]] = [
    ([], "schema", "$"),
    ({k: v for k, v in _base().items() if k != "schema_version"}, "schema", "$.schema_version"),
    (_base(schema_version="2.0"), "unsupported_schema_version", "$.schema_version"),
    (_base(schema_version="0.9"), "unsupported_schema_version", "$.schema_version"),
    (_base(schema_version="1"), "schema", "$.schema_version"),
    (_base(schema_version="1.0.1"), "schema", "$.schema_version"),
    (_base(schema_version=1.0), "schema", "$.schema_version"),
    (_base(message_type="FACT"), "schema", "$.message_type"),
    (_base(message_type=None), "schema", "$.message_type"),
    (_base(status="done"), "schema", "$.status"),
    (_base(extra=1), "schema", "$.extra"),
    *(
        ({k: v for k, v in _base().items() if k != f}, "schema", f"$.{f}")
        for f in ("message_id", "created_at", "workflow_id", "task_id", "agent_id")
    ),
    (_base(created_at=None), "schema", "$.created_at"),
    (_base(created_at="2026-03-01T10:00:00"), "schema", "$.created_at"),
    (_base(created_at="2026-02-30T10:00:00Z"), "schema", "$.created_at"),
    (_base(created_at="2026-03-01T10:00:00+24:00"), "schema", "$.created_at"),
    (_base(created_at="2026-03-01T24:00:00Z"), "schema", "$.created_at"),
    (_base(created_at="0001-01-01T00:00:00+01:00"), "schema", "$.created_at"),
    (_base(created_at=20260301), "schema", "$.created_at"),
    (_base(message_id="_x"), "schema", "$.message_id"),
    (_base(message_id="x" * 129), "schema", "$.message_id"),
    (_base(message_id="a b"), "schema", "$.message_id"),
    (_base(message_id="m\n"), "schema", "$.message_id"),
    (_base(agent_id=""), "schema", "$.agent_id"),
    (_base(agent_id="a\nb"), "schema", "$.agent_id"),
    (_base(agent_id="a" * 257), "schema", "$.agent_id"),
    (_base(agent_id="nul\x00"), "schema", "$.agent_id"),
    (_base(to="a."), "schema", "$.to"),
    (_base(to="com3"), "schema", "$.to"),
    (_base(to="a/b"), "schema", "$.to"),
    (_base(to="topic:"), "schema", "$.to"),
    (_base(to="topic:a."), "schema", "$.to"),
    (_base(to=[]), "schema", "$.to"),
    (_base(to=["bob", "topic:x"]), "schema", "$.to[1]"),
    (_base(to=["bob"] * 257), "schema", "$.to"),
    (_base(to=5), "schema", "$.to"),
    (_base(workflow_id=""), "schema", "$.workflow_id"),
    (_base(task_id="t" * 257), "schema", "$.task_id"),
    (_base(idempotency_key=""), "schema", "$.idempotency_key"),
    (_base(parents=["ok", "_bad"]), "schema", "$.parents[1]"),
    (_base(parents="m-1"), "schema", "$.parents"),
    (_base(attachment_path="a/../b"), "schema", "$.attachment_path"),
    (_base(attachment_path="/etc/passwd"), "schema", "$.attachment_path"),
    (_base(attachment_path="C:x"), "schema", "$.attachment_path"),
    (_base(attachment_path="a\x00"), "schema", "$.attachment_path"),
    (_base(attachment_path=""), "schema", "$.attachment_path"),
    (_base(metadata=[]), "schema", "$.metadata"),
    (_base(metadata=_nest(65)), "schema", "$.metadata"),
    (_base(project_id=1), "schema", "$.project_id"),
    (_base(body=5), "schema", "$.body"),
    (_base(priority="high"), "schema", "$.priority"),
    (_base("task_assignment", priority="urgent"), "schema", "$.priority"),
    (_base("task_assignment", timeout_seconds=0), "schema", "$.timeout_seconds"),
    (_base("task_assignment", timeout_seconds=True), "schema", "$.timeout_seconds"),
    (_base("task_assignment", assigned_to="con"), "schema", "$.assigned_to"),
    (_base("task_assignment", inputs=[1]), "schema", "$.inputs"),
    (_base("status_update", status="done"), "schema", "$.status"),
    (_base("status_update", status=None), "schema", "$.status"),
    (_base("status_update", progress_percent=101), "schema", "$.progress_percent"),
    (_base("status_update", progress_percent="5"), "schema", "$.progress_percent"),
    (_base("status_update", progress_percent=10**400), "schema", "$.progress_percent"),
    (_base("task_complete", status="in_progress"), "schema", "$.status"),
    (_base("task_complete", results="ok"), "schema", "$.results"),
]


def _busd_verdict(msg: Any) -> tuple[str, str | None] | None:
    try:
        decode(json.dumps(msg).encode())
    except BusdInvalid as exc:
        return exc.reason.value, exc.path
    return None


def _our_verdict(msg: Any) -> tuple[str, str | None] | None:
    try:
        validate_message(msg)
    except InvalidMessage as exc:
        return exc.reason, exc.path
    return None


@pytest.mark.parametrize("msg", _VALID)
def test_validator_accepts_what_busd_accepts(msg: dict[str, Any]) -> None:
    """Valid messages pass both validators."""
    assert _busd_verdict(msg) is None
    assert _our_verdict(msg) is None


@pytest.mark.parametrize(("msg", "reason", "path"), _INVALID)
def test_validator_rejects_like_busd(msg: Any, reason: str, path: str | None) -> None:
    """Each common error is refused by both, with the same reason and field path."""
    assert _busd_verdict(msg) == (reason, path)
    assert _our_verdict(msg) == (reason, path)


def test_validator_rejects_unencodable_and_too_large() -> None:
    """Values JSON cannot carry, and oversized messages, are refused before writing."""
    with pytest.raises(InvalidMessage) as err:
        validate_message(_base(body=float("nan")))
    assert err.value.reason == "invalid_json"
    with pytest.raises(InvalidMessage) as err:
        validate_message(_base(body="\ud800"))
    assert err.value.reason == "invalid_utf8"
    with pytest.raises(InvalidMessage) as err:
        validate_message(_base(body="x" * 2000), max_bytes=1000)
    assert err.value.reason == "too_large"


_FIELDS = [
    *_base("task_assignment"),
    "to",
    "idempotency_key",
    "parents",
    "project_id",
    "run_id",
    "attachment_path",
    "body",
    "metadata",
    "assigned_to",
    "priority",
    "inputs",
    "timeout_seconds",
    "retry_policy",
    "status",
    "progress_percent",
    "current_step",
    "results",
    "unknown",
]
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 300),
    st.floats(-1, 150, allow_nan=False),
    st.sampled_from(
        [
            "",
            "bob",
            "a.",
            "con",
            "_x",
            "topic:news",
            "topic:",
            "1.0",
            "1.12",
            "2.0",
            "1.0.1",
            "fact",
            "status_update",
            "task_complete",
            "task_assignment",
            "completed",
            "in_progress",
            "high",
            "urgent",
            "2026-03-01T10:00:00Z",
            "2026-03-01T10:00:00.5+05:30",
            "2026-03-01T10:00:00",
            "2026-13-01T10:00:00Z",
            "a/../b",
            "C:\\x",
            "x" * 257,
        ]
    ),
    st.text(max_size=5),
    st.lists(st.sampled_from(["bob", "m-1", "topic:x", "_bad", "a."]), max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mtype=st.sampled_from(sorted(busclient._TYPES)),
    changes=st.lists(st.tuples(st.sampled_from(_FIELDS), _VALUES | st.just("<del>")), max_size=3),
)
def test_validator_agrees_with_busd_decode(mtype: str, changes: list[tuple[str, Any]]) -> None:
    """On random mutations of valid messages, ours accepts exactly what busd accepts."""
    msg = _base(mtype)
    for key, value in changes:
        if value == "<del>":
            msg.pop(key, None)
        else:
            msg[key] = value
    ours, theirs = _our_verdict(msg), _busd_verdict(msg)
    assert (ours is None) == (theirs is None), (msg, ours, theirs)
    if ours is not None and theirs is not None and len(changes) == 1:
        assert ours[0] == theirs[0], (msg, ours, theirs)
