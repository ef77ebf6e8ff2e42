"""What the dashboard shows and does, through the readers and writers the CLI uses.

No second source of truth: the status is :func:`busd.ops.status.report` (the daemon's
``status`` answer when one runs, the files otherwise, as ``busd status``); messages
come from :class:`busd.store.journal.Journal` (as ``busd tail``); the DLQ from
:mod:`busd.store.dlq`; a replay goes through the daemon's ``replay`` method when one
runs and :func:`busd.routing.replay.replay` plus a daemon-less routing pass
otherwise (as ``busd replay``), so the replayed message is journaled the same way;
a purge is :func:`busd.store.dlq.purge` (as ``busd dlq purge``).

Every function is synchronous and touches files: callers run them in worker threads.
Rows are plain JSON-ready dicts.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import msgspec

from busd import __version__
from busd.config import Config
from busd.errors import BusdError, NotFound
from busd.ops.status import StatusReport, report
from busd.routing.offline import route_pending
from busd.routing.replay import replay as replay_entry
from busd.rpc import client as rpc
from busd.store import dlq, foreign
from busd.store.journal import Journal, JournalEntry, Position

__all__ = [
    "Filters",
    "dlq_entries",
    "dlq_entry",
    "end_position",
    "message",
    "messages",
    "purge",
    "replay",
    "status",
    "workflow",
]

_STATUS_TIMEOUT_S = 5.0
_RPC_TIMEOUT_S = 60.0
_PREVIEW = 160


class _Peek(msgspec.Struct):
    """The envelope fields a row shows; the body is read only on request."""

    message_type: str | None = None
    workflow_id: str | None = None
    task_id: str | None = None
    parents: list[str] | None = None
    created_at: str | None = None
    title: str | None = None


_peek = msgspec.json.Decoder(_Peek)


class Filters(msgspec.Struct, frozen=True, kw_only=True):
    """The filters of ``busd tail`` (agent, type, workflow) and a text search."""

    agent: str | None = None
    type: str | None = None
    workflow: str | None = None
    text: str | None = None

    def keep(self, e: JournalEntry) -> bool:
        """Whether entry ``e`` passes (type, workflow: accepted messages only, as tail)."""
        if self.agent and e.agent != self.agent and self.agent not in (e.to or ()):
            return False
        if self.type or self.workflow:
            peek = _peek_of(e)
            if peek is None:
                return False
            if self.type and peek.message_type != self.type.lower():
                return False
            if self.workflow and peek.workflow_id != self.workflow:
                return False
        if self.text:
            needle = self.text.lower()
            hay = [e.message_id or "", e.agent or "", e.reason or "", e.detail or ""]
            if e.message is not None:
                hay.append(bytes(e.message).decode("utf-8", "replace"))
            return any(needle in h.lower() for h in hay)
        return True


def status(cfg: Config) -> dict[str, Any]:
    """The :class:`StatusReport` as ``busd status --json`` prints it."""
    try:
        answer = rpc.call(cfg, "status", {}, timeout=_STATUS_TIMEOUT_S)
    except rpc.DaemonNotRunning:
        data = report(cfg, None)
    except BusdError as exc:
        data = report(cfg, None, daemon_error=f"{exc.code}: {exc.message}")
    else:
        try:
            data = msgspec.convert(answer, StatusReport)
        except msgspec.ValidationError as exc:
            data = report(cfg, None, daemon_error=f"remote_error: not a status report: {exc}")
        data = msgspec.structs.replace(data, version=__version__)
    out: dict[str, Any] = msgspec.to_builtins(data)
    return out


def _peek_of(e: JournalEntry) -> _Peek | None:
    if e.message is None:
        return None
    try:
        return _peek.decode(e.message)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _row(e: JournalEntry, pos: Position | None = None) -> dict[str, Any]:
    peek = _peek_of(e) or _Peek()
    row: dict[str, Any] = {
        "event": e.event,
        "at": e.at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "message_id": e.message_id,
        "agent": e.agent,
        "to": e.to or [],
        "reason": e.reason,
        "detail": e.detail,
        "message_type": peek.message_type,
        "workflow_id": peek.workflow_id,
        "task_id": peek.task_id,
        "parents": peek.parents or [],
        "title": peek.title,
    }
    if pos is not None:
        row["pos"] = [pos.segment, pos.offset]
    return row


def _tail_start(journal: Journal) -> Position:
    """Where a "recent entries" scan starts: the beginning of the last two segments."""
    segments = journal.segments()
    if not segments:
        return Position(0, 0)
    return Position(int(segments[max(0, len(segments) - 2)].stem), 0)


def messages(
    cfg: Config, filters: Filters, *, limit: int = 200, after: Position | None = None
) -> tuple[list[dict[str, Any]], Position]:
    """Journal entries passing ``filters``: the last ``limit`` ones, or (``after``) the
    ones appended since that position; and the position to continue from."""
    rows: deque[dict[str, Any]] = deque(maxlen=max(1, limit))
    with Journal(cfg.layout.journal) as journal:
        start = after if after is not None else _tail_start(journal)
        end = journal.end_position() if after is None else start
        for entry, pos in journal.read_from(start):
            end = pos
            if filters.keep(entry):
                rows.append(_row(entry))
    return list(rows), end


def end_position(cfg: Config) -> Position:
    """The journal's end now: live tails start there."""
    with Journal(cfg.layout.journal) as journal:
        return journal.end_position()


def _accepted(journal: Journal, message_id: str) -> Iterator[JournalEntry]:
    for entry in journal.read(events={"accepted"}):
        if entry.message_id == message_id:
            yield entry


def message(cfg: Config, message_id: str, *, body: bool = False) -> dict[str, Any]:
    """One message's envelope (and body with ``body``) and its journal history."""
    history: list[dict[str, Any]] = []
    envelope: dict[str, Any] | None = None
    with Journal(cfg.layout.journal) as journal:
        for entry in journal.read():
            if entry.message_id != message_id:
                continue
            history.append(_row(entry))
            if envelope is None and entry.message is not None:
                with suppress(msgspec.DecodeError):
                    envelope = msgspec.json.decode(bytes(entry.message))
    if not history:
        raise NotFound(f"message {message_id!r} is not in the journal", message_id=message_id)
    if envelope is not None and not body:
        text = envelope.pop("body", None)
        envelope["body_bytes"] = len(text.encode()) if isinstance(text, str) else 0
    return {"message_id": message_id, "envelope": envelope, "history": history}


def workflow(cfg: Config, workflow_id: str, *, limit: int = 2000) -> dict[str, Any]:
    """Every accepted message of ``workflow_id`` in journal order, with its parents."""
    rows: list[dict[str, Any]] = []
    keep = Filters(workflow=workflow_id)
    with Journal(cfg.layout.journal) as journal:
        for entry in journal.read(events={"accepted"}):
            if keep.keep(entry):
                rows.append(_row(entry))
                if len(rows) >= limit:
                    break
    ids = {r["message_id"] for r in rows}
    for r in rows:
        r["parents_here"] = [p for p in r["parents"] if p in ids]
    return {"workflow_id": workflow_id, "messages": rows, "truncated": len(rows) >= limit}


def dlq_entries(cfg: Config) -> list[dict[str, Any]]:
    """Every dead letter as ``busd dlq list --json`` rows (foreign ones included)."""
    rows = [{"name": e.name, **msgspec.to_builtins(e.record)} for e in dlq.list_entries(cfg.layout)]
    return rows + [e.row() for e in foreign.list_foreign(cfg.layout)]


def dlq_entry(cfg: Config, name: str) -> dict[str, Any]:
    """One entry: its record and original bytes as text (the page escapes them)."""
    try:
        entry = dlq.load(cfg.layout, name)
    except NotFound:
        other, data = foreign.load_foreign(cfg.layout, name)
        text = data.decode("utf-8", "replace") if data is not None else None
        return {"name": other.name, "record": other.row(), "data": text}
    try:
        raw: str | None = entry.data().decode("utf-8", "replace")
    except BusdError:
        raw = None  # not a regular file: never read
    return {"name": entry.name, "record": msgspec.to_builtins(entry.record), "data": raw}


def replay(cfg: Config, names: list[str]) -> list[dict[str, Any]]:
    """``busd replay NAME...``: through the daemon if one runs, else on the files and
    routed at once; ``[{name, status, target, message_id, detail}]``."""
    try:
        answer = rpc.call(
            cfg, "replay", {"names": names, "to": None, "dry_run": False}, timeout=_RPC_TIMEOUT_S
        )
        return list(answer["replayed"])
    except rpc.DaemonNotRunning:
        pass
    results: list[dict[str, Any]] = []
    for name in names:
        try:
            done = replay_entry(cfg, name)
        except NotFound as exc:
            results.append({"name": name, "status": "not_found", "detail": exc.message})
            continue
        results.append(msgspec.to_builtins(done, enc_hook=str))
    if any(r["status"] == "replayed" for r in results):
        route_pending(cfg)  # no daemon: route now, so it is journaled like the CLI's
    return results


def purge(cfg: Config, older_than_s: float) -> list[str]:
    """``busd dlq purge --older-than``: on the files, under the DLQ lock."""
    return dlq.purge(cfg.layout, older_than_s=older_than_s, now=time.time())
