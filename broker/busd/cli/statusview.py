"""``busd status`` without typer: the report, its screen, its exit code, and the fast path.

``busd status`` is what monitoring runs every minute, so it must start fast: this
module imports neither typer (click) nor structlog, and :func:`fast_status` runs
the command straight from ``sys.argv`` when the arguments are ones it fully
understands (``--root``, ``--config`` before or after ``status``; ``--check``,
``--json``; nothing else). Anything else (``--help``, a typo) returns None and the
typer app handles it, so every option and message stays as it is. The typer
command (:mod:`busd.cli.status`) calls the same functions: one output either way.

Nothing on this path logs (it reads files and calls the socket once), which is why
it needs no structlog set-up.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import msgspec

from busd import __version__
from busd.cli.render import ago, pairs, plural, since_iso, size, table
from busd.config import Config, ConfigLoader
from busd.errors import BusdError
from busd.ops.status import SERVED_SOCKET, AgentStatus, BridgeStatus, Rate, StatusReport, report
from busd.rpc import client as rpc

__all__ = [
    "EXIT_ATTENTION",
    "EXIT_DAEMON_DOWN",
    "exit_code",
    "fast_status",
    "print_report",
    "rate_text",
    "served_text",
    "status_report",
]

EXIT_DAEMON_DOWN = 3
"""No daemon answers on this bus (the files were read instead)."""
EXIT_ATTENTION = 4
"""With ``--check``: the daemon runs but the bus needs attention."""

_STATUS_TIMEOUT_S = 10.0  # a daemon that takes longer is reported as not answering
_ID_WIDTH = 32
# Exit codes of the errors this path can meet (busd.cli.common.EXIT_CODES has them all).
_EXITS = {"not_found": 66, "storage_error": 74, "config_error": 78, "invalid_name": 65}


def status_report(cfg: Config) -> StatusReport:
    """What ``busd status --json`` prints: the daemon's report, or the files' without one."""
    try:
        answer = rpc.call(cfg, "status", {}, timeout=_STATUS_TIMEOUT_S)
    except rpc.DaemonNotRunning:
        return report(cfg, None)
    except BusdError as exc:
        # It accepts connections but does not answer: say so, and show the files.
        return report(cfg, None, daemon_error=f"{exc.code}: {exc.message}")
    try:
        got = msgspec.convert(answer, StatusReport)
    except msgspec.ValidationError as exc:
        raise rpc.RemoteError(f"the daemon's status answer is not a report: {exc}") from None
    # `version` is this busd's; the daemon's own is daemon.version.
    return msgspec.structs.replace(got, version=__version__)


def exit_code(data: StatusReport, check: bool) -> int:
    """0, :data:`EXIT_DAEMON_DOWN`, or with ``check`` :data:`EXIT_ATTENTION`."""
    if not data.daemon.running or data.daemon.error:
        return EXIT_DAEMON_DOWN
    if check and data.attention:
        return EXIT_ATTENTION
    return 0


def print_report(data: StatusReport) -> None:
    """The screen of ``busd status``."""
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
    _echo("")
    now = time.time()
    rows = [
        [
            name,
            served_text(a),
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
        _echo("no agents yet")
    _echo("")
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
            *([("bridge", bridge_text(data.bridge))] if data.bridge is not None else []),
            ("accepted/min", rate_text(rates.accepted)),
            ("delivered/min", rate_text(rates.delivered)),
            ("dead-lettered/min", rate_text(rates.dead_lettered)),
            ("health", "ok" if not attention else "ATTENTION: " + "; ".join(attention)),
        ]
    )


def bridge_text(b: BridgeStatus) -> str:
    """The ``busd bridge nats`` line: link, backlogs each way, the last error."""
    if b.stale:
        return f"not running (last seen {b.updated_at})"
    link = "connected" if b.connected else "DISCONNECTED"
    out = "?" if b.outbound_backlog is None else str(b.outbound_backlog)
    inb = "?" if b.inbound_backlog is None else str(b.inbound_backlog)
    text = f"{link} to {b.url}, backlog {out} out / {inb} in, {b.publish_duplicates} dup"
    return text + (f", last error: {b.last_error}" if b.last_error else "")


def served_text(a: AgentStatus) -> str:
    """``socket (2)``: served from the daemon's memory by 2 socket consumers; ``files``."""
    return f"{a.served} ({a.connections})" if a.served == SERVED_SOCKET else a.served


def rate_text(r: Rate) -> str:
    """``12 (1m) 3.5 (15m)``; ``-`` without a daemon."""
    if r.one_min is None:
        return "-"
    return f"{r.one_min:g} (1m) {r.fifteen_min:g} (15m)"


def _short_id(message_id: str | None) -> str:
    # Ids may be 256 characters: keep the table readable (--json has it whole).
    if message_id is None:
        return "-"
    return message_id if len(message_id) <= _ID_WIDTH else message_id[: _ID_WIDTH - 3] + "..."


def _echo(text: str) -> None:
    sys.stdout.write(text + "\n")


# -- the fast path ----------------------------------------------------------------------

_VALUED = ("--root", "--config")


def _parse(argv: Sequence[str]) -> dict[str, object] | None:
    """``{"root", "config", "check", "json"}`` if ``argv`` is a plain ``status`` call."""
    opts: dict[str, object] = {"root": None, "config": None, "check": False, "json": False}
    seen_command = False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in _VALUED:
            if not eq:
                if i + 1 >= len(args):
                    return None
                i += 1
                value = args[i]
            if not value:
                return None
            key = name[2:]
            # Options after the subcommand win over those before (busd.cli.common.loader).
            if seen_command or opts[key] is None:
                opts[key] = value
        elif arg == "status" and not seen_command:
            seen_command = True
        elif seen_command and arg in ("--check", "--json"):
            opts[arg[2:]] = True
        else:
            return None  # --help, --version, another command, a typo: typer's to answer
        i += 1
    return opts if seen_command else None


def fast_status(argv: Sequence[str]) -> int | None:
    """Run ``busd status`` for ``argv`` (without the program name) and return its exit
    code, or None when ``argv`` is not a call this path handles (typer then does)."""
    opts = _parse(argv)
    if opts is None:
        return None
    root, config = opts["root"], opts["config"]
    try:
        cfg = ConfigLoader(
            root if isinstance(root, str) else None, config if isinstance(config, str) else None
        ).load()
        if not cfg.layout.is_initialized():
            return _fail("not_found", f"no bus at {cfg.root} (run `busd init {cfg.root}`)")
        data = status_report(cfg)
    except BusdError as exc:
        return _fail(exc.code, exc.message)
    except OSError as exc:
        return _fail("os_error", str(exc))
    if opts["json"]:
        sys.stdout.buffer.write(msgspec.json.encode(data) + b"\n")
    else:
        print_report(data)
    sys.stdout.flush()
    return exit_code(data, bool(opts["check"]))


def _fail(code: str, message: str) -> int:
    sys.stderr.write(f"busd: {code}: {message}\n")
    return _EXITS.get(code, 1)
