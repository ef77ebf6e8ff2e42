"""The journal as a write-ahead log: checkpoints and delivery recovery.

An accepted message is durable once its journal entry is fsynced; the inbox
files are a view of the journal. To keep routing fast, deliveries are not
fsynced one by one. Instead, a *checkpoint* periodically makes every delivery
so far durable (fsync of the files and their directories) and then records
the journal position it covers in ``journal/checkpoint``.

At start-up, :func:`recover_deliveries` re-reads only the entries after the
checkpoint and re-delivers any accepted message a recipient lacks (not ready,
not claimed with its full size, not acked, not dead-lettered). So a crash, or
a power cut, at any instant loses no accepted message, and the work after a
restart is bounded by what arrived since the last checkpoint.
"""

from __future__ import annotations

import os

import msgspec
import structlog

from busd.config import Config
from busd.core.codec import decode
from busd.errors import InvalidMessage
from busd.routing.holdings import Holdings
from busd.routing.router import Router, RouteReport
from busd.store import dlq
from busd.store.buslock import BusLock
from busd.store.fsio import fsync_dir, tmp_name
from busd.store.journal import START, Position

__all__ = [
    "CHECKPOINT_NAME",
    "read_checkpoint",
    "recover_deliveries",
    "route_pending",
    "write_checkpoint",
]

_log = structlog.get_logger("busd.recovery")

CHECKPOINT_NAME = "checkpoint"
"""File in ``journal/`` holding the position up to which deliveries are durable."""


def read_checkpoint(router: Router) -> Position:
    """The last checkpointed position, or the start of the journal if none."""
    path = router.layout.journal / CHECKPOINT_NAME
    try:
        return msgspec.json.decode(path.read_bytes(), type=Position)
    except (FileNotFoundError, msgspec.DecodeError):
        return START


def write_checkpoint(router: Router) -> Position:
    """Sync every delivery so far, then record the router's journal position.

    Must run in the routing lane (no route() in flight), so that the position
    covers exactly the deliveries just synced.
    """
    router.sync()
    position = router.delivered
    directory = router.layout.journal
    tmp = directory / f".{tmp_name()}"
    try:
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(position))
            if router.config.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, directory / CHECKPOINT_NAME)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    if router.config.fsync:
        fsync_dir(directory)
    return position


def recover_deliveries(router: Router) -> int:
    """Re-deliver accepted messages after the checkpoint that a recipient lacks.

    Must run with no ``commit`` or ``finish`` in flight: afterwards everything
    journaled counts as delivered.

    Returns how many deliveries were made again. Entries whose message no
    longer decodes (written by a future version, say) are skipped and logged.
    """
    start = read_checkpoint(router)
    holdings = Holdings(router.config)
    dead: set[str] | None = None
    redelivered = 0
    for entry, _ in router.journal.read_from(start):
        if entry.event != "accepted" or entry.message is None or not entry.to:
            continue
        if entry.source and entry.source.startswith("inbox/"):
            continue  # delivered in place; a leftover foreign file is re-routed by the scan
        body = bytes(entry.message)
        try:
            msg = decode(body)
        except InvalidMessage as exc:
            _log.warning("journal_entry_skipped", message_id=entry.message_id, error=str(exc))
            continue
        missing = [r for r in entry.to if not holdings.has(r, msg, len(body))]
        if not missing:
            continue
        if dead is None:
            entries = dlq.list_entries(router.layout)
            dead = {e.record.message_id for e in entries if e.record.message_id is not None}
        if msg.message_id in dead:
            continue
        router.deliver_again(msg, body, missing)
        redelivered += len(missing)
        _log.info("message_recovered_from_journal", message_id=msg.message_id, to=missing)
    router.delivered = router.position  # everything journaled is now delivered
    router.in_flight.clear()
    write_checkpoint(router)
    return redelivered


def route_pending(config: Config) -> RouteReport | None:
    """One daemon-less routing pass, if no daemon runs; None when one does.

    This is how ``busd send`` then ``busd recv`` work with no daemon: the pass
    holds the bus lock, recovers what a crashed router left, routes every
    waiting file, and checkpoints so its deliveries are durable.
    """
    lock = BusLock(config.layout, role="cli")
    if not lock.acquire(timeout=0):
        return None
    try:
        with Router(config) as router:
            recover_deliveries(router)
            report = router.route_all()
            write_checkpoint(router)
            return report
    finally:
        lock.release()
