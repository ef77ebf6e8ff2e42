"""The composition root: the daemon, the socket methods over it, and the server.

``busd.runtime`` knows nothing of sockets and ``busd.rpc`` knows the daemon
only as a :class:`~busd.rpc.broker.Broker`; this module is the one place that
knows both. :func:`serve` is what ``busd run`` calls (through ``anyio.run``)
and what in-process tests start in their own task group, as uvicorn's
``run()`` builds ``Server(config)``.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from anyio.abc import TaskGroup, TaskStatus

from busd.config import ConfigLoader
from busd.rpc.methods import Methods
from busd.rpc.server import Server
from busd.runtime.daemon import Daemon

__all__ = ["serve"]


async def serve(
    loader: ConfigLoader,
    *,
    on_force_exit: Callable[[], None] | None = None,
    task_status: TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a daemon with its socket until it is stopped (a signal, or ``Daemon.stop()``).

    With ``await tg.start(serve, loader)`` the caller gets the ready Daemon
    (socket bound, recovery done). Start-up errors leave as plain busd errors
    (``AlreadyRunning``, ``StorageError``, a bind failure...).
    """
    daemon = Daemon(loader, on_force_exit=on_force_exit)
    methods = Methods(daemon)
    server = Server(daemon.config, methods)
    # Memory deliveries whose lease ended open their subscribers' windows again.
    daemon.on_returned = methods.subscribers.released

    async def start_services(tg: TaskGroup) -> None:
        # Bound before "ready": a bind error stops start-up with a clear message.
        daemon.socket = await tg.start(server.serve)

    await daemon.run(start_services, task_status=task_status)
