"""The bridge's side of its local busd: one socket connection, the daemon's own API.

The bridge is a client like any other (protocol.md section 11): ``publish_batch`` with
``sender = "_bridge"`` for what arrives, ``fetch`` / ``ack`` / ``extend`` / ``reject`` on the
``_bridge`` queue for what leaves. Requests are written by hand so that a message's bytes
travel as they came (``publish_batch`` takes each message as raw JSON): the DLQ keeps the
bytes of a refusal. One request at a time per :class:`LocalBus`; pushes are skipped.

Failures: no daemon listening, or the connection dropped, is
:class:`~busd.errors.DaemonNotRunning` (the connection is re-made on the next call);
no answer in time is :class:`~busd.errors.RpcTimeout`; an error answer is
:class:`RemoteFailure` with its stable ``code`` (``data.error``).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import anyio
import anyio.abc
import msgspec

from busd.config import Config, endpoints
from busd.errors import DaemonNotRunning, RemoteError, RpcTimeout

__all__ = ["LocalBus", "RemoteFailure", "answer_error_code"]

_LINE_MAX = 64 << 20


class _Answer(msgspec.Struct):
    id: Any = None
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: Any = None


_answer = msgspec.json.Decoder(_Answer)


class RemoteFailure(RemoteError):
    """An error answer from the daemon; ``error_code`` is its stable code (``data.error``)."""

    def __init__(self, message: str, error_code: str, data: dict[str, Any]) -> None:
        super().__init__(message, error=error_code)
        self.error_code = error_code
        self.data = data


def answer_error_code(error: dict[str, Any]) -> str:
    """The stable code of an error body (``data.error``, else ``data.reason``)."""
    data = error.get("data")
    if not isinstance(data, dict):
        return "remote_error"
    return str(data.get("error") or data.get("reason") or "remote_error")


class LocalBus:
    """A persistent connection to the bus's daemon (made lazily, re-made after a failure)."""

    def __init__(self, config: Config, timeout: float = 30.0) -> None:
        self.config = config
        self.timeout = timeout
        self._stream: anyio.abc.SocketStream | None = None
        self._buf = b""
        self._ids = itertools.count(1)
        self._lock = anyio.Lock()

    async def aclose(self) -> None:
        """Close the connection (if any)."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()

    async def _connect(self) -> anyio.abc.SocketStream:
        last: OSError | None = None
        for path in endpoints(self.config):
            try:
                with anyio.fail_after(2.0):
                    return await anyio.connect_unix(str(path))
            except (OSError, TimeoutError) as exc:
                last = exc if isinstance(exc, OSError) else None
        raise DaemonNotRunning(
            f"no busd daemon listens for {self.config.root}", error=str(last) if last else None
        )

    async def call_raw(self, method: str, params: bytes) -> msgspec.Raw:
        """Call ``method`` with ``params`` (a JSON object's bytes, one line); its result's
        bytes (decode them with the type you expect: message bodies stay as sent)."""
        async with self._lock:
            rid = next(self._ids)
            line = b'{"jsonrpc":"2.0","id":%d,"method":%s,"params":%s}\n' % (
                rid,
                json.dumps(method).encode(),
                params,
            )
            try:
                if self._stream is None:
                    self._stream = await self._connect()
                    self._buf = b""
                with anyio.fail_after(self.timeout):
                    await self._stream.send(line)
                    while True:
                        answer = await self._line()
                        if answer is not None and answer.id == rid:
                            break
            except TimeoutError:
                await self.aclose()
                raise RpcTimeout(f"the daemon did not answer {method} in time") from None
            except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                await self.aclose()
                raise DaemonNotRunning(f"the daemon dropped the connection ({method})") from exc
        if answer.error is not None:
            err = answer.error if isinstance(answer.error, dict) else {}
            raise RemoteFailure(
                str(err.get("message") or "error"), answer_error_code(err), err.get("data") or {}
            )
        return answer.result

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """Call ``method`` with JSON-ready ``params``; its result as Python values."""
        raw = await self.call_raw(method, json.dumps(params, separators=(",", ":")).encode())
        return msgspec.json.decode(raw)

    async def _line(self) -> _Answer | None:
        assert self._stream is not None
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                raw, self._buf = self._buf[:nl], self._buf[nl + 1 :]
                try:
                    return _answer.decode(raw)
                except msgspec.DecodeError:
                    return None  # a push we cannot read is not our answer
            if len(self._buf) > _LINE_MAX:
                raise anyio.BrokenResourceError("answer line too long")
            self._buf += await self._stream.receive(1 << 20)
