"""A request line over the limit is answered at once, not when its newline arrives.

A client that sends 20 MiB without a newline gets the ``too_large`` error (``id: null``,
``data.reason``) within a second of passing the limit, the connection is then closed
(as NATS does on "maximum payload violation"), and a new connection is answered.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from _rpc import Rpc
from busd.rpc.server import ENVELOPE_BYTES
from busd.store.layout import init_bus
from daemon_harness import Daemon

_MAX = 65536
_LIMIT = _MAX + ENVELOPE_BYTES
_CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = init_bus(tmp_path_factory.mktemp("overlimit") / "bus").root
    d = Daemon(root, env={"BUSD_MAX_MESSAGE_BYTES": str(_MAX)}).ready()
    yield d
    d.kill()


class _Flood:
    """Sends up to ``total`` bytes with no newline; records when the limit was passed."""

    def __init__(self, sock: socket.socket, total: int) -> None:
        self.sock = sock
        self.total = total
        self.sent = 0
        self.passed_at: float | None = None
        self.stopped_by: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        head = b'{"jsonrpc":"2.0","id":5,"method":"publish","params":{"message":"'
        chunk = b"z" * _CHUNK
        try:
            self.sock.sendall(head)
            self.sent = len(head)
            while self.sent < self.total:
                self.sock.sendall(chunk)
                self.sent += len(chunk)
                if self.passed_at is None and self.sent > _LIMIT:
                    self.passed_at = time.monotonic()
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.stopped_by = type(exc).__name__


def test_20_mib_without_newline_is_answered_within_a_second(daemon: Daemon) -> None:
    with Rpc(daemon.root / "busd.sock", timeout=10) as c:
        flood = _Flood(c.sock, 20 << 20)
        flood.thread.start()
        obj = c.read(timeout=10)
        answered = time.monotonic()
        assert obj["id"] is None
        assert obj["error"]["code"] == -32600
        assert obj["error"]["data"]["reason"] == "too_large"
        assert obj["error"]["data"]["limit"] == _LIMIT
        assert flood.passed_at is not None
        assert answered - flood.passed_at < 1.0
        assert c.closed_by_peer(timeout=5)
        flood.thread.join(10)
        # The client never finished its 20 MiB: the daemon stopped reading them.
        assert flood.stopped_by is not None and flood.sent < 20 << 20
    with Rpc(daemon.root / "busd.sock") as fresh:
        assert "pid" in fresh("ping")


def test_exactly_the_limit_without_newline_is_not_answered_yet(daemon: Daemon) -> None:
    """At the limit the line may still end well: no answer until a byte more comes."""
    with Rpc(daemon.root / "busd.sock", timeout=10) as c:
        c.send_raw(b"{" + b" " * (_LIMIT - 1))
        with pytest.raises(TimeoutError):
            c.read_line(timeout=0.5)
        c.send_raw(b" ")
        assert c.read(timeout=2)["error"]["data"]["reason"] == "too_large"
        assert c.closed_by_peer()


def test_the_lines_before_a_long_one_are_answered(daemon: Daemon) -> None:
    """Requests framed before the long line in the same write are answered, in order."""
    with Rpc(daemon.root / "busd.sock", timeout=10) as c:
        ping = b'{"jsonrpc":"2.0","id":41,"method":"ping"}\n'
        c.send_raw(ping + b"[" + b" " * (_LIMIT + 10))
        assert c.read()["id"] == 41
        assert c.read()["error"]["data"]["reason"] == "too_large"
        assert c.closed_by_peer()
