"""``busd web``: serve the dashboard (the ``busd[web]`` extra) on a loopback address.

The token (created at the first start, kept 0600 in the bus root) is printed as
part of the URL on stdout, the one line this command prints there. Starlette and
uvicorn are imported inside the command only: ``busd --help`` stays fast and a
missing extra is one clear error. ``--bind`` to a non-loopback address is allowed
(the token is always required) and said loudly on stderr.
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Annotated

import anyio
import typer

from busd.cli.common import ConfigOpt, RootOpt, exit_on_error, fail, load

__all__ = ["register"]

_DEFAULT_PORT = 8765


def register(app: typer.Typer) -> None:
    """Add ``web`` to ``app``."""
    app.command()(web)


def _loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False


def web(
    ctx: typer.Context,
    port: Annotated[int, typer.Option("--port", help="TCP port to listen on.")] = _DEFAULT_PORT,
    bind: Annotated[
        str,
        typer.Option("--bind", help="Address to listen on (loopback unless you name another one)."),
    ] = "127.0.0.1",
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Serve the live dashboard: overview, agents, messages, workflows, DLQ.

    Prints the URL with the access token (kept in <root>/web-token). Works with
    the daemon stopped (from the files) and says so on the page.
    Example: busd web --root /srv/bus --port 8765
    """
    cfg = load(ctx, root, config)
    if not 0 < port < 65536:
        fail("usage", f"--port {port}: give 1-65535")
    try:
        from busd.web import security, site
    except ImportError as exc:  # the optional extra is missing
        fail("usage", f"busd web needs Starlette and uvicorn ({exc.name}): install busd[web]")
    with exit_on_error():
        token, created = security.load_token(cfg.layout)
    if not _loopback(bind):
        typer.secho(
            f"busd web: WARNING: listening on {bind}, NOT a loopback address: anyone who can "
            f"reach it and has the token ({cfg.layout.web_token_file}) controls this bus.",
            err=True,
            fg="red",
            bold=True,
        )
    host = f"[{bind}]" if ":" in bind else bind
    if created:
        typer.echo(f"busd web: new token in {cfg.layout.web_token_file}", err=True)
    typer.echo(f"http://{host}:{port}/?token={token}")
    sys.stdout.flush()
    app = site.build(cfg, token=token, port=port, bind=bind)
    with exit_on_error():
        try:
            anyio.run(site.serve, app, bind, port)
        except KeyboardInterrupt:
            pass
