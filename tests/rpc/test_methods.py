"""The socket methods in-process, against a small fake Broker over a real Router."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime

import anyio
import msgspec
import pytest

from busd.config import Config
from busd.errors import BusdError, InvalidMessage, NotFound
from busd.ops.status import StatusReport, report
from busd.routing.queues import AckOutcome, Delivery, Queues, Ref
from busd.routing.router import Incoming, Kept, Router
from busd.rpc.methods import Methods
from busd.rpc.protocol import (
    AckParams,
    AgentParams,
    DlqListParams,
    ExtendParams,
    FetchParams,
    NackParams,
    PublishParams,
    ReplayParams,
    SubscribeParams,
)
from busd.runtime.memory import new_receipt
from busd.store import dlq
from conftest import Bus
from daemon_harness import message


class FakeBroker:
    """Commits and delivers each publish at once, and records what the methods asked for.

    Agents in ``served`` get their messages in a real :class:`Queues` (no file),
    read back from the real journal, as the daemon does; the rest get files.
    """

    def __init__(self, config: Config, router: Router) -> None:
        self.config = config
        self.started_at = time.time() - 5
        self.router = router
        self.arrivals: list[str] = []
        self.scans = 0
        self.topics: list[tuple[str, str]] = []
        self.queues = Queues()
        self.served: set[str] = set()
        self.touched: list[str] = []

    async def publish(self, items: list[Incoming]) -> None:
        def route() -> list[Kept]:
            batch = self.router.commit([], items)
            return self.router.finish(batch, served=self.served.__contains__).kept

        for k in await anyio.to_thread.run_sync(route):
            self.queues.add(k.agent, Ref(k.message_id, k.key, k.position, k.length))

    def attach(self, agent: str) -> None:
        self.served.add(agent)

    def detach(self, agent: str) -> None:
        self.served.discard(agent)

    def touch(self, agent: str) -> None:
        self.touched.append(agent)

    async def claim(self, agent: str, n: int) -> list[tuple[Delivery, bytes]]:
        claimed, _ = self.queues.claim(
            agent, n, now=time.time(), lease_s=60.0, max_deliveries=5, new_receipt=new_receipt
        )
        out = []
        for d in claimed:
            entry = self.router.journal.read_at(d.ref.position, d.ref.length)
            assert entry.message is not None
            out.append((d, bytes(entry.message)))
        return out

    async def waiting(self, agent: str, n: int) -> list[tuple[str, int, bytes]]:
        out = []
        for ref, count in self.queues.waiting(agent, n):
            entry = self.router.journal.read_at(ref.position, ref.length)
            assert entry.message is not None
            out.append((ref.message_id, count, bytes(entry.message)))
        return out

    async def settle(
        self, agent: str, *, receipts: list[str], message_ids: list[str]
    ) -> AckOutcome:
        return self.queues.ack(agent, receipts=receipts, message_ids=message_ids)

    def holds(self, agent: str, message_id: str) -> bool:
        return self.queues.holds(agent, message_id)

    def release(
        self, agent: str, *, receipt: str | None, message_id: str | None, delay_s: float
    ) -> None:
        self.queues.release(
            agent, receipt=receipt, message_id=message_id, now=time.time(), delay_s=delay_s
        )

    def extend(
        self, agent: str, *, receipt: str | None, message_id: str | None, lease_s: float
    ) -> datetime:
        d = self.queues.extend(
            agent, receipt=receipt, message_id=message_id, now=time.time(), lease_s=lease_s
        )
        return datetime.fromtimestamp(d.lease_until, UTC)

    async def reject(
        self, agent: str, *, receipt: str | None, message_id: str | None, reason: str
    ) -> str:
        raise NotImplementedError("memory rejects run in the daemon: tests/rpc/test_reject.py")

    async def settled(self) -> None:
        return None

    async def wait_for_delivery(self, agent: str, timeout: float) -> None:
        await anyio.sleep(min(timeout, 0.01))

    def notify_arrival(self, agent: str) -> None:
        self.arrivals.append(agent)

    def request_scan(self) -> None:
        self.scans += 1

    async def subscribe(self, topic: str, agent: str) -> None:
        self.topics.append((topic, agent))

    async def status(self) -> StatusReport:
        return report(self.config, None)


def _raw(i: int, **fields: object) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode(message(i, **fields)))


def _json(result: object) -> object:
    return msgspec.json.decode(msgspec.json.encode(result))


def test_publish_fetch_ack_in_process(bus: Bus) -> None:
    """A publish is fetched, extended and acked; results encode as protocol.md §11 says."""
    with Router(bus.config) as router:
        methods = Methods(FakeBroker(bus.config, router))

        async def main() -> None:
            ping = _json(await methods.ping(AgentParams()))
            assert isinstance(ping, dict)
            assert list(ping) == ["version", "pid", "uptime_s"]
            assert ping["pid"] == os.getpid() and ping["uptime_s"] >= 5
            published = _json(await methods.publish(PublishParams(_raw(1))))
            assert published == {"message_id": "m-000001", "duplicate": False}
            fetched = _json(await methods.fetch(FetchParams("bob", max=5)))
            assert isinstance(fetched, dict)
            (claimed,) = fetched["messages"]
            assert list(claimed) == ["message", "delivery_count", "lease_expires_at", "receipt"]
            assert claimed["message"]["message_id"] == "m-000001"
            assert claimed["delivery_count"] == 1
            extended = _json(
                await methods.extend(ExtendParams("bob", message_id="m-000001", lease_s=60.0))
            )
            assert isinstance(extended, dict) and list(extended) == ["lease_expires_at"]
            acked = _json(await methods.ack(AckParams("bob", ["m-000001", "nope"])))
            assert acked == {"acked": 1, "not_held": ["nope"]}
            assert _json(await methods.fetch(FetchParams("bob"))) == {"messages": []}

        anyio.run(main)


def test_fetch_builds_a_consumer_off_the_event_loop(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first fetch of an agent creates and fsyncs its directories in a worker thread.

    Before, ``Consumer(...)`` ran on the event loop, and with it fsync_dir.
    """
    calls: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(threading.get_ident())
        real_fsync(fd)

    with Router(bus.config) as router:
        methods = Methods(FakeBroker(bus.config, router))

        async def main() -> int:
            monkeypatch.setattr(os, "fsync", fsync)
            assert _json(await methods.fetch(FetchParams("newcomer"))) == {"messages": []}
            return threading.get_ident()

        loop_thread = anyio.run(main)
    assert bus.layout.inbox_dir("newcomer").is_dir()
    assert calls, "creating the agent's directories fsyncs them"
    assert loop_thread not in calls


def test_nack_wakes_fetchers_and_replay_asks_for_a_scan(bus: Bus) -> None:
    """nack (without delay) notifies the agent's waiters; replay asks the broker to rescan."""
    with Router(bus.config) as router:
        broker = FakeBroker(bus.config, router)
        methods = Methods(broker)

        async def main() -> None:
            await methods.publish(PublishParams(_raw(1)))
            await methods.fetch(FetchParams("bob"))
            assert _json(await methods.nack(NackParams("bob", "m-000001"))) == {}
            assert broker.arrivals == ["bob"]
            with pytest.raises(NotFound):
                await methods.nack(NackParams("bob", "m-000001", delay_s=1.0))
            replayed = _json(await methods.replay(ReplayParams(names=["missing"])))
            assert isinstance(replayed, dict)
            (moved,) = replayed["replayed"]
            assert (moved["name"], moved["status"]) == ("missing", "not_found")
            assert broker.scans == 1

        anyio.run(main)


def test_invalid_publish_is_refused_and_dead_lettered(bus: Bus) -> None:
    """An invalid message raises the codec's error and is in the DLQ byte for byte."""
    with Router(bus.config) as router:
        methods = Methods(FakeBroker(bus.config, router))
        data = b'{"nope": 1}'

        async def main() -> None:
            with pytest.raises(InvalidMessage):
                await methods.publish(PublishParams(msgspec.Raw(data)))
            listed = _json(await methods.dlq_list(DlqListParams()))
            assert isinstance(listed, dict)
            (entry,) = listed["entries"]
            assert entry["reason"] == "schema"
            assert dlq.load(bus.layout, entry["name"]).data() == data

        anyio.run(main)


def test_subscribe_joins_topics_through_the_broker(bus: Bus) -> None:
    """Subscribers.add checks names, then asks the broker to subscribe each topic."""
    with Router(bus.config) as router:
        broker = FakeBroker(bus.config, router)
        methods = Methods(broker)

        async def main() -> None:
            sub = await methods.subscribers.add(SubscribeParams("bob", topics=["deploys"]))
            assert broker.topics == [("deploys", "bob")]
            assert sub.max_in_flight == bus.config.max_in_flight
            assert methods.subscribers.of("bob") == {sub}
            with pytest.raises(BusdError):
                await methods.subscribers.add(SubscribeParams("bob", topics=["no/slash"]))
            methods.subscribers.remove(sub)
            assert methods.subscribers.of("bob") == set()

        anyio.run(main)


def test_status_is_the_brokers_report(bus: Bus) -> None:
    """status runs the broker's status in a thread and returns the StatusReport."""
    with Router(bus.config) as router:
        methods = Methods(FakeBroker(bus.config, router))
        result = anyio.run(methods.status, AgentParams())
    assert isinstance(result, StatusReport)
    assert result.root == str(bus.root)
