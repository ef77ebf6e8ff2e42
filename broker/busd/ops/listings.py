"""Mailbox listings summed up for ``busd status``, and the cache a daemon keeps of them.

Listing a directory is the cost of a status report on a big bus: an inbox of 100,000
files is about 50 ms of ``listdir`` and as much again of filtering the names in Python.
A daemon answers ``status`` again and again for a backlog that mostly sits still, so it
keeps a :class:`Listings` and lists only the directories that changed.

Contract:

* :func:`mailbox` sums up a mailbox's visible names (:class:`Mailbox`): how many, how
  many deliveries were redelivered, the oldest and newest delivery name. Delivery names
  start with a fixed-width arrival key, so min and max find them without a sort.
* :meth:`Listings.get` returns ``summarize(names)`` for the visible names of a
  directory. It reuses its last result while the directory's device, inode and
  ``st_mtime_ns`` are unchanged, and only if that listing began more than
  :data:`SETTLE_S` after the mtime. Creating, removing or renaming an entry moves a
  directory's mtime, but a change within the same timestamp tick as the listing would
  not, so a listing that close to the last change is never reused: git's rule for
  "racily clean" index entries. A missing directory is empty and not kept.
* :meth:`Listings.waiting` sums up an outbox (:class:`Waiting`): how many files, and the
  oldest mtime among them. Outbox names are free-form, so their age needs a ``stat``
  each; a file is renamed into an outbox whole and left alone until it is routed, so
  the mtime of a name seen before is reused and only new names are stat'ed. (A stat
  per file of a 10,000-file backlog, each giving up the GIL to threads that route it,
  was most of a busy daemon's ``status``.)
* Without a :class:`Listings` (``None``), every call lists: the CLI runs once.

It is safe to use from several worker threads: each entry is replaced whole.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

from busd.store.fsio import list_names

__all__ = [
    "SETTLE_S",
    "Listings",
    "Mailbox",
    "Waiting",
    "arrival_of",
    "listed",
    "mailbox",
    "outbox_of",
    "summarized",
]

SETTLE_S = 2.0
"""How long after a directory's last change a listing of it may be reused.

Two seconds covers the coarsest timestamps busd's filesystems have (one second on
ext3 and HFS+, two on FAT)."""

_T = TypeVar("_T")


class Mailbox(NamedTuple):
    """One mailbox directory (an inbox or a ``locks/`` directory) summed up."""

    total: int
    """Visible names (dot-names are writes in progress)."""
    redelivered: int
    """Delivery names whose delivery count is not ``000``."""
    oldest: str | None
    """The delivery name with the smallest arrival key, if any."""
    newest: str | None
    """The delivery name with the largest arrival key, if any."""


def mailbox(names: list[str]) -> Mailbox:
    """Sum up a mailbox's visible ``names`` (in any order)."""
    # Cheap slice checks, no regex: on a big inbox this filter is half the cost.
    delivered = [
        n for n in names if len(n) > 25 and n[20] == "-" and n[24] == "-" and n[:20].isdigit()
    ]
    return Mailbox(
        total=len(names),
        redelivered=sum(1 for n in delivered if n[21:24] != "000"),
        oldest=min(delivered, default=None),
        newest=max(delivered, default=None),
    )


class Waiting(NamedTuple):
    """One outbox summed up."""

    total: int
    """Visible names: files nobody has routed yet."""
    oldest_mtime: float | None
    """The oldest mtime among them (epoch seconds), if any."""


def outbox_of(directory: Path, names: list[str], known: dict[str, float] | None = None) -> Waiting:
    """Sum up the outbox ``directory`` holding ``names``, stat'ing only names not in
    ``known`` (name -> mtime), which is updated to hold exactly the names still there."""
    seen = known if known is not None else {}
    now: dict[str, float] = {}
    for name in names:
        mtime = seen.get(name)
        if mtime is None:
            try:
                mtime = os.stat(directory / name).st_mtime
            except FileNotFoundError:
                continue  # routed meanwhile
        now[name] = mtime
    if known is not None:
        known.clear()
        known.update(now)
    return Waiting(total=len(names), oldest_mtime=min(now.values(), default=None))


def arrival_of(name: str) -> float:
    """The arrival time (epoch seconds) in a delivery name's key."""
    return int(name[:20]) / 1e9


def listed(directory: Path) -> list[str]:
    """The visible names of ``directory``, unsorted (empty if it is missing)."""
    return list_names(directory, sort=False)


class Listings:
    """Summaries of directories, each kept while its directory does not change."""

    def __init__(self, settle_s: float = SETTLE_S) -> None:
        self._settle_ns = int(settle_s * 1e9)
        self._kept: dict[Path, tuple[tuple[int, int, int], object]] = {}
        self._mtimes: dict[Path, dict[str, float]] = {}

    def get(self, directory: Path, summarize: Callable[[list[str]], _T]) -> _T:
        """``summarize(names)`` of ``directory``: kept, or listed now (see the module)."""
        try:
            st = os.stat(directory)
        except (FileNotFoundError, NotADirectoryError):
            self._kept.pop(directory, None)
            return summarize([])
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        kept = self._kept.get(directory)
        if kept is not None and kept[0] == key:
            return kept[1]  # type: ignore[return-value]  # one summarizer per directory
        # The clock is read before listing: a change after it moves the mtime past it.
        began = time.time_ns()
        result = summarize(listed(directory))
        if began - st.st_mtime_ns > self._settle_ns:
            self._kept[directory] = (key, result)
        else:
            self._kept.pop(directory, None)
        return result

    def waiting(self, directory: Path) -> Waiting:
        """:func:`outbox_of` the outbox ``directory``, its names' mtimes kept between calls."""
        known = self._mtimes.setdefault(directory, {})
        return self.get(directory, lambda names: outbox_of(directory, names, known))


def summarized(
    listings: Listings | None, directory: Path, summarize: Callable[[list[str]], _T]
) -> _T:
    """``summarize`` of ``directory``'s names, through ``listings`` when there is one."""
    if listings is None:
        return summarize(listed(directory))
    return listings.get(directory, summarize)
