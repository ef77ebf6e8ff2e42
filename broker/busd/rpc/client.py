"""A tiny synchronous JSON-RPC 2.0 caller over the daemon's Unix socket, for the CLI.

One request per connection: connect, send one line, read lines until the answer
with our id arrives (pushed notifications are skipped), close. The daemon is
found at :func:`busd.config.socket_path` first, then at the path written in
``<root>/busd.sock.path`` (a long root puts the socket elsewhere).

Errors come back as :class:`~busd.errors.BusdError` subclasses, so the CLI
prints and maps them like local ones: an error answer becomes the class named
by its ``data.error`` code (``not_found``, ``invalid_message`` with its DLQ
reason, ...); no listening daemon is :class:`DaemonNotRunning`; a daemon that
accepts but does not answer in time is :class:`RpcTimeout`.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from typing import Any

from busd import errors
from busd.config import Config, endpoints
from busd.errors import (
    BusdError,
    DaemonNotRunning,
    InvalidMessage,
    Reason,
    RemoteError,
    RpcTimeout,
)

__all__ = [
    "DaemonNotRunning",
    "RemoteError",
    "RpcTimeout",
    "call",
    "daemon_running",
    "endpoints",
]

_ids = itertools.count(1)
_CONNECT_TIMEOUT_S = 2.0


_BY_CODE: dict[str, type[BusdError]] = {
    cls.code: cls
    for name in errors.__all__
    if isinstance(cls := getattr(errors, name), type)
    and issubclass(cls, BusdError)
    and cls
    not in (errors.BusdError, errors.InvalidMessage, errors.AlreadyRunning, errors.RemoteError)
}


def _connect(config: Config, timeout: float) -> socket.socket:
    last: OSError | None = None
    for path in endpoints(config):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(min(timeout, _CONNECT_TIMEOUT_S))
        try:
            sock.connect(str(path))
        except OSError as exc:  # missing, refused (stale file), not a socket, too long
            sock.close()
            last = exc
            continue
        return sock
    where = ", ".join(str(p) for p in endpoints(config))
    raise DaemonNotRunning(f"no busd daemon listens at {where}", error=str(last) if last else None)


def daemon_running(config: Config) -> bool:
    """True when a daemon accepts connections on the bus's socket (nothing is sent)."""
    try:
        _connect(config, _CONNECT_TIMEOUT_S).close()
    except DaemonNotRunning:
        return False
    return True


def _error(err: dict[str, Any]) -> BusdError:
    data = err.get("data") if isinstance(err.get("data"), dict) else {}
    assert isinstance(data, dict)
    message = str(err.get("message") or "error")
    code = str(data.get("error") or data.get("reason") or "")
    if code == InvalidMessage.code:
        try:
            reason = Reason(str(data.get("reason")))
        except ValueError:
            reason = Reason.SCHEMA
        return InvalidMessage(reason, str(data.get("detail") or message), data.get("path"))
    if code == errors.AlreadyRunning.code:
        pid = data.get("pid")
        return errors.AlreadyRunning(message, pid if isinstance(pid, int) else None)
    cls = _BY_CODE.get(code)
    context = {k: v for k, v in data.items() if k != "error"}
    if cls is None:
        return RemoteError(message, rpc_code=err.get("code"), **context)
    return cls(message, **context)


def call(config: Config, method: str, params: Any = None, timeout: float = 30.0) -> Any:
    """Call ``method`` on the daemon and return its result; raise a BusdError on failure.

    ``timeout`` bounds the whole call (connect, send, answer).
    """
    deadline = time.monotonic() + timeout
    request_id = next(_ids)
    request: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        request["params"] = params
    line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
    sock = _connect(config, timeout)
    with sock:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(line)
            buf = b""
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    sock.settimeout(remaining)
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        raise DaemonNotRunning(f"the daemon closed the connection during {method}")
                    buf += chunk
                    continue
                raw, buf = buf[:nl], buf[nl + 1 :]
                answer = json.loads(raw)
                if not isinstance(answer, dict) or answer.get("id") != request_id:
                    continue  # a pushed notification, or an answer to nobody
                if "error" in answer:
                    raise _error(answer["error"] if isinstance(answer["error"], dict) else {})
                return answer.get("result")
        except TimeoutError:
            raise RpcTimeout(f"the daemon did not answer {method} within {timeout:g} s") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise DaemonNotRunning(f"the daemon dropped the connection during {method}") from exc
        except ValueError as exc:
            raise RemoteError(f"unreadable answer to {method}: {exc}") from exc
