"""Dead-letter commands of ``busd``: dlq list/show/purge/edit and replay.

Each works with the daemon running (through its socket) and stopped (on the
files), printing the same thing both ways. ``busd replay`` and ``busd dlq edit``
exit 65 when an entry is still invalid, replay 66 when a named entry is not in
the DLQ; a missing confirmation (``--yes``) is a usage error, 2. Replayed files
wait in an outbox: with no daemon they are routed before the command returns.

Getting each answer (from the socket or the files) moved to :mod:`busd.cli.dlqdata`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from busd.cli.common import (
    EXIT_CODES,
    ConfigOpt,
    JsonOpt,
    RootOpt,
    exit_on_error,
    fail,
    load,
    parse_duration,
    parse_time,
    print_json,
    remember_options,
)
from busd.cli.dlqdata import list_entries as _entries
from busd.cli.dlqdata import replay_names as _replay_names
from busd.cli.dlqdata import replay_shape as _replay_shape
from busd.cli.dlqdata import route_offline as _route_offline
from busd.cli.dlqdata import show_entry as _show
from busd.cli.render import ago, pairs, progress, short, since_iso, table
from busd.core.model import check_agent_name
from busd.routing.replay import replay as replay_entry
from busd.store import dlq

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add ``replay`` and the ``dlq`` group to ``app``."""
    app.command()(replay)
    app.add_typer(_dlq_app, name="dlq")


_dlq_app = typer.Typer(
    name="dlq",
    help="Inspect and repair the dead-letter queue. Example: busd dlq list --reason schema",
    no_args_is_help=True,
)


@_dlq_app.callback()
def _dlq_group(ctx: typer.Context, root: RootOpt = None, config: ConfigOpt = None) -> None:
    """Inspect and repair the dead-letter queue.

    Example: busd dlq list --reason schema
    """
    remember_options(ctx, root, config)


def _since_filter(since: str | None) -> float | None:
    if since is None:
        return None
    at = parse_time(since)
    if at is None:
        fail("usage", f"--since {since!r}: give a duration (15m, 2h, 7d) or an ISO time")
    return at


@_dlq_app.command("list")
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
    cfg = load(ctx, root, config)
    cutoff = _since_filter(since)
    with exit_on_error():
        entries = _entries(cfg, reason, agent)
    if cutoff is not None:
        entries = [
            e for e in entries if (t := parse_time(e["last_failure_at"])) is None or t >= cutoff
        ]
    if json_out:
        print_json({"entries": entries})
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
            ago(since_iso(e["last_failure_at"], now)),
            str(e.get("replays", 0)),
            "yes" if e.get("foreign") else "-",
            short(e.get("detail") or "", 60),
        ]
        for e in entries
    ]
    headers = [
        "name",
        "reason",
        "from",
        "to",
        "message_id",
        "failed",
        "replays",
        "foreign",
        "detail",
    ]
    table(headers, rows)


@_dlq_app.command("show")
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
    cfg = load(ctx, root, config)
    with exit_on_error():
        shown = _show(cfg, name)
    if json_out:
        print_json(shown)
        return
    r = shown["record"]
    items = [("name", shown["name"])]
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
            items.append((key, str(r[key])))
    pairs(items)
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


@_dlq_app.command("purge")
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
    cfg = load(ctx, root, config)
    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        fail("usage", f"--older-than: {exc}")
    now = time.time()
    with exit_on_error():
        candidates = [
            e
            for e in dlq.list_entries(cfg.layout)
            if (t := parse_time(e.record.last_failure_at)) is not None and now - t > age
        ]
    if not yes:
        if not sys.stdin.isatty():
            fail("usage", "not a terminal: pass --yes to purge without confirmation")
        if not typer.confirm(
            f"Delete {len(candidates)} DLQ entries whose last failure is older than {older_than}?",
            default=False,
        ):
            fail("aborted", "nothing purged")
    with exit_on_error(), progress(len(candidates), "purging") as step:
        purged = dlq.purge(cfg.layout, older_than_s=age, now=now, on_purged=lambda _: step())
    if json_out:
        print_json({"purged": purged, "count": len(purged)})
    else:
        typer.echo(f"purged {len(purged)} DLQ entries older than {older_than}")


@_dlq_app.command("edit")
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
    cfg = load(ctx, root, config)
    with exit_on_error():
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
        fail("editor_failed", f"cannot run {editor!r}: {exc}")
    if rc != 0:
        copy.unlink(missing_ok=True)
        fail("editor_failed", f"{editor!r} exited {rc}; the entry is unchanged")
    edited = copy.read_bytes()
    if edited == original:
        copy.unlink(missing_ok=True)
        result = _replay_shape({"name": name, "status": "unchanged"}, cfg)
    else:
        with exit_on_error():
            done = replay_entry(cfg, name, data=edited)
            if done.status == "replayed":
                _route_offline(cfg)
        result = _replay_shape(msgspec.to_builtins(done, enc_hook=str), cfg)
        if done.status == "replayed":
            copy.unlink(missing_ok=True)
        else:
            result["kept_copy"] = str(copy)
    _print_replays([result], json_out)
    if result["status"] == "still_invalid":
        raise typer.Exit(EXIT_CODES["invalid_message"])


# -- replay --------------------------------------------------------------------


def _print_replays(results: list[dict[str, Any]], json_out: bool) -> None:
    counts = {s: 0 for s in ("replayed", "would_replay", "still_invalid", "not_found")}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if json_out:
        print_json({"results": results, "counts": counts})
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
    cfg = load(ctx, root, config)
    chosen = sum((bool(names), reason is not None, all_))
    if chosen != 1:
        fail("usage", "give entry NAMEs, --reason R or --all (exactly one of them)")
    if from_file is not None and (not names or len(names) != 1):
        fail("usage", "--from FILE corrects one entry: give exactly one NAME")
    if to is not None:
        with exit_on_error():
            check_agent_name(to.removeprefix("topic:"), "recipient")
    data: bytes | None = None
    if from_file is not None:
        with exit_on_error():
            data = sys.stdin.buffer.read() if from_file == "-" else Path(from_file).read_bytes()
    with exit_on_error():
        if names:
            selected = list(dict.fromkeys(names))
        else:
            # A snapshot: entries dead-lettered while we replay wait for the next run.
            selected = [e["name"] for e in _entries(cfg, reason, None)]
        with progress(len(selected), "replaying") as step:
            results = _replay_names(cfg, selected, to=to, dry_run=dry_run, data=data, step=step)
    _print_replays(results, json_out)
    if any(r["status"] == "still_invalid" for r in results):
        raise typer.Exit(EXIT_CODES["invalid_message"])
    if any(r["status"] == "not_found" for r in results):
        raise typer.Exit(EXIT_CODES["not_found"])
