"""What else lives in ``dlq/``: dead letters busd did not write, and busd's own in the
wrong place.

Contracts (protocol.md section 7, compatibility.md):

* A **foreign** file in ``dlq/`` (Tapps' ``<stem>.<hex>.json`` beside its
  ``.reason.txt``, or anything else busd did not write) is listed
  (:func:`list_foreign`, :meth:`ForeignEntry.row`: reason :data:`FOREIGN_REASON`) and
  shown (:func:`load_foreign`), never replayed, moved or deleted, in every mode.
* With ``compat = "tapps"`` busd's entries live in ``dlq/busd/``; :func:`strays` finds
  busd entries left in ``dlq/`` from before the switch and :func:`adopt_strays` moves
  them there (data, then record) under the DLQ lock (``busd doctor --fix``).
"""

from __future__ import annotations

import os
import stat
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from busd.errors import InvalidMessage, NotFound
from busd.store.dlq import (
    ENTRY_NAME,
    FOREIGN_REASON_SUFFIX,
    RECORD_MAX_BYTES,
    RECORD_SUFFIX,
    foreign_reason_name,
    is_orphan,
    locked,
)
from busd.store.fsio import fsync_dir, list_names, read_limited, rename_noreplace
from busd.store.layout import Layout

__all__ = [
    "FOREIGN_REASON",
    "ForeignEntry",
    "adopt_strays",
    "list_foreign",
    "load_foreign",
    "strays",
]

FOREIGN_REASON = "foreign"
"""The reason a listing shows for a dead letter busd did not write (a Tapps one, say)."""


def strays(layout: Layout) -> list[str]:
    """busd's entries (by record) in ``dlq/`` itself while its entries belong in
    ``dlq/busd/`` (a root switched to ``compat = "tapps"``): there Tapps' ``replay_dlq``
    would move their data into an inbox. Empty when :attr:`Layout.dlq_subdir` is unset."""
    if not layout.dlq_subdir:
        return []
    names = list_names(layout.dlq_top)
    own = [n[: -len(RECORD_SUFFIX)] for n in names if n.endswith(RECORD_SUFFIX)]
    return [n for n in own if ENTRY_NAME.fullmatch(n)]


def adopt_strays(layout: Layout) -> list[str]:
    """Move :func:`strays` into :attr:`Layout.dlq` (data, then record; both busd's), under
    the DLQ lock; returns the names moved. A name already taken there is left where it is."""
    moved: list[str] = []
    top = layout.dlq_top
    with locked(layout):
        for name in strays(layout):
            record = name + RECORD_SUFFIX
            try:
                if os.path.lexists(top / name):
                    rename_noreplace(top / name, layout.dlq / name)
                rename_noreplace(top / record, layout.dlq / record)
            except (FileExistsError, FileNotFoundError):
                continue
            moved.append(name)
        if moved:
            fsync_dir(layout.dlq)
            fsync_dir(top)
    return moved


@dataclass(frozen=True, slots=True)
class ForeignEntry:
    """A file in ``dlq/`` busd did not write: listed, never moved or deleted.

    ``reason`` is the text of its ``.reason.txt`` (Tapps), or None when it has none.
    """

    name: str
    path: Path
    reason: str | None
    size: int
    modified_at: str

    def row(self) -> dict[str, Any]:
        """This entry in the shape of a listed record (``dlq.list``, ``busd dlq list``):
        reason :data:`FOREIGN_REASON`, ``detail`` its ``.reason.txt``, ``"foreign": true``."""
        return {
            "name": self.name,
            "foreign": True,
            "reason": FOREIGN_REASON,
            "detail": self.reason or "",
            "size": self.size,
            "first_failure_at": self.modified_at,
            "last_failure_at": self.modified_at,
            "replays": 0,
        }


def list_foreign(layout: Layout) -> list[ForeignEntry]:
    """The foreign dead letters in ``dlq/``, by name (read-only; module docstring)."""
    top = layout.dlq_top
    names = set(list_names(top))
    # busd's: its entry directory (tapps mode), replayed/, and entries written to dlq/
    # itself (in any mode, now or before a switch to tapps mode).
    own = {"replayed", layout.dlq_subdir} - {""}
    for n in names:
        if n.endswith(RECORD_SUFFIX):
            own.update((n, n[: -len(RECORD_SUFFIX)]))
        elif is_orphan(n, names):
            own.add(n)
    reasons = {n for n in names if n.endswith(FOREIGN_REASON_SUFFIX)}
    out: list[ForeignEntry] = []
    for n in sorted(names - own):
        if n in reasons and n.removesuffix(FOREIGN_REASON_SUFFIX) + ".json" in names:
            continue  # shown with its data
        entry = _foreign(top, n, names)
        if entry is not None:
            out.append(entry)
    return out


def load_foreign(layout: Layout, name: str) -> tuple[ForeignEntry, bytes | None]:
    """A foreign entry and its bytes (None if not a regular file); NotFound if none."""
    if "/" in name or "\\" in name or name.startswith("."):
        raise NotFound(f"no DLQ entry {name!r}", name=name[:200])
    for entry in list_foreign(layout):
        if entry.name == name:
            try:
                return entry, read_limited(entry.path, max(entry.size, 0))
            except InvalidMessage:
                return entry, None
    raise NotFound(f"no DLQ entry {name!r}", name=name[:200])


def _foreign(top: Path, name: str, names: set[str]) -> ForeignEntry | None:
    path = top / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    reason: str | None = None
    reason_name = foreign_reason_name(name)
    if reason_name != name and reason_name in names:
        with suppress(OSError, InvalidMessage):
            raw = read_limited(top / reason_name, RECORD_MAX_BYTES)
            reason = raw.decode("utf-8", errors="replace").strip()
    size = st.st_size if stat.S_ISREG(st.st_mode) else 0
    at = datetime.fromtimestamp(st.st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return ForeignEntry(name, path, reason, size, at)
