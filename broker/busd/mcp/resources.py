"""The MCP resources of ``busd mcp`` (URIs are a public contract).

* ``busd://inbox/{agent}``: a summary of what waits for the agent (counts and
  the first waiting messages, no bodies). Subscribable: see :mod:`busd.mcp.notify`.
* ``busd://message/{id}``: one message as the journal accepted it.
* ``busd://workflow/{id}``: the messages of one workflow, oldest first.
* ``busd://status``: what ``busd status --json`` prints.

Every read goes to the bus (socket or files) through :class:`busd.mcp.tools.Bus`;
an unknown URI or message is a ``not_found`` :class:`~busd.mcp.tools.ToolError`.
"""

from __future__ import annotations

import json
from typing import Any

import mcp_types as types

from busd.mcp.bus import Bus, ToolError, message_item
from busd.mcp.notify import inbox_agent

__all__ = ["STATUS_URI", "listed", "read", "templates"]

STATUS_URI = "busd://status"
_MESSAGE = "busd://message/"
_WORKFLOW = "busd://workflow/"
_JSON = "application/json"


def listed(agent: str | None) -> list[types.Resource]:
    """The concrete resources: the status, and this server's inbox when it has an agent."""
    out = [types.Resource(uri=STATUS_URI, name="status", mime_type=_JSON)]
    if agent is not None:
        out.insert(
            0,
            types.Resource(
                uri=f"busd://inbox/{agent}",
                name=f"inbox of {agent}",
                description="what waits for you (subscribe for arrivals)",
                mime_type=_JSON,
            ),
        )
    return out


def templates() -> list[types.ResourceTemplate]:
    """The parameterised resources."""
    return [
        types.ResourceTemplate(uri_template="busd://inbox/{agent}", name="inbox", mime_type=_JSON),
        types.ResourceTemplate(uri_template="busd://message/{id}", name="message", mime_type=_JSON),
        types.ResourceTemplate(
            uri_template="busd://workflow/{id}", name="workflow", mime_type=_JSON
        ),
    ]


async def read(bus: Bus, uri: str) -> types.ReadResourceResult:
    """The contents of ``uri`` as one JSON text."""
    data = await _data(bus, uri)
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return types.ReadResourceResult(
        contents=[types.TextResourceContents(uri=uri, mime_type=_JSON, text=text)]
    )


async def _data(bus: Bus, uri: str) -> Any:
    agent = inbox_agent(uri)
    if agent is not None:
        waiting = await bus.call(lambda c: c.peek(agent, 50))
        status = await bus.status()
        queue = status.get("agents", {}).get(agent) or {}
        return {
            "agent": agent,
            "ready": max(int(queue.get("ready", 0)), len(waiting)),
            "in_flight": int(queue.get("in_flight", 0)),
            "waiting": waiting,
        }
    if uri == STATUS_URI:
        return await bus.status()
    if uri.startswith(_MESSAGE) and len(uri) > len(_MESSAGE):
        mid = uri[len(_MESSAGE) :]
        msg = await bus.call(lambda c: c.message(mid))
        if msg is None:
            raise ToolError("not_found", f"message {mid} is not in the journal")
        return msg
    if uri.startswith(_WORKFLOW) and len(uri) > len(_WORKFLOW):
        wf = uri[len(_WORKFLOW) :]
        found, more = await bus.call(lambda c: c.thread(wf, None, 100))
        return {"workflow_id": wf, "messages": [message_item(m) for m in found], "truncated": more}
    raise ToolError("not_found", f"no resource {uri}")
