"""``busd doctor``: check the bus and its host, explain each problem, optionally repair it.

Exit 0 when every finding is ok or fixed, :data:`~busd.cli.common.EXIT_DOCTOR`
otherwise; 66 when there is no bus directory at all.
"""

from __future__ import annotations

from typing import Annotated

import typer

from busd.cli.common import (
    EXIT_DOCTOR,
    ConfigOpt,
    JsonOpt,
    RootOpt,
    exit_on_error,
    fail,
    load,
    print_json,
)
from busd.cli.render import table
from busd.ops.doctor import diagnose

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add ``doctor`` to ``app``."""
    app.command()(doctor)


def doctor(
    ctx: typer.Context,
    fix: Annotated[
        bool,
        typer.Option(
            "--fix",
            help="Repair what is safe: stale socket files, old tmp files, expired claims, modes.",
        ),
    ] = False,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check the bus and its host, explain each problem, and optionally repair it.

    Checks: layout, permissions of the root and its directories (0700, owner),
    the socket (stale file, mode 0600), the bus lock (stale content), claims
    whose lease expired long ago, old files in tmp/, inotify watch limit, free
    disk space, filesystem type. Exit 0 when every finding is ok or fixed, else 1.
    Example: busd doctor --fix
    """
    cfg = load(ctx, root, config, need_bus=False)
    if not cfg.layout.root.is_dir():
        fail("not_found", f"no bus at {cfg.root} (run `busd init {cfg.root}`)")
    with exit_on_error():
        findings = [f.to_dict() for f in diagnose(cfg, fix=fix)]
    healthy = all(f["status"] == "ok" or f["fixed"] for f in findings)
    if json_out:
        print_json({"root": cfg.root, "healthy": healthy, "findings": findings})
    else:
        rows = [["fixed" if f["fixed"] else f["status"], f["check"], f["detail"]] for f in findings]
        table(["status", "check", "detail"], rows)
    if not healthy:
        raise typer.Exit(EXIT_DOCTOR)
