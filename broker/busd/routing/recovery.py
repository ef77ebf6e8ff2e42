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

import msgspec
import structlog

from busd.core.codec import decode
from busd.errors import InvalidMessage
from busd.routing.holdings import Holdings
from busd.routing.router import Router
from busd.store import dlq
from busd.store.fsio import replace_durable
from busd.store.journal import START, Position

__all__ = [
    "read_checkpoint",
    "recover_deliveries",
    "write_checkpoint",
]

_log = structlog.get_logger("busd.recovery")


def read_checkpoint(router: Router) -> Position:
    """The last checkpointed position, or the start of the journal if none."""
    path = router.layout.checkpoint_file
    try:
        return msgspec.json.decode(path.read_bytes(), type=Position)
    except (FileNotFoundError, msgspec.DecodeError):
        return START


def write_checkpoint(router: Router) -> Position:
    """Sync every delivery so far, then record the position that covers them.

    Must run in the delivery lane (no ``finish`` in flight), so that the
    position covers exactly the deliveries just synced (:meth:`Router.checkpoint`).
    """
    position = router.checkpoint()
    replace_durable(
        router.layout.checkpoint_file,
        msgspec.json.encode(position),
        mode=0o666,  # the umask decides, as for journal segments
        fsync=router.config.fsync,
    )
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
    router.mark_all_delivered()
    write_checkpoint(router)
    return redelivered
