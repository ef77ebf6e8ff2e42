"""Import conductor-loop bus files into a bus, and export a bus's messages as one.

Import: :func:`plan` reads each file (a directory is searched for
``*MESSAGE-BUS.md``), splits it with conductor's rules
(:func:`busd.core.conductor.split`, the whole file: ``final``) and maps every
record (:func:`busd.core.conductor.to_message`). Each record ends up imported,
a duplicate (already imported: its message id is in busd's dedupe window), or
dead-lettered with its original bytes and a reason record whose detail names the
file and byte offset:

* refused before publishing (a record conductor drops, a mapped message that
  does not validate or is too large): written through
  :func:`busd.routing.refusals.dead_letter`, the one way out, with the record's
  bytes. Without a daemon (:func:`run_offline`) its ``dead_lettered`` line rides
  in the import's own journal append; with one (:func:`run_live`) this process
  is not the journal writer and, as for consumer-side refusals, it is written
  and counted here, not journaled;
* refused by the router (e.g. ``unroutable``): dead-lettered there, journaled,
  with the mapped message's bytes (they keep every conductor field).

:func:`run_live` publishes through the daemon's ``publish_batch`` (answered after
its fsync); :func:`run_offline` does what ``busd send`` + the daemon-less pass
do, under the bus lock: recover, commit with one fsync per batch, deliver,
checkpoint. Both are synchronous.

Export: :func:`select` reads the journal's ``accepted`` lines (daemon running or
not) for the messages whose ``to`` or recipients name a topic or an agent, in
journal order; :func:`append_missing` appends, in conductor's format, those the
file lacks (by conductor msg_id), under ``flock(LOCK_EX)`` with ``O_APPEND`` and
one ``fsync``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from busd.config import Config
from busd.core import conductor
from busd.core.codec import decode
from busd.core.model import TOPIC_PREFIX, Message, TaskAssignment
from busd.errors import BusdError, InvalidMessage, LockTimeout, Reason
from busd.routing.intake import Origin, Refused
from busd.routing.recovery import recover_deliveries, write_checkpoint
from busd.routing.refusals import dead_letter
from busd.routing.router import Incoming, Router
from busd.store import dlq
from busd.store.buslock import BusLock
from busd.store.journal import Journal, JournalEntry

__all__ = [
    "ExportReport",
    "ImportReport",
    "Planned",
    "Publish",
    "append_missing",
    "find_bus_files",
    "plan",
    "run_live",
    "run_offline",
    "select",
]

_BATCH = 500
_LOCK_WAIT_S = 10.0
Publish = Callable[[list[Any]], list[dict[str, Any]]]
"""``publish(messages)``: the daemon's ``publish_batch`` items, one per message, in order."""


class ImportReport(msgspec.Struct, kw_only=True):
    """What an import did: every record counted once, refusals by reason."""

    files: list[str] = msgspec.field(default_factory=list)
    messages: int = 0
    imported: int = 0
    duplicate: int = 0
    dead_lettered: dict[str, int] = msgspec.field(default_factory=dict)
    via: str = ""

    def refused(self, reason: str) -> None:
        """Count one dead letter for ``reason``."""
        self.dead_lettered[reason] = self.dead_lettered.get(reason, 0) + 1


@dataclass(frozen=True, slots=True)
class Planned:
    """One record: ``body`` (the mapped JSON) to publish, or a ``refusal`` to write."""

    record: conductor.Record
    source: str
    body: bytes | None = None
    refusal: InvalidMessage | None = None


def find_bus_files(paths: Sequence[str]) -> list[Path]:
    """Each path that is a file, and every ``*MESSAGE-BUS.md`` under each directory.

    Symbolic links inside a directory are not followed. A path that is neither
    raises FileNotFoundError.
    """
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.rglob(f"*{conductor.BUS_FILE_SUFFIX}")
                    if p.is_file() and not p.is_symlink()
                )
            )
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {given}")
    return list(dict.fromkeys(found))


def _where(source: str, record: conductor.Record) -> str:
    return f"{source} at byte {record.offset} (line {record.line})"


def plan(config: Config, path: Path, *, to: str) -> list[Planned]:
    """Every record of the bus file ``path``, mapped and validated (pure but for the read)."""
    source = str(path)
    records, _ = conductor.split(path.read_bytes(), final=True)
    out: list[Planned] = []
    for record in records:
        where = _where(source, record)
        if record.error is not None:
            refusal = InvalidMessage(
                Reason.SCHEMA, f"{where}: conductor drops this record: {record.error}"
            )
            out.append(Planned(record, source, refusal=refusal))
            continue
        try:
            mapped = conductor.to_message(record, to=to, source=source)
            body = msgspec.json.encode(mapped)
            decode(body, max_bytes=config.max_message_bytes)
        except InvalidMessage as exc:
            detail = f"{where}: mapped message refused: {exc.detail}"
            out.append(
                Planned(record, source, refusal=InvalidMessage(exc.reason, detail, exc.path))
            )
            continue
        out.append(Planned(record, source, body=body))
    return out


def _refuse(config: Config, item: Planned, entries: list[JournalEntry] | None) -> str:
    """Dead-letter a refused record, once: one already in the DLQ from this file with the
    same bytes (an import run again) is counted, not written again."""
    assert item.refusal is not None
    sha = hashlib.sha256(item.record.raw).hexdigest()
    if dlq.find(config.layout, item.source, sha) is None:
        origin = Origin("file", None, item.source, conductor.AGENT_ID)
        refused = Refused(origin=origin, error=item.refusal, data=item.record.raw)
        dead_letter(config.layout, refused, entries=entries)
    return item.refusal.reason.value


def _chunks(items: Sequence[Planned], limit: int) -> Iterator[list[Planned]]:
    chunk: list[Planned] = []
    size = 0
    for item in items:
        n = len(item.body or b"")
        if chunk and (len(chunk) >= _BATCH or size + n > limit):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        yield chunk


def run_live(config: Config, items: Sequence[Planned], publish: Publish) -> ImportReport:
    """Import through a running daemon; refusals made here are written after the publishes
    (so a daemon that vanishes midway leaves nothing written twice by the fallback)."""
    report = ImportReport(messages=len(items), via="socket")
    good = [i for i in items if i.body is not None]
    # A request line may hold max_message_bytes (+64 KiB): stay under it per batch.
    for chunk in _chunks(good, max(config.max_message_bytes - 4096, 1)):
        answers = publish([msgspec.json.decode(i.body or b"null") for i in chunk])
        for answer in answers:
            result = answer.get("result")
            if result is not None:
                if result.get("duplicate"):
                    report.duplicate += 1
                else:
                    report.imported += 1
            else:
                data = (answer.get("error") or {}).get("data") or {}
                report.refused(str(data.get("reason") or "refused"))
    for item in items:
        if item.refusal is not None:
            report.refused(_refuse(config, item, None))
    return report


def run_offline(config: Config, items: Sequence[Planned]) -> ImportReport:
    """Import with no daemon: under the bus lock, as the daemon-less pass routes.

    :class:`~busd.errors.LockTimeout` when another process (a daemon that just
    started, another pass) keeps the lock for longer than a few seconds.
    """
    report = ImportReport(messages=len(items), via="file")
    lock = BusLock(config.layout, role="cli")
    if not lock.acquire(timeout=_LOCK_WAIT_S):
        raise LockTimeout(f"the bus lock of {config.root} is held by another process; retry")
    try:
        with Router(config) as router:
            recover_deliveries(router)
            for chunk in _chunks(items, 8 * 1024 * 1024):
                records: list[JournalEntry] = []
                incoming: list[Incoming] = []
                for item in chunk:
                    if item.refusal is not None:
                        report.refused(_refuse(config, item, records))
                    else:
                        incoming.append(Incoming(sender=conductor.AGENT_ID, raw=item.body))
                batch = router.commit([], incoming, records)
                router.finish(batch)
                for inc in incoming:
                    _count(report, inc.outcome)
            write_checkpoint(router)
    finally:
        lock.release()
    return report


def _count(report: ImportReport, outcome: str | BusdError | None) -> None:
    if outcome == "accepted":
        report.imported += 1
    elif outcome == "duplicate":
        report.duplicate += 1
    elif isinstance(outcome, InvalidMessage):
        report.refused(outcome.reason.value)
    else:
        report.refused(Reason.UNROUTABLE.value if outcome is not None else "refused")


# ---------------------------------------------------------------- export


class ExportReport(msgspec.Struct, kw_only=True):
    """What an export did: messages selected, appended, already in the file."""

    file: str
    selected: int = 0
    appended: int = 0
    present: int = 0
    unsafe_bodies: int = 0
    """Appended messages whose body holds a ``---`` line: conductor reads them split."""


@dataclass(slots=True)
class _Selector:
    topic: str | None
    agent: str | None
    seen: set[str] = field(default_factory=set)

    def wants(self, entry: JournalEntry, msg: Message) -> bool:
        to = msg.to
        names = [to] if isinstance(to, str) else list(to or ())
        if self.topic is not None:
            return f"{TOPIC_PREFIX}{self.topic}" in names
        agent = self.agent
        if isinstance(msg, TaskAssignment) and msg.assigned_to == agent:
            return True
        return agent in names or agent in (entry.to or ())


def select(config: Config, *, topic: str | None = None, agent: str | None = None) -> list[Message]:
    """Accepted messages for ``topic`` (their ``to`` names ``topic:<topic>``) or for
    ``agent`` (named in ``to``/``assigned_to`` or among the recipients), in journal order,
    each once."""
    if (topic is None) == (agent is None):
        raise ValueError("select needs exactly one of topic and agent")
    selector = _Selector(topic, agent)
    out: list[Message] = []
    with Journal(config.layout.journal) as journal:
        for entry in journal.read(events={"accepted"}):
            if entry.message is None or entry.message_id in selector.seen:
                continue
            try:
                msg = decode(bytes(entry.message))
            except InvalidMessage:
                continue  # journaled by an older or newer busd: not ours to judge here
            if selector.wants(entry, msg):
                selector.seen.add(msg.message_id)
                out.append(msg)
    return out


def _ids_in(data: bytes) -> set[str]:
    records, _ = conductor.split(data, final=True)
    return {str(r.header["msg_id"]) for r in records if r.header is not None}


def append_missing(path: Path, messages: Sequence[Message], *, fsync: bool = True) -> ExportReport:
    """Append to the conductor bus file ``path`` the messages whose msg_id it lacks.

    One ``write`` per entry (with conductor's ``"\\n"`` separator when the file
    is not empty), under ``flock(LOCK_EX)``, the lock conductor's writers take,
    then one ``fsync``. The file is created (0644) if missing.
    """
    report = ExportReport(file=str(path), selected=len(messages))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with open(path, "rb") as f:  # read under the lock: no writer appends meanwhile
            present = _ids_in(f.read())
        size = os.fstat(fd).st_size
        for msg in messages:
            msg_id = conductor.conductor_id(msg)
            if msg_id in present:
                report.present += 1
                continue
            entry = conductor.from_message(msg)
            _write_all(fd, (b"\n" if size > 0 else b"") + entry)
            size += len(entry) + (1 if size > 0 else 0)
            present.add(msg_id)
            report.appended += 1
            if not conductor.body_is_conductor_safe(msg.body):
                report.unsafe_bodies += 1
        if fsync and report.appended:
            os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the flock
    return report


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
