"""A tiny raw JSON-RPC 2.0 client over a Unix socket, for tests (stdlib only).

One object per ``\\n``-terminated line. :meth:`Rpc.call` sends a request and
reads lines until the answer with its id arrives; notifications read meanwhile
(``message`` pushes) are kept in :attr:`Rpc.notifications`.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any


class RpcFailure(Exception):
    """An error answer: ``error`` is the JSON-RPC error object."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')} {error.get('data')}")
        self.error = error
        self.code: int = error.get("code", 0)
        self.data: dict[str, Any] = error.get("data") or {}


class Rpc:
    """One connection to ``path``; every read waits at most ``timeout`` seconds."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.timeout = timeout
        self._buf = b""
        self._ids = itertools.count(1)
        self.notifications: deque[dict[str, Any]] = deque()

    def __enter__(self) -> Rpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.sock.close()

    # -- raw lines ----------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (add the ``\\n`` yourself)."""
        self.sock.sendall(data)

    def read_line(self, timeout: float | None = None) -> bytes | None:
        """The next line without ``\\n``; None at end of stream. Raises TimeoutError."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete line from the daemon")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no complete line from the daemon") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def read(self, timeout: float | None = None) -> dict[str, Any]:
        """The next JSON object; :class:`EOFError` if the daemon closed the connection."""
        line = self.read_line(timeout)
        if line is None:
            raise EOFError("connection closed by the daemon")
        obj = json.loads(line)
        assert isinstance(obj, dict), obj
        return obj

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True if the daemon closes the connection (after any pending lines) within ``timeout``."""
        try:
            while True:
                line = self.read_line(timeout)
                if line is None:
                    return True
        except TimeoutError:
            return False

    # -- requests -------------------------------------------------------------

    def send(self, method: str, params: Any = None, request_id: Any = None) -> Any:
        """Send one request (a fresh integer id unless given); return the id."""
        rid = next(self._ids) if request_id is None else request_id
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params is not None:
            req["params"] = params
        self.send_raw(json.dumps(req).encode() + b"\n")
        return rid

    def notify(self, method: str, params: Any = None) -> None:
        """Send a notification (no id)."""
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            req["params"] = params
        self.send_raw(json.dumps(req).encode() + b"\n")

    def answer(self, request_id: Any = None, timeout: float | None = None) -> dict[str, Any]:
        """The next answer (matching ``request_id`` if given), keeping notifications aside."""
        while True:
            obj = self.read(timeout)
            if "id" not in obj:
                self.notifications.append(obj)
                continue
            if request_id is not None:
                assert obj["id"] == request_id, f"answer for id {obj['id']}, wanted {request_id}"
            return obj

    def call(self, method: str, params: Any = None, timeout: float | None = None) -> dict[str, Any]:
        """Send a request and return its whole answer object (result or error)."""
        return self.answer(self.send(method, params), timeout)

    def __call__(self, method: str, params: Any = None, timeout: float | None = None) -> Any:
        """Send a request; return its result or raise :class:`RpcFailure`."""
        obj = self.call(method, params, timeout)
        if "error" in obj:
            raise RpcFailure(obj["error"])
        return obj["result"]

    def push(self, timeout: float | None = None) -> dict[str, Any]:
        """The next notification (already read or new)."""
        if self.notifications:
            return self.notifications.popleft()
        obj = self.read(timeout)
        assert "id" not in obj, f"expected a notification, got {obj}"
        return obj
