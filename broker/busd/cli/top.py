"""``busd top``: the agents and rates of a bus, refreshed every second.

On a terminal: a rich ``Live`` table sorted by backlog (ready + in flight), ``q``
(or Ctrl-C) quits. Elsewhere: one plain block per refresh, so ``busd top | tee``
and tests see stable text. The data is :func:`busd.cli.statusview.status_report`,
the report of ``busd status``.
"""

from __future__ import annotations

import os
import select
import sys
import time
from contextlib import contextmanager, suppress
from typing import Annotated, Any

import typer

from busd.cli.common import ConfigOpt, RootOpt, exit_on_error, load
from busd.cli.render import ago, since_iso
from busd.cli.statusview import rate_text, served_text, status_report
from busd.config import Config
from busd.ops.status import StatusReport

__all__ = ["register"]

_HEADERS = ["agent", "ready", "in flight", "redelivered", "oldest ready", "served", "last ack"]


def register(app: typer.Typer) -> None:
    """Add ``top`` to ``app``."""
    app.command()(top)


def _rows(data: StatusReport) -> list[list[str]]:
    now = time.time()
    agents = sorted(data.agents.items(), key=lambda kv: (-(kv[1].ready + kv[1].in_flight), kv[0]))
    return [
        [
            name,
            str(a.ready),
            f"{a.in_flight}/{a.max_in_flight}",
            str(a.redelivered),
            ago(a.oldest_ready_age_s),
            served_text(a),
            ago(since_iso(a.last_ack_at, now)),
        ]
        for name, a in agents
    ]


def _summary(data: StatusReport) -> str:
    d = data.daemon
    state = f"daemon pid {d.pid}" if d.running and not d.error else "daemon DOWN (files)"
    r = data.rates_per_min
    return (
        f"{data.root}  {state}  accepted/min {rate_text(r.accepted)}  "
        f"delivered/min {rate_text(r.delivered)}  dead-lettered/min {rate_text(r.dead_lettered)}"
        f"  outbox {data.outbox.backlog}  dlq {data.dlq.entries}"
    )


def _plain(data: StatusReport) -> str:
    rows = _rows(data)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(_HEADERS)]
    lines = [_summary(data)]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [_HEADERS, *rows]
    ]
    return "\n".join(lines) + "\n"


def _rich(data: StatusReport) -> Any:
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    grid = Table(header_style="bold", expand=True)
    for i, h in enumerate(_HEADERS):
        grid.add_column(h, justify="left" if i in (0, 5) else "right")
    for row in _rows(data):
        grid.add_row(*(escape(c) for c in row))
    hint = Text("q quits · sorted by backlog · every 1 s", style="dim")
    return Group(Text(_summary(data)), grid, hint)


@contextmanager
def _keys() -> Any:
    """stdin in cbreak mode (single keys, no echo) while the view runs, if it is a tty."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int | None, wait: float) -> bool:
    if fd is None:
        time.sleep(wait)
        return False
    ready, _, _ = select.select([fd], [], [], wait)
    return bool(ready) and os.read(fd, 16).lower().startswith(b"q")


def _live(cfg: Config, interval: float, count: int | None) -> None:
    from rich.console import Console
    from rich.live import Live

    shown = 0
    with _keys() as fd, Live(_rich(status_report(cfg)), console=Console(), screen=False) as live:
        while count is None or shown < count:
            shown += 1
            if _quit_pressed(fd, interval):
                return
            live.update(_rich(status_report(cfg)))


def top(
    ctx: typer.Context,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between refreshes.")] = 1.0,
    count: Annotated[
        int | None, typer.Option("--count", "-n", help="Stop after this many refreshes.")
    ] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """A live view of the agents (sorted by backlog) and the bus's rates; q quits.

    Through the daemon when it runs, from the files otherwise. Not a terminal:
    one plain block per refresh.
    Example: busd top --root /srv/bus
    """
    cfg = load(ctx, root, config)
    interval = max(0.1, interval)
    with exit_on_error(), suppress(KeyboardInterrupt):
        if sys.stdout.isatty():
            _live(cfg, interval, count)
            return
        shown = 0
        while count is None or shown < count:
            sys.stdout.write(_plain(status_report(cfg)) + "\n")
            sys.stdout.flush()
            shown += 1
            if count is None or shown < count:
                time.sleep(interval)
