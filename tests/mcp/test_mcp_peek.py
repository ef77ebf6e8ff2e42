"""``bus_peek`` and the inbox resource list what the daemon holds in memory.

An MCP agent that called ``bus_fetch`` is socket-served for ``serve_grace_seconds``: its
new messages wait in the daemon's memory, with no inbox file. Before, ``bus_peek``
listed the inbox files only and reported them as ``not_listed``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

import busclient
from daemon_harness import Daemon, files, message

BUSD = str(Path(sys.executable).with_name("busd"))


async def _call(c: Client, tool: str, **args: Any) -> dict[str, Any]:
    r = await c.call_tool(tool, args)
    assert not r.is_error, r.structured_content
    assert isinstance(r.structured_content, dict)
    return r.structured_content


@pytest.mark.timeout(90)
def test_bus_peek_after_bus_fetch_lists_a_memory_message(root: Path, daemon: Daemon) -> None:
    args = ["mcp", "--agent", "bob", "--root", str(root)]
    params = StdioServerParameters(command=BUSD, args=args)

    async def main() -> None:
        async with Client(params, mode="legacy", read_timeout_seconds=30) as bob:
            empty = await _call(bob, "bus_fetch", wait_s=0.1)
            assert empty["count"] == 0  # bob is socket-served from now on
            with busclient.Client(root) as c:
                sent = c.send(message(1, body="in memory"))
            assert files(root / "inbox" / "bob") == []  # no file: it waits in memory
            peek = await _call(bob, "bus_peek")
            assert peek["ready"] == 1 and peek["in_flight"] == 0 and "not_listed" not in peek
            [waiting] = peek["waiting"]
            assert waiting["message_id"] == sent.message_id
            assert (waiting["from"], waiting["type"], waiting["delivery_count"]) == (
                "alice",
                "fact",
                0,
            )
            assert "body" not in waiting
            inbox = await bob.read_resource("busd://inbox/bob")
            summary = json.loads(inbox.contents[0].text)  # type: ignore[union-attr]
            assert summary["ready"] == 1 and summary["waiting"] == [waiting]
            got = await _call(bob, "bus_fetch", max=10)  # peeking claimed nothing
            assert [m["message_id"] for m in got["messages"]] == [sent.message_id]
            assert got["messages"][0]["delivery_count"] == 1

    anyio.run(main)
