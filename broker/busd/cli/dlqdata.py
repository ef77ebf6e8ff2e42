"""What the dead-letter commands ask, answered through the daemon or on the files.

:mod:`busd.cli.dlq` holds the commands (options, confirmation, printing, exit
codes); this module gets their answers. Each call goes through the daemon's
socket when one runs and to the files when none does, and returns the same
plain dicts both ways, so that a command prints the same thing either way.
Foreign dead letters (read in place, never moved) are listed and shown beside
busd's own. Replayed files wait in an outbox: with no daemon,
:func:`replay_names` routes them before it returns (:func:`route_offline`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import msgspec

from busd.cli.common import RPC_TIMEOUT_S, DaemonCall, daemon_or_files
from busd.config import Config
from busd.errors import InvalidMessage, NotFound
from busd.routing.offline import route_pending
from busd.routing.replay import replay as replay_entry
from busd.store import dlq, foreign

__all__ = ["list_entries", "replay_names", "replay_shape", "route_offline", "show_entry"]

_REPLAY_CHUNK = 50


def route_offline(cfg: Config) -> None:
    """Route what waits in the outboxes now, unless a daemon holds the bus."""
    # Replayed files wait in an outbox; with no daemon, route them now (skipped if
    # a daemon took the bus meanwhile: it routes them itself).
    route_pending(cfg)


_FOREIGN = foreign.FOREIGN_REASON


def list_entries(cfg: Config, reason: str | None, agent: str | None) -> list[dict[str, Any]]:
    """DLQ entries as ``{"name", **record}``, through the daemon if it runs, with the
    foreign ones, ``"foreign": true`` (the daemon lists them too; read here from ``dlq/``
    directly for the files path and a daemon that does not: listing moves nothing)."""

    def live(call: DaemonCall) -> list[dict[str, Any]]:
        params = {"reason": reason, "agent": agent}
        return list(call("dlq.list", params, timeout=RPC_TIMEOUT_S)["entries"])

    def files() -> list[dict[str, Any]]:
        entries = dlq.list_entries(cfg.layout, reason=reason, agent=agent)
        return [{"name": e.name, **msgspec.to_builtins(e.record)} for e in entries]

    own = daemon_or_files(cfg, live, files)
    if agent is not None or reason not in (None, _FOREIGN):
        return own
    listed = {e.get("name") for e in own if e.get("foreign")}
    return own + [e.row() for e in foreign.list_foreign(cfg.layout) if e.name not in listed]


def show_entry(cfg: Config, name: str) -> dict[str, Any]:
    """One entry as ``{"name", "record", "data", "json"}`` (``data``: the bytes as text,
    None when they are not a regular file; ``json``: their parsed value, or None)."""

    def live(call: DaemonCall) -> dict[str, Any]:
        try:
            answer = call("dlq.show", {"name": name}, timeout=RPC_TIMEOUT_S)
        except InvalidMessage:
            # Data that is not a regular file (a symlink, a FIFO): show the record alone.
            matches = [e for e in list_entries(cfg, None, None) if e["name"] == name]
            if not matches:
                raise NotFound(f"no DLQ entry {name!r}", name=name) from None
            record = {k: v for k, v in matches[0].items() if k != "name"}
            answer = {"name": name, "record": record, "data": None}
        return _show_shape(answer)

    def files() -> dict[str, Any]:
        try:
            entry = dlq.load(cfg.layout, name)
        except NotFound:
            return _show_foreign(cfg, name)
        try:
            text: str | None = entry.data().decode("utf-8", errors="replace")
        except InvalidMessage:
            text = None
        record = msgspec.to_builtins(entry.record)
        return _show_shape({"name": entry.name, "record": record, "data": text})

    try:
        return daemon_or_files(cfg, live, files)
    except NotFound:
        return _show_foreign(cfg, name)


def _show_foreign(cfg: Config, name: str) -> dict[str, Any]:
    """A foreign dead letter, read in place (NotFound if there is none of that name)."""
    entry, data = foreign.load_foreign(cfg.layout, name)
    text = data.decode("utf-8", errors="replace") if data is not None else None
    return _show_shape({"name": entry.name, "record": entry.row(), "data": text})


def _show_shape(answer: dict[str, Any]) -> dict[str, Any]:
    text = answer.get("data")
    parsed: Any = None
    if text is not None:
        with suppress(msgspec.DecodeError):
            parsed = msgspec.json.decode(text.encode("utf-8"))
    return {"name": answer["name"], "record": answer["record"], "data": text, "json": parsed}


def replay_shape(result: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A replay result, from the socket or the files, as the commands print it."""
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


def replay_names(
    cfg: Config,
    names: list[str],
    *,
    to: str | None,
    dry_run: bool,
    data: bytes | None,
    step: Callable[[], None],
) -> list[dict[str, Any]]:
    """Replay ``names`` in chunks (``step`` after each), through the daemon while it runs;
    corrected ``data`` always goes on the files. Each result is :func:`replay_shape`'s."""
    results: list[dict[str, Any]] = []
    via_daemon = data is None  # the socket method takes no corrected bytes
    offline = False

    def files(chunk: list[str]) -> list[dict[str, Any]]:
        nonlocal via_daemon, offline
        via_daemon, offline = False, True  # a daemon gone stays gone for this run
        done: list[dict[str, Any]] = []
        for name in chunk:
            try:
                result = msgspec.to_builtins(
                    replay_entry(cfg, name, to=to, data=data, dry_run=dry_run), enc_hook=str
                )
            except NotFound as exc:
                result = {"name": name, "status": "not_found", "detail": exc.message}
            done.append(replay_shape(result, cfg))
            step()
        return done

    def live(chunk: list[str], call: DaemonCall) -> list[dict[str, Any]]:
        params = {"names": chunk, "to": to, "dry_run": dry_run}
        done: list[dict[str, Any]] = []
        for r in call("replay", params, timeout=RPC_TIMEOUT_S)["replayed"]:
            done.append(replay_shape(r, cfg))
            step()
        return done

    for i in range(0, len(names), _REPLAY_CHUNK):
        chunk = names[i : i + _REPLAY_CHUNK]
        if via_daemon:
            results += daemon_or_files(
                cfg, functools.partial(live, chunk), functools.partial(files, chunk)
            )
        else:
            results += files(chunk)
    if offline and not dry_run and any(r["status"] == "replayed" for r in results):
        route_offline(cfg)
    return results
