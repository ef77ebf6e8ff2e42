"""``busd run``: one long-running process that owns a bus and routes it.

Start-up, in order: take the bus lock (refusing if another daemon holds it),
install signal receivers, start the watcher, recover (repair the journal
tail, rebuild the dedupe index, return expired claims, route every file that
waited while no daemon ran), then report ready (log line + ``READY=1``).

Shutdown on SIGTERM/SIGINT, in order: stop watching, let the batch in flight
finish its journal append and fsync (worker threads are never abandoned),
stop the timers, write the inbox files still queued, checkpoint, release the
lock. A second SIGINT, or the shutdown timeout running out, calls
``on_force_exit`` (the CLI exits the process). SIGHUP re-reads the config file
and environment.

Routing runs in two lanes: the route loop commits batches (journal append and
fsync, then the publishers are answered) while the delivery loop writes the
inbox files of the batches committed before (docs/internals.md). Group commit
falls out of the structure: while one batch is in its worker thread, new hints
and publishes pile up, and the next commit takes all of them at once; it also
waits briefly for publishers it just answered (:meth:`Daemon._gather`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from busd.config import Config, ConfigLoader
from busd.core.model import check_agent_name
from busd.errors import (
    AlreadyRunning,
    BusdError,
    ConfigError,
    InvalidName,
    ShuttingDown,
    StorageError,
)
from busd.ops.status import collect
from busd.routing.consumer import return_expired
from busd.routing.recovery import recover_deliveries, write_checkpoint
from busd.routing.retention import gc
from busd.routing.router import Batch, Incoming, Router, RouteReport
from busd.rpc.methods import Service
from busd.rpc.server import Server
from busd.runtime.sdnotify import Notifier, watchdog_interval
from busd.runtime.watcher import watch
from busd.store.buslock import BusLock
from busd.store.journal import START

__all__ = ["Daemon", "RateTracker"]

_log = structlog.get_logger("busd.daemon")
_CLI_LOCK_WAIT_S = 5.0
_GC_PERIOD_S = 60.0
_SUBSCRIPTIONS_FILE = "subscriptions.json"
_CHECKPOINT_PERIOD_S = 1.0
_BATCH = 512
# Committed work may run ahead of its inbox files by this much; past it, commits
# wait (publishers see latency, not errors). The journal holds all of it anyway.
_GATHER_MAX_S = 0.002
_MAX_PENDING = 10_000
_MAX_PENDING_BYTES = 8 * 1024 * 1024


class RateTracker:
    """Counts per minute over the last 1 and 15 minutes, in one-second buckets.

    ``add`` runs on the event loop, ``per_minute`` in a worker thread: a lock
    guards the buckets. A rate is the count inside the window divided by the
    window, or by the uptime when that is shorter (at least one minute), so a
    young daemon does not look idle.
    """

    KINDS = ("accepted", "delivered", "dead_lettered")
    WINDOWS = (("1m", 60.0), ("15m", 900.0))

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._buckets: deque[list[float]] = deque()  # [second, accepted, delivered, dead]
        self._lock = threading.Lock()

    def add(self, accepted: int = 0, delivered: int = 0, dead_lettered: int = 0) -> None:
        """Count events that happened now."""
        if not (accepted or delivered or dead_lettered):
            return
        second = float(int(self._clock()))
        with self._lock:
            if not self._buckets or self._buckets[-1][0] != second:
                self._buckets.append([second, 0.0, 0.0, 0.0])
            bucket = self._buckets[-1]
            bucket[1] += accepted
            bucket[2] += delivered
            bucket[3] += dead_lettered
            while self._buckets and self._buckets[0][0] <= second - self.WINDOWS[-1][1]:
                self._buckets.popleft()

    def per_minute(self) -> dict[str, dict[str, float]]:
        """``{"accepted": {"1m": r, "15m": r}, "delivered": ..., "dead_lettered": ...}``."""
        now = self._clock()
        uptime = now - self._started
        with self._lock:
            buckets = list(self._buckets)
        out: dict[str, dict[str, float]] = {kind: {} for kind in self.KINDS}
        for label, window in self.WINDOWS:
            inside = [b for b in buckets if b[0] > now - window]
            minutes = min(window, max(uptime, 60.0)) / 60.0
            for i, kind in enumerate(self.KINDS, start=1):
                out[kind][label] = round(sum(b[i] for b in inside) / minutes, 3)
        return out


class Daemon:
    """The broker process. Construct with a loader, then ``await run()``."""

    def __init__(
        self, loader: ConfigLoader, *, on_force_exit: Callable[[], None] | None = None
    ) -> None:
        self.loader = loader
        self.config: Config = loader.load()
        self.on_force_exit = on_force_exit or (lambda: os._exit(1))
        self.notifier = Notifier()
        self.started_at = time.time()
        self.totals = RouteReport()
        self.rates = RateTracker()
        self._router: Router | None = None
        # Two lanes: commits (journal, dedupe, outboxes) and deliveries (inbox files,
        # checkpoints) each run one at a time, side by side. Whoever needs both
        # takes the commit lane first.
        self._lane = anyio.Lock()
        self._delivery_lane = anyio.Lock()
        self._pending: list[tuple[int, Batch]] = []  # committed, awaiting inbox files
        self._pending_bytes = 0
        self._pending_messages = 0
        self._committed = 0  # batches committed so far
        self._finished = 0  # ... whose deliveries exist (or that recovery covered)
        self._deliver_wake = anyio.Event()
        self._progress = anyio.Event()  # set (and replaced) when _finished moves
        self._arrived = anyio.Event()  # set by each publish call (see _gather)
        self._last_callers = 0  # publish calls in the last commit that had any
        self._commit_s = 0.0  # how long the last commit took
        self._dirty: set[Path] = set()
        self._full_scan = False
        self._wake = anyio.Event()
        self._stop = anyio.Event()
        self._watch_stop = anyio.Event()
        self._reload = anyio.Event()
        self._stop_signals = 0
        self._force_timer: threading.Timer | None = None
        self._publishes: list[tuple[list[Incoming], anyio.Event]] = []
        self._arrivals: dict[str, anyio.Event] = {}
        self._recover_needed = False
        self._checkpointed = START
        self.socket: Path | None = None

    @property
    def router(self) -> Router:
        """The router; only valid while :meth:`run` is running."""
        assert self._router is not None, "daemon not started"
        return self._router

    # -- lifecycle ----------------------------------------------------------

    async def run(self) -> None:
        """Serve until a stop signal; raise :class:`AlreadyRunning` if the bus is taken."""
        _raise_fd_limit()
        lock = BusLock(self.config.layout, role="daemon")
        await anyio.to_thread.run_sync(self._acquire, lock)
        try:
            # Built before the task group: a start-up failure (say, an unreadable
            # journal) then leaves as a plain error the CLI can explain, not a group.
            try:
                self._router = await anyio.to_thread.run_sync(Router, self.config)
            except PermissionError as exc:
                raise StorageError(f"cannot read the bus: {exc}", path=exc.filename) from exc
            self._router.subscriptions = self._merged_subscriptions(self.config)
            async with _plain_errors(), anyio.create_task_group() as tg:
                await tg.start(self._signals)
                # Bound before "ready": a bind error stops start-up with a clear message.
                self.socket = await tg.start(Server(self.config, Service(self)).serve)
                tg.start_soon(watch, self.config, self._on_hints, self._watch_stop)
                report = await anyio.to_thread.run_sync(self._recover)
                tg.start_soon(self._route_loop)
                tg.start_soon(self._delivery_loop)
                tg.start_soon(self._timer, self._lease_pass, self._lease_period)
                tg.start_soon(self._timer, self._request_full_scan, self._rescan_period)
                tg.start_soon(self._timer, self._gc_pass, lambda: _GC_PERIOD_S)
                tg.start_soon(self._timer, self._checkpoint, lambda: _CHECKPOINT_PERIOD_S)
                tg.start_soon(self._reload_loop)
                if (interval := watchdog_interval()) is not None:
                    tg.start_soon(self._timer, self._watchdog, lambda: interval)
                _log.info(
                    "daemon_ready",
                    root=self.config.root,
                    pid=os.getpid(),
                    recovered=report.accepted,
                    dead_lettered=report.dead_lettered,
                )
                self.notifier.send("READY=1", f"STATUS=ready; recovered {report.accepted}")
                await self._stop.wait()
                _log.info("daemon_stopping")
                self.notifier.send("STOPPING=1")
                self._watch_stop.set()
                # Cancelling waits for a worker thread in flight: the batch
                # being routed finishes its journal fsync and deliveries.
                tg.cancel_scope.cancel()
        finally:
            if self._router is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._final_checkpoint)
                self._router.close()
            lock.release()
            if self._force_timer is not None:
                self._force_timer.cancel()
        _log.info("daemon_stopped", accepted=self.totals.accepted)

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
                self._stop.set()

    # -- work ---------------------------------------------------------------

    def _recover(self) -> RouteReport:
        """Start-up recovery; runs in a worker thread before the daemon is ready."""
        removed = self.router.journal.repair()
        if removed:
            _log.warning("journal_tail_repaired", bytes_removed=removed)
        recovered = recover_deliveries(self.router)
        expired = return_expired(self.config)
        _log.info(
            "recovery_done",
            redelivered_from_journal=recovered,
            claims_returned=len(expired.returned),
            claims_dead_lettered=len(expired.dead_lettered),
        )
        report = self.router.route_all()
        write_checkpoint(self.router)
        self._count(report)
        self.rates.add(dead_lettered=len(expired.dead_lettered))
        return report

    # -- hooks for the socket service ------------------------------------------

    def notify_arrival(self, agent: str) -> None:
        """Wake fetchers and subscribers of ``agent`` (a message was put back)."""
        self._notify_arrivals({agent})

    def request_scan(self) -> None:
        """Ask for a full scan soon (after a replay published into outboxes)."""
        self._request_full_scan()

    def subscribe(self, topic: str, agent: str) -> None:
        """Add ``agent`` to ``topic`` and persist it in ``<root>/subscriptions.json``."""
        agents = self.router.subscriptions.setdefault(topic, [])
        if agent in agents:
            return
        agents.append(agent)
        runtime = self._runtime_subscriptions()
        runtime.setdefault(topic, [])
        if agent not in runtime[topic]:
            runtime[topic].append(agent)
        path = self.config.layout.root / _SUBSCRIPTIONS_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(msgspec.json.encode(runtime))
        os.replace(tmp, path)
        _log.info("topic_subscribed", topic=topic, agent=agent)

    def _runtime_subscriptions(self) -> dict[str, list[str]]:
        path = self.config.layout.root / _SUBSCRIPTIONS_FILE
        try:
            data = msgspec.json.decode(path.read_bytes(), type=dict[str, list[str]])
        except FileNotFoundError:
            return {}
        except msgspec.DecodeError as exc:
            _log.error("subscriptions_file_ignored", path=str(path), error=str(exc))
            return {}
        clean: dict[str, list[str]] = {}
        for topic, agents in data.items():
            try:
                check_agent_name(topic, "topic")
                clean[topic] = [check_agent_name(a) for a in agents]
            except InvalidName as exc:
                _log.error("subscription_ignored", topic=topic, error=exc.message)
        return clean

    def _merged_subscriptions(self, config: Config) -> dict[str, list[str]]:
        merged = {topic: list(agents) for topic, agents in config.subscriptions.items()}
        for topic, agents in self._runtime_subscriptions().items():
            merged[topic] = list(dict.fromkeys([*merged.get(topic, []), *agents]))
        return merged

    def status(self) -> dict[str, Any]:
        """``busd status`` data, with what only the daemon knows (call from a thread)."""
        t = self.totals
        info = {
            "running": True,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "socket": str(self.socket),
            "watcher": "polling" if self.config.force_polling else "native",
            "config_file": self.config.config_file,
            "dedupe_index": len(self.router.dedupe),
            "undelivered": self._pending_messages,
            "totals": {
                "accepted": t.accepted,
                "delivered": t.delivered,
                "duplicates": t.duplicates,
                "dead_lettered": t.dead_lettered,
            },
            "rates_per_min": self.rates.per_minute(),
        }
        return collect(self.config, info)

    def _count(self, report: RouteReport) -> None:
        """Add a routing report to the totals and the rates."""
        self.totals.add(report)
        self.rates.add(report.accepted, report.delivered, report.dead_lettered)

    def _on_hints(self, hints: set[Path]) -> None:
        root = self.config.layout.root
        if root in hints:  # the watcher lost track: scan everything
            hints = hints - {root}
            self._full_scan = True
        self._dirty |= hints
        self._wake.set()

    def _request_full_scan(self) -> None:
        self._full_scan = True
        self._wake.set()

    async def publish(self, items: list[Incoming]) -> None:
        """Hand ``items`` to the next group commit; return once each has its outcome.

        An accepted item is in the fsynced journal when this returns.
        """
        if self._stop.is_set():
            raise ShuttingDown("busd is shutting down; publish to the outbox instead")
        done = anyio.Event()
        self._publishes.append((items, done))
        self._wake.set()
        self._arrived.set()
        await done.wait()

    async def settled(self) -> None:
        """Return once deliveries of every publish answered so far are in the inboxes.

        Publishers are answered after the journal fsync, before their inbox files
        exist; a fetch waits here first, so a consumer always sees what was
        acknowledged to a producer before it asked (read your writes).
        """
        target = self._committed
        while self._finished < target:
            await self._progress.wait()

    async def wait_for_delivery(self, agent: str, timeout: float) -> None:
        """Return when something may have arrived for ``agent``, or after ``timeout``."""
        event = self._arrivals.setdefault(agent, anyio.Event())
        with anyio.move_on_after(timeout):
            await event.wait()

    def _notify_arrivals(self, agents: set[str] | None) -> None:
        for agent in list(self._arrivals) if agents is None else agents:
            event = self._arrivals.pop(agent, None)
            if event is not None:
                event.set()

    async def _route_loop(self) -> None:
        backoff = 0.0
        while True:
            await self._wake.wait()
            await self._gather()
            self._wake = anyio.Event()
            dirs, full = self._dirty, self._full_scan
            self._dirty, self._full_scan = set(), False
            publishes, self._publishes = self._publishes, []
            try:
                await self._route_once(dirs, full, publishes)
                backoff = 0.0
            except (BusdError, OSError) as exc:
                # Disk full, read-only, permissions: nothing accepted is lost (sources
                # stay in the outboxes; a journaled batch is redone), publishers get
                # the error, and the pass is retried with a growing pause.
                error = exc if isinstance(exc, BusdError) else _storage_error(exc)
                for items, _ in publishes:
                    for item in items:
                        if item.outcome is None:
                            item.outcome = error
                backoff = min(max(backoff * 2, 0.1), 5.0)
                _log.error("route_pass_failed", error=str(exc), retry_in_s=backoff)
                self._recover_needed = True
                _release(publishes)
                self._full_scan = True
                await anyio.sleep(backoff)
                self._wake.set()
            finally:
                # Never leave a publisher hanging.
                _release(publishes)

    async def _gather(self) -> None:
        """Group commit: give the publishers just answered a moment to come back.

        When the last commit carried ``k`` > 1 publish calls and fewer wait now,
        wait until ``k`` do, or for half the last commit's duration (at most
        2 ms), whichever comes first. Without it, concurrent publishers split into
        two alternating groups (those answered while a commit was in flight cannot
        join it), and a slow disk pays two flushes for what one could cover, as
        PostgreSQL's ``commit_delay``/``commit_siblings`` avoid. A lone publisher
        (``k`` = 1) never waits.
        """
        k = self._last_callers
        if k < 2 or len(self._publishes) >= k or not self._publishes:
            return
        with anyio.move_on_after(min(self._commit_s / 2, _GATHER_MAX_S)):
            while len(self._publishes) < k:
                self._arrived = anyio.Event()
                await self._arrived.wait()

    async def _route_once(
        self, dirs: set[Path], full: bool, publishes: list[tuple[list[Incoming], anyio.Event]]
    ) -> None:
        incoming = [item for items, _ in publishes for item in items]
        async with self._lane:
            if self._recover_needed:
                # A pass failed after its journal append, or deliveries failed:
                # deliver what the journal holds after the checkpoint.
                await self._recover_deliveries()
            paths: list[Path] = []
            if dirs or full:  # socket-only passes skip a worker-thread round trip
                paths = await anyio.to_thread.run_sync(self._scan, dirs, full)
            for i in range(0, max(len(paths), 1), _BATCH):
                await self._room()
                # Socket publishes ride with the first batch: one fsync for all.
                started = time.monotonic()
                batch = await anyio.to_thread.run_sync(
                    self.router.commit, paths[i : i + _BATCH], incoming if i == 0 else ()
                )
                self._commit_s = time.monotonic() - started
                if i == 0 and publishes:
                    self._last_callers = len(publishes)
                self._count(batch.report)
                self._enqueue(batch)
                if i == 0:
                    # Durable now: answer while the inbox files are written.
                    _release(publishes)

    async def _room(self) -> None:
        """Back-pressure: wait while too much committed work awaits its inbox files."""
        while (
            self._pending_bytes > _MAX_PENDING_BYTES or self._pending_messages > _MAX_PENDING
        ) and not self._recover_needed:
            await self._progress.wait()

    def _enqueue(self, batch: Batch) -> None:
        self._committed += 1
        if batch.accepted or batch.redo or self._pending:
            self._pending.append((self._committed, batch))
            self._pending_bytes += batch.size
            self._pending_messages += len(batch.accepted) + len(batch.redo)
            self._deliver_wake.set()
        else:
            self._advance(self._committed)  # nothing to deliver, nothing queued before it

    def _advance(self, finished: int) -> None:
        self._finished = max(self._finished, finished)
        self._progress.set()
        self._progress = anyio.Event()

    async def _delivery_loop(self) -> None:
        """Write the inbox files of committed batches, oldest first, many per pass."""
        while True:
            await self._deliver_wake.wait()
            self._deliver_wake = anyio.Event()
            report: RouteReport | None = None
            async with self._delivery_lane:
                pending, self._pending = self._pending, []
                if not pending or self._recover_needed:
                    continue  # recovery delivers from the journal what was queued
                batches = [b for _, b in pending]
                try:
                    report = await anyio.to_thread.run_sync(self.router.finish, *batches)
                except (BusdError, OSError) as exc:
                    # Nothing is lost: these batches are journaled after the
                    # checkpoint, and `delivered` has not moved past them.
                    _log.error("delivery_failed", error=str(exc))
                    self._recover_needed = True
                    self._wake.set()
                else:
                    self._advance(pending[-1][0])
                finally:
                    self._pending_bytes -= sum(b.size for b in batches)
                    self._pending_messages -= sum(len(b.accepted) + len(b.redo) for b in batches)
            if report is not None:
                self._count(report)
                self._notify_arrivals(report.recipients)

    async def _recover_deliveries(self) -> None:
        """Deliver everything journaled after the checkpoint (holding the commit lane)."""
        async with self._delivery_lane:
            await anyio.to_thread.run_sync(recover_deliveries, self.router)
            self._recover_needed = False
            self._pending.clear()
            self._pending_bytes = self._pending_messages = 0
            self._advance(self._committed)
        self._notify_arrivals(None)

    def _final_checkpoint(self) -> None:
        """On the way out: deliver what is queued, then checkpoint (best effort)."""
        router = self.router
        try:
            if self._pending and not self._recover_needed:
                router.finish(*(b for _, b in self._pending))
            write_checkpoint(router)
        except (BusdError, OSError) as exc:  # the next start recovers from the journal
            _log.error("final_checkpoint_failed", error=str(exc))

    def _scan(self, dirs: set[Path], full: bool) -> list[Path]:
        router = self.router
        if full:
            router.dedupe.expire()  # on the slow timer: often enough for a 7-day window
            return router.scan()
        return router.scan_dirs(dirs)

    async def _checkpoint(self) -> None:
        router = self.router
        if router.unsynced or router.delivered != self._checkpointed:
            try:
                async with self._delivery_lane:
                    self._checkpointed = await anyio.to_thread.run_sync(write_checkpoint, router)
            except OSError as exc:  # disk full or read-only: recovery covers the gap
                _log.error("checkpoint_failed", error=str(exc))

    async def _lease_pass(self) -> None:
        async with self._lane:
            expired = await anyio.to_thread.run_sync(return_expired, self.config)
        self.rates.add(dead_lettered=len(expired.dead_lettered))
        if expired.returned:
            self._notify_arrivals(None)
        for name in expired.returned:
            _log.info("message_redelivered", name=name)
        for name in expired.dead_lettered:
            _log.warning("message_dead_lettered", name=name, reason="delivery_limit")

    async def _gc_pass(self) -> None:
        async with self._lane:
            report = await anyio.to_thread.run_sync(
                lambda: gc(self.config, journal=self.router.journal)
            )
        if report.journal_segments or report.ledger_records or report.dlq_entries:
            _log.info("retention_applied", **msgspec.structs.asdict(report))

    def _lease_period(self) -> float:
        return min(1.0, self.config.lease_seconds / 4)

    def _rescan_period(self) -> float:
        return self.config.rescan_interval_seconds

    async def _watchdog(self) -> None:
        t = self.totals
        self.notifier.send(
            "WATCHDOG=1",
            f"STATUS=ready; accepted {t.accepted}, delivered {t.delivered}, "
            f"duplicates {t.duplicates}, dead-lettered {t.dead_lettered}",
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
            self._reload = anyio.Event()
            self.notifier.send("RELOADING=1")
            try:
                new = await anyio.to_thread.run_sync(self.loader.load)
            except ConfigError as exc:
                _log.error("config_reload_failed", error=str(exc), key=exc.context.get("key"))
            else:
                self._apply(new)
            self.notifier.send("READY=1")

    def _apply(self, new: Config) -> None:
        if new.root != self.config.root:
            _log.warning("config_reload_ignored_root", root=new.root, kept=self.config.root)
            new = _replace_root(new, self.config.root)
        self.config = new
        self.router.config = new
        self.router.subscriptions = self._merged_subscriptions(new)
        self.router.dedupe.window_s = new.dedupe_window_seconds
        _log.info("config_reloaded", config_file=new.config_file)


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


def _replace_root(config: Config, root: str) -> Config:
    return msgspec.structs.replace(config, root=root)


def _raise_fd_limit() -> None:
    """Lift the soft descriptor limit to the hard one: each client costs a descriptor."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # keep what we have; accept errors are survived anyway


def _storage_error(exc: OSError) -> StorageError:
    return StorageError(f"the bus cannot be written: {exc.strerror or exc}", errno=exc.errno)


def _release(publishes: list[tuple[list[Incoming], anyio.Event]]) -> None:
    for _, done in publishes:
        done.set()
