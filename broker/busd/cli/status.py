"""``busd status``: the state of the bus on one screen, or as one JSON document.

The report is :class:`busd.ops.status.StatusReport` either way: the daemon's
``status`` answer when one runs, built from the files when none does, so
``--json`` has the same keys with and without a daemon. Exit
:data:`~busd.cli.common.EXIT_DAEMON_DOWN` when no daemon answers and, with
``--check``, :data:`~busd.cli.common.EXIT_ATTENTION` when the bus needs attention.

This is the command monitoring runs every minute: keep its imports light.
"""

from __future__ import annotations

import time
from typing import Annotated

import msgspec
import typer

from busd import __version__
from busd.cli.common import (
    EXIT_ATTENTION,
    EXIT_DAEMON_DOWN,
    ConfigOpt,
    DaemonCall,
    JsonOpt,
    RootOpt,
    daemon_or_files,
    exit_on_error,
    load,
    print_json,
)
from busd.cli.render import ago, pairs, plural, since_iso, size, table
from busd.config import Config
from busd.errors import BusdError
from busd.ops.status import SERVED_SOCKET, AgentStatus, Rate, StatusReport, report
from busd.rpc import client as rpc

__all__ = ["register", "status_report"]

_STATUS_TIMEOUT_S = 10.0  # a daemon that takes longer is reported as not answering
_ID_WIDTH = 32


def register(app: typer.Typer) -> None:
    """Add ``status`` to ``app``."""
    app.command()(status)


def status_report(cfg: Config) -> StatusReport:
    """What ``busd status --json`` prints: the daemon's report, or the files' without one."""

    def live(call: DaemonCall) -> StatusReport:
        try:
            answer = call("status", {}, timeout=_STATUS_TIMEOUT_S)
        except rpc.DaemonNotRunning:
            raise
        except BusdError as exc:
            # It accepts connections but does not answer: say so, and show the files.
            return report(cfg, None, daemon_error=f"{exc.code}: {exc.message}")
        try:
            got = msgspec.convert(answer, StatusReport)
        except msgspec.ValidationError as exc:
            raise rpc.RemoteError(f"the daemon's status answer is not a report: {exc}") from None
        # `version` is this busd's; the daemon's own is daemon.version.
        return msgspec.structs.replace(got, version=__version__)

    return daemon_or_files(cfg, live, lambda: report(cfg, None))


def _print(data: StatusReport) -> None:
    d = data.daemon
    if d.error:
        state = f"listening but NOT ANSWERING ({d.error}); state read from the files"
    elif d.running:
        state = f"running, pid {d.pid}, up {ago(d.uptime_s)}, version {d.version}"
        state += f", watcher {d.watcher}" if d.watcher else ""
    else:
        state = "not running (state read from the files)"
    pairs(
        [
            ("bus", f"{data.root}  (busd {data.version})"),
            ("daemon", state),
            ("socket", d.socket),
            ("config", data.config_file or "(defaults, no file)"),
        ]
    )
    typer.echo("")
    now = time.time()
    rows = [
        [
            name,
            _served(a),
            str(a.ready),
            f"{a.in_flight}/{a.max_in_flight}",
            str(a.redelivered),
            ago(a.oldest_ready_age_s),
            str(a.outbox),
            ago(since_iso(a.last_delivery_at, now)),
            ago(since_iso(a.last_ack_at, now)),
            _short_id(a.oldest_unsettled),
        ]
        for name, a in data.agents.items()
    ]
    if rows:
        headers = ["agent", "served", "ready", "in flight", "redelivered", "oldest ready"]
        table([*headers, "outbox", "last delivery", "last ack", "oldest unsettled"], rows)
    else:
        typer.echo("no agents yet")
    typer.echo("")
    dl = data.dlq
    by_reason = ", ".join(f"{r} {n}" for r, n in dl.by_reason.items())
    dlq_text = plural(dl.entries, "entry", "entries") + (
        f" ({by_reason}), oldest {ago(dl.oldest_age_s)}" if dl.entries else ""
    )
    dd = data.dedupe
    index = "unknown (no daemon)" if dd.index_size is None else plural(dd.index_size, "key")
    outbox = data.outbox
    journal = data.journal
    rates = data.rates_per_min
    attention = data.attention
    pairs(
        [
            (
                "outbox",
                f"{outbox.backlog} waiting"
                + (f", oldest {ago(outbox.oldest_age_s)}" if outbox.backlog else ""),
            ),
            ("dlq", dlq_text),
            (
                "journal",
                f"{plural(journal.segments, 'segment')}, {size(journal.bytes)}"
                + (f", {journal.undelivered} awaiting inbox files" if journal.undelivered else ""),
            ),
            ("dedupe", f"{index}, window {ago(dd.window_s)}"),
            ("accepted/min", _rate(rates.accepted)),
            ("delivered/min", _rate(rates.delivered)),
            ("dead-lettered/min", _rate(rates.dead_lettered)),
            ("health", "ok" if not attention else "ATTENTION: " + "; ".join(attention)),
        ]
    )


def _served(a: AgentStatus) -> str:
    """``socket (2)``: served from the daemon's memory by 2 socket consumers; ``files``."""
    return f"{a.served} ({a.connections})" if a.served == SERVED_SOCKET else a.served


def _short_id(message_id: str | None) -> str:
    # Ids may be 256 characters: keep the table readable (--json has it whole).
    if message_id is None:
        return "-"
    return message_id if len(message_id) <= _ID_WIDTH else message_id[: _ID_WIDTH - 3] + "..."


def _rate(r: Rate) -> str:
    if r.one_min is None:
        return "-"
    return f"{r.one_min:g} (1m) {r.fifteen_min:g} (15m)"


def status(
    ctx: typer.Context,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help=f"Exit {EXIT_ATTENTION} when the bus needs attention (DLQ not empty, outbox "
            "backlog older than a minute, ...).",
        ),
    ] = False,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The state of the bus on one screen: daemon, agents, outbox, DLQ, journal, rates.

    Per agent: how it is served (`socket (n)`: by n socket consumers from the
    daemon's memory; `files`: through inbox/), what is ready and in flight (files
    and memory together), and the oldest message it has not settled.

    Through the daemon when it runs, from the files otherwise (rates and the
    dedupe index are then null). Never reads the journal's contents.
    Exit 0: daemon running; 3: no daemon answers; 4: with --check, the bus needs attention.

    Example: busd status --check --json | jq .attention
    """
    cfg = load(ctx, root, config)
    with exit_on_error():
        data = status_report(cfg)
    if json_out:
        print_json(data)
    else:
        _print(data)
    if not data.daemon.running or data.daemon.error:
        raise typer.Exit(EXIT_DAEMON_DOWN)
    if check and data.attention:
        raise typer.Exit(EXIT_ATTENTION)
