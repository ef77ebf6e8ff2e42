"""Turn filesystem events into "this directory may have work" hints.

Events are hints, never the source of truth: the router re-scans every
directory an event names, and the daemon also re-scans everything on a slow
timer, so a lost event (inotify queue overflow, a network filesystem, the
polling fallback) delays a message but never loses it.

Only ``outbox/**`` and ``inbox/**`` are watched. Ignored: names starting with
``.`` (in-progress writes by convention), deletions, and files in ``inbox/``
that already carry a delivery name (busd's own deliveries; reacting to them
would make every delivery trigger a re-scan of its inbox).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog
import watchfiles

from busd.config import Config
from busd.ops.host import inotify_budget
from busd.store.layout import parse_delivery_name

__all__ = ["Hint", "watch"]

_log = structlog.get_logger("busd.watcher")

Hint = Path
"""A directory that may hold files to route."""


def _relevant(layout_outbox: str, layout_inbox: str) -> Callable[[watchfiles.Change, str], bool]:
    def keep(change: watchfiles.Change, path: str) -> bool:
        if change == watchfiles.Change.deleted:
            return False
        name = os.path.basename(path)
        if not name or name.startswith("."):
            return False
        if path.startswith(layout_inbox):
            return parse_delivery_name(name) is None
        return path.startswith(layout_outbox)

    return keep


def hint_for(config: Config, path: str) -> Path | None:
    """The directory to re-scan for an event on ``path``, or None.

    ``outbox/<a>/x`` and ``inbox/<a>/x`` give their directory; a new agent
    directory ``outbox/<a>`` gives itself (files may already be inside).
    """
    p = Path(path)
    layout = config.layout
    for top in (layout.outbox, layout.inbox):
        if p.parent == top:
            return p if p.is_dir() else top
        if p.parent.parent == top:
            return p.parent
    return None


async def watch(config: Config, on_hints: Callable[[set[Path]], None], stop: anyio.Event) -> None:
    """Watch the bus and call ``on_hints`` with directories to re-scan, until ``stop``.

    The watch is established synchronously on the first iteration, so a
    daemon that starts this task before its start-up scan misses no file:
    anything dropped during the scan raises an event afterwards.

    It never ends the daemon: when the native watcher cannot be created (no
    inotify instance left) or fails (a path it cannot decode), it logs a warning,
    asks for a full scan and carries on, switching to polling after a failure.
    """
    polling = config.force_polling
    while not stop.is_set():
        try:
            await _watch_once(config, on_hints, stop, polling)
            return
        except Exception as exc:  # noqa: BLE001 - watching is a hint; routing goes on
            _log.warning("watcher_failed", error=str(exc), fallback="polling")
            on_hints({config.layout.root})  # the root means: scan everything
            polling = True
            with anyio.move_on_after(1.0):
                await stop.wait()


async def _watch_once(
    config: Config, on_hints: Callable[[set[Path]], None], stop: anyio.Event, polling: bool
) -> None:
    layout = config.layout
    outbox, inbox = str(layout.outbox) + os.sep, str(layout.inbox) + os.sep
    if not polling:
        # Past the limit inotify silently skips directories; polling sees them all.
        # The same budget as `busd doctor`, so it reports exactly this fallback.
        budget = inotify_budget(layout)
        if not budget.native:
            limits = budget.limits
            _log.warning(
                "watcher_watch_limit",
                needed=budget.needed_watches,
                limit=limits.max_watches,
                instances=limits.max_instances,
                fallback="polling",
            )
            polling = True
    _log.info("watcher_starting", mode="polling" if polling else "native")
    watcher = watchfiles.awatch(
        layout.outbox,
        layout.inbox,
        watch_filter=_relevant(outbox, inbox),
        debounce=config.watch_debounce_ms,
        step=config.watch_step_ms,
        stop_event=stop,
        force_polling=polling or None,
        poll_delay_ms=100,
        rust_timeout=5000,
        recursive=True,
        ignore_permission_denied=True,
    )
    async for changes in watcher:
        hints = {h for _, path in changes if (h := hint_for(config, path)) is not None}
        if hints:
            on_hints(hints)
