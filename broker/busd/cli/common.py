"""What every ``busd`` command shares: options, config loading, exits, the daemon-or-files rule.

Errors print ``busd: <code>: <message>`` on stderr and exit with the code from
:data:`EXIT_CODES` (1 for any other code), all through :func:`fail`. Commands
go through the daemon's socket when one runs and read or write the files
otherwise, all through :func:`daemon_or_files`. Command modules import this
module, never :mod:`busd.cli.main`.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn, Protocol, TypeVar

import msgspec
import typer

from busd import logs
from busd.config import Config, ConfigLoader
from busd.errors import BusdError
from busd.rpc import client as rpc

__all__ = [
    "EXIT_ATTENTION",
    "EXIT_CODES",
    "EXIT_DAEMON_DOWN",
    "EXIT_DOCTOR",
    "EXIT_FORCED",
    "EXIT_USAGE",
    "RPC_TIMEOUT_S",
    "ConfigOpt",
    "DaemonCall",
    "JsonOpt",
    "RootOpt",
    "daemon_or_files",
    "exit_on_error",
    "fail",
    "load",
    "loader",
    "parse_duration",
    "parse_time",
    "print_json",
    "remember_options",
]

EXIT_USAGE = 2
"""Bad or missing options (also click's own usage errors)."""
EXIT_DAEMON_DOWN = 3
"""``busd status``: no daemon answers on this bus (the files were read instead)."""
EXIT_ATTENTION = 4
"""``busd status --check``: the daemon runs but the bus needs attention."""
EXIT_DOCTOR = 1
"""``busd doctor``: some finding is neither ok nor fixed."""
EXIT_FORCED = 130
"""Exit code of a daemon forced out by a second SIGINT or the shutdown timeout."""
EXIT_CODES: dict[str, int] = {
    "usage": EXIT_USAGE,
    "invalid_message": 65,  # EX_DATAERR
    "invalid_name": 65,
    "not_found": 66,  # EX_NOINPUT
    "stale_receipt": 66,  # the claim it named is gone, as for not_found
    "storage_error": 74,  # EX_IOERR
    "lock_timeout": 75,  # EX_TEMPFAIL
    "already_running": 75,
    "config_error": 78,  # EX_CONFIG
}
"""Exit code per error code; any other code exits 1 (``aborted``, ``editor_failed``, ...)."""

RPC_TIMEOUT_S = 60.0
"""How long operator commands wait for the daemon (``send``/``recv``/``ack``: 30 s)."""

RootOpt = Annotated[
    str | None,
    typer.Option("--root", help="Bus root (default: $BUSD_ROOT, nearest .busd/, ./.busd)."),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", help="Config file (default: $BUSD_CONFIG, <root>/busd.toml)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]

_T = TypeVar("_T")
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?", re.IGNORECASE)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DEFAULT_TIMEOUT_S = 30.0


def fail(code: str, message: str) -> NoReturn:
    """Print ``busd: CODE: MESSAGE`` on stderr and exit with CODE's exit code."""
    typer.echo(f"busd: {code}: {message}", err=True)
    raise typer.Exit(EXIT_CODES.get(code, 1))


@contextmanager
def exit_on_error() -> Iterator[None]:
    """Turn a BusdError (its code) or an OSError (``os_error``) into :func:`fail`."""
    try:
        yield
    except BusdError as exc:
        fail(exc.code, exc.message)
    except OSError as exc:
        fail("os_error", str(exc))


def remember_options(ctx: typer.Context, root: str | None, config: str | None) -> None:
    """Keep ``--root``/``--config`` given before a subcommand for the subcommand."""
    obj = ctx.ensure_object(dict)
    if root is not None:
        obj["root"] = root
    if config is not None:
        obj["config"] = config


def loader(ctx: typer.Context, root: str | None, config: str | None, **flags: Any) -> ConfigLoader:
    """The loader of this invocation: options after the subcommand win over those before."""
    obj = ctx.obj or {}
    return ConfigLoader(root or obj.get("root"), config or obj.get("config"), flags)


def load(
    ctx: typer.Context, root: str | None, config: str | None, *, need_bus: bool = True
) -> Config:
    """The Config of this invocation; exit 66 when ``need_bus`` and no bus is there."""
    with exit_on_error():
        cfg = loader(ctx, root, config).load()
        logs.configure("warning", cfg.log_format)
    if need_bus and not cfg.layout.is_initialized():
        fail("not_found", f"no bus at {cfg.root} (run `busd init {cfg.root}`)")
    return cfg


def print_json(obj: Any) -> None:
    """One JSON document (dicts, lists, msgspec Structs) and a newline on stdout."""
    sys.stdout.buffer.write(msgspec.json.encode(obj) + b"\n")
    sys.stdout.flush()


class DaemonCall(Protocol):
    """``call(method, params)``: the daemon's result; raises a BusdError on an error answer."""

    def __call__(self, method: str, params: Any, *, timeout: float = ...) -> Any: ...


def daemon_or_files(cfg: Config, live: Callable[[DaemonCall], _T], files: Callable[[], _T]) -> _T:
    """``live(call)`` through the daemon of ``cfg``; ``files()`` when no daemon listens.

    Only :class:`~busd.rpc.client.DaemonNotRunning` falls back: any other error
    of the daemon (a refusal, a timeout) propagates, since the files could
    disagree with what the daemon just decided.
    """

    def call(method: str, params: Any, *, timeout: float = _DEFAULT_TIMEOUT_S) -> Any:
        return rpc.call(cfg, method, params, timeout=timeout)

    try:
        return live(call)
    except rpc.DaemonNotRunning:
        return files()


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
