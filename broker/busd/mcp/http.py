"""``busd mcp --http HOST:PORT``: the streamable HTTP transport, on loopback only.

Contracts:

* The listener binds a loopback address only (``127.0.0.0/8``, ``::1``,
  ``localhost``); any other host is a ``config_error`` before anything listens.
* Every request whose ``Host`` is not a loopback name, or whose ``Origin`` (when
  present) is not a loopback origin, is refused with 403 before the MCP layer sees
  it: a web page the user visits cannot drive the bus (DNS rebinding included).
* The endpoint is ``/mcp``. Tools take an explicit ``agent`` (one server, many
  agents); see :func:`busd.mcp.server.build`.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from busd.errors import ConfigError
from busd.mcp.server import Built

__all__ = ["LocalOnly", "app_of", "is_loopback", "parse_address", "serve_http"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, brackets allowed) is this machine only."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); a loopback host only."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--http expects HOST:PORT, got {text!r}")
    host = host.strip("[]")
    if not is_loopback(host):
        raise ConfigError(f"--http binds loopback only (127.0.0.1, ::1, localhost), not {host!r}")
    return host, int(port)


def _host_of(authority: str) -> str:
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


class LocalOnly:
    """ASGI middleware: 403 unless Host (and Origin, when sent) are loopback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            why = _refusal(headers.get("host", ""), headers.get("origin"))
            if why is not None:
                await PlainTextResponse(why, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _refusal(host: str, origin: str | None) -> str | None:
    if not host or not is_loopback(_host_of(host)):
        return f"forbidden: Host {host!r} is not local"
    if origin is not None and origin != "null":
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not is_loopback(parts.hostname or ""):
            return f"forbidden: Origin {origin!r} is not local"
    elif origin == "null":
        return "forbidden: Origin 'null' is not local"
    return None


def app_of(built: Built, host: str) -> Any:
    """The ASGI application: the SDK's streamable HTTP app behind :class:`LocalOnly`."""
    from mcp.server.transport_security import TransportSecuritySettings

    # The SDK's own check too (421 for a bad Host); ours answers first, with 403.
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost"],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
    )
    inner = built.server.streamable_http_app(host=host, transport_security=security)
    return LocalOnly(inner)


async def serve_http(built: Built, host: str, port: int) -> None:
    """Serve ``built`` at ``http://HOST:PORT/mcp`` until cancelled."""
    config = uvicorn.Config(
        app_of(built, host), host=host, port=port, log_level="warning", lifespan="on"
    )
    await uvicorn.Server(config).serve()
