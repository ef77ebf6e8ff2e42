"""A whole daemon in-process through ``busd.app.serve``: socket, lanes, status, stop."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from _rpc import Rpc, RpcFailure
from busd.app import serve
from busd.config import ConfigLoader
from conftest import Bus
from daemon_harness import message

pytestmark = pytest.mark.timeout(60)


def _in_process(bus: Bus, calls: Any) -> Any:
    """Start a daemon on ``bus`` in this process, run ``calls(rpc)`` in a thread, stop it."""
    forced: list[bool] = []
    loader = ConfigLoader(root=str(bus.root), env={})

    async def main() -> Any:
        async with anyio.create_task_group() as tg:
            daemon = await tg.start(
                functools.partial(serve, loader, on_force_exit=lambda: forced.append(True))
            )
            assert daemon.socket is not None

            def client() -> Any:
                with Rpc(daemon.socket, timeout=10) as rpc:
                    return calls(rpc)

            try:
                return await anyio.to_thread.run_sync(client)
            finally:
                daemon.stop()

    with capture_logs() as logs:
        result = anyio.run(main)
    events = [e["event"] for e in logs]
    assert "daemon_ready" in events and events[-1] == "daemon_stopped", events
    assert not forced
    return result


def test_socket_refusals_count_in_status_totals_and_rates(bus: Bus) -> None:
    """An invalid socket publish shows in totals and rates_per_min.dead_lettered.

    Before, the socket path incremented a total by hand and never reached the
    rates: the two numbers disagreed.
    """

    def calls(rpc: Rpc) -> dict[str, Any]:
        rpc("publish", {"message": message(1)})
        with pytest.raises(RpcFailure):
            rpc("publish", {"message": {"nope": 1}})
        status: dict[str, Any] = rpc("status")
        return status

    status = _in_process(bus, calls)
    assert status["totals"]["accepted"] == 1
    assert status["totals"]["dead_lettered"] == 1
    assert status["rates_per_min"]["dead_lettered"]["1m"] > 0
    assert status["rates_per_min"]["accepted"]["1m"] > 0


def test_subscribe_persists_and_routes_the_topic(bus: Bus) -> None:
    """subscribe with topics routes the next publish to the topic and keeps the file."""

    def calls(rpc: Rpc) -> list[Any]:
        assert rpc("subscribe", {"agent_id": "carol", "topics": ["deploys"]}) == {
            "subscribed": True
        }
        rpc("publish", {"message": message(1, to="topic:deploys")})
        return [rpc.push(timeout=10)]

    (pushed,) = _in_process(bus, calls)
    assert pushed["params"]["message"]["message_id"] == "m-000001"
    assert (bus.root / "subscriptions.json").read_bytes() == b'{"deploys":["carol"]}'
    assert not Path(bus.root / "busd.sock").exists()
