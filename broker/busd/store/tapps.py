"""Inbox files for Tapps consumers (``compat = "tapps"``): names and payloads.

Tapps' FileMessageBus parses an inbox file with pydantic models that forbid unknown
fields (at the top level and inside ``inputs``, ``retry_policy`` and ``results``) and
know three types only. So in tapps mode a delivery is written:

* for ``task_assignment``, ``status_update`` and ``task_complete``: under the Tapps
  form of the delivery name (``<arrival>-<n>_<id>_<type>.json``, which Tapps' ack and
  fail globs find) holding :func:`to_tapps` of the message: Tapps' fields only. Every
  field Tapps has no place for (``to``, ``parents``, ``body``, ``project_id``,
  ``run_id``, ``attachment_path``, and a nested value or number its model would
  refuse) moves, as it was, into ``metadata["busd"] = {"fields": {...}}``
  (``"metadata"`` there keeps a ``busd`` key the producer itself had put in
  ``metadata``; ``"no_metadata": true`` when it had none). :func:`from_tapps`
  restores the message exactly, and busd's consumer applies it to every claim;
* for busd's five other types: under the native form ``<arrival>-<n>-<id>.busd``,
  as busd's own JSON: Tapps' ``*.json`` glob never picks it up (it would quarantine
  it), busd's consumers claim it like any delivery.

The arrival key and count are in the name as in busd's form. Pure except
:func:`deliver_tapps`, which writes like :func:`busd.store.mailbox.deliver`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import msgspec

from busd.core.codec import decode, encode_json, to_builtins
from busd.core.model import Message
from busd.store.fsio import rename_noreplace, write_durable
from busd.store.layout import TAPPS_TYPES, Layout, tapps_delivery_name
from busd.store.mailbox import arrival_clock, ensure_agent_dirs

__all__ = [
    "BUSD_KEY",
    "deliver_tapps",
    "from_tapps",
    "place_in_inbox",
    "tapps_payload",
    "to_tapps",
]

BUSD_KEY = "busd"
"""The ``metadata`` key that keeps what Tapps' models have no field for."""

_BASE = frozenset(
    {
        "schema_version",
        "message_type",
        "workflow_id",
        "task_id",
        "agent_id",
        "message_id",
        "created_at",
        "idempotency_key",
        "metadata",
    }
)
_FIELDS = {
    "task_assignment": _BASE
    | {"assigned_to", "priority", "inputs", "timeout_seconds", "retry_policy"},
    "status_update": _BASE | {"status", "progress_percent", "current_step"},
    "task_complete": _BASE | {"status", "results"},
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _shape(value: Any, rules: dict[str, Any]) -> bool:
    """Whether ``value`` is an object whose keys all have a rule their value passes."""
    return isinstance(value, dict) and all(k in rules and rules[k](v) for k, v in value.items())


_INPUTS = {
    "files": _str_list,
    "config": _is_dict,
    "options": _is_dict,
    "parameters": _is_dict,
    "environment": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
}
_RETRY = {
    "max_retries": lambda v: _is_int(v) and v >= 0,
    "backoff_seconds": lambda v: _is_int(v) and v >= 0,
    "backoff_multiplier": lambda v: (
        isinstance(v, int | float) and not isinstance(v, bool) and v > 0
    ),
    "max_backoff_seconds": lambda v: v is None or (_is_int(v) and v >= 0),
}
_RESULTS = {
    "output_files": _str_list,
    "artifacts": _str_list,
    "errors": _str_list,
    "warnings": _str_list,
    "output": _is_dict,
    "metrics": lambda v: (
        isinstance(v, dict)
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v.values())
    ),
}
_CHECKS: dict[str, Any] = {
    "inputs": lambda v: _shape(v, _INPUTS),
    "retry_policy": lambda v: _shape(v, _RETRY),
    "results": lambda v: _shape(v, _RESULTS),
    "timeout_seconds": _is_int,
    "progress_percent": _is_int,
}


def to_tapps(message: Message) -> bytes:
    """``message`` as JSON Tapps' model for its type accepts (module docstring).

    Only for :data:`~busd.store.layout.TAPPS_TYPES`; ``ValueError`` otherwise.
    """
    data = to_builtins(message)
    kind = data["message_type"]
    if kind not in TAPPS_TYPES:
        raise ValueError(f"Tapps has no model for {kind!r}")
    allowed = _FIELDS[kind]
    out: dict[str, Any] = {}
    moved: dict[str, Any] = {}
    for key, value in data.items():
        check = _CHECKS.get(key)
        if key == "metadata":
            continue
        if key in allowed and (check is None or check(value)):
            out[key] = value
        else:
            moved[key] = value
    metadata = data.get("metadata")
    own = dict(metadata) if isinstance(metadata, dict) else {}
    block: dict[str, Any] = {}
    if BUSD_KEY in own:
        block["metadata"] = own.pop(BUSD_KEY)
    if moved:
        block["fields"] = moved
    if block:
        if metadata is None:
            block["no_metadata"] = True
        own[BUSD_KEY] = block
    if own or metadata is not None:
        out["metadata"] = own
    return msgspec.json.encode(out)


def from_tapps(message: Message) -> Message:
    """The message :func:`to_tapps` was made from (unchanged if it holds no busd block)."""
    metadata = message.metadata
    block = metadata.get(BUSD_KEY) if metadata else None
    if not isinstance(block, dict) or not set(block) <= {"fields", "metadata", "no_metadata"}:
        return message
    data = to_builtins(message)
    own = dict(data.get("metadata") or {})
    del own[BUSD_KEY]
    if "metadata" in block:
        own[BUSD_KEY] = block["metadata"]
    fields = block.get("fields")
    if isinstance(fields, dict):
        data.update(fields)
    if block.get("no_metadata") and not own:
        data.pop("metadata", None)
    else:
        data["metadata"] = own
    return decode(msgspec.json.encode(data))


def _kind(message: Message) -> str:
    kind = message.__struct_config__.tag
    assert isinstance(kind, str)
    return kind


def tapps_payload(message: Message, body: bytes | None = None) -> bytes:
    """The bytes tapps mode delivers for ``message``: :func:`to_tapps` for Tapps' three
    types, else busd's JSON (``body``, the accepted bytes, when given)."""
    if _kind(message) in TAPPS_TYPES:
        return to_tapps(message)
    return encode_json(message) if body is None else body


def deliver_tapps(
    layout: Layout,
    agent: str,
    message: Message,
    *,
    deliveries: int = 0,
    arrival: str | None = None,
    fsync: bool = False,
    data: bytes | None = None,
) -> Path:
    """Place ``message`` in ``inbox/<agent>/`` as tapps mode delivers it (module docstring).

    Like :func:`busd.store.mailbox.deliver`: atomic, never replacing, synced only with
    ``fsync``. ``data``: :func:`tapps_payload` of ``message``, when the caller has it.
    """
    ensure_agent_dirs(layout, agent)
    directory = layout.inbox_dir(agent)
    kind = _kind(message)
    if data is None:
        data = tapps_payload(message)
    while True:
        key = arrival or arrival_clock.next()
        name = tapps_delivery_name(key, deliveries, message.message_id, kind)
        try:
            return write_durable(directory, name, data, tmp_dir=layout.tmp, fsync=fsync)
        except FileExistsError:
            arrival = None


def place_in_inbox(
    layout: Layout, path: Path, message: Message, body: bytes, arrival: str
) -> Path | None:
    """Give a file a producer wrote straight into an inbox its tapps-mode delivery name.

    The bytes stay when they already are the Tapps payload's fields (Tapps' own files);
    otherwise the payload is written under the new name and the source removed (a redo
    after a crash in between finds the delivery and only removes the source). ``None``:
    a daemon-less consumer claimed it first (it is journaled, that is all).
    """
    data = tapps_payload(message, body)
    if data != body and not _fits(body, data):
        agent = path.parent.name
        written = deliver_tapps(layout, agent, message, arrival=arrival, data=data)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return written
    target = path.parent / tapps_delivery_name(arrival, 0, message.message_id, _kind(message))
    try:
        rename_noreplace(path, target)
    except FileNotFoundError:
        return None
    return target


def _fits(body: bytes, payload: bytes) -> bool:
    """Whether a producer's own bytes can stay as they are for a Tapps consumer: JSON with
    exactly the fields of the Tapps payload (busd's own JSON for a ``.busd`` name)."""
    try:
        return bool(msgspec.json.decode(body) == msgspec.json.decode(payload))
    except msgspec.DecodeError:
        return False
