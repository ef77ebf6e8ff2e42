"""Message commands of ``busd``: init, send, recv, ack, gc.

send, recv and ack go through the daemon's socket when one runs (send then
answers after the daemon's journal fsync, shared with other publishers) and
work on the files otherwise, printing the same shapes either way. ``recv --json``
adds each delivery's ``receipt`` (protocol.md 6.8) to its envelope, and ``ack
--receipt`` settles exactly that delivery (a stale one fails ``stale_receipt``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from busd.cli.common import (
    ConfigOpt,
    DaemonCall,
    JsonOpt,
    RootOpt,
    daemon_or_files,
    exit_on_error,
    fail,
    load,
    print_json,
)
from busd.core.codec import decode, encode_json, encode_markdown
from busd.core.model import Message
from busd.routing.consumer import Consumer, return_expired
from busd.routing.offline import route_pending
from busd.routing.retention import gc
from busd.store.layout import init_bus
from busd.store.mailbox import publish

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add init, send, recv, ack and gc to ``app``, in that order."""
    app.command()(init)
    app.command()(send)
    app.command()(recv)
    app.command()(ack)
    app.command("gc")(gc_command)


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
    cfg = load(ctx, path or root, config, need_bus=False)
    with exit_on_error():
        layout = init_bus(Path(cfg.root))
    if json_out:
        print_json({"root": str(layout.root)})
    else:
        typer.echo(f"initialized bus at {layout.root}")


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
    cfg = load(ctx, root, config)
    with exit_on_error():
        data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        msg = decode(data, fill_missing=True, max_bytes=cfg.max_message_bytes)

        def live(call: DaemonCall) -> dict[str, Any]:
            # The daemon answers after its journal fsync, sharing it with other publishers.
            params = {"message": msgspec.json.decode(encode_json(msg)), "sender": sender}
            result = call("publish", params)
            return {
                "message_id": result["message_id"],
                "duplicate": result["duplicate"],
                "via": "socket",
            }

        def files() -> dict[str, Any]:
            path = publish(cfg.layout, msg, sender=sender, fsync=not no_fsync)
            report = route_pending(cfg)
            out: dict[str, Any] = {"message_id": msg.message_id, "duplicate": False}
            out.update(via="file", path=str(path), routed=report is not None)
            return out

        out = daemon_or_files(cfg, live, files)
    if json_out:
        print_json(out)
    else:
        typer.echo(out["message_id"])


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
    cfg = load(ctx, root, config)

    def live(call: DaemonCall) -> list[tuple[Message, str | None]]:
        result = call("fetch", {"agent_id": agent, "max": max_})
        return [
            (decode(json.dumps(m["message"]).encode()), m.get("receipt"))
            for m in result["messages"]
        ]

    def files() -> list[tuple[Message, str | None]]:
        route_pending(cfg)
        return_expired(cfg, agent)
        return [(c.message, c.receipt) for c in Consumer(cfg, agent).claim(max_)]

    with exit_on_error():
        deliveries = daemon_or_files(cfg, live, files)
    for msg, receipt in deliveries:
        sys.stdout.buffer.write(_with_receipt(msg, receipt) if json_out else encode_markdown(msg))
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


def _with_receipt(msg: Message, receipt: str | None) -> bytes:
    """The compact JSON envelope plus a top-level ``receipt`` (left out when unknown).

    The added field makes it no longer a message to send as it is: strip it first.
    """
    envelope: dict[str, Any] = msgspec.json.decode(encode_json(msg))
    if receipt is not None:
        envelope["receipt"] = receipt
    return msgspec.json.encode(envelope)


def ack(
    ctx: typer.Context,
    agent: Annotated[str, typer.Argument(help="The agent that claimed the messages.")],
    message_ids: Annotated[
        list[str] | None, typer.Argument(help="Message ids to acknowledge (current claims).")
    ] = None,
    receipts: Annotated[
        list[str] | None,
        typer.Option("--receipt", help="A delivery to settle, as `busd recv --json` prints it."),
    ] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Acknowledge claimed messages: recorded as processed, then removed.

    A message id settles the message's current claim; --receipt settles that one
    delivery and fails with stale_receipt (nothing settled) once it was redelivered.
    Example: busd ack bob --receipt 01795297525618002255-001-task-42  (or: busd ack bob task-42)
    """
    cfg = load(ctx, root, config)
    ids, named = list(message_ids or ()), list(receipts or ())
    if not ids and not named:
        fail("usage", "name at least one message id or --receipt")

    def live(call: DaemonCall) -> tuple[int, list[str]]:
        params: dict[str, Any] = {"agent_id": agent, "message_ids": ids}
        if named:  # only then: a daemon that predates receipts refuses the field
            params["receipts"] = named
        result = call("ack", params)
        return int(result["acked"]), [str(x) for x in result.get("not_held", ())]

    with exit_on_error():
        n, not_held = daemon_or_files(
            cfg, live, lambda: Consumer(cfg, agent).settle(message_ids=ids, receipts=named)
        )
    if json_out:
        print_json({"acked": n, "not_held": not_held})
    else:
        typer.echo(f"acked {n}")


def gc_command(
    ctx: typer.Context,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Apply retention once: old journal segments, ledger records, DLQ entries, tmp files.

    The daemon does the same every minute. Example: busd gc --json
    """
    cfg = load(ctx, root, config)
    with exit_on_error():
        report = gc(cfg)
    if json_out:
        print_json(report)
    else:
        typer.echo(
            f"removed {len(report.journal_segments)} journal segments, "
            f"{report.ledger_records} ledger records, {len(report.dlq_entries)} DLQ entries, "
            f"{len(report.tmp_files)} tmp files"
        )
