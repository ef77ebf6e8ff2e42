"""``busd tail``: print the journal, filtered, once or following it across rotation.

Formats: ``line`` (one readable line per entry), ``json`` (the journal entries
as written) and ``md`` (each accepted message as Markdown with front matter).
A reader that leaves (``busd tail | head``) ends the command quietly, exit 0.
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Callable, Iterable
from typing import Annotated

import msgspec
import typer

from busd.cli.common import ConfigOpt, RootOpt, exit_on_error, fail, load, parse_time
from busd.core.codec import decode, encode_markdown
from busd.errors import InvalidMessage
from busd.store.journal import Journal, JournalEntry, Position, encode_entry

__all__ = ["TailFormat", "register"]


def register(app: typer.Typer) -> None:
    """Add ``tail`` to ``app``."""
    app.command()(tail)


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
    cfg = load(ctx, root, config)
    if json_out:
        if fmt not in (TailFormat.line, TailFormat.json):
            fail("usage", "--json means --format json; do not combine it with another format")
        fmt = TailFormat.json
    since_ts = parse_time(since) if since is not None else None
    since_id = since if since is not None and since_ts is None else None
    keep = _matcher(agent, type_, workflow, since_ts)
    render = _renderer(fmt)
    out = sys.stdout.buffer
    with exit_on_error(), Journal(cfg.layout.journal) as journal:
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
