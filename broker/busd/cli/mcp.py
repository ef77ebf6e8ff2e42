"""``busd mcp``: serve the bus to a coding agent over the Model Context Protocol.

The SDK (the ``busd[mcp]`` extra) is imported inside the command only, so
``busd --help`` stays fast and a missing extra is one clear error. On stdio,
stdout belongs to the protocol: logs go to stderr.
"""

from __future__ import annotations

from typing import Annotated

import anyio
import typer

from busd import logs
from busd.cli.common import ConfigOpt, RootOpt
from busd.cli.common import exit_on_error as _errors
from busd.cli.common import fail as _fail
from busd.cli.common import loader as _loader

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add ``mcp`` to ``app``."""
    app.command()(mcp)


def mcp(
    ctx: typer.Context,
    agent: Annotated[
        str | None,
        typer.Option("--agent", help="The agent id this server acts as (required on stdio)."),
    ] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
    ops: Annotated[
        bool, typer.Option("--ops", help="Also offer the operator tools (DLQ, replay, tail).")
    ] = False,
    http: Annotated[
        str | None,
        typer.Option(
            "--http",
            metavar="HOST:PORT",
            help="Serve streamable HTTP on a loopback address instead of stdio; "
            "every tool then takes an explicit agent.",
        ),
    ] = None,
) -> None:
    """Run an MCP server for one agent (stdio), or for local agents over HTTP.

    Example: claude mcp add busd -- busd mcp --agent alice --root /srv/bus
    """
    with _errors():
        cfg = _loader(ctx, root, config).load()
        logs.configure("warning", cfg.log_format)
        if not cfg.layout.is_initialized():
            _fail("not_found", f"no bus at {cfg.root} (run `busd init {cfg.root}`)")
        if http is None and agent is None:
            _fail("usage", "--agent is required on stdio (or serve --http HOST:PORT)")
        if agent is not None:
            from busd.core.model import check_agent_name

            check_agent_name(agent, "agent")
        try:
            from busd.mcp import server
        except ImportError as exc:  # the optional SDK is missing
            _fail("usage", f"busd mcp needs the MCP SDK ({exc.name}): install busd[mcp]")
        built = server.build(cfg, agent=agent, ops=ops, http=http is not None)
        if http is None:
            anyio.run(server.serve_stdio, built)
            return
        from busd.mcp import http as transport

        host, port = transport.parse_address(http)
        anyio.run(transport.serve_http, built, host, port)
