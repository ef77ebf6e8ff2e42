"""The systemd notification protocol, without libsystemd.

``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``RELOADING=1`` and ``WATCHDOG=1``
are datagrams sent to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a
leading ``@`` means the abstract namespace). Without that variable every call
is a no-op, so the daemon calls these unconditionally.
"""

from __future__ import annotations

import os
import socket

__all__ = ["Notifier", "watchdog_interval"]


class Notifier:
    """Sends notifications to the service manager, if there is one."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address

    @property
    def enabled(self) -> bool:
        """True when ``$NOTIFY_SOCKET`` names a socket."""
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send ``fields`` as one datagram (newline-joined); return whether it was sent."""
        if self._address is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.sendto("\n".join(fields).encode(), self._address)
            except OSError:
                return False  # the manager went away; nothing useful to do
        return True


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None if not asked.

    Honours ``WATCHDOG_PID``: a watchdog meant for another process is ignored.
    """
    env = dict(os.environ) if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2_000_000
