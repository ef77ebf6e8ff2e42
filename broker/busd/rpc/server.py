"""The local socket: where it lives, who may connect, and how lines are read.

On Windows the endpoint is a named pipe (see :mod:`busd.winpipe`); elsewhere:

Endpoint: ``<root>/busd.sock`` (mode 0600, inside the 0700 root). When that path
is longer than the 107 bytes ``sun_path`` holds, the socket lives at
``$XDG_RUNTIME_DIR/busd/<hash of root>.sock`` (or the temp dir) and its path is
written to ``<root>/busd.sock.path``; clients look there second. A socket
inherited from systemd (``LISTEN_FDS``/``LISTEN_PID``) is used as is.

Limits, so no client can exhaust the daemon: at most ``max_connections``
connections (the next is told ``overloaded`` and closed); a request line may
hold ``max_message_bytes`` plus 64 KiB of envelope (a longer one is answered
``too_large``, ``id: null``, as soon as the limit is passed, without waiting for its
newline, and the connection is then closed, as NATS does on "maximum payload
violation": what follows an unframed line cannot be trusted to be a request); one request
at a time per connection, so a client that never reads its answers only
stalls itself (the kernel buffer fills and we stop reading from it).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import (
    ByteStream,
    SocketAttribute,
    SocketListener,
    SocketStream,
    TaskGroup,
    TaskStatus,
)

from busd.config import Config, socket_path
from busd.errors import BusdError, Forbidden, Overloaded
from busd.rpc.methods import Methods
from busd.rpc.protocol import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    ClaimedMessage,
    RpcError,
    SubscribeParams,
    SubscribeResult,
    encode_error,
    encode_notification,
    encode_result,
    error_from_exception,
    parse_params,
    parse_request,
)
from busd.rpc.winpipe import PipeListener
from busd.store.fsio import replace_durable

__all__ = ["ENVELOPE_BYTES", "Server", "socket_path"]

_log = structlog.get_logger("busd.server")
ENVELOPE_BYTES = 64 * 1024
_SD_LISTEN_FDS_START = 3
_TRANSIENT_ACCEPT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _inherited_socket() -> socket.socket | None:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0") or 0) < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # children must not think they were activated
    sock = socket.socket(fileno=_SD_LISTEN_FDS_START)
    sock.setblocking(False)
    return sock


class _Lines:
    """Reads ``\\n``-terminated lines of at most ``limit`` bytes from a stream.

    A longer line yields :attr:`TOO_LONG` as soon as ``limit`` bytes have come without
    a newline (not when the newline finally arrives: a client may never send one); a
    further :meth:`next` discards the rest of that line first, so each long line
    yields one ``TOO_LONG`` and the lines after it are kept.
    """

    TOO_LONG = b"\0too long"

    def __init__(self, stream: ByteStream, limit: int) -> None:
        self._stream = stream
        self.limit = limit
        self._buf = bytearray()
        self._scanned = 0
        self._skipping = False

    async def next(self) -> bytes | None:
        """The next line (without ``\\n``), :attr:`TOO_LONG`, or None at end of stream."""
        while True:
            i = self._buf.find(b"\n", self._scanned)
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                self._scanned = 0
                if self._skipping:
                    self._skipping = False  # the end of a line already answered
                    continue
                return self.TOO_LONG if i > self.limit else line
            if self._skipping:
                self._buf.clear()  # still inside a line already answered: drop it
            elif len(self._buf) > self.limit:
                self._skipping = True
                self._buf.clear()
                self._scanned = 0
                return self.TOO_LONG
            self._scanned = len(self._buf)
            try:
                self._buf += await self._stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None


class Server:
    """Accepts connections and answers JSON-RPC requests through :class:`Methods`.

    ``config`` is the config at start-up: the endpoint and the limits it sets
    (``max_connections``, line length, allowed peers) hold until a restart.
    """

    def __init__(self, config: Config, methods: Methods) -> None:
        self.config = config
        self.methods = methods
        self.path = socket_path(config)
        self.connections = 0
        self._owns_path = True

    async def serve(self, *, task_status: TaskStatus[Path] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind (or adopt the inherited socket), report the path, serve until cancelled."""
        if sys.platform == "win32":  # pragma: no cover - the named pipe transport
            pipes = PipeListener(self.config.layout.root)
            self.path = Path(pipes.name)
            task_status.started(self.path)
            await pipes.serve(self._handle)
            return
        sock = await anyio.to_thread.run_sync(self._listen)
        listener = await SocketListener.from_socket(sock)
        try:
            async with listener:
                task_status.started(self.path)
                _log.info("socket_listening", path=str(self.path))
                await self._accept_forever(listener)
        finally:
            if self._owns_path:
                for p in (self.path, self.config.layout.socket_path_file):
                    try:
                        p.unlink()
                    except FileNotFoundError:
                        pass

    async def _accept_forever(self, listener: SocketListener) -> None:
        """Accept clients until cancelled; running out of descriptors only pauses it.

        anyio's own ``serve`` ends on any accept error; EMFILE/ENFILE (a flood of
        clients, a low ``ulimit -n``) must refuse new clients for a moment, not
        stop the broker.
        """
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    stream = await listener.accept()
                except (anyio.BrokenResourceError, OSError) as exc:
                    cause = exc if isinstance(exc, OSError) else exc.__cause__
                    if not isinstance(cause, OSError) or cause.errno not in _TRANSIENT_ACCEPT:
                        raise
                    _log.warning("accept_failed", error=str(cause), retry_in_s=0.1)
                    await anyio.sleep(0.1)
                    continue
                tg.start_soon(self._handle, stream)

    def _listen(self) -> socket.socket:
        inherited = _inherited_socket()
        self._owns_path = inherited is None
        if inherited is not None:
            name = inherited.getsockname()
            self.path = Path(name if isinstance(name, str) else os.fsdecode(name))
            self._record_path()
            return inherited
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.path.unlink()  # we hold the bus lock: any socket file here is stale
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the file is created 0600: no window with wider rights
        try:
            sock.bind(os.fspath(self.path))
        finally:
            os.umask(old)
        sock.listen(1024)
        sock.setblocking(False)
        self._record_path()
        return sock

    def _record_path(self) -> None:
        # Clients look at <root>/busd.sock first, then at the path recorded here.
        layout = self.config.layout
        if self.path != layout.socket:
            # Written whole or not at all: a client must never read half a path.
            replace_durable(layout.socket_path_file, os.fsencode(self.path) + b"\n")
        else:
            layout.socket_path_file.unlink(missing_ok=True)

    def _allowed(self, stream: ByteStream) -> tuple[bool, dict[str, int]]:
        if not isinstance(stream, SocketStream):
            return True, {}  # a named pipe: its DACL already admits only the owner
        raw: socket.socket = stream.extra(SocketAttribute.raw_socket)  # noqa: S610
        fmt = "3i"
        data = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
        pid, uid, gid = struct.unpack(fmt, data)
        peer = {"pid": pid, "uid": uid, "gid": gid}
        ok = (
            uid == os.getuid() or uid in self.config.allowed_uids or gid in self.config.allowed_gids
        )
        return ok, peer

    async def _handle(self, stream: ByteStream) -> None:
        async with stream:
            if self.connections >= self.config.max_connections:
                exc: BusdError = Overloaded(
                    f"too many connections (max_connections={self.config.max_connections})"
                )
                await _send_quietly(stream, encode_error(error_from_exception(exc)))
                _log.warning("connection_refused", reason="overloaded")
                return
            ok, peer = self._allowed(stream)
            if not ok:
                exc = Forbidden(f"uid {peer['uid']} may not use this bus")
                await _send_quietly(stream, encode_error(error_from_exception(exc)))
                _log.warning("connection_refused", reason="forbidden", **peer)
                return
            self.connections += 1
            try:
                await Connection(self, stream).run()
            except Exception as exc:  # noqa: BLE001 - one connection must never stop the listener
                _log.exception("connection_failed", error=repr(exc), **peer)
            finally:
                self.connections -= 1


async def _send_quietly(stream: ByteStream, data: bytes) -> None:
    try:
        await stream.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


class Connection:
    """One client: requests answered in order; pushes interleaved under a send lock."""

    def __init__(self, server: Server, stream: ByteStream) -> None:
        self.server = server
        self.methods = server.methods
        self.stream = stream
        self.send_lock = anyio.Lock()
        limit = server.config.max_message_bytes + ENVELOPE_BYTES
        self.lines = _Lines(stream, limit)

    async def send(self, data: bytes) -> None:
        async with self.send_lock:
            await self.stream.send(data)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            try:
                while (line := await self.lines.next()) is not None:
                    if not line.strip():
                        continue
                    answer = await self.answer(line, tg)
                    if answer is not None:
                        await self.send(answer)
                    if line == _Lines.TOO_LONG:
                        # Answered at once; the rest of an unframed line is not worth
                        # reading (it may never end), so close, as NATS does.
                        _log.warning("connection_closed", reason="too_large")
                        break
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            tg.cancel_scope.cancel()

    async def answer(self, line: bytes, tg: TaskGroup) -> bytes | None:
        """The answer line to one request line, or None for a notification.

        JSON-RPC never answers a notification (a request without ``id``), even
        when it fails; a line that does not parse is answered with ``id: null``.
        """
        request_id: Any = None
        notification = False
        try:
            if line == _Lines.TOO_LONG:
                raise RpcError(
                    INVALID_REQUEST,
                    "request line too long",
                    "too_large",
                    {"limit": self.lines.limit},
                )
            req = parse_request(line)
            notification = req.id is msgspec.UNSET
            request_id = None if notification else req.id
            result = await self.dispatch(req.method, req.params, tg)
            return None if notification else encode_result(request_id, result)
        except RpcError as err:
            answer = encode_error(err, request_id)
        except BusdError as exc:
            answer = encode_error(error_from_exception(exc), request_id)
        except Exception as exc:  # noqa: BLE001 - one bad request must not kill the connection
            _log.exception("request_failed", error=repr(exc))
            answer = encode_error(
                RpcError(INTERNAL_ERROR, "internal error", "internal"), request_id
            )
        return None if notification else answer

    async def dispatch(self, method: str, params: msgspec.Raw, tg: TaskGroup) -> Any:
        """Run ``method`` with ``params``; raise :class:`RpcError` or a busd error."""
        if method == "subscribe":
            await self.subscribe(parse_params(params, SubscribeParams), tg)
            return SubscribeResult()
        entry = self.methods.methods.get(method)
        if entry is None:
            raise RpcError(METHOD_NOT_FOUND, f"no method {method!r}", "method_not_found")
        kind, handler = entry
        return await handler(parse_params(params, kind))

    async def subscribe(self, params: SubscribeParams, tg: TaskGroup) -> None:
        subscribers = self.methods.subscribers
        sub = await subscribers.add(params)

        async def push(payload: ClaimedMessage) -> None:
            await self.send(encode_notification("message", payload))

        async def run() -> None:
            try:
                await subscribers.pushes(sub, push)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the subscriber went away; its claims come back after their leases
            except Exception as exc:  # noqa: BLE001 - a subscriber must never take the server down
                _log.exception("subscription_failed", agent=sub.agent_id, error=repr(exc))
            finally:
                subscribers.remove(sub)

        tg.start_soon(run)
