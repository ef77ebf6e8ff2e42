"""Operator commands of the ``busd`` CLI: status, dlq, replay, tail, doctor.

Registered on :data:`busd.cli.app` when ``busd.cli`` imports this module. Each
command works with the daemon running (through its socket, :mod:`busd.rpc`) and
stopped (from the files), prints the same thing both ways, and takes ``--json``.
Human output is a rich table on a terminal and plain text when piped; long work
shows a progress bar on stderr when stderr is a terminal.

Exit codes besides :data:`busd.cli.EXIT_CODES`: ``busd status`` exits
:data:`EXIT_DAEMON_DOWN` (3) when no daemon runs and, with ``--check``,
:data:`EXIT_ATTENTION` (4) when the bus needs attention; ``busd doctor`` exits 1
when a finding is neither ok nor fixed; ``busd replay`` exits 65 when an entry is
still invalid and 66 when a named entry is not in the DLQ; a missing
confirmation (``--yes``) is a usage error, 2.
"""

from __future__ import annotations

import enum
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer

from busd import __version__
from busd.cli.main import ConfigOpt, JsonOpt, RootOpt, _entry_line, _errors, _load, _print_json, app
from busd.config import Config, socket_path
from busd.core.codec import decode, encode_markdown
from busd.core.model import check_agent_name
from busd.errors import BusdError, InvalidMessage, NotFound
from busd.ops.doctor import diagnose
from busd.ops.status import collect
from busd.routing.recovery import route_pending
from busd.rpc import client as rpc
from busd.store import dlq
from busd.store.journal import Journal, JournalEntry, Position, encode_entry

__all__ = [
    "EXIT_ATTENTION",
    "EXIT_DAEMON_DOWN",
    "EXIT_USAGE",
    "OUTBOX_STALE_S",
    "parse_duration",
    "parse_time",
]

EXIT_DAEMON_DOWN = 3
"""``busd status``: no daemon answers on this bus (the files were read instead)."""
EXIT_ATTENTION = 4
"""``busd status --check``: the daemon runs but the bus needs attention."""
EXIT_USAGE = 2
"""Bad or missing options (also click's own usage errors)."""
EXIT_DOCTOR = 1
"""``busd doctor``: some finding is neither ok nor fixed."""
OUTBOX_STALE_S = 60.0
"""A file waiting in an outbox longer than this means nobody routes the bus."""
_RPC_TIMEOUT_S = 60.0
_STATUS_TIMEOUT_S = 10.0  # a daemon that takes longer is reported as not answering
_REPLAY_CHUNK = 50
_PROGRESS_MIN = 10
_RATE_KINDS = ("accepted", "delivered", "dead_lettered")
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?", re.IGNORECASE)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


# -- small helpers -------------------------------------------------------------


def _die(code: str, message: str, exit_code: int) -> NoReturn:
    typer.echo(f"busd: {code}: {message}", err=True)
    raise typer.Exit(exit_code)


def _usage(message: str) -> NoReturn:
    _die("usage", message, EXIT_USAGE)


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``15m``, ``2h``, ``7d``, ``1w``, ``500ms`` or a bare number."""
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 2h, 7d)")
    return float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]


def parse_time(text: str, now: float | None = None) -> float | None:
    """Epoch seconds of a duration ago (``15m``) or of an ISO 8601 time; None if neither.

    A time without an offset is taken as UTC, like every time on a bus.
    """
    now = time.time() if now is None else now
    with suppress(ValueError):
        return now - parse_duration(text)
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ago(seconds: float | None) -> str:
    """A short duration: ``45s``, ``3m20s``, ``2h05m``, ``7d``."""
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    for big, small, size, sub in (("d", "h", 86400, 3600), ("h", "m", 3600, 60), ("m", "s", 60, 1)):
        if s >= size:
            whole, rest = divmod(s, size)
            rest //= sub
            return f"{whole}{big}{rest:02d}{small}" if rest and whole < 10 else f"{whole}{big}"
    return f"{s}s"


def _since_epoch(iso: str | None, now: float) -> float | None:
    if not iso:
        return None
    try:
        return now - datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _stdout_tty() -> bool:
    return sys.stdout.isatty()


def _table(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """A rich table on a terminal; aligned plain columns when piped."""
    if _stdout_tty():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=title, title_justify="left", header_style="bold")
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i == 0 or not _numeric(rows, i) else "right")
        for row in rows:
            table.add_row(*(escape(c) for c in row))  # names and details are not markup
        Console().print(table)
        return
    if title:
        typer.echo(title)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _numeric(rows: list[list[str]], i: int) -> bool:
    return bool(rows) and all(r[i].replace("/", "").replace(".", "").isdigit() for r in rows)


def _pairs(pairs: list[tuple[str, str]]) -> None:
    """``label  value`` lines: a rich grid on a terminal, plain text when piped."""
    if _stdout_tty():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for label, value in pairs:
            grid.add_row(escape(label), escape(value))
        Console().print(grid)
        return
    width = max(len(label) for label, _ in pairs)
    for label, value in pairs:
        typer.echo(f"{label.ljust(width)}  {value}")


@contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr when it is a terminal and the work is long; else nothing."""
    if total < _PROGRESS_MIN or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=total)
        yield lambda: bar.advance(task)


def _daemon_call(cfg: Config, method: str, params: Any, timeout: float = _RPC_TIMEOUT_S) -> Any:
    """The daemon's answer, or raise :class:`rpc.DaemonNotRunning` to use the files."""
    return rpc.call(cfg, method, params, timeout=timeout)


def _route_offline(cfg: Config) -> None:
    # Replayed files wait in an outbox; with no daemon, route them now (skipped if
    # a daemon took the bus meanwhile: it routes them itself).
    route_pending(cfg)


# -- status --------------------------------------------------------------------


def _status_raw(cfg: Config) -> dict[str, Any]:
    try:
        data = _daemon_call(cfg, "status", {}, timeout=_STATUS_TIMEOUT_S)
    except rpc.DaemonNotRunning:
        return collect(cfg, None)
    except BusdError as exc:
        # It accepts connections but does not answer: say so, and show the files.
        data = collect(cfg, None)
        data["daemon"] = {"running": True, "error": f"{exc.code}: {exc.message}"}
        return data
    if not isinstance(data, dict):
        raise rpc.RemoteError("the daemon's status answer is not an object")
    return data


def status_data(cfg: Config) -> dict[str, Any]:
    """What ``busd status --json`` prints: the same keys with or without a daemon."""
    raw = _status_raw(cfg)
    now = time.time()
    d = raw.get("daemon") or {}
    running = bool(d.get("running"))
    rates = d.get("rates_per_min") or {}
    agents: dict[str, Any] = {}
    for name, a in (raw.get("agents") or {}).items():
        agents[name] = {
            "ready": a.get("ready"),
            "in_flight": a.get("in_flight"),
            "max_in_flight": a.get("max_in_flight"),
            "redelivered": a.get("redelivered"),
            "oldest_ready_age_s": a.get("oldest_ready_age_s"),
            "outbox": a.get("outbox"),
            "outbox_oldest_age_s": a.get("outbox_oldest_age_s"),
            "last_delivery_at": _iso(a.get("last_delivery_at")),
            "last_ack_at": _iso(a.get("last_ack_at")),
        }
    dlq_info = raw.get("dlq") or {}
    data: dict[str, Any] = {
        "root": raw.get("root", cfg.root),
        "version": __version__,
        "config_file": d.get("config_file", cfg.config_file),
        "daemon": {
            "running": running,
            "pid": d.get("pid"),
            "uptime_s": d.get("uptime_s"),
            "version": raw.get("version") if running else None,
            "socket": d.get("socket") or str(socket_path(cfg)),
            "watcher": d.get("watcher"),
            "error": d.get("error"),
        },
        "agents": agents,
        "outbox": {
            "backlog": raw.get("outbox_backlog", 0),
            "oldest_age_s": raw.get("outbox_oldest_age_s"),
        },
        "dlq": {
            "entries": dlq_info.get("entries", 0),
            "by_reason": dlq_info.get("by_reason", {}),
            "oldest_age_s": dlq_info.get("oldest_age_s"),
        },
        "journal": {
            "segments": (raw.get("journal") or {}).get("segments", 0),
            "bytes": (raw.get("journal") or {}).get("bytes", 0),
            "undelivered": d.get("undelivered"),
        },
        "dedupe": {
            "index_size": d.get("dedupe_index"),
            "window_s": raw.get("dedupe_window_s", cfg.dedupe_window_seconds),
        },
        "totals": {
            k: (d.get("totals") or {}).get(k)
            for k in ("accepted", "delivered", "duplicates", "dead_lettered")
        },
        "rates_per_min": {
            kind: {w: (rates.get(kind) or {}).get(w) for w in ("1m", "15m")} for kind in _RATE_KINDS
        },
        "generated_at": _iso(now),
    }
    data["attention"] = _attention(data)
    data["healthy"] = running and not data["attention"]
    return data


def _attention(data: dict[str, Any]) -> list[str]:
    """What needs an operator, most urgent first (empty: all is well)."""
    problems: list[str] = []
    daemon = data["daemon"]
    if not daemon["running"]:
        problems.append("the daemon is not running")
    elif daemon["error"]:
        problems.append(f"the daemon does not answer: {daemon['error']}")
    dlq_info = data["dlq"]
    if dlq_info["entries"]:
        reasons = ", ".join(f"{r} {n}" for r, n in dlq_info["by_reason"].items())
        problems.append(f"{dlq_info['entries']} dead letters ({reasons}): see `busd dlq list`")
    outbox = data["outbox"]
    if outbox["oldest_age_s"] is not None and outbox["oldest_age_s"] > OUTBOX_STALE_S:
        problems.append(
            f"{outbox['backlog']} files wait in outboxes, the oldest for "
            f"{_ago(outbox['oldest_age_s'])}: nothing routes the bus"
        )
    for name, a in data["agents"].items():
        if (a["in_flight"] or 0) > (a["max_in_flight"] or 0) > 0:
            problems.append(f"{name} holds {a['in_flight']} claims, over max_in_flight")
    return problems


def _print_status(data: dict[str, Any]) -> None:
    d = data["daemon"]
    if d["error"]:
        state = f"listening but NOT ANSWERING ({d['error']}); state read from the files"
    elif d["running"]:
        state = f"running, pid {d['pid']}, up {_ago(d['uptime_s'])}, version {d['version']}"
        state += f", watcher {d['watcher']}" if d["watcher"] else ""
    else:
        state = "not running (state read from the files)"
    _pairs(
        [
            ("bus", f"{data['root']}  (busd {data['version']})"),
            ("daemon", state),
            ("socket", d["socket"]),
            ("config", data["config_file"] or "(defaults, no file)"),
        ]
    )
    typer.echo("")
    now = time.time()
    rows = [
        [
            name,
            str(a["ready"]),
            f"{a['in_flight']}/{a['max_in_flight']}",
            str(a["redelivered"]),
            _ago(a["oldest_ready_age_s"]),
            str(a["outbox"]),
            _ago(_since_epoch(a["last_delivery_at"], now)),
            _ago(_since_epoch(a["last_ack_at"], now)),
        ]
        for name, a in data["agents"].items()
    ]
    if rows:
        headers = ["agent", "ready", "in flight", "redelivered", "oldest ready", "outbox"]
        _table([*headers, "last delivery", "last ack"], rows)
    else:
        typer.echo("no agents yet")
    typer.echo("")
    dl = data["dlq"]
    by_reason = ", ".join(f"{r} {n}" for r, n in dl["by_reason"].items())
    dlq_text = _n(dl["entries"], "entry", "entries") + (
        f" ({by_reason}), oldest {_ago(dl['oldest_age_s'])}" if dl["entries"] else ""
    )
    dd = data["dedupe"]
    index = "unknown (no daemon)" if dd["index_size"] is None else _n(dd["index_size"], "key")
    rates = data["rates_per_min"]

    def rate(kind: str) -> str:
        r = rates[kind]
        if r["1m"] is None:
            return "-"
        return f"{r['1m']:g} (1m) {r['15m']:g} (15m)"

    attention = data["attention"]
    _pairs(
        [
            (
                "outbox",
                f"{data['outbox']['backlog']} waiting"
                + (
                    f", oldest {_ago(data['outbox']['oldest_age_s'])}"
                    if data["outbox"]["backlog"]
                    else ""
                ),
            ),
            ("dlq", dlq_text),
            (
                "journal",
                f"{_n(data['journal']['segments'], 'segment')}, {_size(data['journal']['bytes'])}"
                + (
                    f", {data['journal']['undelivered']} awaiting inbox files"
                    if data["journal"]["undelivered"]
                    else ""
                ),
            ),
            ("dedupe", f"{index}, window {_ago(dd['window_s'])}"),
            ("accepted/min", rate("accepted")),
            ("delivered/min", rate("delivered")),
            ("dead-lettered/min", rate("dead_lettered")),
            ("health", "ok" if not attention else "ATTENTION: " + "; ".join(attention)),
        ]
    )


@app.command()
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

    Through the daemon when it runs, from the files otherwise (rates and the
    dedupe index are then null). Never reads the journal's contents.
    Exit 0: daemon running; 3: no daemon answers; 4: with --check, the bus needs attention.

    Example: busd status --check --json | jq .attention
    """
    cfg = _load(ctx, root, config)
    with _errors():
        data = status_data(cfg)
    if json_out:
        _print_json(data)
    else:
        _print_status(data)
    if not data["daemon"]["running"] or data["daemon"]["error"]:
        raise typer.Exit(EXIT_DAEMON_DOWN)
    if check and data["attention"]:
        raise typer.Exit(EXIT_ATTENTION)


# -- dlq -----------------------------------------------------------------------

dlq_app = typer.Typer(
    name="dlq",
    help="Inspect and repair the dead-letter queue. Example: busd dlq list --reason schema",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")


@dlq_app.callback()
def _dlq_group(ctx: typer.Context, root: RootOpt = None, config: ConfigOpt = None) -> None:
    """Inspect and repair the dead-letter queue.

    Example: busd dlq list --reason schema
    """
    obj = ctx.ensure_object(dict)
    if root is not None:
        obj["root"] = root
    if config is not None:
        obj["config"] = config


def _entries(cfg: Config, reason: str | None, agent: str | None) -> list[dict[str, Any]]:
    """DLQ entries as ``{"name", **record}``, through the daemon if it runs."""
    try:
        answer = _daemon_call(cfg, "dlq.list", {"reason": reason, "agent": agent})
        return list(answer["entries"])
    except rpc.DaemonNotRunning:
        pass
    entries = dlq.list_entries(cfg.layout, reason=reason, agent=agent)
    return [{"name": e.name, **msgspec.to_builtins(e.record)} for e in entries]


def _since_filter(since: str | None) -> float | None:
    if since is None:
        return None
    at = parse_time(since)
    if at is None:
        _usage(f"--since {since!r}: give a duration (15m, 2h, 7d) or an ISO time")
    return at


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Only this reason (schema, delivery_limit...).")
    ] = None,
    agent: Annotated[
        str | None, typer.Option("--agent", help="Only entries from or for this agent.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only entries that failed since: 15m, 2h, 7d or ISO time."),
    ] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List dead letters, oldest first, with their reason.

    Example: busd dlq list --reason schema --since 1h
    """
    cfg = _load(ctx, root, config)
    cutoff = _since_filter(since)
    with _errors():
        entries = _entries(cfg, reason, agent)
    if cutoff is not None:
        entries = [
            e for e in entries if (t := parse_time(e["last_failure_at"])) is None or t >= cutoff
        ]
    if json_out:
        _print_json({"entries": entries})
        return
    if not entries:
        typer.echo("the DLQ is empty" if reason is agent is since is None else "no entry matches")
        return
    now = time.time()
    rows = [
        [
            e["name"],
            e["reason"],
            e.get("sender") or "-",
            e.get("recipient") or "-",
            e.get("message_id") or "-",
            _ago(_since_epoch(e["last_failure_at"], now)),
            str(e.get("replays", 0)),
            _short(e.get("detail") or "", 60),
        ]
        for e in entries
    ]
    headers = ["name", "reason", "from", "to", "message_id", "failed", "replays", "detail"]
    _table(headers, rows)


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _show(cfg: Config, name: str) -> dict[str, Any]:
    try:
        try:
            answer = _daemon_call(cfg, "dlq.show", {"name": name})
        except InvalidMessage:
            # Data that is not a regular file (a symlink, a FIFO): show the record alone.
            matches = [e for e in _entries(cfg, None, None) if e["name"] == name]
            if not matches:
                raise NotFound(f"no DLQ entry {name!r}", name=name) from None
            record = {k: v for k, v in matches[0].items() if k != "name"}
            answer = {"name": name, "record": record, "data": None}
        return _show_shape(answer)
    except rpc.DaemonNotRunning:
        pass
    entry = dlq.load(cfg.layout, name)
    try:
        text: str | None = entry.data().decode("utf-8", errors="replace")
    except InvalidMessage:
        text = None
    record = msgspec.to_builtins(entry.record)
    return _show_shape({"name": entry.name, "record": record, "data": text})


def _show_shape(answer: dict[str, Any]) -> dict[str, Any]:
    text = answer.get("data")
    parsed: Any = None
    if text is not None:
        with suppress(msgspec.DecodeError):
            parsed = msgspec.json.decode(text.encode("utf-8"))
    return {"name": answer["name"], "record": answer["record"], "data": text, "json": parsed}


@dlq_app.command("show")
def dlq_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The entry name (from `busd dlq list`).")],
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one dead letter: its reason record and its original bytes.

    The bytes are pretty-printed when they parse as JSON. With --json: name,
    record, data (the bytes as text) and json (the parsed value, or null).
    Example: busd dlq show 01795297569198152398-nomid.json
    """
    cfg = _load(ctx, root, config)
    with _errors():
        shown = _show(cfg, name)
    if json_out:
        _print_json(shown)
        return
    r = shown["record"]
    pairs = [("name", shown["name"])]
    for key in (
        "reason",
        "detail",
        "original_path",
        "sender",
        "recipient",
        "message_id",
        "size",
        "sha256",
        "first_failure_at",
        "last_failure_at",
        "delivery_count",
        "replays",
    ):
        if r.get(key) not in (None, ""):
            pairs.append((key, str(r[key])))
    _pairs(pairs)
    if r.get("history"):
        typer.echo("history:")
        for h in r["history"]:
            typer.echo(f"  {h.get('at')}  {h.get('event')}  {h.get('detail', '')}")
    if shown["data"] is None:
        typer.echo("data: (not a regular file; not shown)")
        return
    typer.echo(f"--- data ({r.get('size', len(shown['data']))} bytes) ---")
    if shown["json"] is not None:
        pretty = msgspec.json.format(msgspec.json.encode(shown["json"]), indent=2)
        typer.echo(pretty.decode("utf-8"))
    else:
        typer.echo(shown["data"])


@dlq_app.command("purge")
def dlq_purge(
    ctx: typer.Context,
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than", help="Remove entries whose last failure is older: 30s, 15m, 7d."
        ),
    ],
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask (required when not on a terminal).")
    ] = False,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Delete dead letters older than a duration (and old replay records, orphan data).

    Asks for confirmation on a terminal; elsewhere --yes is required.
    Runs on the files under the DLQ lock, so it is safe beside a running daemon.
    Example: busd dlq purge --older-than 7d --yes
    """
    cfg = _load(ctx, root, config)
    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        _usage(f"--older-than: {exc}")
    now = time.time()
    with _errors():
        candidates = [
            e
            for e in dlq.list_entries(cfg.layout)
            if (t := parse_time(e.record.last_failure_at)) is not None and now - t > age
        ]
    if not yes:
        if not sys.stdin.isatty():
            _usage("not a terminal: pass --yes to purge without confirmation")
        if not typer.confirm(
            f"Delete {len(candidates)} DLQ entries whose last failure is older than {older_than}?",
            default=False,
        ):
            _die("aborted", "nothing purged", 1)
    with _errors(), _progress(len(candidates), "purging") as step:
        purged = dlq.purge(cfg.layout, older_than_s=age, now=now, on_purged=lambda _: step())
    if json_out:
        _print_json({"purged": purged, "count": len(purged)})
    else:
        typer.echo(f"purged {len(purged)} DLQ entries older than {older_than}")


@dlq_app.command("edit")
def dlq_edit(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The entry to correct (from `busd dlq list`).")],
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Correct a dead letter in $VISUAL/$EDITOR, then replay the corrected copy.

    The copy is edited in the bus's tmp/; the original bytes stay in the DLQ
    until the replay succeeds. An unchanged copy is not replayed. If the copy is
    still invalid, the entry's record says why and the copy is kept (replay it
    later with `busd replay NAME --from FILE`).
    Example: EDITOR=nano busd dlq edit 01795297569198152398-nomid.json
    """
    cfg = _load(ctx, root, config)
    with _errors():
        entry = dlq.load(cfg.layout, name)
        original = entry.data()
    copy = cfg.layout.tmp / f"edit-{os.getpid()}-{name}"
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(original)
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    try:
        rc = subprocess.call([*shlex.split(editor), str(copy)])
    except OSError as exc:
        copy.unlink(missing_ok=True)
        _die("editor_failed", f"cannot run {editor!r}: {exc}", 1)
    if rc != 0:
        copy.unlink(missing_ok=True)
        _die("editor_failed", f"{editor!r} exited {rc}; the entry is unchanged", 1)
    edited = copy.read_bytes()
    if edited == original:
        copy.unlink(missing_ok=True)
        result = _replay_shape({"name": name, "status": "unchanged"}, cfg)
    else:
        with _errors():
            done = dlq.replay(cfg, name, data=edited)
            if done.status == "replayed":
                _route_offline(cfg)
        result = _replay_shape(msgspec.to_builtins(done, enc_hook=str), cfg)
        if done.status == "replayed":
            copy.unlink(missing_ok=True)
        else:
            result["kept_copy"] = str(copy)
    _print_replays([result], json_out)
    if result["status"] == "still_invalid":
        raise typer.Exit(65)


# -- replay --------------------------------------------------------------------


def _replay_shape(result: dict[str, Any], cfg: Config) -> dict[str, Any]:
    target = result.get("target")
    if target:
        with suppress(ValueError):
            target = Path(target).relative_to(cfg.layout.root).as_posix()
    return {
        "name": result["name"],
        "status": result["status"],
        "target": target or None,
        "message_id": result.get("message_id"),
        "detail": result.get("detail") or "",
    }


def _replay_names(
    cfg: Config,
    names: list[str],
    *,
    to: str | None,
    dry_run: bool,
    data: bytes | None,
    step: Callable[[], None],
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    via_daemon = data is None  # the socket method takes no corrected bytes
    offline = False
    for i in range(0, len(names), _REPLAY_CHUNK):
        chunk = names[i : i + _REPLAY_CHUNK]
        if via_daemon:
            try:
                params = {"names": chunk, "to": to, "dry_run": dry_run}
                answer = _daemon_call(cfg, "replay", params)
                for r in answer["replayed"]:
                    results.append(_replay_shape(r, cfg))
                    step()
                continue
            except rpc.DaemonNotRunning:
                via_daemon = False
        for name in chunk:
            try:
                done = dlq.replay(cfg, name, to=to, data=data, dry_run=dry_run)
                result = msgspec.to_builtins(done, enc_hook=str)
            except NotFound as exc:
                result = {"name": name, "status": "not_found", "detail": exc.message}
            results.append(_replay_shape(result, cfg))
            offline = True
            step()
    if offline and not dry_run and any(r["status"] == "replayed" for r in results):
        _route_offline(cfg)
    return results


def _print_replays(results: list[dict[str, Any]], json_out: bool) -> None:
    counts = {s: 0 for s in ("replayed", "would_replay", "still_invalid", "not_found")}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if json_out:
        _print_json({"results": results, "counts": counts})
        return
    for r in results:
        status = r["status"]
        if status == "replayed":
            typer.echo(f"replayed {r['name']} -> {r['target']}")
        elif status == "would_replay":
            typer.echo(f"would replay {r['name']} -> {r['target']}/")
        elif status == "still_invalid":
            typer.echo(f"still invalid {r['name']}: {r['detail']} (record updated)")
        elif status == "not_found":
            typer.echo(f"not found {r['name']} (already replayed or purged?)")
        elif status == "unchanged":
            typer.echo(f"unchanged {r['name']}: not replayed")
        else:
            typer.echo(f"{status} {r['name']} {r['detail']}")
    if len(results) > 1:
        typer.echo(", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items() if n))


@app.command()
def replay(
    ctx: typer.Context,
    names: Annotated[
        list[str] | None, typer.Argument(help="DLQ entry names (from `busd dlq list`).")
    ] = None,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Replay every entry with this reason.")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every entry.")] = False,
    to: Annotated[
        str | None, typer.Option("--to", help="Deliver to this agent (or topic:NAME) instead.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and say where each would go; move nothing.")
    ] = False,
    from_file: Annotated[
        str | None,
        typer.Option("--from", help="Replay NAME with the corrected bytes of this file."),
    ] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Validate dead letters again and hand the valid ones back to the bus.

    Only entries in the DLQ when the command starts move. One that still fails
    stays, its record updated (replays + 1, new detail). One that passes is
    published again and its record is kept in dlq/replayed/ with its history;
    a replayed entry leaves the DLQ, so replaying twice never delivers twice.
    Exit 0: all replayed; 65: some still invalid; 66: some name not in the DLQ.
    Example: busd replay --reason delivery_limit --to bob-v2
    """
    cfg = _load(ctx, root, config)
    chosen = sum((bool(names), reason is not None, all_))
    if chosen != 1:
        _usage("give entry NAMEs, --reason R or --all (exactly one of them)")
    if from_file is not None and (not names or len(names) != 1):
        _usage("--from FILE corrects one entry: give exactly one NAME")
    if to is not None:
        with _errors():
            check_agent_name(to.removeprefix("topic:"), "recipient")
    data: bytes | None = None
    if from_file is not None:
        with _errors():
            data = sys.stdin.buffer.read() if from_file == "-" else Path(from_file).read_bytes()
    with _errors():
        if names:
            selected = list(dict.fromkeys(names))
        else:
            # A snapshot: entries dead-lettered while we replay wait for the next run.
            selected = [e["name"] for e in _entries(cfg, reason, None)]
        with _progress(len(selected), "replaying") as step:
            results = _replay_names(cfg, selected, to=to, dry_run=dry_run, data=data, step=step)
    _print_replays(results, json_out)
    if any(r["status"] == "still_invalid" for r in results):
        raise typer.Exit(65)
    if any(r["status"] == "not_found" for r in results):
        raise typer.Exit(66)


# -- tail ----------------------------------------------------------------------


class TailFormat(enum.StrEnum):
    """How ``busd tail`` prints an entry."""

    line = "line"
    json = "json"
    md = "md"


class _Peek(msgspec.Struct):
    """The fields tail filters on; every other field of the message is skipped."""

    message_type: str | None = None
    workflow_id: str | None = None


_peek = msgspec.json.Decoder(_Peek)


def _matcher(
    agent: str | None, type_: str | None, workflow: str | None, since_ts: float | None
) -> Callable[[JournalEntry], bool]:
    want_type = type_.lower() if type_ else None

    def keep(e: JournalEntry) -> bool:
        if since_ts is not None and e.at.timestamp() < since_ts:
            return False
        if agent is not None and e.agent != agent and agent not in (e.to or ()):
            return False
        if want_type is None and workflow is None:
            return True
        if e.message is None:
            return False
        try:
            peek = _peek.decode(e.message)
        except msgspec.DecodeError:
            return False
        if want_type is not None and peek.message_type != want_type:
            return False
        return workflow is None or peek.workflow_id == workflow

    return keep


def _renderer(fmt: TailFormat) -> Callable[[JournalEntry], bytes | None]:
    if fmt is TailFormat.json:
        return lambda e: encode_entry(e) + b"\n"
    if fmt is TailFormat.line:
        return lambda e: (_entry_line(e) + "\n").encode("utf-8")

    def markdown(e: JournalEntry) -> bytes | None:
        if e.message is None:
            return None  # duplicates and dead letters carry no message
        try:
            return encode_markdown(decode(bytes(e.message))) + b"\n"
        except InvalidMessage:
            return None  # written by a newer busd: skip, like any unknown entry

    return markdown


def _start_after(journal: Journal, ts: float) -> Position | None:
    """The first segment that may hold entries at or after ``ts`` (by mtime)."""
    for path in journal.segments():
        try:
            if path.stat().st_mtime >= ts - 1.0:
                return Position(int(path.stem), 0)
        except FileNotFoundError:
            continue
    return journal.end_position()


@app.command()
def tail(
    ctx: typer.Context,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new entries (across rotation).")
    ] = False,
    agent: Annotated[
        str | None, typer.Option("--agent", help="Only entries from or to this agent.")
    ] = None,
    type_: Annotated[
        str | None, typer.Option("--type", help="Only messages of this type (fact, decision...).")
    ] = None,
    workflow: Annotated[
        str | None, typer.Option("--workflow", help="Only messages of this workflow_id.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="After this message_id, or since a time (15m, ISO time)."),
    ] = None,
    fmt: Annotated[
        TailFormat,
        typer.Option(
            "--format", help="line (default), json (journal entries) or md (front matter)."
        ),
    ] = TailFormat.line,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
) -> None:
    """Print the journal: what was accepted, duplicated and dead-lettered.

    --since takes a message_id (entries after its first one) or a time: a
    duration ago (30s, 15m, 2h, 7d) or an ISO 8601 time (UTC unless it has an
    offset). --type and --workflow keep only accepted messages. --format md
    prints each message as Markdown with YAML front matter.
    Example: busd tail -f --agent bob --format md
    """
    cfg = _load(ctx, root, config)
    if json_out:
        if fmt not in (TailFormat.line, TailFormat.json):
            _usage("--json means --format json; do not combine it with another format")
        fmt = TailFormat.json
    since_ts = parse_time(since) if since is not None else None
    since_id = since if since is not None and since_ts is None else None
    keep = _matcher(agent, type_, workflow, since_ts)
    render = _renderer(fmt)
    out = sys.stdout.buffer
    with _errors(), Journal(cfg.layout.journal) as journal:
        start = _start_after(journal, since_ts) if since_ts is not None else None
        entries: Iterable[JournalEntry] = (
            journal.follow(since_id, start=start) if follow else journal.read(since_id, start=start)
        )
        try:
            for entry in entries:
                if not keep(entry):
                    continue
                data = render(entry)
                if data is None:
                    continue
                out.write(data)
                if follow:
                    out.flush()
            out.flush()
        except KeyboardInterrupt:
            pass
        except BrokenPipeError:
            # `busd tail | head`: the reader left; leave quietly, without a flush error.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(0) from None


# -- doctor --------------------------------------------------------------------


@app.command()
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
    cfg = _load(ctx, root, config, need_bus=False)
    if not cfg.layout.root.is_dir():
        _die("not_found", f"no bus at {cfg.root} (run `busd init {cfg.root}`)", 66)
    with _errors():
        findings = [f.to_dict() for f in diagnose(cfg, fix=fix)]
    healthy = all(f["status"] == "ok" or f["fixed"] for f in findings)
    if json_out:
        _print_json({"root": cfg.root, "healthy": healthy, "findings": findings})
    else:
        rows = [["fixed" if f["fixed"] else f["status"], f["check"], f["detail"]] for f in findings]
        _table(["status", "check", "detail"], rows)
    if not healthy:
        raise typer.Exit(EXIT_DOCTOR)
