"""The Starlette app of ``busd web`` and its uvicorn server.

Routes (every one behind :class:`busd.web.security.Guard`):

* ``GET /`` the page (``static/index.html``), ``GET /static/<file>`` its JS and CSS;
* ``GET /api/session`` the CSRF token; ``GET /api/status`` the :class:`StatusReport`;
* ``GET /api/messages?agent=&type=&workflow=&text=&limit=`` recent journal entries;
* ``GET /api/messages/<id>?body=1`` one message (the body only with ``body=1``);
* ``GET /api/workflows/<id>`` a workflow's messages; ``GET /api/dlq``, ``/api/dlq/<name>``;
* ``POST /api/dlq/replay`` ``{"names": [...]}``, ``POST /api/dlq/purge``
  ``{"older_than_s": N}`` (both with ``X-CSRF-Token``);
* ``GET /api/events?...filters`` Server-Sent Events: ``status`` every second and
  ``entry`` for each new journal entry that passes the filters.

Reads run in worker threads (they list directories and read the journal); the event
loop only serves. It works without a daemon: the status then says so.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from importlib import resources
from typing import Any

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from busd.config import Config
from busd.errors import BusdError, NotFound
from busd.store.journal import Position
from busd.web import views
from busd.web.security import Guard, csrf_token

__all__ = ["STATIC_FILES", "build", "serve"]

STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_TICK_S = 1.0
_SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    # Everything is ours: no CDN, no inline script, no framing.
    "content-security-policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'",
}


def _static(name: str) -> bytes:
    return resources.files("busd.web").joinpath("static", name).read_bytes()


def _json(data: Any, status: int = 200) -> Response:
    return Response(
        msgspec.json.encode(data),
        status_code=status,
        media_type="application/json",
        headers=_SECURITY_HEADERS,
    )


def _error(exc: BusdError) -> Response:
    status = 404 if isinstance(exc, NotFound) else 400
    return _json({"error": exc.code, "message": exc.message}, status)


def _filters(request: Request) -> views.Filters:
    q = request.query_params
    return views.Filters(
        agent=q.get("agent") or None,
        type=q.get("type") or None,
        workflow=q.get("workflow") or None,
        text=q.get("text") or None,
    )


def build(cfg: Config, *, token: str, port: int, bind: str = "127.0.0.1") -> Guard:
    """The ASGI app for ``cfg``'s bus, guarded by ``token`` (see :mod:`busd.web.security`)."""
    run = anyio.to_thread.run_sync
    csrf = csrf_token(token)

    async def page(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in STATIC_FILES:
            return Response("not found\n", 404, media_type="text/plain")
        return Response(_static(name), media_type=STATIC_FILES[name], headers=_SECURITY_HEADERS)

    async def session(_: Request) -> Response:
        return _json({"csrf": csrf, "root": str(cfg.root)})

    async def status(_: Request) -> Response:
        return _json(await run(views.status, cfg))

    async def messages(request: Request) -> Response:
        limit = min(max(int(request.query_params.get("limit", "200") or 200), 1), 2000)
        try:
            rows, end = await run(partial(views.messages, cfg, _filters(request), limit=limit))
        except BusdError as exc:
            return _error(exc)
        return _json({"entries": rows, "end": [end.segment, end.offset]})

    async def message(request: Request) -> Response:
        body = request.query_params.get("body") == "1"
        mid = request.path_params["message_id"]
        try:
            return _json(await run(partial(views.message, cfg, mid, body=body)))
        except BusdError as exc:
            return _error(exc)

    async def workflow(request: Request) -> Response:
        try:
            return _json(await run(views.workflow, cfg, request.path_params["workflow_id"]))
        except BusdError as exc:
            return _error(exc)

    async def dlq_list(_: Request) -> Response:
        return _json({"entries": await run(views.dlq_entries, cfg)})

    async def dlq_show(request: Request) -> Response:
        try:
            return _json(await run(views.dlq_entry, cfg, request.path_params["name"]))
        except BusdError as exc:
            return _error(exc)

    async def dlq_replay(request: Request) -> Response:
        body = await _body(request)
        names = body.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            return _json({"error": "usage", "message": "give names: [entry names]"}, 400)
        try:
            results = await run(views.replay, cfg, names)
        except BusdError as exc:
            return _error(exc)
        return _json({"results": results})

    async def dlq_purge(request: Request) -> Response:
        body = await _body(request)
        age = body.get("older_than_s")
        if not isinstance(age, int | float) or isinstance(age, bool) or age < 0:
            return _json({"error": "usage", "message": "give older_than_s: seconds >= 0"}, 400)
        try:
            purged = await run(views.purge, cfg, float(age))
        except BusdError as exc:
            return _error(exc)
        return _json({"purged": purged, "count": len(purged)})

    async def events(request: Request) -> Response:
        filters = _filters(request)
        return StreamingResponse(
            _stream(cfg, filters, request),
            media_type="text/event-stream",
            headers={**_SECURITY_HEADERS, "x-accel-buffering": "no"},
        )

    routes = [
        Route("/", page),
        Route("/static/{name}", page),
        Route("/api/session", session),
        Route("/api/status", status),
        Route("/api/messages", messages),
        Route("/api/messages/{message_id:path}", message),
        Route("/api/workflows/{workflow_id:path}", workflow),
        Route("/api/dlq", dlq_list),
        Route("/api/dlq/replay", dlq_replay, methods=["POST"]),
        Route("/api/dlq/purge", dlq_purge, methods=["POST"]),
        Route("/api/dlq/{name}", dlq_show),
        Route("/api/events", events),
    ]
    return Guard(Starlette(routes=routes), token=token, port=port, bind=bind)


async def _body(request: Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.body() or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _event(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


async def _stream(cfg: Config, filters: views.Filters, request: Request) -> AsyncIterator[bytes]:
    """``status`` every second, ``entry`` per new journal entry, until the client leaves."""
    run = anyio.to_thread.run_sync
    pos: Position = await run(views.end_position, cfg)
    yield b"retry: 2000\n\n"
    while not await request.is_disconnected():
        rows, pos = await run(partial(views.messages, cfg, filters, limit=500, after=pos))
        for row in rows:
            yield _event("entry", row)
        yield _event("status", await run(views.status, cfg))
        await anyio.sleep(_TICK_S)


async def serve(app: Guard, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` until cancelled (uvicorn, no access log)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        # Event streams never end by themselves: do not wait for them at a stop.
        timeout_graceful_shutdown=1,
    )
    await uvicorn.Server(config).serve()
