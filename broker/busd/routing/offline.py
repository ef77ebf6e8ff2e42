"""The daemon-less routing pass: how ``busd send`` then ``busd recv`` work alone.

:func:`route_pending` does, in one process and under the bus lock, what a
daemon does over its lifetime: recover what a crashed router left, route every
waiting file, and checkpoint so its deliveries are durable. Recovery writes as
inbox files every message a killed daemon held in memory and did not see
settled: what the journal after the checkpoint records as acked or
dead-lettered by a consumer stays settled
(:func:`busd.routing.recovery.recover_deliveries`). When a daemon (or another
pass) holds the lock it does nothing: that holder routes.
"""

from __future__ import annotations

from busd.config import Config
from busd.routing.recovery import recover_deliveries, write_checkpoint
from busd.routing.router import Router, RouteReport
from busd.store.buslock import BusLock

__all__ = ["route_pending"]


def route_pending(config: Config) -> RouteReport | None:
    """One daemon-less routing pass, if no daemon runs; None when one does."""
    lock = BusLock(config.layout, role="cli")
    if not lock.acquire(timeout=0):
        return None
    try:
        with Router(config) as router:
            recover_deliveries(router)
            report = router.route_all()
            write_checkpoint(router)
            return report
    finally:
        lock.release()
