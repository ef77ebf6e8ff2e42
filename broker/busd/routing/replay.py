"""DLQ replay: validate a dead letter again and hand it back to the bus.

Contract (:func:`replay`):

* Still invalid: the record is updated in place (``replays`` + 1, detail,
  ``last_failure_at``, history) unless ``dry_run``; nothing moves.
* Valid, reason ``delivery_limit`` / ``rejected``: delivered straight into
  ``inbox/<to or recipient>/`` with delivery count 0 and fsynced (it was
  accepted before, so the outbox would drop it as a duplicate).
* Valid, a file its producer dropped straight into an inbox: written back
  there under a foreign name, so the router validates and journals it in place.
* Valid, any other reason: written to ``outbox/<sender or agent_id>/`` for the
  router; with ``to`` it is re-encoded addressed to ``to`` only.

After a replay the record moves to ``dlq/replayed/`` and the data is removed
(:func:`busd.store.dlq.retire_replayed`), so replaying the same name again raises
:class:`~busd.errors.NotFound`. Everything happens under the DLQ lock, so two
concurrent replays of one entry never both deliver it. A crash after the
hand-over but before the record moved can replay it twice (at-least-once);
consumers' idempotency keys absorb that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from busd.config import Config
from busd.core import codec
from busd.core.model import check_agent_name
from busd.errors import InvalidMessage, InvalidName, Reason
from busd.store import dlq
from busd.store.fsio import read_limited, write_durable
from busd.store.mailbox import deliver, publish_bytes
from busd.store.tapps import deliver_tapps, from_tapps

__all__ = ["ReplayResult", "replay"]

# Entries of these reasons were accepted (journaled and deduplicated) before they
# failed: sending them through the outbox again would be dropped as duplicates.
_ACCEPTED_REASONS = frozenset({Reason.DELIVERY_LIMIT.value, Reason.REJECTED.value})


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What :func:`replay` did; ``target`` is the file written (or, dry run, its directory)."""

    name: str
    status: Literal["replayed", "still_invalid", "would_replay"]
    target: Path | None = None
    message_id: str | None = None
    detail: str = ""


def replay(
    config: Config,
    name: str,
    *,
    to: str | None = None,
    data: bytes | None = None,
    dry_run: bool = False,
) -> ReplayResult:
    """Validate entry ``name`` again (or its corrected ``data``) and hand it back to the bus.

    See the module docstring for where it goes. Raises :class:`~busd.errors.NotFound`
    for an unknown (or already replayed) entry, :class:`~busd.errors.InvalidName` for a
    bad ``to``, :class:`~busd.errors.LockTimeout` when the DLQ stays locked.
    """
    layout = config.layout
    limit = config.max_message_bytes
    with dlq.locked(layout):
        entry = dlq.load(layout, name)
        record = entry.record
        try:
            raw = data if data is not None else read_limited(entry.path, limit)
            msg = codec.decode(raw, max_bytes=limit)
        except InvalidMessage as exc:
            why = f"{exc.reason.value}: {exc.detail}"
            if not dry_run:
                dlq.note_replay_failed(layout, entry, why, exc.detail)
            return ReplayResult(name, "still_invalid", None, None, why)
        inbox_agent = (to or record.recipient) if record.reason in _ACCEPTED_REASONS else None
        # A file its producer dropped straight into an inbox goes back there, under a
        # foreign name, so the router validates and journals it in place.
        dropped = (
            inbox_agent is None
            and to is None
            and record.recipient is not None
            and (record.original_path or "").startswith("inbox/")
        )
        body = raw
        if dropped:
            where = layout.inbox_dir(check_agent_name(record.recipient or "", "recipient"))
        elif inbox_agent is not None:
            where = layout.inbox_dir(check_agent_name(inbox_agent, "recipient"))
        else:
            sender = _sender_of(record.sender, msg.agent_id)
            where = layout.outbox if sender is None else layout.outbox_dir(sender)
            if to is not None:
                check_agent_name(to.removeprefix("topic:"), "recipient")
                msg = msgspec.structs.replace(msg, to=to)
                body = codec.encode_json(msg)
        if dry_run:
            return ReplayResult(name, "would_replay", where, msg.message_id)
        if dropped:
            foreign = f"replay-{hashlib.sha256(body).hexdigest()[:16]}.json"
            target = write_durable(where, foreign, body, tmp_dir=layout.tmp)
        elif inbox_agent is not None and config.compat == "tapps":
            # Named and shaped for Tapps consumers too (store/tapps.py).
            target = deliver_tapps(layout, inbox_agent, from_tapps(msg), fsync=True)
        elif inbox_agent is not None:
            target = deliver(layout, inbox_agent, body, msg.message_id, deliveries=0, fsync=True)
        else:
            target = publish_bytes(layout, sender, body, msg.message_id, fsync=True)
        dlq.retire_replayed(layout, entry, body, target)
        return ReplayResult(name, "replayed", target, msg.message_id)


def _sender_of(sender: str | None, agent_id: str) -> str | None:
    """Whose outbox a replayed message is written to: its sender's, else its author's,
    else ``outbox/`` itself (``None``: agent_id is free text, maybe no directory name)."""
    if sender is not None:
        return check_agent_name(sender, "sender")
    try:
        return check_agent_name(agent_id, "sender")
    except InvalidName:
        return None
