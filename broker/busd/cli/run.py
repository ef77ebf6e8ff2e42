"""``busd run``: the daemon in the foreground (what systemd and ``make run`` use).

The server stack is imported inside the command: only ``run`` needs it, and
every other command stays fast to start. A daemon forced out (second SIGINT,
shutdown timeout) exits :data:`~busd.cli.common.EXIT_FORCED`.
"""

from __future__ import annotations

import functools
import os
from typing import Annotated, Any

import anyio
import typer

from busd import logs
from busd.cli.common import EXIT_FORCED, ConfigOpt, RootOpt
from busd.cli.common import exit_on_error as _errors
from busd.cli.common import fail as _fail
from busd.cli.common import loader as _loader
from busd.config import parse_text_value

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add ``run`` to ``app``."""
    app.command()(run)


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            _fail("config_error", f"--set expects KEY=VALUE, got {pair!r}")
        key = key.strip().replace("-", "_")
        with _errors():
            flags[key] = parse_text_value(value, f"--set {key}")
    return flags


def run(
    ctx: typer.Context,
    root: RootOpt = None,
    config: ConfigOpt = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = None,
    log_format: Annotated[
        str | None, typer.Option("--log-format", help="auto, json or console.")
    ] = None,
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="Set any config key: --set lease_seconds=30.")
    ] = None,
) -> None:
    """Run the daemon in the foreground (what systemd and `make run` use).

    Example: busd run --root /var/lib/busd --set lease_seconds=30
    """
    flags = _parse_sets(sets or [])
    if log_level is not None:
        flags["log_level"] = log_level
    if log_format is not None:
        flags["log_format"] = log_format
    with _errors():
        loader = _loader(ctx, root, config, **flags)
        cfg = loader.load()
        logs.configure(cfg.log_level, cfg.log_format)
        if not cfg.layout.is_initialized():
            _fail("not_found", f"no bus at {cfg.root} (run `busd init {cfg.root}`)")
        from busd.app import serve  # only `run` needs the server stack: keep others fast

        anyio.run(functools.partial(serve, loader, on_force_exit=lambda: os._exit(EXIT_FORCED)))
