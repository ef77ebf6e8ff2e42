"""The commit lane in-process, with a real Router: reconfigure between commits, group commit."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from busd.core.codec import decode
from busd.errors import ShuttingDown
from busd.routing.router import Incoming, Router
from busd.runtime.arrivals import Arrivals
from busd.runtime.committer import Committer
from busd.runtime.deliverer import Deliverer
from busd.runtime.metrics import Metrics
from busd.store.journal import Journal, JournalEntry, Position
from busd.store.layout import Layout, init_bus
from conftest import Bus
from daemon_harness import files, message


def _parts(router: Router) -> tuple[Committer, Deliverer, Metrics]:
    metrics = Metrics()
    deliverer = Deliverer(router, metrics, Arrivals(), on_failure=lambda: None)
    return Committer(router, deliverer, metrics), deliverer, metrics


def _incoming(i: int, **fields: object) -> Incoming:
    return Incoming(decode(msgspec.json.encode(message(i, **fields))))


def test_reconfigure_waits_for_the_commit_lane(bus: Bus) -> None:
    """A reload never changes the Router under a commit: it waits for the lane.

    Before, the daemon assigned router.config / subscriptions / dedupe window
    from the event loop while a worker thread could be inside Router.commit.
    """
    new = bus.with_config(dedupe_window_seconds=123.0)
    with Router(bus.config) as router:
        committer, _, _ = _parts(router)
        old_window = router.dedupe.window_s

        async def main() -> None:
            release = anyio.Event()

            async def commit_in_flight(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                async with committer.lane:
                    task_status.started()
                    await release.wait()

            async with anyio.create_task_group() as tg:
                await tg.start(commit_in_flight)
                tg.start_soon(committer.reconfigure, new, {"deploys": ["carol"]})
                await anyio.sleep(0.2)
                assert router.dedupe.window_s == old_window  # not while the lane is held
                release.set()
            assert router.dedupe.window_s == 123.0

        anyio.run(main)


def test_publish_after_reconfigure_routes_by_the_new_topics(bus: Bus) -> None:
    """Topics handed to reconfigure route the next commit (what subscribe relies on)."""
    with Router(bus.config) as router:
        committer, deliverer, metrics = _parts(router)

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(committer.run)
                tg.start_soon(deliverer.run)
                await committer.reconfigure(bus.config, {"deploys": ["carol"]})
                item = _incoming(1, to="topic:deploys")
                with anyio.fail_after(10):
                    await committer.publish([item])
                    await deliverer.settled()
                assert item.outcome == "accepted"
                committer.close()
                try:
                    await committer.publish([_incoming(2)])
                except ShuttingDown:
                    pass
                else:
                    raise AssertionError("a closed committer accepted a publish")
                tg.cancel_scope.cancel()

        anyio.run(main)
        assert len(files(bus.layout.inbox_dir("carol"))) == 1
        assert metrics.totals()["accepted"] == 1


def _count_appends(router: Router) -> list[int]:
    """The size of every journal append ``router`` makes from now on."""
    appends: list[int] = []
    real_append = router.journal.append_at

    def append(entries: list[object]) -> object:
        appends.append(len(entries))
        return real_append(entries)  # type: ignore[arg-type]

    router.journal.append_at = append  # type: ignore[method-assign,assignment]
    return appends


def test_concurrent_publishes_share_commits(bus: Bus) -> None:
    """Group commit: 20 publish calls at once need far fewer than 20 journal appends."""
    with Router(bus.config) as router:
        committer, deliverer, metrics = _parts(router)
        appends = _count_appends(router)

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(committer.run)
                tg.start_soon(deliverer.run)
                async with anyio.create_task_group() as publishers:
                    for i in range(20):
                        publishers.start_soon(committer.publish, [_incoming(i)])
                with anyio.fail_after(10):
                    await deliverer.settled()
                tg.cancel_scope.cancel()

        anyio.run(main)
        assert sum(appends) == 20
        assert len(appends) <= 3, appends
        assert metrics.totals()["accepted"] == 20


def test_acks_share_a_commit_and_return_only_once_journaled(bus: Bus) -> None:
    """``record`` (an ack's ``acked`` lines) returns after the append that holds its lines;
    concurrent ones share appends, and ``record_soon`` lines ride along without a commit."""
    with Router(bus.config) as router:
        committer, deliverer, _ = _parts(router)
        appends = _count_appends(router)
        now = datetime.now(UTC)

        def acked(i: int) -> JournalEntry:
            return JournalEntry(event="acked", at=now, message_id=f"m-{i}", agent="bob")

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(committer.run)
                tg.start_soon(deliverer.run)
                committer.record_soon([JournalEntry(event="delivered", at=now, message_id="d")])
                await anyio.sleep(0.05)
                assert appends == []  # a `delivered` line causes no commit of its own
                journaled: list[bool] = []

                async def ack(i: int) -> None:
                    await committer.record([acked(i)])
                    ids = {e.message_id for e in router.journal.read(events=("acked",))}
                    journaled.append(f"m-{i}" in ids)

                async with anyio.create_task_group() as ackers:
                    for i in range(20):
                        ackers.start_soon(ack, i)
                tg.cancel_scope.cancel()
            assert journaled == [True] * 20

        anyio.run(main)
        assert sum(appends) == 21 and len(appends) <= 3, appends
        assert [e.message_id for e in router.journal.read(events=("delivered",))] == ["d"]


class _GatedJournal(Journal):
    """A real Journal whose append waits for a gate: a commit held inside its thread."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def append_lines(self, lines: Sequence[bytes]) -> Position:
        """Signal, wait at the gate, then append for real."""
        self.entered.set()
        self.gate.wait(10)
        return super().append_lines(lines)


def test_a_stop_during_a_commit_still_hands_the_batch_to_the_delivery_lane(bus: Bus) -> None:
    """Cancelled while its commit runs in the worker thread (a graceful stop), the lane
    still queues the batch for its inbox files: its publisher is answered, so the stop's
    final checkpoint must deliver it (the worker thread is never abandoned, and the batch
    is queued before the lane's next checkpoint)."""
    journal = _GatedJournal(bus.layout.journal)
    with Router(bus.config, journal=journal) as router:
        committer, deliverer, _ = _parts(router)
        item = _incoming(1)

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(committer.run)
                tg.start_soon(committer.publish, [item])
                await anyio.to_thread.run_sync(journal.entered.wait, 10)
                tg.cancel_scope.cancel()  # the daemon's shutdown: cancel the task group
                journal.gate.set()
            deliverer.final_checkpoint()

        anyio.run(main)
    assert item.outcome == "accepted"
    assert [p.name.endswith("m-000001.json") for p in files(bus.layout.inbox_dir("bob"))] == [True]


def test_a_stop_at_any_step_of_a_delivery_pass_leaves_its_batch_delivered(bus: Bus) -> None:
    """Whatever event-loop step of the delivery lane a stop (cancel) lands on, the batch it
    took is delivered before the stop ends (in the pass, or by the final checkpoint).

    Before, a cancel that landed during the lane lock's shielded yield was raised at the
    worker thread's entry checkpoint, after the pass had taken the batches off the queue:
    an answered publish was journaled but got no inbox file at a graceful stop (seen under
    load as tests/rpc/test_server.py::test_sigterm_while_publishing_... failing now and then).
    """
    for steps in range(8):
        root = bus.root.parent / f"bus-{steps}"
        init_bus(root)
        with Router(msgspec.structs.replace(bus.config, root=str(root))) as router:
            item = _incoming(steps)
            anyio.run(_stop_after, router, item, steps)
        assert item.outcome == "accepted"
        assert len(files(Layout(root).inbox_dir("bob"))) == 1, f"lost at step {steps}"


async def _stop_after(router: Router, item: Incoming, steps: int) -> None:
    """Commit ``item``, start the delivery lane, stop ``steps`` loop steps later, then
    end as the daemon's shutdown does (final checkpoint)."""
    committer, deliverer, _ = _parts(router)
    async with anyio.create_task_group() as tg:
        tg.start_soon(committer.run)
        with anyio.fail_after(10):
            await committer.publish([item])  # committed and queued for delivery
        tg.start_soon(deliverer.run)
        for _ in range(steps):
            await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    deliverer.final_checkpoint()
