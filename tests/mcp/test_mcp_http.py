"""``busd mcp --http``: loopback only, foreign Origin and Host refused with 403."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp import Client

from busd.errors import ConfigError
from busd.mcp.http import is_loopback, parse_address
from daemon_harness import clean_env

BUSD = str(Path(sys.executable).with_name("busd"))
_INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"},
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def server(root: Path) -> Iterator[int]:
    """A ``busd mcp --http`` subprocess on a free loopback port; yields the port."""
    port = _free_port()
    proc = subprocess.Popen(
        [BUSD, "mcp", "--root", str(root), "--http", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "busd mcp --http did not listen"
            time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(10)


def _post(port: int, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST",
            "/mcp",
            body=json.dumps(_INIT),
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
                **headers,
            },
        )
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_a_foreign_origin_or_host_is_refused(server: int) -> None:
    port = server
    assert _post(port, {"Origin": "http://evil.example"}) == 403
    assert _post(port, {"Origin": "http://localhost.evil.example:80"}) == 403
    assert _post(port, {"Origin": "null"}) == 403
    assert _post(port, {"Host": f"evil.example:{port}"}) == 403
    assert _post(port, {"Origin": f"http://127.0.0.1:{port}"}) == 200
    assert _post(port, {}) == 200  # no Origin: not a browser


@pytest.mark.timeout(60)
def test_over_http_every_tool_takes_an_agent(server: int) -> None:
    async def main() -> None:
        async with Client(f"http://127.0.0.1:{server}/mcp", mode="legacy") as c:
            tools = (await c.list_tools()).tools
            assert all(t.input_schema["required"][0] == "agent" for t in tools)
            r = await c.call_tool("bus_send", {"to": "bob", "body": "hi"})
            assert r.is_error
            assert r.structured_content == {
                "error": {
                    "code": "invalid_params",
                    "message": "missing required argument `agent`",
                    "path": "$.agent",
                }
            }
            r = await c.call_tool("bus_send", {"agent": "alice", "to": "bob", "body": "hi"})
            assert not r.is_error and r.structured_content is not None
            assert r.structured_content["via"] == "file"
            r = await c.call_tool("bus_fetch", {"agent": "bob", "wait_s": 5})
            assert r.structured_content is not None
            [got] = r.structured_content["messages"]
            assert (got["from"], got["body"]) == ("alice", "hi")

    anyio.run(main)


@pytest.mark.timeout(30)
def test_only_loopback_addresses_are_served(root: Path) -> None:
    assert parse_address("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert parse_address("[::1]:8765") == ("::1", 8765)
    assert parse_address("localhost:1") == ("localhost", 1)
    for bad in ("0.0.0.0:8765", "192.168.1.2:80", "example.com:80", "127.0.0.1", "::1:99999"):
        with pytest.raises(ConfigError):
            parse_address(bad)
    assert is_loopback("127.8.9.10") and not is_loopback("10.0.0.1")
    proc = subprocess.run(
        [BUSD, "mcp", "--root", str(root), "--http", "0.0.0.0:8765"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=20,
        check=False,
    )
    assert proc.returncode == 78, proc.stderr
    assert "loopback only" in proc.stderr
