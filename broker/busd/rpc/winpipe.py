"""The Windows transport: a named pipe instead of a Unix socket.

``\\\\.\\pipe\\busd-<hash of root>``, created with:

* ``FILE_FLAG_FIRST_PIPE_INSTANCE`` on the first instance, so a second daemon
  (or an impostor that got there first) makes start-up fail instead of sharing
  the name;
* ``PIPE_REJECT_REMOTE_CLIENTS``, so the pipe is local to the machine;
* a protected DACL granting access to SYSTEM and the current user only, the
  equivalent of the 0600 socket inside a 0700 root.

Each accepted instance becomes a :class:`PipeStream`, an anyio byte stream, so
the JSON-RPC connection code is the same as on POSIX. Blocking Win32 calls run
in worker threads. Only :func:`pipe_name` and :func:`owner_sddl` are testable
off Windows; the rest is kept small on purpose.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

__all__ = ["PipeListener", "PipeStream", "owner_sddl", "pipe_name"]

_BUFFER = 65536


def pipe_name(root: Path) -> str:
    """The pipe of the bus at ``root`` (case-insensitive, as Windows paths are)."""
    digest = hashlib.sha256(str(root.absolute()).lower().encode("utf-8")).hexdigest()[:16]
    return rf"\\.\pipe\busd-{digest}"


def owner_sddl(user_sid: str) -> str:
    """A protected DACL (no inherited entries) granting all access to SYSTEM and ``user_sid``."""
    if not user_sid.startswith("S-1-") or not all(p.isdigit() for p in user_sid[4:].split("-")):
        raise ValueError(f"not a SID: {user_sid!r}")
    return f"D:P(A;;GA;;;SY)(A;;GA;;;{user_sid})"


class PipeStream(anyio.abc.ByteStream):
    """One connected pipe instance as an anyio byte stream."""

    def __init__(self, handle: int) -> None:
        self._handle = handle
        self._closed = False

    async def receive(self, max_bytes: int = _BUFFER) -> bytes:
        data: bytes = await anyio.to_thread.run_sync(_read, self._handle, max_bytes)
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            written = await anyio.to_thread.run_sync(_write, self._handle, bytes(view))
            view = view[written:]

    async def send_eof(self) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            _close(self._handle)

    @property
    def extra_attributes(self) -> dict[Any, Callable[[], Any]]:
        return {}


class PipeListener:
    """Creates pipe instances one after another and hands each client to ``handler``."""

    def __init__(self, root: Path) -> None:
        self.name = pipe_name(root)

    async def serve(self, handler: Callable[[PipeStream], Coroutine[Any, Any, None]]) -> None:
        # The first instance is made before anything else, so a name already taken
        # fails start-up here rather than inside the task group.
        handle = _create(self.name, first=True)
        async with anyio.create_task_group() as tg:
            while True:
                # Cancelling abandons the blocked wait; closing the handle ends it.
                try:
                    await anyio.to_thread.run_sync(_connect, handle, abandon_on_cancel=True)
                except BaseException:
                    _close(handle)
                    raise
                tg.start_soon(handler, PipeStream(handle))
                handle = _create(self.name, first=False)


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import ctypes
    from ctypes import wintypes

    _k32 = ctypes.WinDLL("kernel32", use_last_error=True)
    _adv = ctypes.WinDLL("advapi32", use_last_error=True)
    _PIPE_ACCESS_DUPLEX = 0x3
    _FIRST_INSTANCE = 0x00080000
    _PIPE_REJECT_REMOTE = 0x8
    _UNLIMITED = 255
    _ERROR_PIPE_CONNECTED = 535
    _INVALID = wintypes.HANDLE(-1).value

    class _SecurityAttributes(ctypes.Structure):
        _fields_ = [
            ("nLength", wintypes.DWORD),
            ("lpSecurityDescriptor", wintypes.LPVOID),
            ("bInheritHandle", wintypes.BOOL),
        ]

    def _current_sid() -> str:
        import subprocess

        out = subprocess.run(
            ["whoami", "/user", "/fo", "csv", "/nh"], capture_output=True, text=True, check=True
        ).stdout
        return out.strip().split(",")[-1].strip('"')

    def _security() -> _SecurityAttributes:
        descriptor = wintypes.LPVOID()
        if not _adv.ConvertStringSecurityDescriptorToSecurityDescriptorW(
            owner_sddl(_current_sid()), 1, ctypes.byref(descriptor), None
        ):
            raise ctypes.WinError(ctypes.get_last_error())
        return _SecurityAttributes(ctypes.sizeof(_SecurityAttributes), descriptor, False)

    def _create(name: str, *, first: bool) -> int:
        flags = _PIPE_ACCESS_DUPLEX | (_FIRST_INSTANCE if first else 0)
        sa = _security()
        handle = _k32.CreateNamedPipeW(
            name, flags, _PIPE_REJECT_REMOTE, _UNLIMITED, _BUFFER, _BUFFER, 0, ctypes.byref(sa)
        )
        if handle == _INVALID:
            raise ctypes.WinError(ctypes.get_last_error())
        return int(handle)

    def _connect(handle: int) -> None:
        if not _k32.ConnectNamedPipe(handle, None):
            err = ctypes.get_last_error()
            if err != _ERROR_PIPE_CONNECTED:  # the client connected before we waited
                raise ctypes.WinError(err)

    def _read(handle: int, size: int) -> bytes:
        buf = ctypes.create_string_buffer(size)
        n = wintypes.DWORD()
        if not _k32.ReadFile(handle, buf, size, ctypes.byref(n), None):
            return b""  # broken pipe: the client went away
        return buf.raw[: n.value]

    def _write(handle: int, data: bytes) -> int:
        n = wintypes.DWORD()
        if not _k32.WriteFile(handle, data, len(data), ctypes.byref(n), None):
            raise anyio.BrokenResourceError
        return int(n.value)

    def _close(handle: int) -> None:
        _k32.DisconnectNamedPipe(handle)
        _k32.CloseHandle(handle)

else:

    def _unsupported() -> OSError:
        return OSError("named pipes are the Windows transport; POSIX uses the Unix socket")

    def _create(name: str, *, first: bool) -> int:
        raise _unsupported()

    def _connect(handle: int) -> None:
        raise _unsupported()

    def _read(handle: int, size: int) -> bytes:
        raise _unsupported()

    def _write(handle: int, data: bytes) -> int:
        raise _unsupported()

    def _close(handle: int) -> None:
        raise _unsupported()
