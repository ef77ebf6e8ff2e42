"""Mirror a topic into a conductor-loop bus file (``[[conductor.mirror]]``).

Each mirror is a subscriber of ``topic`` under the reserved agent name
:func:`mirror_agent` (``conductor-mirror.<8 hex>``, from the file's path and the
topic, so reordering the config keeps each queue with its file). It is a real
queue, served from the daemon's memory like a socket subscriber (``busd status``
shows it with one connection): messages wait there, and across restarts as inbox
files, while the file cannot be written. The :class:`Mirror` claims (inbox files
first, then memory: arrival order), appends, and acks:

* the append is conductor's own: the file opened ``O_WRONLY|O_APPEND|O_CREAT``, an
  exclusive ``flock`` (the lock conductor's writers take), ``"\\n"`` before the
  entry when the file is not empty, entries from
  :func:`busd.core.conductor.from_message`, in arrival order, then one ``fsync`` for
  the whole batch (never one per message when many wait), then the ack;
* at most once: under the same lock the mirror first reads what others appended
  since it last looked (conductor agents share the file) and skips every message
  whose conductor id (:func:`busd.core.conductor.conductor_id`) the file already
  holds, so a crash between the append and the ack writes nothing twice; at start
  the whole file is read once for its ids;
* a file the mirror creates is 0600, as everything busd creates (conductor's own
  writers use 0644; chmod it if other users must read it); an existing file's mode
  is left alone. Its directory must exist.

While an append fails (a missing directory, a full disk), the claimed batch is kept,
its leases extended, and the append retried with a growing pause: claims are not
repeated, so a long outage does not use up ``max_deliveries``.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

import anyio
import structlog
from anyio.abc import TaskStatus

from busd.config import MIRROR_AGENT_PREFIX as AGENT_PREFIX
from busd.config import ConductorMirror, Config, mirror_agent, with_mirrors
from busd.core import codec, conductor
from busd.core.model import Message
from busd.errors import BusdError, InvalidMessage
from busd.routing.consumer import Claim, Consumer
from busd.routing.queues import AckOutcome, Delivery

__all__ = ["AGENT_PREFIX", "Host", "Mirror", "mirror_agent", "run_mirrors", "with_mirrors"]

_log = structlog.get_logger("busd.conductor")

_BATCH = 256
_IDLE_WAIT_S = 1.0
_MODE = 0o600


class Host(Protocol):
    """What a mirror needs from the daemon (``busd.runtime.daemon.Daemon`` is one)."""

    @property
    def config(self) -> Config: ...

    def attach(self, agent: str) -> None: ...

    def detach(self, agent: str) -> None: ...

    async def claim(self, agent: str, n: int) -> list[tuple[Delivery, bytes]]: ...

    async def settle(
        self, agent: str, *, receipts: list[str], message_ids: list[str]
    ) -> AckOutcome: ...

    def extend(
        self, agent: str, *, receipt: str | None, message_id: str | None, lease_s: float
    ) -> datetime: ...

    async def wait_for_delivery(self, agent: str, timeout: float) -> None: ...


@dataclass(slots=True)
class _Taken:
    """A claimed batch: the messages in order, and how to settle each."""

    messages: list[Message] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # receipts of file claims
    memory: list[str] = field(default_factory=list)  # receipts of memory deliveries

    def __bool__(self) -> bool:
        return bool(self.files or self.memory)


class _File:
    """The bus file and the conductor ids it holds (blocking: worker threads only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: set[str] = set()
        self._seen = 0  # bytes whose ids are in ``ids``
        self._identity: tuple[int, int] | None = None

    def catch_up(self, fd: int) -> int:
        """Read the ids appended since the last look (all of them if the file changed)."""
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self._identity or st.st_size < self._seen:
            self.ids.clear()
            self._seen = 0
            self._identity = (st.st_dev, st.st_ino)
        if st.st_size > self._seen:
            data = os.pread(fd, st.st_size - self._seen, self._seen)
            records, _ = conductor.split(data)
            self.ids.update(
                str(r.header["msg_id"])
                for r in records
                if r.header is not None and r.header.get("msg_id") is not None
            )
            # Entries are whole under the lock: the next look starts at the end.
            self._seen = st.st_size
        return st.st_size

    def load(self) -> None:
        """The ids of the file as it is (at start); a missing file holds none."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                self.catch_up(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def append(self, messages: Sequence[Message], fsync: bool) -> int:
        """Append the messages the file lacks, in order: one write, one fsync; how many."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.path, flags, _MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = self.catch_up(fd)  # what others appended meanwhile, under our lock
                parts: list[bytes] = []
                written = 0
                for msg in messages:
                    cid = conductor.conductor_id(msg)
                    if cid in self.ids:
                        continue  # appended before a crash, or by someone else: once only
                    if size or parts:
                        parts.append(b"\n")  # conductor's separator rule
                    parts.append(conductor.from_message(msg))
                    self.ids.add(cid)
                    written += 1
                if parts:
                    view = memoryview(b"".join(parts))
                    while view:
                        view = view[os.write(fd, view) :]
                    if fsync:
                        os.fsync(fd)
                    self._seen = os.fstat(fd).st_size
                return written
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class Mirror:
    """One ``[[conductor.mirror]]`` entry: its queue drained into its bus file."""

    def __init__(self, host: Host, mirror: ConductorMirror) -> None:
        self._host = host
        config = host.config
        self.agent = mirror_agent(config, mirror)
        self.topic = mirror.topic
        self._file = _File(config.resolve(mirror.path))
        self._consumer: Consumer | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Attach as the agent's subscriber, read the file's ids, then drain until cancelled."""
        self._host.attach(self.agent)
        try:
            await self._consumer_now()  # its inbox exists: routable with unknown_recipient=dlq
            try:
                await anyio.to_thread.run_sync(self._file.load)
            except OSError as exc:
                _log.warning(
                    "conductor_mirror_unreadable", path=str(self._file.path), error=str(exc)
                )
            task_status.started()
            _log.info(
                "conductor_mirror_started",
                path=str(self._file.path),
                topic=self.topic,
                agent=self.agent,
                ids=len(self._file.ids),
            )
            while True:
                taken = await self._claim()
                if not taken:
                    await self._host.wait_for_delivery(self.agent, _IDLE_WAIT_S)
                    continue
                await self._append(taken)
                await self._settle(taken)
        finally:
            self._host.detach(self.agent)

    async def _consumer_now(self) -> Consumer:
        config = self._host.config
        if self._consumer is None or self._consumer.config is not config:
            self._consumer = await anyio.to_thread.run_sync(Consumer, config, self.agent)
        return self._consumer

    async def _claim(self) -> _Taken:
        taken = _Taken()
        consumer = await self._consumer_now()
        # Files first: written before the last stop, they are the older part of the queue.
        claims: list[Claim] = await anyio.to_thread.run_sync(consumer.claim, _BATCH)
        for c in claims:
            taken.messages.append(c.message)
            taken.files.append(c.receipt)
        if len(claims) < _BATCH:
            for d, body in await self._host.claim(self.agent, _BATCH - len(claims)):
                try:
                    taken.messages.append(codec.decode(body))
                except InvalidMessage as exc:  # journaled canonical JSON: never expected
                    _log.error(
                        "conductor_mirror_undecodable", message_id=d.ref.message_id, error=str(exc)
                    )
                taken.memory.append(d.receipt)
        return taken

    async def _append(self, taken: _Taken) -> None:
        """Append until it works; leases are extended while it does not."""
        backoff = 0.0
        while True:
            fsync = self._host.config.fsync
            try:
                written = await anyio.to_thread.run_sync(self._file.append, taken.messages, fsync)
            except (OSError, BusdError) as exc:
                backoff = min(max(backoff * 2, 0.1), 5.0)
                _log.error(
                    "conductor_mirror_failed",
                    path=str(self._file.path),
                    error=str(exc),
                    retry_in_s=backoff,
                )
                await self._extend(taken, backoff)
                await anyio.sleep(backoff)
                continue
            if written:
                _log.debug("conductor_mirrored", path=str(self._file.path), messages=written)
            return

    async def _extend(self, taken: _Taken, pause: float) -> None:
        lease = max(self._host.config.lease_seconds, 4 * pause)
        for receipt in taken.memory:
            try:
                self._host.extend(self.agent, receipt=receipt, message_id=None, lease_s=lease)
            except BusdError:
                pass  # already back in the queue: the file's ids stop a second append
        if taken.files:
            consumer = await self._consumer_now()

            def extend_files() -> None:
                for receipt in taken.files:
                    try:
                        consumer.extend(receipt=receipt, lease_s=lease)
                    except BusdError:
                        pass

            await anyio.to_thread.run_sync(extend_files)

    async def _settle(self, taken: _Taken) -> None:
        if taken.memory:
            try:
                await self._host.settle(self.agent, receipts=taken.memory, message_ids=[])
            except BusdError as exc:
                # A stale receipt (lease ended meanwhile): redelivered, then skipped by id.
                _log.warning("conductor_mirror_ack_failed", error=str(exc))
        if taken.files:
            consumer = await self._consumer_now()
            try:
                await anyio.to_thread.run_sync(lambda: consumer.settle(receipts=taken.files))
            except BusdError as exc:
                _log.warning("conductor_mirror_ack_failed", error=str(exc))


async def run_mirrors(
    host: Host, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run every mirror of the config in force at start, until cancelled."""
    config = host.config
    async with anyio.create_task_group() as tg:
        for m in config.conductor.mirror:
            await tg.start(Mirror(host, m).run)
        task_status.started()
