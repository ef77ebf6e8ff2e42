"""Host limits a bus depends on, computed once for everyone who needs them.

Contract: :func:`inotify_budget` is THE answer to "can the daemon watch this bus
with inotify?". The daemon's watcher (:mod:`busd.runtime.watcher`) falls back to
polling exactly when :attr:`InotifyBudget.native` is False, and ``busd doctor``
reports an error exactly then, so the two can never disagree.

The watcher watches ``outbox/`` and ``inbox/`` recursively: one inotify watch per
directory (the two tops and every agent directory in them), and one inotify
instance. The limits in force are the smaller of the per-user sysctls
(``/proc/sys/fs/inotify/max_user_*``) and those of the user namespace
(``/proc/sys/user/max_inotify_*``); where neither exists (not Linux) there is no
limit to check. Everything here reads metadata only and never prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from busd.store.layout import Layout

__all__ = ["InotifyBudget", "InotifyLimits", "inotify_budget", "read_inotify_limits"]

_WATCH_LIMITS = ("/proc/sys/fs/inotify/max_user_watches", "/proc/sys/user/max_inotify_watches")
_INSTANCE_LIMITS = (
    "/proc/sys/fs/inotify/max_user_instances",
    "/proc/sys/user/max_inotify_instances",
)


@dataclass(frozen=True, slots=True)
class InotifyLimits:
    """The inotify limits in force for this process; None where there is none to read."""

    max_watches: int | None
    max_instances: int | None


@dataclass(frozen=True, slots=True)
class InotifyBudget:
    """What watching a bus needs against what the host allows."""

    needed_watches: int
    """Directories the watcher watches: ``outbox/``, ``inbox/`` and every agent directory."""
    limits: InotifyLimits

    @property
    def native(self) -> bool:
        """True when inotify can watch every directory: else the daemon polls."""
        if self.limits.max_instances is not None and self.limits.max_instances < 1:
            return False
        return self.limits.max_watches is None or self.needed_watches <= self.limits.max_watches

    @property
    def tight(self) -> bool:
        """More than half of the watch limit, which every program of the user shares."""
        limit = self.limits.max_watches
        return limit is not None and self.needed_watches > limit // 2


def _read_proc_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _smallest(paths: tuple[str, ...]) -> int | None:
    values = [v for p in paths if (v := _read_proc_int(p)) is not None]
    return min(values) if values else None


def read_inotify_limits() -> InotifyLimits:
    """The inotify limits in force (the smaller of the user and namespace sysctls)."""
    return InotifyLimits(_smallest(_WATCH_LIMITS), _smallest(_INSTANCE_LIMITS))


def _watched_directories(layout: Layout) -> int:
    count = 2  # outbox/ and inbox/ themselves
    for top in (layout.outbox, layout.inbox):
        try:
            with os.scandir(top) as it:
                count += sum(1 for e in it if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            continue
    return count


def inotify_budget(layout: Layout) -> InotifyBudget:
    """The inotify budget of the bus ``layout`` on this host, right now."""
    return InotifyBudget(_watched_directories(layout), read_inotify_limits())
