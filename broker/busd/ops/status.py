"""The state of a bus at a glance, from directory listings alone.

:func:`collect` never reads the journal's contents or any message: it lists
directories and stats a few files, so it stays fast on a bus with a large
journal and many waiting files. The daemon adds what only it knows (pid,
uptime, rates, dedupe index) through ``daemon``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from busd import __version__
from busd.config import Config

__all__ = ["collect"]


def _names(path: os.PathLike[str] | str) -> list[str]:
    # Unsorted on purpose: an inbox may hold 100,000 names, and the fixed-width
    # delivery prefix lets min/max find the oldest and newest without a sort.
    try:
        with os.scandir(path) as it:
            return [e.name for e in it if not e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _delivered(names: list[str]) -> list[str]:
    """The names that carry a delivery prefix (cheap slice checks, no regex)."""
    return [n for n in names if len(n) > 25 and n[20] == "-" and n[24] == "-" and n[:20].isdigit()]


def _oldest_age(names: list[str], now: float) -> float | None:
    delivered = _delivered(names)
    if not delivered:
        return None
    return max(0.0, round(now - int(min(delivered)[:20]) / 1e9, 3))


def _newest_arrival(*name_lists: list[str]) -> float | None:
    # The arrival key of a delivery name is when the router delivered it.
    keys = [n[:20] for names in name_lists for n in _delivered(names)]
    return int(max(keys)) / 1e9 if keys else None


def _oldest_mtime(directory: Path, names: list[str]) -> float | None:
    # Outbox names are free-form, so arrival order is not name order: stat them all
    # (one stat per waiting file; still no reads).
    oldest: float | None = None
    for name in names:
        mtime = _mtime(directory / name)
        if mtime is not None and (oldest is None or mtime < oldest):
            oldest = mtime
    return oldest


def collect(config: Config, daemon: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything ``busd status --json`` prints; ``daemon`` is None when none runs."""
    layout = config.layout
    now = time.time()
    agents: dict[str, Any] = {}
    oldest_outbox: float | None = None
    for agent in layout.agents():
        ready = _names(layout.inbox_dir(agent))
        claimed = _names(layout.locks_dir(agent))
        outbox = _names(layout.outbox_dir(agent))
        waiting = _oldest_mtime(layout.outbox_dir(agent), outbox)
        if waiting is not None and (oldest_outbox is None or waiting < oldest_outbox):
            oldest_outbox = waiting
        redelivered = sum(1 for n in _delivered(ready) if n[21:24] != "000")
        agents[agent] = {
            "ready": len(ready),
            "in_flight": len(claimed),
            "max_in_flight": config.max_in_flight,
            "redelivered": redelivered,
            "oldest_ready_age_s": _oldest_age(ready, now),
            "outbox": len(outbox),
            "outbox_oldest_age_s": None if waiting is None else round(now - waiting, 3),
            "last_delivery_at": _newest_arrival(ready, claimed),
            "last_ack_at": _mtime(layout.ledger(agent)),
        }
    reasons: Counter[str] = Counter()
    oldest_dlq: float | None = None
    for name in _names(layout.dlq):
        if name.endswith(".reason.json"):
            reasons[_reason_of(layout.dlq / name)] += 1
            mtime = _mtime(layout.dlq / name)
            if mtime is not None and (oldest_dlq is None or mtime < oldest_dlq):
                oldest_dlq = mtime
    segments = [n for n in _names(layout.journal) if n.endswith(".ndjson")]
    journal_bytes = sum(_size(layout.journal / n) for n in segments)
    return {
        "root": str(layout.root),
        "version": __version__,
        "daemon": daemon or {"running": False},
        "agents": agents,
        "outbox_backlog": sum(a["outbox"] for a in agents.values()),
        "outbox_oldest_age_s": None if oldest_outbox is None else round(now - oldest_outbox, 3),
        "dlq": {
            "entries": sum(reasons.values()),
            "by_reason": dict(sorted(reasons.items())),
            "oldest_age_s": None if oldest_dlq is None else round(now - oldest_dlq, 3),
        },
        "journal": {"segments": len(segments), "bytes": journal_bytes},
        "dedupe_window_s": config.dedupe_window_seconds,
    }


def _reason_of(path: os.PathLike[str]) -> str:
    # The reason is the first field of every record; reading 200 bytes is enough
    # and keeps status from decoding thousands of records in full.
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except FileNotFoundError:
        return "unknown"
    marker = b'"reason":"'
    i = head.find(marker)
    if i < 0:
        return "unknown"
    j = head.find(b'"', i + len(marker))
    return head[i + len(marker) : j].decode("ascii", "replace") if j > 0 else "unknown"


def _mtime(path: os.PathLike[str]) -> float | None:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def _size(path: os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
