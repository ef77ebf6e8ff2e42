"""``busd run``: one long-running process that owns a bus and routes it.

The Daemon is lifecycle only; the work is done by the objects it starts, each
owning its state (:mod:`~busd.runtime.committer`, :mod:`~busd.runtime.deliverer`,
:mod:`~busd.runtime.arrivals`, :mod:`~busd.runtime.topics`,
:mod:`~busd.runtime.metrics`). It knows nothing of sockets: the composition
root (:mod:`busd.app`) passes the listener in as a service to start before
"ready", and the socket methods see the Daemon only as a ``Broker``.

Phases of :meth:`Daemon.run`, in order:

* startup: take the bus lock (refusing if another daemon holds it), build the
  Router (before the task group, so a start-up failure leaves as a plain error
  the CLI can explain), install signal receivers, start the services (the
  socket is bound before "ready": a bind error stops start-up with a clear
  message), start the watcher, recover (repair the journal tail, rebuild the
  dedupe index and the in-memory queues from the journal after the
  checkpoint, return expired claims), start the lanes and timers, the
  conductor-loop follower and mirrors (:mod:`~busd.runtime.follow`,
  :mod:`~busd.runtime.mirror`: they publish and consume through the lanes),
  then report ready (log line + ``READY=1``). Files that waited in outboxes while no daemon
  ran are routed AFTER ready, by the committer's passes in arrival order
  (``busd status`` shows the backlog draining), so a large backlog never
  delays start-up;
* serve: until a stop is requested (SIGTERM/SIGINT or :meth:`Daemon.stop`);
* shutdown: stop watching, refuse publishes, cancel the task group (a batch in
  its worker thread finishes its journal append and fsync: worker threads are
  never abandoned), then, shielded, write every memory message (ready and in
  flight) and the inbox files still queued as files, checkpoint, and release
  the lock: the daemon-less tools see the whole queue.

Socket consumers are served from memory (:mod:`busd.runtime.memory`): the
served rule, the write-out of unserved agents' messages (a 1 s timer), lease
expiry of memory deliveries (with the lease sweep), and the checkpoint floor.

A second SIGINT, or the shutdown timeout running out (the timer is armed in
the signal receiver), calls ``on_force_exit`` (the CLI exits the process).
SIGHUP re-reads the config file and environment; the Router gets the new
config inside the commit lane.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup, TaskStatus

from busd.config import Config, ConfigLoader
from busd.errors import AlreadyRunning, BusdError, ConfigError, StorageError
from busd.ops.host import raise_fd_limit
from busd.ops.listings import Listings
from busd.ops.status import DaemonInfo, QueueInfo, Rates, StatusReport, Totals, report
from busd.routing.consumer import return_expired
from busd.routing.queues import Queues
from busd.routing.recovery import write_checkpoint
from busd.routing.retention import gc
from busd.routing.router import Incoming, Router, RouteReport
from busd.runtime.arrivals import Arrivals, Wakeup
from busd.runtime.committer import Committer
from busd.runtime.consumers import ConsumerMethods
from busd.runtime.deliverer import Deliverer
from busd.runtime.follow import Follower
from busd.runtime.memory import Memory, rebuild
from busd.runtime.metrics import Metrics
from busd.runtime.mirror import run_mirrors, with_mirrors
from busd.runtime.sdnotify import Notifier, watchdog_interval
from busd.runtime.serving import Serving
from busd.runtime.topics import Topics
from busd.runtime.watcher import watch
from busd.store.buslock import BusLock

__all__ = ["Daemon", "StartServices"]

_log = structlog.get_logger("busd.daemon")
_CLI_LOCK_WAIT_S = 5.0
_GC_PERIOD_S = 60.0
_CHECKPOINT_PERIOD_S = 1.0
_WRITE_OUT_PERIOD_S = 1.0

StartServices = Callable[[TaskGroup], Awaitable[None]]
"""Starts services in the daemon's task group before it is ready (``await tg.start(...)``)."""


class _Running:
    """The objects that exist only while :meth:`Daemon.run` runs."""

    def __init__(self, daemon: Daemon, router: Router) -> None:
        self.router = router
        self.deliverer = Deliverer(
            router,
            daemon.metrics,
            daemon.arrivals,
            on_failure=lambda: self.committer.request_pass(),
        )
        self.committer = Committer(router, self.deliverer, daemon.metrics)
        self.memory = Memory(
            router,
            self.committer,
            self.deliverer,
            daemon.metrics,
            lambda: daemon.config,
            daemon.serving,
        )
        self.deliverer.served = daemon.serving.served
        self.deliverer.keep = self.memory.keep
        self.deliverer.floor = self.memory.floor
        self.deliverer.live = self.memory.queues
        self.deliverer.held = self.memory.covers


class Daemon(ConsumerMethods):
    """The broker process. Construct with a loader, then ``await run()``.

    Implements the ``busd.rpc.broker.Broker`` protocol the socket methods use.
    """

    def __init__(
        self, loader: ConfigLoader, *, on_force_exit: Callable[[], None] | None = None
    ) -> None:
        self.loader = loader
        self.config: Config = loader.load()
        self.on_force_exit = on_force_exit or (lambda: os._exit(1))
        self.notifier = Notifier()
        self.started_at = time.time()
        self.metrics = Metrics()
        self.arrivals = Arrivals()
        self.topics = Topics(self.config.layout)
        self.serving = Serving(lambda: self.config.serve_grace_seconds)
        self.on_returned: Callable[[str, set[str]], None] = lambda agent, ids: None
        """Told the ids of an agent's memory deliveries whose lease ended (the subscribers)."""
        self.socket: Path | None = None
        """The endpoint clients use, for ``status``; set by whoever starts the listener."""
        self._running: _Running | None = None
        self._stop = anyio.Event()
        self._watch_stop = anyio.Event()
        self._reload = Wakeup()
        self._reconfiguring = anyio.Lock()  # subscribe and reload, one at a time
        self._stop_signals = 0
        self._force_timer: threading.Timer | None = None
        self._recovered = 0
        self._listings = Listings()

    @property
    def router(self) -> Router:
        """The router; only valid while :meth:`run` is running."""
        return self._parts.router

    def _memory(self) -> Memory:
        return self._parts.memory

    def _memory_or_none(self) -> Memory | None:
        return self._running.memory if self._running is not None else None

    @property
    def _parts(self) -> _Running:
        assert self._running is not None, "daemon not started"
        return self._running

    # -- lifecycle ----------------------------------------------------------

    async def run(
        self,
        start_services: StartServices | None = None,
        *,
        task_status: TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until a stop is requested; raise :class:`AlreadyRunning` if the bus is taken.

        ``start_services`` runs inside the root task group before the daemon
        is ready; ``task_status`` is given the daemon once it is.
        """
        raise_fd_limit()
        lock = BusLock(self.config.layout, role="daemon")
        await anyio.to_thread.run_sync(self._acquire, lock)
        try:
            await self._build()
            async with _plain_errors(), anyio.create_task_group() as tg:
                report = await self._startup(tg, start_services)
                self._ready(report)
                task_status.started(self)
                await self._stop.wait()
                self._shutdown(tg)
        finally:
            await self._release(lock)
        _log.info("daemon_stopped", accepted=self.metrics.accepted)

    def stop(self) -> None:
        """Ask for a graceful stop (what SIGTERM does, without the force-exit timer)."""
        if self._running is not None:
            self._running.committer.close()  # from now on a publish is refused
        self._stop.set()

    async def _build(self) -> None:
        try:
            router = await anyio.to_thread.run_sync(Router, self.config)
        except PermissionError as exc:
            raise StorageError(f"cannot read the bus: {exc}", path=exc.filename) from exc
        self._running = _Running(self, router)
        self._running.memory.on_returned = lambda agent, ids: self.on_returned(agent, ids)
        # Before any commit and before the lanes exist: nothing can race this.
        subscriptions = with_mirrors(self.config, await self.topics.reload(self.config))
        await anyio.to_thread.run_sync(router.reconfigure, self.config, subscriptions)

    async def _startup(self, tg: TaskGroup, start_services: StartServices | None) -> RouteReport:
        parts = self._parts
        await tg.start(self._signals)
        if start_services is not None:
            await start_services(tg)
        tg.start_soon(watch, self.config, parts.committer.on_hints, self._watch_stop)
        async with parts.committer.lane, parts.deliverer.lane:
            report, queues, rebuilt = await anyio.to_thread.run_sync(self._recover)
        parts.memory.queues = parts.deliverer.live = queues
        parts.memory.rebuilt = rebuilt
        self.metrics.count(report)
        tg.start_soon(parts.committer.run)
        tg.start_soon(parts.deliverer.run)
        # conductor-loop bus files: followed into the committer, mirrored from topics.
        follower = Follower(lambda: self.config, parts.committer, self.metrics, self._watch_stop)
        await tg.start(follower.run)
        await tg.start(run_mirrors, self)
        # The backlog that waited while no daemon ran: routed after ready, pass by pass.
        parts.committer.request_full_scan()
        parts.memory.hold_until = time.monotonic() + self.config.serve_grace_seconds
        tg.start_soon(self._timer, parts.memory.write_out, lambda: _WRITE_OUT_PERIOD_S)
        tg.start_soon(self._timer, self._lease_pass, self._lease_period)
        tg.start_soon(self._timer, parts.committer.request_full_scan, self._rescan_period)
        tg.start_soon(self._timer, self._gc_pass, lambda: _GC_PERIOD_S)
        tg.start_soon(self._timer, parts.deliverer.checkpoint, lambda: _CHECKPOINT_PERIOD_S)
        tg.start_soon(self._reload_loop)
        tg.start_soon(self._warm_listings)
        if (interval := watchdog_interval()) is not None:
            tg.start_soon(self._timer, self._watchdog, lambda: interval)
        return report

    def _ready(self, report: RouteReport) -> None:
        _log.info(
            "daemon_ready",
            root=self.config.root,
            pid=os.getpid(),
            recovered=self._recovered,
            dead_lettered=report.dead_lettered,
        )
        self.notifier.send("READY=1", f"STATUS=ready; recovered {report.accepted}")

    def _shutdown(self, tg: TaskGroup) -> None:
        _log.info("daemon_stopping")
        self.notifier.send("STOPPING=1")
        self._watch_stop.set()
        if self._running is not None:
            self._running.committer.close()
        # Cancelling waits for a worker thread in flight: the batch
        # being routed finishes its journal fsync and deliveries.
        tg.cancel_scope.cancel()

    async def _release(self, lock: BusLock) -> None:
        if self._running is not None:
            parts = self._running
            with anyio.CancelScope(shield=True):
                # Every memory message becomes a file: the daemon-less tools see the queue.
                await parts.memory.write_out(everything=True, progress=self._rearm_force_timer)
                floor = parts.memory.floor()
                await anyio.to_thread.run_sync(parts.deliverer.final_checkpoint, floor)
            self._running.router.close()
        lock.release()
        if self._force_timer is not None:
            self._force_timer.cancel()

    def _acquire(self, lock: BusLock) -> None:
        if lock.acquire(timeout=0):
            return
        holder = lock.holder() or {}
        # A daemon-less CLI holds the lock only for one routing pass: wait it out.
        if holder.get("role") == "cli" and lock.acquire(timeout=_CLI_LOCK_WAIT_S):
            return
        pid = holder.get("pid")
        raise AlreadyRunning(
            f"busd is already running on {self.config.root} (pid {pid})",
            pid=pid if isinstance(pid, int) else None,
        )

    def _arm_force_timer(self) -> None:
        timer = threading.Timer(self.config.shutdown_timeout_seconds, self._force)
        timer.daemon = True
        timer.start()
        self._force_timer = timer

    def _rearm_force_timer(self) -> None:
        """The stop is making progress (a chunk of memory written out): restart the timer.

        Called from a worker thread; only a timer a stop signal armed is re-armed."""
        timer = self._force_timer
        if timer is not None:
            timer.cancel()
            self._arm_force_timer()

    def _force(self) -> None:
        _log.error("daemon_forced_exit", timeout_s=self.config.shutdown_timeout_seconds)
        self.on_force_exit()

    async def _signals(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # Receivers only record the request; the main task acts on it.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self._reload.set()
                    continue
                self._stop_signals += 1
                if self._stop_signals > 1 and signum == signal.SIGINT:
                    self._force()
                if self._force_timer is None:
                    # Armed here, not when the main task notices: a stop during a long
                    # start-up recovery must still end within the shutdown timeout.
                    self._arm_force_timer()
                self.stop()

    # -- work ---------------------------------------------------------------

    def _recover(self) -> tuple[RouteReport, Queues, set[tuple[str, str]]]:
        """Start-up recovery; a worker thread, in both lanes, before ready.

        Rebuilds the memory queues from the journal after the checkpoint (every
        agent's messages stay in memory for ``serve_grace_seconds``); the
        outbox backlog is left to the committer's passes after ready.
        """
        router = self.router
        removed = router.journal.repair()
        if removed:
            _log.warning("journal_tail_repaired", bytes_removed=removed)
        queues, recovered, rebuilt = rebuild(router, self.config.serve_grace_seconds)
        in_memory = sum(queues.ready(a) for a in queues.agents())
        expired = return_expired(self.config)
        _log.info(
            "recovery_done",
            redelivered_from_journal=recovered,
            in_memory=in_memory,
            claims_returned=len(expired.returned),
            claims_dead_lettered=len(expired.dead_lettered),
        )
        router.checkpoint_limit = queues.low_water()
        write_checkpoint(router)
        self._recovered = recovered + in_memory
        return RouteReport(dead_lettered=len(expired.dead_lettered)), queues, rebuilt

    async def _lease_pass(self) -> None:
        back = self._parts.memory.expire()
        if back:
            self.arrivals.notify(back)
        async with self._parts.committer.lane:
            expired = await anyio.to_thread.run_sync(return_expired, self.config)
        self.metrics.count(RouteReport(dead_lettered=len(expired.dead_lettered)))
        if expired.returned:
            self.arrivals.notify(None)
        for name in expired.returned:
            _log.info("message_redelivered", name=name)

    async def _gc_pass(self) -> None:
        config, journal = self.config, self.router.journal
        async with self._parts.committer.lane:
            report = await anyio.to_thread.run_sync(lambda: gc(config, journal=journal))
        if report.journal_segments or report.ledger_records or report.dlq_entries:
            _log.info("retention_applied", **msgspec.structs.asdict(report))

    def _lease_period(self) -> float:
        return min(1.0, self.config.lease_seconds / 4)

    def _rescan_period(self) -> float:
        return self.config.rescan_interval_seconds

    async def _watchdog(self) -> None:
        t = self.metrics.totals()
        self.notifier.send(
            "WATCHDOG=1",
            f"STATUS=ready; accepted {t['accepted']}, delivered {t['delivered']}, "
            f"duplicates {t['duplicates']}, dead-lettered {t['dead_lettered']}",
        )

    async def _timer(self, action: Callable[[], Any], period: Callable[[], float]) -> None:
        while True:
            await anyio.sleep(period())
            result = action()
            if result is not None:
                await result

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self.notifier.send("RELOADING=1")
            try:
                new = await anyio.to_thread.run_sync(self.loader.load)
            except ConfigError as exc:
                _log.error("config_reload_failed", error=str(exc), key=exc.context.get("key"))
            else:
                await self.reload(new)
            self.notifier.send("READY=1")

    async def reload(self, new: Config) -> None:
        """Take ``new`` (its root is ignored): the daemon's, then the Router's, in the lane."""
        if new.root != self.config.root:
            _log.warning("config_reload_ignored_root", root=new.root, kept=self.config.root)
            new = msgspec.structs.replace(new, root=self.config.root)
        async with self._reconfiguring:
            self.config = new
            subscriptions = with_mirrors(new, await self.topics.reload(new))
            await self._parts.committer.reconfigure(new, subscriptions)
        _log.info("config_reloaded", config_file=new.config_file)

    # -- the Broker the socket methods see -----------------------------------

    async def publish(self, items: list[Incoming]) -> None:
        """Hand ``items`` to the next group commit; return once each has its outcome."""
        await self._parts.committer.publish(items)

    async def settled(self) -> None:
        """Return once deliveries of every publish answered so far are in the inboxes.

        Publishers are answered after the journal fsync, before their inbox files
        exist; a fetch waits here first, so a consumer always sees what was
        acknowledged to a producer before it asked (read your writes).
        """
        await self._parts.deliverer.settled()

    async def wait_for_delivery(self, agent: str, timeout: float) -> None:
        """Return when something may have arrived for ``agent``, or after ``timeout``."""
        await self.arrivals.wait(agent, timeout)

    def notify_arrival(self, agent: str) -> None:
        """Wake fetchers and subscribers of ``agent`` (a message was put back)."""
        self.arrivals.notify((agent,))

    def request_scan(self) -> None:
        """Ask for a full scan soon (after a replay published into outboxes)."""
        self._parts.committer.request_full_scan()

    async def subscribe(self, topic: str, agent: str) -> None:
        """Add ``agent`` to ``topic``, persisted durably, and route to it from the next commit."""
        async with self._reconfiguring:
            subscriptions = await self.topics.subscribe(topic, agent)
            if subscriptions is not None:
                subscriptions = with_mirrors(self.config, subscriptions)
                await self._parts.committer.reconfigure(self.config, subscriptions)

    async def status(self) -> StatusReport:
        """``busd status`` data, with what only the daemon knows.

        The memory queues are read on the loop (they are the loop's); the
        directory listings run in a worker thread.
        """
        queues = self._parts.memory.info()
        return await anyio.to_thread.run_sync(self._status, queues)

    async def _warm_listings(self) -> None:
        # The first `status` after a start would list every mailbox (100,000 names is
        # about 0.1 s): list them now, so it lists only what changed since.
        config = self.config
        await anyio.to_thread.run_sync(lambda: report(config, None, listings=self._listings))

    def _status(self, queues: dict[str, QueueInfo]) -> StatusReport:
        info = DaemonInfo(
            pid=os.getpid(),
            uptime_s=round(time.time() - self.started_at, 3),
            socket=str(self.socket),
            watcher="polling" if self.config.force_polling else "native",
            config_file=self.config.config_file,
            dedupe_index=len(self.router.dedupe),
            undelivered=self._parts.deliverer.undelivered,
            totals=Totals(**self.metrics.totals()),
            rates_per_min=msgspec.convert(self.metrics.per_minute(), Rates),
            queues=queues,
        )
        return report(self.config, info, listings=self._listings)


@contextlib.asynccontextmanager
async def _plain_errors() -> AsyncIterator[None]:
    """Let a lone busd error from inside the task group (a start-up failure, say
    a journal that cannot be written) leave as itself, for the CLI to explain."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], BusdError):
            raise group.exceptions[0] from None
        raise
