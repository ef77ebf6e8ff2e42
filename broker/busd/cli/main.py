"""The ``busd`` command line. The only module that prints or exits.

Global options (``--root``, ``--config``) are accepted before or after the
subcommand. Errors print ``busd: <code>: <message>`` on stderr and exit with a
sysexits-style code from :data:`EXIT_CODES`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import anyio
import msgspec
import typer

from busd import __version__, logs
from busd.config import Config, ConfigLoader, parse_text_value
from busd.core.codec import decode, encode_json, encode_markdown
from busd.errors import BusdError
from busd.routing.consumer import Consumer, return_expired
from busd.routing.recovery import route_pending
from busd.routing.retention import gc
from busd.rpc import client as rpc
from busd.store.journal import JournalEntry
from busd.store.layout import init_bus
from busd.store.mailbox import publish

__all__ = ["EXIT_CODES", "app", "main"]

EXIT_CODES: dict[str, int] = {
    "invalid_message": 65,  # EX_DATAERR
    "invalid_name": 65,
    "not_found": 66,  # EX_NOINPUT
    "storage_error": 74,  # EX_IOERR
    "lock_timeout": 75,  # EX_TEMPFAIL
    "already_running": 75,
    "config_error": 78,  # EX_CONFIG
}
"""Exit code per error code; any other BusdError exits 1, usage errors exit 2."""
EXIT_FORCED = 130
"""Exit code of a daemon forced out by a second SIGINT or the shutdown timeout."""

app = typer.Typer(
    name="busd",
    help="busd: a durable local message broker. Files are the protocol.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RootOpt = Annotated[
    str | None,
    typer.Option("--root", help="Bus root (default: $BUSD_ROOT, nearest .busd/, ./.busd)."),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", help="Config file (default: $BUSD_CONFIG, <root>/busd.toml)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


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


def _loader(ctx: typer.Context, root: str | None, config: str | None, **flags: Any) -> ConfigLoader:
    obj = ctx.obj or {}
    return ConfigLoader(root or obj.get("root"), config or obj.get("config"), flags)


def _fail(code: str, message: str) -> NoReturn:
    typer.echo(f"busd: {code}: {message}", err=True)
    raise typer.Exit(EXIT_CODES.get(code, 1))


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except BusdError as exc:
        _fail(exc.code, exc.message)
    except OSError as exc:
        _fail("os_error", str(exc))


def _load(
    ctx: typer.Context, root: str | None, config: str | None, *, need_bus: bool = True
) -> Config:
    with _errors():
        cfg = _loader(ctx, root, config).load()
        logs.configure("warning", cfg.log_format)
    if need_bus and not cfg.layout.is_initialized():
        _fail("not_found", f"no bus at {cfg.root} (run `busd init {cfg.root}`)")
    return cfg


def _print_json(obj: Any) -> None:
    sys.stdout.buffer.write(msgspec.json.encode(obj) + b"\n")
    sys.stdout.flush()


@app.command()
def init(
    ctx: typer.Context,
    path: Annotated[str | None, typer.Argument(help="Where to create the bus.")] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a bus directory (idempotent).

    Example: busd init ./.busd
    """
    cfg = _load(ctx, path or root, config, need_bus=False)
    with _errors():
        layout = init_bus(Path(cfg.root))
    if json_out:
        _print_json({"root": str(layout.root)})
    else:
        typer.echo(f"initialized bus at {layout.root}")


@app.command()
def send(
    ctx: typer.Context,
    sender: Annotated[str, typer.Option("--from", help="Agent whose outbox receives the message.")],
    file: Annotated[
        str, typer.Argument(help="Message file (JSON or Markdown), - for stdin.")
    ] = "-",
    no_fsync: Annotated[
        bool, typer.Option("--no-fsync", help="Skip fsync (may be lost in a power cut).")
    ] = False,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Validate a message and publish it; print its message_id.

    message_id and created_at are filled in when missing.
    Example: echo '{"schema_version":"1.0",...}' | busd send --from alice -
    """
    cfg = _load(ctx, root, config)
    out: dict[str, Any]
    with _errors():
        data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        msg = decode(data, fill_missing=True, max_bytes=cfg.max_message_bytes)
        try:
            # The daemon answers after its journal fsync, sharing it with other publishers.
            params = {"message": msgspec.json.decode(encode_json(msg)), "sender": sender}
            result = rpc.call(cfg, "publish", params)
            out = {"message_id": result["message_id"], "duplicate": result["duplicate"]}
            out["via"] = "socket"
        except rpc.DaemonNotRunning:
            path = publish(cfg, msg, sender=sender, fsync=not no_fsync)
            report = route_pending(cfg)
            out = {"message_id": msg.message_id, "duplicate": False, "via": "file"}
            out.update(path=str(path), routed=report is not None)
    if json_out:
        _print_json(out)
    else:
        typer.echo(out["message_id"])


@app.command()
def recv(
    ctx: typer.Context,
    agent: Annotated[str, typer.Argument(help="The agent whose inbox to claim from.")],
    max_: Annotated[int, typer.Option("--max", min=1, help="Claim at most this many.")] = 1,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Claim messages for AGENT and print them (ack them with `busd ack`).

    With --json, one JSON envelope per line; otherwise Markdown with front matter.
    Example: busd recv bob --max 10 --json
    """
    cfg = _load(ctx, root, config)
    with _errors():
        try:
            result = rpc.call(cfg, "fetch", {"agent_id": agent, "max": max_})
            messages = [decode(json.dumps(m["message"]).encode()) for m in result["messages"]]
        except rpc.DaemonNotRunning:
            route_pending(cfg)
            return_expired(cfg, agent)
            messages = [c.message for c in Consumer(cfg, agent).claim(max_)]
    for msg in messages:
        encode = encode_json if json_out else encode_markdown
        sys.stdout.buffer.write(encode(msg) + b"\n")
    sys.stdout.flush()


@app.command()
def ack(
    ctx: typer.Context,
    agent: Annotated[str, typer.Argument(help="The agent that claimed the messages.")],
    message_ids: Annotated[list[str], typer.Argument(help="Message ids to acknowledge.")],
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Acknowledge claimed messages: recorded as processed, then removed.

    Example: busd ack bob MSG-20260101-000000-000000000-PID00001-0000
    """
    cfg = _load(ctx, root, config)
    with _errors():
        try:
            n = rpc.call(cfg, "ack", {"agent_id": agent, "message_ids": message_ids})["acked"]
        except rpc.DaemonNotRunning:
            n = Consumer(cfg, agent).ack(message_ids)
    if json_out:
        _print_json({"acked": n})
    else:
        typer.echo(f"acked {n}")


def _entry_line(entry: JournalEntry) -> str:
    parts = [entry.at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), entry.event]
    if entry.message_id:
        parts.append(entry.message_id)
    if entry.agent:
        parts.append(f"from={entry.agent}")
    if entry.to:
        parts.append("to=" + ",".join(entry.to))
    if entry.reason:
        parts.append(f"reason={entry.reason}")
    return " ".join(parts)


@app.command("gc")
def gc_command(
    ctx: typer.Context,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Apply retention once: old journal segments, ledger records, DLQ entries, tmp files.

    The daemon does the same every minute. Example: busd gc --json
    """
    cfg = _load(ctx, root, config)
    with _errors():
        report = gc(cfg)
    if json_out:
        _print_json(report)
    else:
        typer.echo(
            f"removed {len(report.journal_segments)} journal segments, "
            f"{report.ledger_records} ledger records, {len(report.dlq_entries)} DLQ entries, "
            f"{len(report.tmp_files)} tmp files"
        )


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


@app.command()
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
        from busd.runtime.daemon import (
            Daemon,  # only `run` needs the server stack: keep other commands fast
        )

        daemon = Daemon(loader, on_force_exit=lambda: os._exit(EXIT_FORCED))
        anyio.run(daemon.run)


def main() -> None:
    """Console-script entry point."""
    # A bus is private to its owner: every file busd creates is 0600, every directory 0700.
    os.umask(0o077)
    app()


# Registers the operator commands (status, dlq, replay, tail, doctor) on app.
from busd.cli import ops as cli_ops  # noqa: E402, F401
