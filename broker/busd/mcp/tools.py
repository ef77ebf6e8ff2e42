"""The MCP tools of ``busd mcp``: names, parameters and results are a public contract.

Contracts:

* Parameter schemas stay small: the whole default ``tools/list`` answer is under
  8,000 characters (a test measures it). Arguments are checked here against the
  same table (:func:`check_args`), so a wrong one is a tool error with its JSON
  path, never an exception.
* A tool returns a JSON object (the structured content), or raises
  :class:`~busd.mcp.bus.ToolError` (:mod:`busd.mcp.handlers` does the work).
* With ``http`` every agent tool takes an explicit ``agent``; on stdio the
  server's ``--agent`` is the identity and no tool takes one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from busd.mcp import handlers
from busd.mcp.bus import Args, Bus, Result, ToolError

__all__ = ["TOOLS", "Tool", "check_args", "listed"]

_TYPES = ("fact", "progress", "decision", "review", "error")
_ALL_TYPES = (*_TYPES, "task_assignment", "status_update", "task_complete")


def _p(kind: str | list[str], description: str = "", **rules: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": kind, **rules}
    if description:
        schema["description"] = description
    return schema


_STR = _p("string")
_IDS = _p("array", items=_STR)
_OBJ = _p("object")
_AGENT = _p("string", "the agent id you act as")
_NAMED = {
    "message_id": _p("string", "a held message (its current claim)"),
    "receipt": _p("string", "the receipt bus_fetch gave (preferred)"),
}


@dataclass(frozen=True)
class Tool:
    """One tool: its parameters (name -> JSON schema), which are required, its coroutine."""

    name: str
    description: str
    params: dict[str, dict[str, Any]]
    run: Callable[[Bus, str, Args], Awaitable[Result]]
    required: tuple[str, ...] = ()
    ops: bool = False
    agent: bool = True  # acts as an agent (takes `agent` over HTTP)
    read_only: bool = False

    def schema(self, http: bool) -> dict[str, Any]:
        """The tool's ``inputSchema``."""
        props = dict(self.params)
        required = list(self.required)
        if http and self.agent:
            props = {"agent": _AGENT, **props}
            required.insert(0, "agent")
        out: dict[str, Any] = {"type": "object", "properties": props}
        if required:
            out["required"] = required
        return out


def check_args(tool: Tool, args: Mapping[str, Any] | None, http: bool) -> Args:
    """``args`` checked against the tool's schema (types, bounds, enums, required, unknown);
    a :class:`ToolError` ``invalid_params`` naming the JSON path otherwise."""
    schema = tool.schema(http)
    props: dict[str, dict[str, Any]] = schema["properties"]
    given = {k: v for k, v in (args or {}).items() if v is not None}
    for key in schema.get("required", []):
        if key not in given:
            raise ToolError("invalid_params", f"missing required argument `{key}`", path=f"$.{key}")
    for key, value in given.items():
        rule = props.get(key)
        if rule is None:
            known = ", ".join(props) or "none"
            raise ToolError(
                "invalid_params", f"unknown argument `{key}` (known: {known})", path=f"$.{key}"
            )
        _check_value(value, rule, f"$.{key}")
    return given


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


def _check_value(value: Any, rule: Mapping[str, Any], path: str) -> None:
    kinds = rule["type"] if isinstance(rule["type"], list) else [rule["type"]]
    ok = any(
        isinstance(value, _JSON_TYPES[k]) and not (k != "boolean" and isinstance(value, bool))
        for k in kinds
    )
    if not ok:
        want = " or ".join(kinds)
        raise ToolError("invalid_params", f"{path} must be {want}", path=path)
    if "enum" in rule and value not in rule["enum"]:
        allowed = ", ".join(map(str, rule["enum"]))
        raise ToolError("invalid_params", f"{path} must be one of {allowed}", path=path)
    if "minimum" in rule and value < rule["minimum"]:
        raise ToolError("invalid_params", f"{path} must be >= {rule['minimum']}", path=path)
    if "maximum" in rule and value > rule["maximum"]:
        raise ToolError("invalid_params", f"{path} must be <= {rule['maximum']}", path=path)
    if isinstance(value, list) and "items" in rule:
        for i, item in enumerate(value):
            _check_value(item, rule["items"], f"{path}[{i}]")


_N = _p("integer", minimum=1, maximum=100)
TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool(
            "bus_send",
            "Publish a message. type-specific fields (status, results, assigned_to, priority, "
            "inputs) go in `fields`. Returns message_id, duplicate, via (socket|file).",
            {
                "to": _p(["string", "array"], "agent id, topic:<name>, or a list of ids"),
                "body": _STR,
                "type": _p("string", enum=list(_ALL_TYPES)),
                "workflow_id": _STR,
                "task_id": _STR,
                "idempotency_key": _STR,
                "parents": _IDS,
                "fields": _OBJ,
                "metadata": _OBJ,
            },
            handlers.send,
            ("to", "body"),
        ),
        Tool(
            "bus_reply",
            "Reply to a message's sender: same workflow and task, parents=[message_id].",
            {
                "message_id": _STR,
                "body": _STR,
                "type": _p("string", enum=list(_ALL_TYPES)),
                "fields": _OBJ,
            },
            handlers.reply,
            ("message_id", "body"),
        ),
        Tool(
            "bus_fetch",
            "Claim waiting messages (long poll up to wait_s). Each has a receipt: settle it "
            "with bus_ack, bus_nack, bus_extend or bus_reject before lease_expires_at.",
            {
                "max": _N,
                "wait_s": _p("number", minimum=0, maximum=60),
                "include_body": _p("boolean"),
            },
            handlers.fetch,
        ),
        Tool(
            "bus_peek",
            "What is waiting, without claiming: counts and summaries, no bodies.",
            {"limit": _N},
            handlers.peek,
            read_only=True,
        ),
        Tool(
            "bus_ack",
            "Settle fetched messages as done. Reports what was acked and what was not held.",
            {"receipts": _IDS, "message_ids": _IDS},
            handlers.ack,
        ),
        Tool(
            "bus_nack",
            "Give a fetched message back for redelivery, now or after delay_s.",
            {**_NAMED, "delay_s": _p("number", minimum=0), "reason": _STR},
            handlers.nack,
        ),
        Tool(
            "bus_extend",
            "Keep a claim while a long task runs: its lease ends lease_s from now.",
            {**_NAMED, "lease_s": _p("number", minimum=1, maximum=86400)},
            handlers.extend,
            ("lease_s",),
        ),
        Tool(
            "bus_reject",
            "Refuse a fetched message for good: dead-lettered with reason rejected.",
            {**_NAMED, "reason": _STR},
            handlers.reject,
            ("reason",),
        ),
        Tool(
            "bus_status",
            "This agent's queue and the bus's health.",
            {},
            handlers.status,
            read_only=True,
        ),
        Tool(
            "bus_thread",
            "The messages of one workflow (and task) from the journal, oldest first.",
            {"workflow_id": _STR, "task_id": _STR, "limit": _p("integer", minimum=1)},
            handlers.thread,
            ("workflow_id",),
            read_only=True,
        ),
        Tool(
            "bus_dlq_list",
            "Operator: dead-letter entries (newest limit), by reason and agent.",
            {"reason": _STR, "agent_id": _STR, "limit": _p("integer", minimum=1)},
            handlers.dlq_list,
            ops=True,
            agent=False,
            read_only=True,
        ),
        Tool(
            "bus_dlq_show",
            "Operator: one dead-letter entry, its record and its bytes.",
            {"name": _STR},
            handlers.dlq_show,
            ("name",),
            ops=True,
            agent=False,
            read_only=True,
        ),
        Tool(
            "bus_replay",
            "Operator: validate dead-letter entries again and hand them back to the bus.",
            {"names": _IDS, "to": _STR, "dry_run": _p("boolean")},
            handlers.replay,
            ("names",),
            ops=True,
            agent=False,
        ),
        Tool(
            "bus_tail",
            "Operator: the last journal records.",
            {"limit": _N},
            handlers.tail,
            ops=True,
            agent=False,
            read_only=True,
        ),
    )
}


def listed(*, ops: bool) -> list[Tool]:
    """The tools ``tools/list`` shows: the agent tools, and the operator ones with ``ops``."""
    return [t for t in TOOLS.values() if ops or not t.ops]
