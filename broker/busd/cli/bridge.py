"""``busd bridge nats``: carry this bus's messages to and from other buses over NATS JetStream.

The options win over the ``[bridge]`` table of busd.toml (docs/multi-host.md). nats-py
(the ``busd[bridge]`` extra) is imported only when the command runs, so ``busd --help``
stays fast and a missing extra is one clear error. Exit 78 (``config_error``) when the
start checks refuse the NATS server's settings.
"""

from __future__ import annotations

from typing import Annotated

import anyio
import msgspec
import typer

from busd import logs
from busd.cli.common import ConfigOpt, RootOpt, exit_on_error, fail, loader, remember_options

__all__ = ["register"]

_app = typer.Typer(
    name="bridge",
    help="Carry messages between buses (agent@bus, shared topics). "
    "Example: busd bridge nats --url nats://10.0.0.5:4222",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add the ``bridge`` group to ``app``."""
    app.add_typer(_app)


@_app.callback()
def _group(ctx: typer.Context, root: RootOpt = None, config: ConfigOpt = None) -> None:
    """Carry messages between buses over a distributed engine."""
    remember_options(ctx, root, config)


@_app.command("nats")
def nats(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option("--url", help="NATS server(s), comma-separated (config: bridge.url)."),
    ] = None,
    stream: Annotated[
        str | None,
        typer.Option("--stream", help='JetStream stream (config: bridge.stream, "BUSD").'),
    ] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
    ordered: Annotated[
        bool | None,
        typer.Option(
            "--ordered/--unordered",
            help="One message in flight each way: publish order per destination "
            "(config: bridge.ordered).",
        ),
    ] = None,
    window: Annotated[
        int, typer.Option("--window", min=1, max=10_000, help="Messages in flight when unordered.")
    ] = 64,
    delivery_limit: Annotated[
        int,
        typer.Option(
            "--delivery-limit",
            min=1,
            help="NATS deliveries of an inbound message before it is dead-lettered "
            "(reason bridge_delivery_limit).",
        ),
    ] = 10,
    monitor_url: Annotated[
        str | None,
        typer.Option(
            "--monitor-url",
            help="nats-server monitoring endpoint, to check sync_interval "
            "(default: http://<url host>:8222).",
        ),
    ] = None,
    ack_wait: Annotated[
        float,
        typer.Option(
            "--ack-wait",
            min=1.0,
            help="Seconds NATS waits for an ack before it redelivers to this bridge.",
        ),
    ] = 30.0,
    replicas: Annotated[
        int, typer.Option("--replicas", min=1, max=5, help="Replicas of a stream it creates.")
    ] = 1,
    accept_weaker_durability: Annotated[
        bool,
        typer.Option(
            "--accept-weaker-durability",
            help="Start even on a single-replica stream without sync_interval: always.",
        ),
    ] = False,
) -> None:
    """Run the NATS JetStream bridge of this bus in the foreground (SIGTERM stops it).

    Example: busd bridge nats --url nats://10.0.0.5:4222 --root /srv/bus
    """
    with exit_on_error():
        cfg = loader(ctx, root, config).load()
        logs.configure(cfg.log_level, cfg.log_format)
        if not cfg.layout.is_initialized():
            fail("not_found", f"no bus at {cfg.root} (run `busd init {cfg.root}`)")
        try:
            from busd.bridge import service
        except ImportError as exc:  # pragma: no cover - the package itself is always there
            fail("usage", f"busd bridge needs {exc.name}")
        try:
            import nats as _nats  # noqa: F401 - only to fail early and clearly
        except ImportError:
            fail("usage", "busd bridge nats needs nats-py: install busd[bridge]")
        bridge = cfg.bridge
        if url is not None or stream is not None or ordered is not None:
            bridge = msgspec.structs.replace(
                bridge,
                url=url if url is not None else bridge.url,
                stream=stream if stream is not None else bridge.stream,
                ordered=ordered if ordered is not None else bridge.ordered,
            )
        opts = service.Options(
            url=bridge.url,
            stream=bridge.stream,
            ordered=bridge.ordered,
            window=window,
            delivery_limit=delivery_limit,
            monitor_url=monitor_url,
            accept_weaker_durability=accept_weaker_durability,
            replicas=replicas,
            ack_wait_s=ack_wait,
        )
        anyio.run(service.run, cfg, opts)
