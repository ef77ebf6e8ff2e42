"""The ``busd`` command line: the typer app, assembled from the command modules.

Global options (``--root``, ``--config``) are accepted before or after the
subcommand. Errors print ``busd: <code>: <message>`` on stderr and exit with a
sysexits-style code from :data:`busd.cli.common.EXIT_CODES`. The command
modules register themselves on :data:`app` through their ``register`` and never
import this module, so the package has no import cycle.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from busd import __version__
from busd.cli import dlq, doctor, messages, run, status, tail
from busd.cli.common import EXIT_CODES, ConfigOpt, RootOpt

__all__ = ["EXIT_CODES", "app", "main"]

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
for _module in (messages, run, status, dlq, tail, doctor):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    # A bus is private to its owner: every file busd creates is 0600, every directory 0700.
    os.umask(0o077)
    app()
