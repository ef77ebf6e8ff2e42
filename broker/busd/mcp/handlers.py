"""What each MCP tool does: one coroutine per tool, each a thin call into busclient.

Each takes the :class:`~busd.mcp.bus.Bus`, the agent it acts as and its checked
arguments (:func:`busd.mcp.tools.check_args`), and returns the tool's structured
content or raises :class:`~busd.mcp.bus.ToolError`.
"""

from __future__ import annotations

import collections
from typing import Any

import anyio
import msgspec

from busd.errors import BusdError
from busd.mcp.bus import CORE_FIELDS, Args, Bus, Result, ToolError, error_of, message_item

__all__ = [
    "ack",
    "dlq_list",
    "dlq_show",
    "extend",
    "fetch",
    "nack",
    "peek",
    "reject",
    "replay",
    "reply",
    "send",
    "status",
    "tail",
    "thread",
]

# What `fields` of bus_send / bus_reply may not set: the tool's own parameters.
_RESERVED = CORE_FIELDS | {"to", "idempotency_key", "parents", "metadata"}


def _compose(agent: str, args: Args, *, to: Any, mtype: str) -> Result:
    fields = args.get("fields") or {}
    clash = sorted(set(fields) & _RESERVED)
    if clash:
        raise ToolError(
            "invalid_params",
            f"fields may hold type-specific fields only; pass {clash[0]} as its own argument",
            path=f"$.fields.{clash[0]}",
        )
    workflow = args.get("workflow_id") or "default"
    msg: Result = {
        "schema_version": "1.0",
        "message_type": mtype,
        "workflow_id": workflow,
        "task_id": args.get("task_id") or workflow,
        "agent_id": agent,
        "to": to,
    }
    if args.get("body"):
        msg["body"] = args["body"]
    for key in ("idempotency_key", "parents", "metadata"):
        if key in args:
            msg[key] = args[key]
    msg.update(fields)
    return msg


async def _publish(bus: Bus, msg: Result) -> Result:
    sent = await bus.call(lambda c: c.send(msg))
    if sent.via == "file":
        await bus.route()  # as `busd send` does without a daemon
    return {"message_id": sent.message_id, "duplicate": sent.duplicate, "via": sent.via}


async def send(bus: Bus, agent: str, args: Args) -> Result:
    msg = _compose(agent, args, to=args["to"], mtype=args.get("type", "fact"))
    return await _publish(bus, msg)


async def reply(bus: Bus, agent: str, args: Args) -> Result:
    mid = args["message_id"]
    original = await bus.call(lambda c: c.message(mid))
    if original is None:
        raise ToolError(
            "not_found",
            f"message {mid} is not in the journal (not routed yet, or retention removed it): "
            "use bus_send with `to` instead.",
        )
    base = {
        "workflow_id": original.get("workflow_id"),
        "task_id": original.get("task_id"),
        "parents": [mid],
        **args,
    }
    base.pop("message_id")
    msg = _compose(agent, base, to=original.get("agent_id"), mtype=args.get("type", "fact"))
    return await _publish(bus, msg)


async def fetch(bus: Bus, agent: str, args: Args) -> Result:
    n, wait_s, body = args.get("max", 10), args.get("wait_s", 0), args.get("include_body", True)
    if await bus.offline():
        # Route while polling: without a daemon nobody else moves outboxes into inboxes.
        deadline = anyio.current_time() + wait_s
        while True:
            await bus.route()
            got = await bus.call(lambda c: c.fetch(agent, max=n, wait_s=0))
            if got or anyio.current_time() >= deadline:
                break
            await anyio.sleep(min(0.25, max(0.0, deadline - anyio.current_time())))
    else:
        got = await bus.call(lambda c: c.fetch(agent, max=n, wait_s=wait_s))
    bus.on_fetch(agent)  # only now: a cue sent while it fetched stays the pending one
    items = [
        message_item(
            d.message,
            receipt=d.receipt,
            delivery_count=d.delivery_count,
            lease_expires_at=d.lease_expires_at.isoformat().replace("+00:00", "Z"),
            include_body=body,
        )
        for d in got
    ]
    via = got[0].via if got else None
    return {"messages": items, "count": len(items), **({"via": via} if via else {})}


async def peek(bus: Bus, agent: str, args: Args) -> Result:
    limit = args.get("limit", 10)
    await bus.route()
    waiting = await bus.call(lambda c: c.peek(agent, limit))
    status = await bus.status()
    queue = status.get("agents", {}).get(agent) or {}
    ready = max(int(queue.get("ready", 0)), len(waiting))
    out: Result = {"ready": ready, "in_flight": int(queue.get("in_flight", 0))}
    out["waiting"] = waiting
    if ready > len(waiting):
        out["not_listed"] = ready - len(waiting)
    return out


async def ack(bus: Bus, agent: str, args: Args) -> Result:
    receipts, ids = args.get("receipts", []), args.get("message_ids", [])
    if not receipts and not ids:
        raise ToolError("invalid_params", "give receipts or message_ids", path="$.receipts")
    n, not_held = await bus.call(lambda c: c.settle(agent, ids, receipts=receipts))
    missing = set(not_held)
    acked = [x for x in [*receipts, *ids] if x not in missing]
    return {"acked": n, "settled": acked, "not_held": not_held}


def _named(args: Args) -> tuple[str | None, str | None]:
    receipt, mid = args.get("receipt"), args.get("message_id")
    if (receipt is None) == (mid is None):
        raise ToolError("invalid_params", "give exactly one of receipt and message_id", path="$")
    return mid, receipt


async def nack(bus: Bus, agent: str, args: Args) -> Result:
    mid, receipt = _named(args)
    delay = float(args.get("delay_s", 0))
    await bus.call(lambda c: c.nack(agent, mid, receipt=receipt, delay_s=delay))
    return {"released": receipt or mid, "delay_s": delay, "reason": args.get("reason")}


async def extend(bus: Bus, agent: str, args: Args) -> Result:
    mid, receipt = _named(args)
    lease = float(args["lease_s"])
    until = await bus.call(lambda c: c.extend(agent, mid, lease, receipt=receipt))
    return {"lease_expires_at": until.isoformat().replace("+00:00", "Z")}


async def reject(bus: Bus, agent: str, args: Args) -> Result:
    mid, receipt = _named(args)
    reason = args["reason"]
    name = await bus.call(lambda c: c.reject(agent, mid, receipt=receipt, reason=reason))
    return {"rejected": receipt or mid, "dlq_entry": name, "reason": "rejected"}


async def status(bus: Bus, agent: str, args: Args) -> Result:
    full = await bus.status()
    keys = ("daemon", "outbox", "dlq", "journal", "totals", "healthy", "attention")
    out: Result = {"agent": agent, "queue": full.get("agents", {}).get(agent)}
    out.update({k: full[k] for k in keys if k in full})
    return out


async def thread(bus: Bus, agent: str, args: Args) -> Result:
    wf, task, limit = args["workflow_id"], args.get("task_id"), args.get("limit", 50)
    found, more = await bus.call(lambda c: c.thread(wf, task, limit))
    items = [message_item(m) for m in found]
    return {"workflow_id": wf, "messages": items, "truncated": more}


async def dlq_list(bus: Bus, agent: str, args: Args) -> Result:
    from busd.store import dlq

    layout = bus.config.layout
    entries = await anyio.to_thread.run_sync(
        lambda: dlq.list_entries(layout, reason=args.get("reason"), agent=args.get("agent_id"))
    )
    rows = [{"name": e.name, **msgspec.to_builtins(e.record)} for e in entries]
    for row in rows:
        row.pop("history", None)
    return {"entries": rows[-args.get("limit", 50) :], "total": len(rows)}


async def dlq_show(bus: Bus, agent: str, args: Args) -> Result:
    from busd.store import dlq

    try:
        entry = await anyio.to_thread.run_sync(dlq.load, bus.config.layout, args["name"])
        data = await anyio.to_thread.run_sync(entry.data)
    except BusdError as exc:
        raise error_of(exc) from None
    record = msgspec.to_builtins(entry.record)
    return {"name": entry.name, "record": record, "data": data.decode("utf-8", "replace")}


async def replay(bus: Bus, agent: str, args: Args) -> Result:
    names = args.get("names") or []
    if not names:
        raise ToolError("invalid_params", "name the entries to replay", path="$.names")
    options = {k: args[k] for k in ("to", "dry_run") if k in args}
    try:
        done = await bus.call(lambda c: c.replay(names, **options), fallback=False)
    except ToolError as exc:
        if exc.code != "daemon_not_running":
            raise
        from busd.routing.replay import replay

        def files() -> list[Any]:
            return [
                msgspec.to_builtins(replay(bus.config, n, **options), enc_hook=str) for n in names
            ]

        try:
            done = await anyio.to_thread.run_sync(files)
        except BusdError as exc2:
            raise error_of(exc2) from None
    return {"replayed": done}


async def tail(bus: Bus, agent: str, args: Args) -> Result:
    from busd.store.journal import Journal

    limit = args.get("limit", 20)

    def read() -> list[Any]:
        last: collections.deque[Any] = collections.deque(maxlen=limit)
        with Journal(bus.config.layout.journal) as journal:
            for entry in journal.read():
                last.append(entry)
        return [_short(msgspec.to_builtins(e)) for e in last]

    return {"entries": await anyio.to_thread.run_sync(read)}


def _short(entry: Result) -> Result:
    msg = entry.pop("message", None)
    if isinstance(msg, dict):
        entry["type"] = msg.get("message_type")
    return entry
