"""The ``busd`` typer app, assembled from the command modules (:mod:`busd.cli.main` runs it).

Global options (``--root``, ``--config``) are accepted before or after the
subcommand. Errors print ``busd: <code>: <message>`` on stderr and exit with a
sysexits-style code from :data:`busd.cli.common.EXIT_CODES`. The command
modules register themselves on :data:`app` through their ``register`` and never
import this module or :mod:`busd.cli.main`, so the package has no import cycle.
"""

from __future__ import annotations

from typing import Annotated

import typer

from busd import __version__
from busd.cli import bridge, conductor, dlq, doctor, mcp, messages, run, status, tail, top, web
from busd.cli.common import EXIT_CODES, ConfigOpt, RootOpt

__all__ = ["EXIT_CODES", "app"]

app = typer.Typer(
    name="busd",
    help="busd: a durable local message broker. Files are the protocol.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"busd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    root: RootOpt = None,
    config: ConfigOpt = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    ctx.obj = {"root": root, "config": config}


# The order of `busd --help` (groups such as dlq are listed after the commands).
for _module in (messages, run, status, dlq, tail, doctor, top, web, mcp, conductor, bridge):
    _module.register(app)
