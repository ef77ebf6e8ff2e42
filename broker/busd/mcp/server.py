"""The MCP server of one agent identity (or, over HTTP, of any agent the caller names).

:func:`build` wires the SDK's low-level :class:`mcp.server.Server` to the tool table
(:mod:`busd.mcp.tools`), the resources (:mod:`busd.mcp.resources`) and the inbox
notifier (:mod:`busd.mcp.notify`, run in the server's lifespan). :func:`serve_stdio`
runs it on stdin/stdout (nothing else may write to stdout: logs go to stderr).

Contracts: tool refusals are MCP tool errors (``isError``) with busd's stable code
in the structured content; a resource that does not exist is a JSON-RPC error
(-32602, as the spec asks for unknown resources). Nothing here outlives the
process but the bus itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import ListenHandler
from mcp.shared.exceptions import MCPError

from busd import __version__
from busd.config import Config
from busd.mcp import resources
from busd.mcp.bus import Bus, ToolError
from busd.mcp.notify import Inboxes, inbox_agent
from busd.mcp.tools import TOOLS, check_args, listed

__all__ = ["Built", "build", "serve_stdio"]

_Ctx = ServerRequestContext[Any, Any]
_INSTRUCTIONS = (
    "busd is a durable message bus between agents. bus_fetch claims your messages (each "
    "with a receipt); finish each with bus_ack, or bus_nack / bus_reject; bus_send and "
    "bus_reply publish. Messages stay until acked: a notification is only a cue to fetch."
)


class Built:
    """A server and the parts tests and transports need: the bus seam and the notifier."""

    def __init__(self, server: Server[Any], bus: Bus, inboxes: Inboxes) -> None:
        self.server = server
        self.bus = bus
        self.inboxes = inboxes


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)


def _result(data: dict[str, Any], *, error: bool = False) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=_json(data))], structured_content=data, is_error=error
    )


def build(config: Config, *, agent: str | None, ops: bool = False, http: bool = False) -> Built:
    """The server for ``agent`` on the bus of ``config`` (``http``: tools take ``agent``)."""
    if agent is None and not http:
        raise ValueError("a stdio server acts as one agent")
    bus = Bus(config)

    async def waiting(agents: list[str]) -> dict[str, int]:
        try:
            status = await bus.call(lambda c: c.status(), fallback=False)
        except ToolError as exc:
            if exc.code != "daemon_not_running":
                raise
            await bus.route()  # nobody else routes without a daemon
            return await anyio.to_thread.run_sync(_inbox_counts, config, agents)
        queues = status.get("agents", {})
        return {a: int((queues.get(a) or {}).get("ready", 0)) for a in agents}

    inboxes = Inboxes(waiting)
    bus.on_fetch = inboxes.fetched
    visible = {t.name: t for t in listed(ops=ops)}
    listen = ListenHandler(inboxes.bus)

    @asynccontextmanager
    async def lifespan(_: Server[Any]) -> AsyncIterator[dict[str, Any]]:
        async with anyio.create_task_group() as tg:
            await tg.start(inboxes.run)
            try:
                yield {}
            finally:
                listen.close()
                tg.cancel_scope.cancel()

    async def list_tools(
        ctx: _Ctx, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=[
                types.Tool(
                    name=t.name,
                    description=t.description,
                    input_schema=t.schema(http),
                    annotations=types.ToolAnnotations(read_only_hint=True) if t.read_only else None,
                )
                for t in visible.values()
            ]
        )

    async def call_tool(ctx: _Ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        tool = visible.get(params.name) if params.name in TOOLS else None
        if tool is None:
            known = ", ".join(visible)
            err = ToolError("not_found", f"no tool {params.name!r}; the tools are {known}")
            return _result(err.content(), error=True)
        try:
            args = check_args(tool, params.arguments, http)
            who = args.pop("agent", None) if http and tool.agent else agent
            return _result(await tool.run(bus, who or "", args))
        except ToolError as exc:
            return _result(exc.content(), error=True)

    async def list_resources(
        ctx: _Ctx, params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=resources.listed(agent))

    async def list_templates(
        ctx: _Ctx, params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=resources.templates())

    async def read_resource(
        ctx: _Ctx, params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        try:
            return await resources.read(bus, str(params.uri))
        except ToolError as exc:
            raise MCPError(types.INVALID_PARAMS, exc.message, exc.content()["error"]) from None

    async def subscribe(ctx: _Ctx, params: types.SubscribeRequestParams) -> types.EmptyResult:
        watched = inbox_agent(str(params.uri))
        if watched is not None:
            inboxes.subscribe(watched, ctx.session)
        return types.EmptyResult()

    async def unsubscribe(ctx: _Ctx, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        watched = inbox_agent(str(params.uri))
        if watched is not None:
            inboxes.unsubscribe(watched, ctx.session)
        return types.EmptyResult()

    async def subscriptions_listen(
        ctx: _Ctx, params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        uris = params.notifications.resource_subscriptions or []
        agents = [a for a in map(inbox_agent, uris) if a is not None]
        with inboxes.listening(agents):
            return await listen(ctx, params)

    server: Server[Any] = Server(
        "busd",
        version=__version__,
        instructions=_INSTRUCTIONS,
        lifespan=lifespan,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_list_resource_templates=list_templates,
        on_read_resource=read_resource,
        on_subscribe_resource=subscribe,
        on_unsubscribe_resource=unsubscribe,
        on_subscriptions_listen=subscriptions_listen,
    )
    return Built(server, bus, inboxes)


def _inbox_counts(config: Config, agents: list[str]) -> dict[str, int]:
    """Delivery files waiting in each agent's inbox (the daemon-less view)."""
    out: dict[str, int] = {}
    for agent in agents:
        n = 0
        with suppress(OSError), os.scandir(config.layout.inbox_dir(agent)) as it:
            n = sum(1 for e in it if not e.name.startswith("."))
        out[agent] = n
    return out


async def serve_stdio(built: Built) -> None:
    """Serve ``built`` on stdin/stdout until the client closes stdin."""
    server = built.server
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())
