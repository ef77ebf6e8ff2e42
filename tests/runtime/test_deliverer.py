"""The delivery lane in-process: read-your-writes and back-pressure, with a real Router."""

from __future__ import annotations

import threading

import anyio
import msgspec

from busd.core.codec import decode
from busd.routing.router import Batch, Held, Incoming, Router, RouteReport, Served
from busd.runtime.arrivals import Arrivals
from busd.runtime.deliverer import Deliverer
from busd.runtime.metrics import Metrics
from conftest import Bus
from daemon_harness import files, message


class _GatedRouter(Router):
    """A real Router whose ``finish`` waits for the test to open a gate."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.entered = threading.Event()

    def finish(
        self, *batches: Batch, served: Served | None = None, held: Held | None = None
    ) -> RouteReport:
        self.entered.set()
        self.gate.wait(10)
        return super().finish(*batches, served=served, held=held)


def _incoming(i: int) -> Incoming:
    return Incoming(decode(msgspec.json.encode(message(i))))


def test_settled_waits_for_a_batch_being_delivered_when_an_empty_one_follows(bus: Bus) -> None:
    """An empty commit behind a batch in finish() must not mark that batch as delivered.

    Before the fix, the empty batch saw nothing queued (the batch in flight had
    been taken off the queue) and counted as finished at once, so a fetch after
    an answered publish could miss it.
    """
    router = _GatedRouter(bus.config)

    async def main() -> bool:
        deliverer = Deliverer(router, Metrics(), Arrivals(), on_failure=lambda: None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(deliverer.run)
            full = await anyio.to_thread.run_sync(router.commit, [], [_incoming(1)])
            await deliverer.enqueue(full)
            await anyio.to_thread.run_sync(router.entered.wait, 10)
            empty = await anyio.to_thread.run_sync(router.commit, [], [])
            await deliverer.enqueue(empty)
            with anyio.move_on_after(0.3) as scope:
                await deliverer.settled()
            waited = scope.cancelled_caught  # settled() must wait for the files
            router.gate.set()
            with anyio.fail_after(10):
                await deliverer.settled()
            tg.cancel_scope.cancel()
        return waited

    try:
        assert anyio.run(main) is True
        assert len(files(bus.layout.inbox_dir("bob"))) == 1
    finally:
        router.gate.set()
        router.close()


def test_room_waits_past_the_bound_until_deliveries_catch_up(bus: Bus) -> None:
    """Back-pressure: past ``max_pending`` messages a commit waits for the delivery lane."""
    router = _GatedRouter(bus.config)

    async def main() -> None:
        deliverer = Deliverer(router, Metrics(), Arrivals(), on_failure=lambda: None, max_pending=1)
        batch = await anyio.to_thread.run_sync(router.commit, [], [_incoming(1), _incoming(2)])
        await deliverer.enqueue(batch)
        assert deliverer.undelivered == 2
        with anyio.move_on_after(0.2) as scope:
            await deliverer.room()
        assert scope.cancelled_caught  # over the bound: waits
        router.gate.set()
        async with anyio.create_task_group() as tg:
            tg.start_soon(deliverer.run)
            with anyio.fail_after(10):
                await deliverer.room()
                await deliverer.settled()
            tg.cancel_scope.cancel()
        assert deliverer.undelivered == 0

    try:
        anyio.run(main)
    finally:
        router.gate.set()
        router.close()
