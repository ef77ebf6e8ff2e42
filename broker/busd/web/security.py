"""Who may use ``busd web``: the token, loopback Host and Origin, and CSRF for changes.

Contract:

* A random token is created at the first start and kept in
  :attr:`~busd.store.layout.Layout.web_token_file` (0600, written whole); later
  starts reuse it. The printed URL carries it (``?token=``), as Jupyter does.
* Every request needs it: ``?token=`` (answered with a cookie and, for a page, a
  redirect to the same URL without it), the cookie, or ``Authorization: Bearer``.
  Without it: 401.
* ``Host`` must name a loopback address (or the ``--bind`` address) and ``Origin``,
  when sent, too: a page of another site that resolves its name to 127.0.0.1 (DNS
  rebinding) or posts a form here is refused, 403.
* A state change is a POST carrying ``X-CSRF-Token`` (derived from the token, given
  to the page by ``/api/session``): without it, 403. The cookie is ``SameSite=Strict``
  and ``HttpOnly``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from busd.store.fsio import replace_durable
from busd.store.layout import Layout

__all__ = [
    "CSRF_HEADER",
    "LOOPBACK_NAMES",
    "Guard",
    "cookie_name",
    "csrf_token",
    "load_token",
]

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
CSRF_HEADER = "x-csrf-token"
_TOKEN_BYTES = 24

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def load_token(layout: Layout) -> tuple[str, bool]:
    """The dashboard token of ``layout``'s bus, and whether it was created just now."""
    path = layout.web_token_file
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = ""
    if len(token) >= 16:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)  # a secret: the owner's alone
        return token, False
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    replace_durable(path, token.encode("ascii") + b"\n")
    os.chmod(path, 0o600)
    return token, True


def csrf_token(token: str) -> str:
    """The CSRF token of a session: derived, so it survives restarts with the token."""
    return hmac.new(token.encode(), b"busd-web-csrf", hashlib.sha256).hexdigest()[:32]


def cookie_name(port: int) -> str:
    """Per port: cookies ignore ports, and two dashboards on one host are two buses."""
    return f"busd_web_{port}"


def _host_name(value: str) -> str:
    """``[::1]:8765`` -> ``::1``; ``localhost:8765`` -> ``localhost``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware enforcing the contract above in front of ``app``."""

    def __init__(self, app: ASGIApp, *, token: str, port: int, bind: str) -> None:
        self.app = app
        self.token = token
        self.csrf = csrf_token(token)
        self.cookie = cookie_name(port)
        self.hosts = LOOPBACK_NAMES | {bind.strip("[]").lower()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if _host_name(headers.get("host", "")) not in self.hosts:
            await _plain(send, 403, "forbidden: Host is not a loopback name")
            return
        origin = headers.get("origin")
        if origin is not None and _host_name(urlsplit(origin).netloc) not in self.hosts:
            await _plain(send, 403, "forbidden: foreign Origin")
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = (query.get("token") or [""])[0]
        if given:
            if not hmac.compare_digest(given, self.token):
                await _plain(send, 401, "unauthorized: wrong token")
                return
            await self._login(scope, send, query)
            return
        if not self._authorized(headers):
            await _plain(send, 401, "unauthorized: open the URL busd web printed (with ?token=)")
            return
        if scope["method"] not in ("GET", "HEAD") and not hmac.compare_digest(
            headers.get(CSRF_HEADER, ""), self.csrf
        ):
            await _plain(send, 403, "forbidden: missing or wrong CSRF token")
            return
        await self.app(scope, receive, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        bearer = headers.get("authorization", "")
        if bearer.startswith("Bearer ") and hmac.compare_digest(bearer[7:], self.token):
            return True
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed Cookie header is no cookie
            return False
        morsel = jar.get(self.cookie)
        return morsel is not None and hmac.compare_digest(morsel.value, self.token)

    async def _login(self, scope: Scope, send: Send, query: dict[str, list[str]]) -> None:
        """The token in the URL: set the cookie and go to the same URL without it."""
        rest = {k: v for k, v in query.items() if k != "token"}
        target = scope["path"] + ("?" + urlencode(rest, doseq=True) if rest else "")
        cookie = f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict"
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", target.encode("latin-1")),
                    (b"set-cookie", cookie.encode("latin-1")),
                    (b"cache-control", b"no-store"),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})


async def _plain(send: Send, status: int, text: str) -> None:
    body = (text + "\n").encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
