"""The journal as a write-ahead log: checkpoints, delivery recovery, the start-up rebuild.

An accepted message is durable once its journal entry is fsynced; inbox files
and the daemon's in-memory queues are views of the journal. To keep routing fast,
deliveries are not fsynced one by one. Instead, a *checkpoint* periodically makes
every delivery so far durable (fsync of the files and their directories) and then
records the journal position it covers in ``journal/checkpoint``; the daemon never
lets it pass the oldest message its memory queues still hold
(:meth:`busd.routing.queues.Queues.low_water`).

Both readers below fold the entries after the checkpoint with
:func:`busd.routing.fold.replay`, so a message settled in the journal after the
checkpoint (``acked``, or dead-lettered by a consumer, for that agent) is never
written out again, and a ``delivered`` count survives:

- :func:`recover_deliveries` (the daemon-less pass, a daemon after a failed pass)
  writes an inbox file for every unsettled message a recipient lacks (not ready, not
  claimed with its full size, not acked, not in the DLQ for it, not in the live queues
  it is given), then checkpoints;
- :func:`rebuild` (the daemon's start-up) returns the memory queues of the agents it
  serves and the list of messages that must become files; it writes nothing.

So a crash, or a power cut, at any instant loses no accepted message, and the work
after a restart is bounded by what arrived since the last checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Container, Iterator, Sequence
from pathlib import Path

import msgspec
import structlog

from busd.core.codec import decode
from busd.errors import InvalidMessage, NotFound, Reason
from busd.routing.fold import Pending, Replayed, replay
from busd.routing.holdings import Holdings
from busd.routing.queues import Queues
from busd.routing.router import Router
from busd.store import dlq
from busd.store.fsio import replace_durable
from busd.store.journal import START, JournalEntry, Position
from busd.store.mailbox import arrival_clock, deliver, sync_dirs
from busd.store.tapps import deliver_tapps

__all__ = [
    "read_checkpoint",
    "rebuild",
    "recover_deliveries",
    "write_checkpoint",
    "write_out",
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


class _Held:
    """``holds`` for the fold: what a recipient has as a file, is dead-lettered for, or
    (in a running daemon) holds in its live queues. One :class:`Holdings` per pass; the
    DLQ is listed at most once, and only if some message is not held otherwise."""

    def __init__(self, router: Router, live: Queues | None) -> None:
        self._holdings = Holdings(router.config)
        self._layout = router.layout
        self._live = live
        self._dead: set[tuple[str | None, str]] | None = None

    def __call__(self, agent: str, entry: JournalEntry) -> bool:
        mid = entry.message_id
        assert mid is not None and entry.message is not None  # replay asks only for these
        if self._live is not None and self._live.holds(agent, mid):
            return True
        size = len(entry.message)  # the body's length: encode_entry keeps it
        if self._holdings.holds(agent, mid, key=entry.idempotency_key, size=size):
            return True
        if self._dead is None:
            records = (e.record for e in dlq.list_entries(self._layout))
            self._dead = {(r.recipient, r.message_id) for r in records if r.message_id}
        # An entry without a recipient (an intake refusal of that id) counts for everyone,
        # as before there were recipients in reason records.
        return (agent, mid) in self._dead or (None, mid) in self._dead


def _fold(
    router: Router, memory: Container[str] | Callable[[str], bool], live: Queues | None
) -> Replayed:
    start = read_checkpoint(router)
    with _collector_paused():
        spans = router.journal.read_spans(start)
        return replay(spans, memory_agents=memory, holds=_Held(router, live))


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection meanwhile: the fold keeps a few hundred thousand new
    objects (refs, queue slots), none in a cycle, and each collection would scan them all
    again (measured: 1.45 s -> 0.95 s for 100,000 messages). Reference counting still
    frees everything else; the collector resumes (if it ran before) right after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def rebuild(router: Router, *, served: Container[str] | Callable[[str], bool]) -> Replayed:
    """The daemon's start-up state, from the journal after the checkpoint.

    ``served`` names the agents to keep in memory (a container or a predicate): their
    unsettled messages are in ``result.queues``, all ready (no lease survives a
    restart), with the counts of their ``delivered`` lines. Every other recipient's
    unsettled message that it does not hold as a file is in ``result.files``, in
    journal order, for :func:`write_out`. Writes nothing and does not move
    ``router.delivered``: until those files exist, the caller must not checkpoint past
    ``result.files_from`` (nor, ever, past ``result.queues.low_water()``).

    Blocking (reads the journal, lists each recipient's inbox and locks once and reads
    its ledger): run it in a worker thread, before the commit and delivery lanes start.
    """
    result = _fold(router, served, None)
    _log.info(
        "queues_rebuilt",
        memory=sum(result.queues.ready(a) for a in result.queues.agents()),
        files=len(result.files),
    )
    return result


def write_out(router: Router, pending: Sequence[Pending]) -> list[Path]:
    """Write ``pending`` as inbox files, in order: each under a fresh arrival key with its
    delivery count, its bytes read back from the journal (:meth:`Journal.read_at`).

    Entries whose message no longer decodes (written by a future version, say), or
    whose segment is gone, are skipped and logged. The files and their directories are
    fsynced before this returns (when ``config.fsync``), so a checkpoint may then cover
    them. Blocking: run it in a worker thread.
    """
    layout, written = router.layout, []
    for agent, ref, deliveries in pending:
        try:
            entry = router.journal.read_at(ref.position, ref.length)
            if entry.message is None or entry.message_id != ref.message_id:
                raise InvalidMessage(Reason.SCHEMA, "not the accepted line of this message")
            body = bytes(entry.message)
            msg = decode(body)
        except (InvalidMessage, NotFound) as exc:
            _log.warning("journal_entry_skipped", message_id=ref.message_id, error=str(exc))
            continue
        arrival = arrival_clock.next()
        if router.config.compat == "tapps":
            path = deliver_tapps(layout, agent, msg, deliveries=deliveries, arrival=arrival)
        else:
            path = deliver(
                layout, agent, body, ref.message_id, deliveries=deliveries, arrival=arrival
            )
        written.append(path)
        _log.info("message_recovered_from_journal", message_id=ref.message_id, to=[agent])
    if written and router.config.fsync:
        sync_dirs(written)
    return written


def recover_deliveries(router: Router, *, live: Queues | None = None) -> int:
    """Write an inbox file for every unsettled message after the checkpoint that a
    recipient lacks, then checkpoint.

    Must run with no ``commit`` or ``finish`` in flight: afterwards everything
    journaled counts as delivered. A message settled later in the journal (``acked``,
    or dead-lettered by a consumer, for that recipient) is not written again. A running
    daemon passes its ``live`` queues: what they hold is held, not missing.

    Returns how many deliveries were made again. Entries whose message no longer
    decodes (written by a future version, say) are skipped and logged.
    """
    result = _fold(router, (), live)
    redelivered = len(write_out(router, result.files))
    router.mark_all_delivered()
    write_checkpoint(router)
    return redelivered
