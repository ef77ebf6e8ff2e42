"""The ``busd`` console script: run the command line, starting as little as it needs.

:func:`main` runs a plain ``busd status [--check] [--json]`` through
:func:`busd.cli.statusview.fast_status`, without importing typer, structlog or any
other command (monitoring runs it every minute: it must start fast); every other
invocation goes to the typer app of :mod:`busd.cli.commands`, also reachable here
as :data:`app` (loaded on first use). Errors print ``busd: <code>: <message>`` on
stderr and exit with a sysexits-style code from :data:`busd.cli.common.EXIT_CODES`.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import typer

    app: typer.Typer
    EXIT_CODES: dict[str, int]

__all__ = ["EXIT_CODES", "app", "main"]


def __getattr__(name: str) -> Any:
    # `app` and `EXIT_CODES` cost the whole typer app: import it only when asked.
    if name in ("app", "EXIT_CODES"):
        from busd.cli import commands

        return getattr(commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Console-script entry point."""
    # A bus is private to its owner: every file busd creates is 0600, every directory 0700.
    os.umask(0o077)
    from busd.cli.statusview import fast_status

    code = fast_status(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from busd.cli.commands import app

    app()
