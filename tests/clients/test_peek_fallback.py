"""busclient's ``peek`` without the daemon's ``peek``: no daemon at all, or one too old.

``Client.peek``/``AsyncClient.peek`` ask the daemon first; with no daemon (Unavailable)
or one that answers "method not found" (a busd from before ``peek``), they list
``inbox/<agent>/`` themselves, as they always did.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import busclient
from busd.config import load_config
from busd.routing.offline import route_pending
from daemon_harness import files, message


def _summary(i: int, count: int = 0) -> dict[str, Any]:
    return {
        "message_id": f"m-{i:06d}",
        "from": "alice",
        "type": "fact",
        "created_at": "2026-11-21T12:00:00Z",
        "delivery_count": count,
        "workflow_id": "w1",
        "task_id": "t1",
    }


def _three_inbox_files(root: Path) -> None:
    with busclient.Client(root) as c:
        for i in (1, 2, 3):
            assert c.send(message(i)).via == "file"
    assert route_pending(load_config(root=str(root), env={})) is not None
    assert len(files(root / "inbox" / "bob")) == 3


@contextmanager
def _old_daemon(path: Path) -> Iterator[list[str]]:
    """A socket that answers every request as a busd without ``peek`` answers ``peek``:
    -32601 ``method_not_found``. Yields the methods it was asked for."""
    asked: list[str] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    server.settimeout(0.2)
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                request = json.loads(line)
                asked.append(request["method"])
                error = {
                    "code": -32601,
                    "message": f"no method {request['method']!r}",
                    "data": {"reason": "method_not_found"},
                }
                reply = {"jsonrpc": "2.0", "id": request["id"], "error": error}
                stream.write(json.dumps(reply).encode() + b"\n")
                stream.flush()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield asked
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.mark.timeout(60)
def test_peek_without_a_daemon_lists_the_inbox_files(root: Path) -> None:
    _three_inbox_files(root)
    expected = [_summary(1), _summary(2), _summary(3)]
    with busclient.Client(root) as c:
        assert c.peek("bob") == expected
        assert c.peek("bob", 2) == expected[:2]
        assert c.peek("bob", 0) == []
        [d] = c.fetch("bob")  # a claim is no longer waiting
        assert d.via == "file"
        assert c.peek("bob") == expected[1:]
        with pytest.raises(busclient.InvalidName):
            c.peek("../bob")
    with busclient.Client(root, fallback=False) as strict, pytest.raises(busclient.Unavailable):
        strict.peek("bob")

    async def via_async() -> list[dict[str, Any]]:
        async with busclient.AsyncClient(root) as ac:
            return await ac.peek("bob", 10)

    assert asyncio.run(via_async()) == expected[1:]
    assert len(files(root / "inbox" / "bob")) == 2  # nothing claimed by peeking


@pytest.mark.timeout(60)
def test_peek_from_a_daemon_that_predates_it_lists_the_files(root: Path) -> None:
    _three_inbox_files(root)
    expected = [_summary(1), _summary(2), _summary(3)]
    with _old_daemon(root / "busd.sock") as asked:
        with busclient.Client(root, fallback=False) as c:
            assert c.peek("bob") == expected
            with pytest.raises(busclient.InvalidRequest):
                c.call("peek", {"agent_id": "bob"})

        async def via_async() -> list[dict[str, Any]]:
            async with busclient.AsyncClient(root, fallback=False) as ac:
                return await ac.peek("bob", 2)

        assert asyncio.run(via_async()) == expected[:2]
    assert asked == ["peek", "peek", "peek"]
