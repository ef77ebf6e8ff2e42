"""Human output of the ``busd`` CLI: tables, label/value pairs, progress bars, durations, sizes.

A rich table on a terminal, aligned plain text when piped (so scripts and tests
see stable columns). rich is imported only when stdout or stderr is a terminal:
it costs start-up time every piped command would pay for nothing. Neither is typer:
``busd status`` runs without it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from busd.ops.status import short_duration

__all__ = ["ago", "pairs", "plural", "progress", "short", "since_iso", "size", "table"]

_PROGRESS_MIN = 10

ago = short_duration
"""A short duration: ``45s``, ``3m20s``, ``2h05m``, ``7d``; ``-`` for None."""


def since_iso(iso: str | None, now: float) -> float | None:
    """Seconds from the ISO 8601 time ``iso`` to ``now``; None if absent or unparsable."""
    if not iso:
        return None
    try:
        return now - datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def size(n: float) -> str:
    """Bytes in B, KiB, MiB, GiB (or TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def plural(count: int, one: str, many: str | None = None) -> str:
    """``1 entry``, ``2 entries``: ``many`` defaults to ``one + "s"``."""
    return f"{count} {one if count == 1 else (many or one + 's')}"


def short(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """A rich table on a terminal; aligned plain columns when piped."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        grid = Table(title=title, title_justify="left", header_style="bold")
        for i, h in enumerate(headers):
            grid.add_column(h, justify="left" if i == 0 or not _numeric(rows, i) else "right")
        for row in rows:
            grid.add_row(*(escape(c) for c in row))  # names and details are not markup
        Console().print(grid)
        return
    if title:
        _echo(title)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        _echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _echo(text: str) -> None:
    # Not typer.echo: `busd status` runs without importing typer (busd.cli.statusview).
    sys.stdout.write(text + "\n")


def _numeric(rows: list[list[str]], i: int) -> bool:
    return bool(rows) and all(r[i].replace("/", "").replace(".", "").isdigit() for r in rows)


def pairs(items: list[tuple[str, str]]) -> None:
    """``label  value`` lines: a rich grid on a terminal, plain text when piped."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for label, value in items:
            grid.add_row(escape(label), escape(value))
        Console().print(grid)
        return
    width = max(len(label) for label, _ in items)
    for label, value in items:
        _echo(f"{label.ljust(width)}  {value}")


@contextmanager
def progress(total: int, what: str) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr when it is a terminal and the work is long; else nothing."""
    if total < _PROGRESS_MIN or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=total)
        yield lambda: bar.advance(task)
