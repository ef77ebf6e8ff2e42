"""A test-side Tapps FileMessageBus: its file moves, written from their description.

Not Tapps' code: the same names, payload shape and moves (producer writes tmp/ then
``os.replace``; poll renames into ``locks/<agent>/`` without touching the mtime; ack
appends the bare id and unlinks ``*_{id}_{type}.json``; fail and bad files go to
``dlq/<stem>.<hex>.json`` + ``.reason.txt``; replay_dlq moves every ``dlq/*.json``).
Every path it creates is recorded in ``written``.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

__all__ = ["TappsBus", "tapps_message", "validate"]

TYPES = ("task_assignment", "status_update", "task_complete")
_BASE = {
    "schema_version", "message_type", "workflow_id", "task_id", "agent_id",
    "message_id", "created_at", "idempotency_key", "metadata",
}  # fmt: skip
_FIELDS = {
    "task_assignment": _BASE
    | {"assigned_to", "priority", "inputs", "timeout_seconds", "retry_policy"},
    "status_update": _BASE | {"status", "progress_percent", "current_step"},
    "task_complete": _BASE | {"status", "results"},
}
_NESTED = {
    "inputs": {"files", "config", "options", "environment", "parameters"},
    "retry_policy": {"max_retries", "backoff_seconds", "backoff_multiplier", "max_backoff_seconds"},
    "results": {"output_files", "metrics", "artifacts", "errors", "warnings", "output"},
}
_REQUIRED = {"workflow_id", "task_id", "agent_id"}


def validate(data: Any) -> None:
    """Tapps' models' rules that matter here (extra="forbid", three types, ints stay
    ints); ValueError as pydantic's ValidationError would be."""
    if not isinstance(data, dict) or data.get("message_type") not in TYPES:
        raise ValueError(f"Unknown message_type: {data.get('message_type')!r}")
    extra = set(data) - _FIELDS[data["message_type"]]
    if extra or not set(data) >= _REQUIRED:
        raise ValueError(f"extra or missing fields: {sorted(extra)}")
    for key, allowed in _NESTED.items():
        value = data.get(key)
        if value is not None and (not isinstance(value, dict) or set(value) - allowed):
            raise ValueError(f"{key}: extra fields")
    for key in ("timeout_seconds", "progress_percent"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{key}: not an int")
    if data.get("metadata") is not None and not isinstance(data["metadata"], dict):
        raise ValueError("metadata: not an object")


def tapps_message(message_id: str, message_type: str = "task_assignment") -> dict[str, Any]:
    """What pydantic's ``model_dump(mode="json")`` gives for one of Tapps' models."""
    base: dict[str, Any] = {
        "schema_version": "1.0",
        "message_type": message_type,
        "workflow_id": "wf-1",
        "task_id": "t-1",
        "agent_id": "Builder Agent",
        "message_id": message_id,
        "created_at": "2026-03-01T09:00:00.123000Z",
        "idempotency_key": None,
        "metadata": {},
    }
    if message_type == "task_assignment":
        base |= {
            "assigned_to": "builder",
            "priority": "medium",
            "inputs": {
                "files": [],
                "config": {},
                "options": {},
                "environment": {},
                "parameters": {},
            },
            "timeout_seconds": 900,
            "retry_policy": {
                "max_retries": 0,
                "backoff_seconds": 60,
                "backoff_multiplier": 2.0,
                "max_backoff_seconds": None,
            },
        }
    elif message_type == "status_update":
        base |= {"status": "in_progress", "progress_percent": 40, "current_step": None}
    else:
        base |= {
            "status": "completed",
            "results": {
                "output_files": [],
                "metrics": {},
                "artifacts": [],
                "errors": [],
                "warnings": [],
                "output": {},
            },
        }
    return base


class TappsBus:
    """Tapps' moves on ``root`` (a ``.tapps-agents/messages`` directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.written: set[Path] = set()
        for d in ("inbox", "outbox", "dlq", "locks", "processed", "tmp"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self._processed: dict[str, set[str]] = {}

    def _name(self, msg: dict[str, Any]) -> str:
        return f"20260301T090000_123Z_{msg['message_id']}_{msg['message_type']}.json"

    def _write(self, target: Path, msg: dict[str, Any]) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "tmp" / f"{target.name}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(msg, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, target)
        self.written.add(target)
        return target

    def send_to_outbox(self, agent: str, msg: dict[str, Any]) -> Path:
        return self._write(self.root / "outbox" / agent / self._name(msg), msg)

    def send_to_inbox(self, agent: str, msg: dict[str, Any]) -> Path:
        return self._write(self.root / "inbox" / agent / self._name(msg), msg)

    def _is_processed(self, agent: str, mid: str) -> bool:
        idx = self.root / "processed" / f"{agent}.jsonl"
        lines = idx.read_text(encoding="utf-8").splitlines() if idx.exists() else []
        return mid in {line.strip() for line in lines if line.strip()}

    def quarantine(self, src: Path, reason: str) -> Path | None:
        dst = self.root / "dlq" / f"{src.stem}.{uuid.uuid4().hex}.json"
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            return None
        reason_path = dst.with_suffix(".reason.txt")
        reason_path.write_text(reason + "\n", encoding="utf-8")
        self.written |= {dst, reason_path}
        return dst

    def poll_inbox(self, agent: str, max_messages: int = 10) -> list[dict[str, Any]]:
        inbox = self.root / "inbox" / agent
        locks = self.root / "locks" / agent
        inbox.mkdir(parents=True, exist_ok=True)
        locks.mkdir(parents=True, exist_ok=True)
        out: list[dict[str, Any]] = []
        for f in sorted(inbox.glob("*.json")):
            if len(out) >= max_messages:
                break
            claimed = locks / f.name
            try:
                os.replace(f, claimed)
            except OSError:
                continue
            try:
                data = json.loads(claimed.read_text(encoding="utf-8"))
                validate(data)
            except (ValueError, OSError) as exc:
                self.quarantine(claimed, f"Schema validation failed: {exc}")
                continue
            if self._is_processed(agent, data["message_id"]):
                claimed.unlink(missing_ok=True)
                continue
            out.append(data)
        return out

    def ack(self, agent: str, msg: dict[str, Any]) -> None:
        idx = self.root / "processed" / f"{agent}.jsonl"
        with idx.open("a", encoding="utf-8") as f:
            f.write(msg["message_id"] + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.written.add(idx)
        for p in (self.root / "locks" / agent).glob(
            f"*_{msg['message_id']}_{msg['message_type']}.json"
        ):
            p.unlink(missing_ok=True)

    def fail(self, agent: str, msg: dict[str, Any], reason: str) -> None:
        for p in (self.root / "locks" / agent).glob(
            f"*_{msg['message_id']}_{msg['message_type']}.json"
        ):
            self.quarantine(p, reason)

    def replay_dlq(self, agent: str) -> list[Path]:
        inbox = self.root / "inbox" / agent
        inbox.mkdir(parents=True, exist_ok=True)
        moved = []
        for f in sorted((self.root / "dlq").glob("*.json")):
            dst = inbox / f.name
            os.replace(f, dst)
            moved.append(f)
        return moved
