"""Writing messages where they go: producers' outboxes and recipients' inboxes.

Contracts:

* :func:`publish` is the daemon-less producer: when it returns, the message is
  a complete file in ``outbox/<agent>/`` and (with fsync on, the default) on
  disk. It validates first, so nothing invalid is ever published by busd.
* :func:`waiting` / :func:`waiting_in` list what waits to be routed: outbox files
  and, in inboxes, files without a delivery name (producers' own drops, 5.4).
* :func:`deliver` places bytes in ``inbox/<agent>/`` under a delivery name,
  atomically and without replacing anything. Whether each file is fsynced is
  the caller's choice: the router fsyncs per batch, because the journal, not
  the inbox file, is what makes an accepted message durable.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from busd.core.codec import encode_json
from busd.core.ids import ArrivalClock
from busd.core.model import Message, check_agent_name
from busd.errors import InvalidName
from busd.store.fsio import fsync_dir, list_names, syncfs, write_durable
from busd.store.layout import Layout, delivery_name, ensure_dir, outbox_name, parse_delivery_name

__all__ = [
    "arrival_clock",
    "deliver",
    "ensure_agent_dirs",
    "publish",
    "publish_bytes",
    "sync_dirs",
    "waiting",
    "waiting_in",
]

arrival_clock = ArrivalClock()
"""The process-wide source of arrival keys for outbox and delivery names."""

_known_dirs: set[Path] = set()


_SYNCFS_FROM = 16  # files to sync at once from which one syncfs beats an fsync each


def _ensure(path: Path) -> None:
    # mkdir + parent fsync once per directory per process; the set makes the
    # hot path a single dictionary lookup.
    if path not in _known_dirs:
        ensure_dir(path)
        _known_dirs.add(path)


def ensure_agent_dirs(layout: Layout, agent: str) -> None:
    """Create ``inbox/<agent>/`` and ``locks/<agent>/`` if missing (name checked)."""
    check_agent_name(agent)
    _ensure(layout.inbox_dir(agent))
    _ensure(layout.locks_dir(agent))


def publish_bytes(
    layout: Layout, agent: str | None, data: bytes, message_id: str, *, fsync: bool = True
) -> Path:
    """Write already-validated ``data`` into ``outbox/<agent>/`` (``outbox/`` itself for
    ``None``); return its path."""
    if agent is None:
        directory = layout.outbox
    else:
        directory = layout.outbox_dir(check_agent_name(agent, "sender"))
        _ensure(directory)
    while True:
        name = outbox_name(arrival_clock.next(), message_id)
        try:
            return write_durable(directory, name, data, tmp_dir=layout.tmp, fsync=fsync)
        except FileExistsError:
            continue  # another process took this arrival key; take the next one


def publish(
    layout: Layout, message: Message, *, sender: str | None = None, fsync: bool = True
) -> Path:
    """Publish ``message`` into the outbox of ``sender`` (default: its ``agent_id``, or
    ``outbox/`` itself when that free text is no agent name).

    ``fsync`` is the caller's (the bus's ``fsync`` setting, usually); False is the
    seed's "optional fsync" for messages that may be lost in a power cut.
    """
    if sender is None:
        try:
            sender = check_agent_name(message.agent_id, "sender")
        except InvalidName:
            sender = None
    return publish_bytes(layout, sender, encode_json(message), message.message_id, fsync=fsync)


def deliver(
    layout: Layout,
    agent: str,
    data: bytes,
    message_id: str,
    *,
    deliveries: int = 0,
    arrival: str | None = None,
    fsync: bool = False,
) -> Path:
    """Place ``data`` in ``inbox/<agent>/`` under a fresh delivery name.

    ``deliveries`` is how many times the message was already handed out (it is
    kept across redeliveries by the name). With ``fsync=False`` neither the
    file nor the directory is fsynced here; see :func:`sync_dirs`.
    """
    ensure_agent_dirs(layout, agent)
    directory = layout.inbox_dir(agent)
    while True:
        name = delivery_name(arrival or arrival_clock.next(), deliveries, message_id)
        try:
            return write_durable(directory, name, data, tmp_dir=layout.tmp, fsync=fsync)
        except FileExistsError:
            arrival = None  # a name clash can only come from a reused key; draw a new one


def sync_dirs(paths: Iterable[Path]) -> None:
    """Make the files ``paths`` and their directories durable.

    Few files: fsync each distinct file, then each distinct directory, once.
    Many (a checkpoint under load): one ``syncfs`` per filesystem they are on,
    which covers the directories too and waits for one device flush, not one
    per file. A file that is gone (a consumer claimed or acked it meanwhile) is
    skipped: its bytes are the claimer's business now, and its directory is
    still synced.
    """
    paths = list(paths)
    dirs = {path.parent for path in paths}
    if len(paths) >= _SYNCFS_FROM:
        devices: dict[int, Path] = {}
        for d in dirs:
            with contextlib.suppress(FileNotFoundError):
                devices.setdefault(os.stat(d).st_dev, d)
        if all(syncfs(d) for d in devices.values()):
            return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in dirs:
        fsync_dir(d)


def waiting(layout: Layout) -> list[Path]:
    """Every file waiting to be routed: outbox files, then foreign inbox files.

    Names starting with ``.`` are in-progress writes by convention and skipped.
    """
    found = [p for d in _subdirs(layout.outbox) for p in _entries(d)]
    found.extend(p for p in _entries(layout.outbox) if not p.is_dir())
    for d in _subdirs(layout.inbox):
        found.extend(_foreign(d))
    return found


def waiting_in(layout: Layout, dirs: set[Path]) -> list[Path]:
    """The files waiting in ``dirs`` (outbox or inbox directories)."""
    found: list[Path] = []
    for d in sorted(dirs):
        if d == layout.outbox:
            found.extend(p for p in _entries(d) if not p.is_dir())
            continue
        found.extend(_foreign(d) if d.parent == layout.inbox else _entries(d))
    return found


def _subdirs(parent: Path) -> list[Path]:
    return [parent / n for n in list_names(parent) if _is_dir(parent / n)]


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)  # a symlink is not followed
    except FileNotFoundError:
        return False


def _entries(directory: Path) -> list[Path]:
    return [directory / n for n in list_names(directory)]


def _foreign(directory: Path) -> list[Path]:
    """Files of an inbox without a delivery name (filtered before the sort: only few)."""
    names = [n for n in list_names(directory, sort=False) if not parse_delivery_name(n)]
    return [directory / n for n in sorted(names)]
