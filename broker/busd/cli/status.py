"""``busd status``: the state of the bus on one screen, or as one JSON document.

The report is :class:`busd.ops.status.StatusReport` either way: the daemon's
``status`` answer when one runs, built from the files when none does, so
``--json`` has the same keys with and without a daemon. Exit
:data:`~busd.cli.common.EXIT_DAEMON_DOWN` when no daemon answers and, with
``--check``, :data:`~busd.cli.common.EXIT_ATTENTION` when the bus needs attention.

This is the command monitoring runs every minute: the report and its screen live in
:mod:`busd.cli.statusview`, which ``busd`` runs without typer for a plain
``busd status [--check] [--json]`` (see :func:`busd.cli.statusview.fast_status`).
"""

from __future__ import annotations

from typing import Annotated

import typer

from busd.cli.common import ConfigOpt, JsonOpt, RootOpt, exit_on_error, load, print_json
from busd.cli.statusview import (
    EXIT_ATTENTION,
    exit_code,
    print_report,
    status_report,
)

__all__ = ["register", "status_report"]


def register(app: typer.Typer) -> None:
    """Add ``status`` to ``app``."""
    app.command()(status)


def status(
    ctx: typer.Context,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help=f"Exit {EXIT_ATTENTION} when the bus needs attention (DLQ not empty, outbox "
            "backlog older than a minute, ...).",
        ),
    ] = False,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The state of the bus on one screen: daemon, agents, outbox, DLQ, journal, rates.

    Per agent: how it is served (`socket (n)`: by n socket consumers from the
    daemon's memory; `files`: through inbox/), what is ready and in flight (files
    and memory together), and the oldest message it has not settled.

    Through the daemon when it runs, from the files otherwise (rates and the
    dedupe index are then null). Never reads the journal's contents.
    Exit 0: daemon running; 3: no daemon answers; 4: with --check, the bus needs attention.

    Example: busd status --check --json | jq .attention
    """
    cfg = load(ctx, root, config)
    with exit_on_error():
        data = status_report(cfg)
    if json_out:
        print_json(data)
    else:
        print_report(data)
    code = exit_code(data, check)
    if code:
        raise typer.Exit(code)
