"""busclient: the Python client of busd. Standard library only: vendor this one file.

It speaks JSON-RPC 2.0 over busd's Unix socket. When no daemon answers it follows the
file protocol itself (docs/protocol.md, sections 5 and 6), so an agent keeps working
while the daemon is down::

    from busclient import Client

    with Client() as bus:                       # finds the bus as the `busd` CLI does
        r = bus.send({"schema_version": "1.0", "message_type": "fact",
                      "workflow_id": "w1", "task_id": "t1", "agent_id": "alice",
                      "to": "bob", "body": "hello"})
        print(r.message_id, r.via)              # "socket", or "file" without a daemon
        for d in bus.fetch("bob", max=10, wait_s=5):
            with bus.processing(d) as fresh:    # skips processed messages, acks on success
                if fresh:
                    print(d.message["body"])

Contracts:

* Discovery. The root is the ``root`` argument, else ``BUSD_ROOT``, else ``root`` in
  the file named by ``BUSD_CONFIG``, else the nearest ``.busd/`` in the current
  directory or a parent, else ``./.busd``. The socket is the ``socket_path`` argument,
  else ``BUSD_SOCKET_PATH``, else ``<root>/busd.sock``, else the path written in
  ``<root>/busd.sock.path``.
* Reconnection. Every call tries the daemon first (a stale kept-alive connection is
  re-opened once). If the daemon cannot be reached, the call falls back to the files,
  and the next call tries the daemon again. Delivery is at-least-once. A lost answer
  can leave a publish done or a claim taken. Retrying is safe: the ``message_id``
  turns a repeated publish into a duplicate, and lost claims come back when their
  lease expires.
* File fallback. ``send`` validates with :func:`validate_message` (the 1.0 contract)
  and writes durably into ``outbox/<sender>/``. The message is routed when a daemon
  starts or any ``busd send``/``busd recv`` runs. ``fetch``, ``ack``, ``nack`` and
  ``extend`` claim and settle in ``inbox/``, ``locks/`` and ``processed/`` the way
  busd's consumer does, lease sweep included. Some files cannot be handled
  faithfully without third-party libraries, so the fallback leaves them to busd:
  foreign (non-delivery) names, Markdown front matter, undecodable or non-regular
  files, and messages already delivered ``max_deliveries`` times (claimed with an
  expired lease, so busd's sweep dead-letters them).
* Receipts. Every delivery carries ``receipt``, naming that one delivery (from the
  daemon, or the claim file's name without ``.json`` in the file fallback).
  ``Delivery.ack``/``nack``/``extend`` settle by receipt, so the receipt of a claim
  whose lease expired and that was handed out again raises :class:`StaleReceipt`
  and never settles the newer claim. ``Client.ack``/``nack``/``extend`` also take
  message ids, meaning "the current claim" (protocol.md 6.8 and 11).
* ``reject`` dead-letters a claim (reason ``rejected``) through the daemon or, without
  one, as the file protocol says (protocol.md 6.2). ``peek`` asks the daemon (its
  memory queue and the inbox files); without one, or from a daemon too old to know
  ``peek``, it lists ``inbox/<agent>/`` itself. ``thread`` and ``message`` always read
  the journal, daemon or not.
* Errors are :class:`BusError` subclasses carrying the JSON-RPC ``code``, the stable
  ``reason`` and the answer's ``data``. :class:`Unavailable` means no daemon could be
  reached and the call has no fallback: ``fallback=False`` was given, or the method
  (``ping``, ``dlq_*``, ``replay``) needs the daemon.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import socket
import stat
import sys
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, NamedTuple, TypeVar

__all__ = [
    "AsyncClient",
    "AsyncDelivery",
    "AsyncSubscription",
    "BusError",
    "Client",
    "Delivery",
    "Forbidden",
    "InvalidMessage",
    "InvalidName",
    "InvalidRequest",
    "LockTimeout",
    "NotFound",
    "Overloaded",
    "SendResult",
    "ShuttingDown",
    "StaleReceipt",
    "StorageError",
    "Subscription",
    "Unavailable",
    "find_root",
    "find_socket",
    "new_message_id",
    "validate_message",
]

_T = TypeVar("_T")
_IS_WINDOWS = sys.platform == "win32"
_SEGMENT_RE = re.compile(r"[0-9]{12}\.ndjson\Z")
# busd's form (.json), its native form (.busd) and the Tapps form (protocol.md 2, compat).
_DELIVERY_RE = re.compile(
    r"([0-9]{20})-([0-9]{3})(?:-([A-Za-z0-9][A-Za-z0-9._-]{0,127})(\.json|\.busd)"
    r"|_([A-Za-z0-9][A-Za-z0-9._-]{0,127})_(task_assignment|status_update|task_complete)\.json)\Z"
)
_LINE_LIMIT = 1 << 30  # one answer holds up to `max` messages of max_message_bytes each
_LOCK_TIMEOUT_S = 10.0
_PEEK_MAX = 1000  # the most one `peek` call to the daemon may ask for
_Via = Literal["socket", "file"]


class _Delivery(NamedTuple):
    """A parsed delivery name: ``[1]`` arrival, ``[2]`` deliveries (3 digits), ``[3]`` id."""

    name: str
    arrival: str
    times: str
    mid: str
    kind: str | None  # the Tapps form's type; None for busd's two forms
    suffix: str

    def renamed(self, arrival: str, count: int, mid: str | None = None) -> str:
        """This name's form with another arrival, count (capped at 999) and maybe id."""
        mid = self.mid if mid is None else mid
        if self.kind is not None:
            return f"{arrival}-{min(count, 999):03d}_{mid}_{self.kind}.json"
        return f"{arrival}-{min(count, 999):03d}-{mid}{self.suffix}"


def _delivery(name: str) -> _Delivery | None:
    m = _DELIVERY_RE.match(name)
    if m is None:
        return None
    if m[3] is not None:
        return _Delivery(name, m[1], m[2], m[3], None, m[4])
    return _Delivery(name, m[1], m[2], m[5], m[6], ".json")


def _receipt(name: str) -> str:
    """A claim's receipt: its name without the suffix (busd.store.layout.receipt_of)."""
    return name.removesuffix(".busd") if name.endswith(".busd") else name.removesuffix(".json")


def _from_tapps(msg: dict[str, Any]) -> dict[str, Any]:
    """A Tapps-shaped delivery (compat = "tapps") back as the message busd accepted: what
    busd moved into ``metadata["busd"]`` returns to its place (busd.store.tapps)."""
    meta = msg.get("metadata")
    block = meta.get("busd") if isinstance(meta, dict) else None
    if not isinstance(block, dict) or not set(block) <= {"fields", "metadata", "no_metadata"}:
        return msg
    assert isinstance(meta, dict)
    own = {k: v for k, v in meta.items() if k != "busd"}
    if "metadata" in block:
        own["busd"] = block["metadata"]
    out = dict(msg)
    if isinstance(block.get("fields"), dict):
        out.update({k: v for k, v in block["fields"].items() if v is not None})
    if block.get("no_metadata") and not own:
        out.pop("metadata", None)
    else:
        out["metadata"] = own
    return out


# ---------------------------------------------------------------- errors


class BusError(Exception):
    """A refused call: ``code`` (JSON-RPC; None when raised locally), ``reason``, ``data``."""

    default_reason: ClassVar[str] = "busd_error"

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        reason: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.data: dict[str, Any] = dict(data or {})
        self.reason: str = reason or str(self.data.get("reason") or self.default_reason)


class InvalidMessage(BusError):
    """The message breaks the contract; ``reason`` is the DLQ reason (``schema``, ...)."""

    default_reason = "schema"

    @property
    def path(self) -> str | None:
        """The JSON path of the offending field (e.g. ``$.status``), when known."""
        path = self.data.get("path")
        return path if isinstance(path, str) else None

    @property
    def detail(self) -> str:
        """What is wrong, for humans."""
        return str(self.data.get("detail") or self.message)


class InvalidName(BusError):
    """An agent id or topic is not a valid name."""

    default_reason = "invalid_name"


class InvalidRequest(BusError):
    """The daemon refused the request itself (bad params, unknown method)."""

    default_reason = "invalid_request"


class NotFound(BusError):
    """No such claim (its lease expired?) or DLQ entry."""

    default_reason = "not_found"


class Overloaded(BusError):
    """The daemon is at a limit (connections); retry later."""

    default_reason = "overloaded"


class Forbidden(BusError):
    """This user may not use the daemon's socket."""

    default_reason = "forbidden"


class LockTimeout(BusError):
    """A ledger lock was not acquired within 10 s."""

    default_reason = "lock_timeout"


class StorageError(BusError):
    """The filesystem refused a write (disk full, read-only, permissions)."""

    default_reason = "storage_error"


class StaleReceipt(BusError):
    """The receipt names a delivery that is no longer current (its lease expired and the
    message was handed out again, or it was released): nothing was settled."""

    default_reason = "stale_receipt"

    @property
    def receipts(self) -> list[str]:
        """The stale receipts of the refused call."""
        return [str(r) for r in self.data.get("receipts") or ()]


class Unavailable(BusError):
    """No daemon could be reached, and the call has no file fallback."""

    default_reason = "unavailable"


class ShuttingDown(Unavailable):
    """The daemon is stopping and takes no new work (calls fall back to the files)."""

    default_reason = "shutting_down"


class _Lost(Unavailable):
    """The connection broke during a call (worth one retry on a fresh connection)."""


_ERRORS: dict[str, type[BusError]] = {
    "invalid_message": InvalidMessage,
    "invalid_name": InvalidName,
    "invalid_params": InvalidRequest,
    "not_found": NotFound,
    "overloaded": Overloaded,
    "forbidden": Forbidden,
    "lock_timeout": LockTimeout,
    "storage_error": StorageError,
    "shutting_down": ShuttingDown,
    "stale_receipt": StaleReceipt,
}


def _error_from(err: Any) -> BusError:
    """The exception for the ``error`` member of an answer (class by ``data.error``)."""
    if not isinstance(err, dict):
        return BusError(f"malformed error answer: {err!r:.200}")
    data: dict[str, Any] = err["data"] if isinstance(err.get("data"), dict) else {}
    code = err.get("code") if isinstance(err.get("code"), int) else None
    reason = str(data.get("reason") or "") or None
    cls = _ERRORS.get(str(data.get("error") or reason), BusError)
    if code == -32600 and reason == "too_large":
        cls = InvalidMessage  # the request line was over the daemon's limit
    elif code in (-32700, -32600, -32601):
        cls = InvalidRequest
    return cls(str(err.get("message") or "error"), code=code, reason=reason, data=data)


def _invalid(reason: str, detail: str, path: str | None = None) -> InvalidMessage:
    data = {"reason": reason, "detail": detail, "path": path}
    return InvalidMessage(f"{reason}: {detail}", reason=reason, data=data)


# ---------------------------------------------------------------- ids (as busd/ids.py)

_B36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _pid_field(pid: int) -> str:
    """Five characters, injective over Linux pids: decimal below 100000, else a letter + base 36."""
    if pid < 100_000:
        return f"{pid:05d}"
    lead, rest = divmod(pid - 100_000, 36**4)
    digits = []
    for _ in range(4):
        rest, d = divmod(rest, 36)
        digits.append(_B36[d])
    return chr(ord("A") + lead % 26) + "".join(reversed(digits))


class _IdGenerator:
    """``MSG-YYYYMMDD-HHMMSS-NNNNNNNNN-PIDppppp-SSSS``; (tick, counter) strictly increases."""

    def __init__(self, clock: Callable[[], int] = time.time_ns, pid: int | None = None) -> None:
        self._clock = clock
        self._fixed_pid = pid
        self._pid = _pid_field(os.getpid() if pid is None else pid)
        self._lock = threading.Lock()
        self._tick = 0
        self._counter = -1

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        if self._fixed_pid is None:
            self._pid = _pid_field(os.getpid())

    def next(self) -> str:
        with self._lock:
            now = self._clock()
            if now > self._tick:
                self._tick, self._counter = now, 0
            else:  # the clock stood still or stepped back: same tick, next counter
                self._counter += 1
                if self._counter >= 10_000:
                    self._tick, self._counter = self._tick + 1, 0
            tick, counter, pid = self._tick, self._counter, self._pid
        secs, frac = divmod(tick, 1_000_000_000)
        stamp = datetime.fromtimestamp(secs, UTC).strftime("%Y%m%d-%H%M%S")
        return f"MSG-{stamp}-{frac:09d}-PID{pid}-{counter:04d}"


class _ArrivalClock:
    """20-digit nanosecond keys for file names, strictly increasing in this process."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            return f"{self._last:020d}"


_ids = _IdGenerator()
_arrivals = _ArrivalClock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.after_fork)


def new_message_id() -> str:
    """A fresh id in busd's seed format, unique across live processes."""
    return _ids.next()


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------- discovery and settings


def _config_table(path: Path) -> dict[str, Any]:
    """The keys of a busd config file (top level or ``[busd]``); empty if unreadable."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return data["busd"] if isinstance(data.get("busd"), dict) else data


def find_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The bus root (absolute), found as the CLI finds it; see the module docstring."""
    if root is None and os.environ.get("BUSD_ROOT"):
        root = os.environ["BUSD_ROOT"]
    if root is None and os.environ.get("BUSD_CONFIG"):
        cfg = Path(os.environ["BUSD_CONFIG"])
        value = _config_table(cfg).get("root")
        if isinstance(value, str):
            root = cfg.absolute().parent / value
    if root is None:
        here = Path.cwd()
        root = next((d / ".busd" for d in (here, *here.parents) if (d / ".busd").is_dir()), None)
    return Path(root if root is not None else ".busd").absolute()


def find_socket(root: Path, explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """Where the daemon of ``root`` listens, or None when no socket is advertised."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("BUSD_SOCKET_PATH"):
        return Path(os.environ["BUSD_SOCKET_PATH"])
    if (root / "busd.sock").exists():
        return root / "busd.sock"
    try:
        written = (root / "busd.sock.path").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return Path(written) if written else None


@dataclass(frozen=True)
class _Settings:
    """What the file fallback needs: ``BUSD_<KEY>`` > config file > busd's default."""

    lease_seconds: float = 60.0
    max_deliveries: int = 5
    max_message_bytes: int = 1 << 20
    fsync: bool = True
    compat: str = "none"

    @classmethod
    def load(cls, root: Path) -> _Settings:
        cfg = os.environ.get("BUSD_CONFIG")
        values = _config_table(Path(cfg) if cfg else root / "busd.toml")
        kwargs: dict[str, Any] = {}
        for key, default in vars(cls()).items():
            raw = os.environ.get(f"BUSD_{key.upper()}", values.get(key))
            text = str(raw).lower()
            with suppress(TypeError, ValueError):  # busd refuses a bad value; keep the default
                if raw is None:
                    continue
                if isinstance(default, str):
                    kwargs[key] = str(raw)
                elif isinstance(default, bool):
                    if text in ("true", "1", "false", "0"):
                        kwargs[key] = text in ("true", "1")
                elif (number := type(default)(raw)) > 0:
                    kwargs[key] = number
        return cls(**kwargs)


# ---------------------------------------------------------------- validation (busd/model.py)

_MESSAGE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_AGENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\Z")
_VERSION_RE = re.compile(r"1\.[0-9]+\Z")
_OTHER_VERSION_RE = re.compile(r"([0-9]+)(?:\.[0-9]+)*\Z")
_DATETIME_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))\Z"
)
_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", *(f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10))]
)
_Check = Callable[[Any, str], None]


def _kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "bool", int: "int"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _invalid("schema", f"expected a string, got {_kind(value)}", path)
    return value


def _text(lo: int = 0, hi: int | None = None) -> _Check:
    def check(value: Any, path: str) -> None:
        n = len(_str(value, path))
        if n < lo or (hi is not None and n > hi):
            raise _invalid("schema", f"length must be {lo}..{hi or 'any'}, got {n}", path)

    return check


_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")


def _agent_text(value: Any, path: str) -> None:
    """agent_id: free text (schema 1.1), 1..256 characters, no control characters."""
    text = _str(value, path)
    if not 1 <= len(text) <= 256 or _CONTROL_RE.search(text):
        raise _invalid("schema", "agent_id must be 1..256 characters without controls", path)


def _name(value: Any, path: str) -> None:
    text = _str(value, path)
    if _AGENT_RE.match(text) is None:
        raise _invalid("schema", f"invalid agent name {text!r:.80}", path)
    if text.endswith(".") or text.split(".", 1)[0].upper() in _RESERVED:
        raise _invalid("schema", f"agent name {text!r} ends with '.' or is a device name", path)


def _message_id(value: Any, path: str) -> None:
    if _MESSAGE_ID_RE.match(_str(value, path)) is None:
        raise _invalid("schema", f"invalid message id {value!r:.80}", path)


def _recipients(value: Any, path: str) -> None:
    if isinstance(value, str):
        _name(value.removeprefix("topic:"), path)
    elif isinstance(value, list) and 1 <= len(value) <= 256:
        for i, item in enumerate(value):
            _name(item, f"{path}[{i}]")
    else:
        raise _invalid("schema", "expected an agent id, topic:<name> or 1..256 agent ids", path)


def _message_ids(value: Any, path: str) -> None:
    if not isinstance(value, list):
        raise _invalid("schema", f"expected an array, got {_kind(value)}", path)
    for i, item in enumerate(value):
        _message_id(item, f"{path}[{i}]")


def _datetime(value: Any, path: str) -> None:
    m = _DATETIME_RE.match(_str(value, path))
    try:
        if m is None:
            raise ValueError(value)
        y, mo, d, h, mi, s, frac, sign, oh, om = m.groups()
        if int(om or 0) > 59:
            raise ValueError(value)
        offset = timedelta(hours=int(oh or 0), minutes=int(om or 0))
        tz = timezone(-offset if sign == "-" else offset)
        when = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=tz)
        micros = round(int((frac or "0").ljust(9, "0")) / 1000)
        (when + timedelta(microseconds=micros)).astimezone(UTC)  # must fit once in UTC
    except (ValueError, OverflowError):
        detail = f"not an RFC 3339 date-time with an offset: {value!r:.40}"
        raise _invalid("schema", detail, path) from None


def _object(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        raise _invalid("schema", f"expected an object, got {_kind(value)}", path)
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:  # iterative, as in model.py: depth is refused before anything recurses
        node, depth = stack.pop()
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                if depth >= 64:
                    raise _invalid("schema", "nested deeper than 64 levels", path)
                stack.append((child, depth + 1))


def _number(lo: float, lo_inclusive: bool, hi: float | None = None) -> _Check:
    def check(value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid("schema", f"expected a number, got {_kind(value)}", path)
        try:
            x = float(value)
        except OverflowError:
            raise _invalid("schema", "number out of range", path) from None
        if x < lo or (x == lo and not lo_inclusive) or (hi is not None and x > hi):
            raise _invalid("schema", f"number {x} out of range", path)

    return check


def _enum(*allowed: str) -> _Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str) or value not in allowed:
            raise _invalid("schema", f"expected one of {', '.join(allowed)}", path)

    return check


def _attachment(value: Any, path: str) -> None:
    text = _str(value, path)
    if (
        not text
        or "\x00" in text
        or text.startswith(("/", "\\"))
        or re.match(r"[A-Za-z]:", text)
        or ".." in re.split(r"[/\\]", text)
    ):
        raise _invalid("schema", f"invalid attachment path {text!r:.80}", path)


_ENVELOPE: dict[str, tuple[bool, _Check]] = {  # field: (required, check)
    "message_id": (True, _message_id),
    "created_at": (True, _datetime),
    "workflow_id": (True, _text(1, 256)),
    "task_id": (True, _text(1, 256)),
    "agent_id": (True, _agent_text),
    "to": (False, _recipients),
    "idempotency_key": (False, _text(1, 256)),
    "parents": (False, _message_ids),
    "project_id": (False, _text()),
    "run_id": (False, _text()),
    "attachment_path": (False, _attachment),
    "body": (False, _text()),
    "metadata": (False, _object),
}
_TYPES: dict[str, dict[str, tuple[bool, _Check]]] = {
    "task_assignment": {
        "assigned_to": (False, _name),
        "priority": (False, _enum("low", "medium", "high")),
        "inputs": (False, _object),
        "timeout_seconds": (False, _number(0, False)),
        "retry_policy": (False, _object),
    },
    "status_update": {
        "status": (True, _enum("queued", "in_progress", "blocked", "failed", "completed")),
        "progress_percent": (False, _number(0, True, 100)),
        "current_step": (False, _text()),
    },
    "task_complete": {
        "status": (True, _enum("completed", "failed")),
        "results": (False, _object),
    },
    **{t: {} for t in ("fact", "progress", "decision", "review", "error")},
}


def _encode(obj: Any) -> bytes:
    """Compact UTF-8 JSON, or InvalidMessage (``invalid_json`` / ``invalid_utf8``)."""
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _invalid("invalid_utf8", f"not encodable as UTF-8: {exc.reason}") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise _invalid("invalid_json", f"not representable as JSON: {exc}") from None


def _check(obj: Any) -> None:
    if not isinstance(obj, dict):
        raise _invalid("schema", "expected a JSON object", "$")
    version, path = obj.get("schema_version"), "$.schema_version"
    if not isinstance(version, str):
        raise _invalid("schema", f"schema_version must be a string, got {_kind(version)}", path)
    if _VERSION_RE.match(version) is None:
        other = _OTHER_VERSION_RE.match(version)
        if other is not None and other.group(1) != "1":
            raise _invalid("unsupported_schema_version", f"unsupported {version!r:.40}", path)
        raise _invalid("schema", f"invalid schema_version {version!r:.40}", path)
    mtype = obj.get("message_type")
    extra = _TYPES.get(mtype) if isinstance(mtype, str) else None
    if extra is None:
        raise _invalid("schema", f"invalid message_type {mtype!r:.40}", "$.message_type")
    rules = {**_ENVELOPE, **extra}
    for key in obj:
        if key not in rules and key not in ("schema_version", "message_type"):
            raise _invalid("schema", f"unknown field `{key}`", f"$.{key}")
    for key, (required, check) in rules.items():
        if obj.get(key) is not None:  # null means absent
            check(obj[key], f"$.{key}")
        elif required:
            raise _invalid("schema", f"missing required field `{key}`", f"$.{key}")


def validate_message(message: Mapping[str, Any], *, max_bytes: int | None = None) -> bytes:
    """Validate ``message`` as busd would and return its compact JSON encoding.

    Raises :class:`InvalidMessage` (``reason``: the DLQ reason; ``path``: the field)
    for anything busd refuses. These are the 1.0 rules (protocol section 4): a field
    added by a later 1.x minor is refused here even where a newer daemon accepts it.
    The daemon stays the authority. ``max_bytes`` bounds the encoded size.
    """
    data = _encode(message)
    if max_bytes is not None and len(data) > max_bytes:
        raise _invalid("too_large", f"message is {len(data)} bytes; the limit is {max_bytes}")
    _check(json.loads(data))  # what busd will read: tuples are lists, keys are strings
    return data


def _agent(name: Any, what: str = "agent id") -> str:
    try:
        _name(name, what)
    except InvalidMessage:
        raise InvalidName(f"invalid {what} {name!r:.80}", data={"name": name}) from None
    return str(name)


def _filled(message: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``message`` with ``message_id`` and ``created_at`` filled when missing."""
    if not isinstance(message, Mapping):
        raise _invalid("schema", "expected a JSON object", "$")
    out = dict(message)
    if out.get("message_id") is None:
        out["message_id"] = new_message_id()
    if out.get("created_at") is None:
        out["created_at"] = _rfc3339(time.time())
    return out


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class SendResult:
    """What ``send`` did. ``via="socket"``: accepted and journaled (``duplicate`` if
    its id or idempotency key was seen before). ``via="file"``: written to ``path``
    in the outbox; busd routes it later."""

    message_id: str
    duplicate: bool = False
    via: _Via = "socket"
    path: Path | None = None


@dataclass(frozen=True)
class _DeliveryData:
    agent_id: str
    message: dict[str, Any]
    delivery_count: int
    lease_expires_at: datetime
    via: _Via
    receipt: str | None = field(default=None, kw_only=True)
    """Names this one delivery (None only from a daemon that predates receipts)."""

    @property
    def message_id(self) -> str:
        """The message's id (what old clients and the CLI settle by)."""
        return str(self.message["message_id"])

    def _names(self) -> dict[str, Any]:
        """How ``nack`` and ``extend`` name this delivery: its receipt, else its id."""
        if self.receipt is not None:
            return {"receipt": self.receipt}
        return {"message_id": self.message_id}

    @property
    def keys(self) -> list[str]:
        """The keys a processed message is known by in the ledger: id, idempotency key."""
        key = self.message.get("idempotency_key")
        return [self.message_id, *([key] if isinstance(key, str) else [])]


@dataclass(frozen=True)
class Delivery(_DeliveryData):
    """A claimed message. Settle it with :meth:`ack`, :meth:`nack` or :meth:`extend`."""

    client: Client = field(repr=False, compare=False)

    def ack(self) -> bool:
        """Record it as processed and drop the claim; False if no claim was left.

        Settles this delivery by its receipt: :class:`StaleReceipt` if its lease
        expired and the message was handed out again (the newer claim is kept).
        """
        if self.receipt is None:
            return self.client.ack(self.agent_id, [self.message_id]) == 1
        return self.client.ack(self.agent_id, receipts=[self.receipt]) == 1

    def nack(self, delay_s: float = 0.0) -> None:
        """Give it back now, or after ``delay_s``; NotFound if the claim is lost,
        :class:`StaleReceipt` if it was handed out again."""
        self.client.nack(self.agent_id, delay_s=delay_s, **self._names())

    def extend(self, lease_s: float) -> datetime:
        """Move the lease to ``lease_s`` from now; return the new expiry."""
        return self.client.extend(self.agent_id, lease_s=lease_s, **self._names())


@dataclass(frozen=True)
class AsyncDelivery(_DeliveryData):
    """:class:`Delivery` of an :class:`AsyncClient`; the methods are coroutines."""

    client: AsyncClient = field(repr=False, compare=False)

    async def ack(self) -> bool:
        """See :meth:`Delivery.ack`."""
        if self.receipt is None:
            return await self.client.ack(self.agent_id, [self.message_id]) == 1
        return await self.client.ack(self.agent_id, receipts=[self.receipt]) == 1

    async def nack(self, delay_s: float = 0.0) -> None:
        """See :meth:`Delivery.nack`."""
        await self.client.nack(self.agent_id, delay_s=delay_s, **self._names())

    async def extend(self, lease_s: float) -> datetime:
        """See :meth:`Delivery.extend`."""
        return await self.client.extend(self.agent_id, lease_s=lease_s, **self._names())


_Claimed = tuple[dict[str, Any], int, datetime, str | None]


def _claimed(item: Any) -> _Claimed:
    """(message, delivery_count, lease_expires_at, receipt) of a fetched or pushed item."""
    when = datetime.fromisoformat(str(item["lease_expires_at"]))
    receipt = item.get("receipt")
    receipt = receipt if isinstance(receipt, str) else None
    return dict(item["message"]), int(item["delivery_count"]), when, receipt


def _sent(result: Any) -> SendResult:
    return SendResult(str(result["message_id"]), bool(result.get("duplicate")), "socket")


def _claims_of(result: Any) -> list[_Claimed]:
    return [_claimed(item) for item in result["messages"]]


def _expiry_of(result: Any) -> datetime:
    return datetime.fromisoformat(str(result["lease_expires_at"]))


# ---------------------------------------------------------------- the file protocol


def _fsync_dir(path: Path) -> None:
    if not _IS_WINDOWS:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _move_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError if ``dst`` exists, never a replacement."""
    if _IS_WINDOWS:
        os.rename(src, dst)  # refuses to replace on Windows
    else:
        os.link(src, dst, follow_symlinks=False)
        os.unlink(src)


def _set_lease(path: Path, expiry: float) -> None:
    """The lease is the mtime (never following a symlink)."""
    nofollow = os.utime in os.supports_follow_symlinks
    os.utime(path, ns=(time.time_ns(), int(expiry * 1e9)), follow_symlinks=not nofollow)


@contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """The exclusive lock busd's portalocker takes: flock(2); Windows: bytes 0-65535."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    deadline = time.monotonic() + _LOCK_TIMEOUT_S
    try:
        while True:
            try:
                if sys.platform == "win32":
                    import msvcrt

                    os.lseek(fd, 0, os.SEEK_SET)
                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 65536)
                else:
                    import fcntl

                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{path.name} stayed locked for 10 s") from None
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class _Ledger:
    """``processed/<agent>.jsonl``, read incrementally as busd/ledger.py reads it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids: set[str] = set()  # acked message ids and acked idempotency keys are
        self._keys: set[str] = set()  # two key spaces: an id never matches a key
        self._offset = 0
        self._ino: int | None = None
        self._mutex = threading.Lock()

    def acked(self, message_id: str, key: str | None) -> bool:
        """Whether a message with this id (or this idempotency key) was acknowledged."""
        with self._mutex:
            self._refresh()
            return message_id in self._ids or (key is not None and key in self._keys)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            if st.st_ino != self._ino or st.st_size < self._offset:  # compacted: start over
                self._ids.clear()
                self._keys.clear()
                self._offset, self._ino = 0, st.st_ino
            if st.st_size == self._offset:
                return
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(st.st_size - self._offset)
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n")  # a last line without its newline is a write in progress
        self._offset += end + 1
        for line in chunk[: max(end, 0)].split(b"\n"):
            bare = line.strip()
            if bare and not bare.startswith(b"{"):  # a bare id: Tapps' ack line (6.4)
                with suppress(UnicodeDecodeError):
                    self._ids.add(bare.decode("utf-8"))
                continue
            with suppress(ValueError, LookupError, TypeError):  # not a record: skipped
                rec = json.loads(line)
                if isinstance(rec["message_id"], str) and isinstance(rec["acked_at"], str):
                    self._ids.add(rec["message_id"])
                    if isinstance(rec.get("idempotency_key"), str):
                        self._keys.add(rec["idempotency_key"])

    def append(self, records: list[dict[str, Any]], bare_ids: bool = False) -> None:
        """One write and one fsync under the exclusive lock; a torn last line is ended first.

        ``bare_ids`` (compat = "tapps"): each record is followed by its bare id, Tapps' line.
        """
        payload = b"".join(
            _encode(r) + b"\n" + (r["message_id"].encode() + b"\n" if bare_ids else b"")
            for r in records
        )
        with _flocked(self.path.parent / f".{self.path.stem}.lock"):
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.lseek(fd, size - 1, os.SEEK_SET) >= 0 and os.read(fd, 1) != b"\n":
                    payload = b"\n" + payload
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if size == 0:
                _fsync_dir(self.path.parent)


def _message_in(data: bytes) -> dict[str, Any] | None:
    """The JSON message in a delivery file (nulls dropped, as busd does), or None."""
    try:
        msg = json.loads(data.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except ValueError:  # front matter (needs YAML), or not a message at all
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get("message_id"), str):
        return None
    return {k: v for k, v in msg.items() if v is not None and not (k == "body" and v == "")}


def _summary(msg: Mapping[str, Any], message_id: str, count: int) -> dict[str, Any]:
    """What a peek shows of a waiting message: no body."""
    return {
        "message_id": msg.get("message_id", message_id),
        "from": msg.get("agent_id"),
        "type": msg.get("message_type"),
        "created_at": msg.get("created_at"),
        "delivery_count": count,
        "workflow_id": msg.get("workflow_id"),
        "task_id": msg.get("task_id"),
    }


class _Files:
    """The daemon-less operations on one bus root. Synchronous and thread-safe."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.settings = _Settings.load(root)
        self._ledgers: dict[str, _Ledger] = {}
        self._counter = itertools.count()

    def _dir(self, *parts: str) -> Path:
        """``root/parts``, created 0700 (and made durable) if missing."""
        if not all((self.root / d).is_dir() for d in ("tmp", "outbox", "inbox", "locks")):
            raise Unavailable(f"no daemon answers and {self.root} is not a bus (`busd init`)")
        path = self.root.joinpath(*parts)
        with suppress(FileExistsError):
            os.mkdir(path, 0o700)
            _fsync_dir(path.parent)
        return path

    def ledger(self, agent: str) -> _Ledger:
        return self._ledgers.setdefault(agent, _Ledger(self.root / "processed" / f"{agent}.jsonl"))

    def publish(self, message: dict[str, Any], sender: str | None) -> SendResult:
        """Validate, then tmp/ + fsync + no-replace link into outbox/<sender>/ + fsync dir."""
        data = validate_message(message, max_bytes=self.settings.max_message_bytes)
        mid = str(message["message_id"])
        if sender is not None:
            outbox = self._dir("outbox", _agent(sender, "sender"))
        else:
            # agent_id is free text: a name that cannot be a directory drops into outbox/ itself.
            try:
                outbox = self._dir("outbox", _agent(message["agent_id"], "sender"))
            except InvalidName:
                outbox = self._dir("outbox")
        tmp = self._dir("tmp") / f"{os.getpid()}-{threading.get_ident()}-{next(self._counter)}.tmp"
        try:
            self._write_new(tmp, data)
            while True:
                path = outbox / f"{_arrivals.next()}-{mid}.json"
                with suppress(FileExistsError):  # another process drew this name
                    _move_noreplace(tmp, path)
                    break
        except OSError as exc:
            with suppress(OSError):
                os.unlink(tmp)
            raise StorageError(f"cannot write into {outbox}: {exc}") from exc
        if self.settings.fsync:
            _fsync_dir(outbox)
        return SendResult(mid, False, "file", path)

    def fetch(self, agent: str, max: int, wait_s: float) -> list[_Claimed]:
        """Sweep expired leases, then claim up to ``max``, polling up to ``wait_s``."""
        inbox, locks = self._dir("inbox", _agent(agent)), self._dir("locks", agent)
        deadline = time.monotonic() + wait_s
        while True:
            self._sweep(inbox, locks)
            claims: list[_Claimed] = []
            for name in sorted(os.listdir(inbox)):
                if len(claims) >= max:
                    break
                claim = self._claim(agent, inbox / name, locks)
                if claim is not None:
                    claims.append(claim)
            left = deadline - time.monotonic()
            if claims or left <= 0:
                return claims
            time.sleep(min(0.05, left))

    def _claim(self, agent: str, src: Path, locks: Path) -> _Claimed | None:
        parsed = _delivery(src.name)
        if parsed is None:
            return None  # a foreign or hidden name: the router turns it into a delivery
        arrival, n, mid = parsed[1], int(parsed[2]), parsed[3]
        dst = locks / parsed.renamed(arrival, n + 1)
        exhausted = n >= self.settings.max_deliveries
        expiry = time.time() + (0 if exhausted else self.settings.lease_seconds)
        try:
            if not stat.S_ISREG(os.lstat(src).st_mode):
                return None  # links, FIFOs and directories are left to busd
            _set_lease(src, expiry)  # the lease first: a sweep never sees a stale mtime
            _move_noreplace(src, dst)
            if exhausted:
                return None  # expired at once: busd's sweep dead-letters it
            fd = os.open(
                dst, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
            )
            with open(fd, "rb") as f:
                data = f.read(self.settings.max_message_bytes + 1)
        except (FileNotFoundError, FileExistsError):
            return None  # another consumer won, or the sweep took it back
        msg = _message_in(data)
        msg = msg if msg is None or parsed.kind is None else _from_tapps(msg)
        if msg is None or len(data) > self.settings.max_message_bytes:
            with suppress(OSError):  # undo the claim; busd decodes or dead-letters it
                _move_noreplace(dst, src)
            return None
        key = msg.get("idempotency_key")
        if self.ledger(agent).acked(msg["message_id"], key if isinstance(key, str) else None):
            os.unlink(dst)  # acked before: dropping the copy keeps side effects single
            return None
        if msg["message_id"] != mid:  # keep the claim findable by the id acks will name
            name = parsed.renamed(arrival, n + 1, msg["message_id"])
            dst = locks / self._return(dst, locks, name)
        return msg, n + 1, datetime.fromtimestamp(expiry, UTC), _receipt(dst.name)

    def _return(self, path: Path, directory: Path, name: str) -> str:
        """Move ``path`` to ``directory/name``; on a clash, a new arrival and the same count."""
        parsed = _delivery(name)
        while True:
            with suppress(FileExistsError):
                _move_noreplace(path, directory / name)
                return name
            arrival = _arrivals.next()
            name = parsed.renamed(arrival, int(parsed[2])) if parsed else f"{arrival}-{name}"

    def _sweep(self, inbox: Path, locks: Path) -> None:
        """busd's lease sweep for one agent, except that exhausted claims stay for busd."""
        now_ns = time.time_ns()
        tapps = self.settings.compat == "tapps"
        for name in sorted(os.listdir(locks)):
            parsed = _delivery(name)
            with suppress(FileNotFoundError):  # acked or moved by someone else meanwhile
                st = os.lstat(locks / name)
                if st.st_mtime_ns > now_ns:
                    continue
                if tapps and name[:1] != "." and st.st_mtime_ns <= st.st_ctime_ns:
                    # Tapps claims by a bare rename: a lease from now, as busd's sweep gives.
                    _set_lease(locks / name, time.time() + self.settings.lease_seconds)
                    continue
                if name.startswith(".claim-"):  # busd's hidden claim of a foreign name
                    self._return(locks / name, inbox, name[24:] or f"{name[-16:]}.json")
                elif parsed and int(parsed[2]) < self.settings.max_deliveries:
                    self._return(locks / name, inbox, name)

    def _held(self, agent: str, message_id: str, required: bool = True) -> list[Path]:
        locks = self._dir("locks", _agent(agent))
        paths = [
            locks / name
            for name in sorted(os.listdir(locks))
            if (p := _delivery(name)) is not None and p[3] == message_id
        ]
        if required and not paths:
            raise NotFound(f"{agent} holds no claim on {message_id}", data={"id": message_id})
        return paths

    def _by_receipts(self, agent: str, receipts: Iterable[str]) -> tuple[list[Path], list[str]]:
        """(the claim files the receipts name, the receipts not held); StaleReceipt first.

        A receipt is current while ``locks/<agent>/<receipt>.json`` (or ``.busd``) exists.
        It is stale
        when that file is gone but the message is claimed under another name or is
        back in the inbox: the call then changes nothing.
        """
        locks = self._dir("locks", _agent(agent))
        held: list[Path] = []
        stale: list[str] = []
        not_held: list[str] = []
        names: set[str] | None = None
        for receipt in dict.fromkeys(receipts):
            parsed = _delivery(f"{receipt}.json")
            if parsed is None:
                not_held.append(receipt)  # not a receipt: it names no delivery
                continue
            if names is None:
                names = set(os.listdir(locks))
            if here := [f"{receipt}{x}" for x in (".json", ".busd") if f"{receipt}{x}" in names]:
                held.append(locks / here[0])
            elif self._held(agent, parsed[3], required=False) or self._queued(agent, parsed[3]):
                stale.append(receipt)
            else:
                not_held.append(receipt)
        if stale:
            raise StaleReceipt(
                f"receipt {', '.join(stale)} names a delivery that is no longer current "
                "(its lease expired and it was delivered again, or it was released)",
                reason="stale_receipt",
                data={"receipts": stale},
            )
        return held, not_held

    def _queued(self, agent: str, message_id: str) -> bool:
        """Whether a delivery of ``message_id`` waits in ``inbox/<agent>/``."""
        with suppress(FileNotFoundError):
            return any(
                (p := _delivery(name)) is not None and p[3] == message_id
                for name in os.listdir(self.root / "inbox" / agent)
            )
        return False

    def _one(self, agent: str, message_id: str | None, receipt: str | None) -> list[Path]:
        """The claims a nack/extend acts on: the receipt's file, or every copy of an id."""
        if receipt is None:
            if message_id is None:
                raise TypeError("name a message_id or a receipt")
            return self._held(agent, message_id)
        held, _ = self._by_receipts(agent, [receipt])
        named = _delivery(f"{receipt}.json")
        if not held or (message_id is not None and (named is None or named[3] != message_id)):
            raise NotFound(f"{agent} holds no delivery {receipt}", data={"receipt": receipt})
        return held

    def ack(
        self, agent: str, message_ids: Iterable[str], receipts: Iterable[str] = ()
    ) -> tuple[int, list[str]]:
        """Ledger records first (locked, fsynced), then the claims are removed.

        A receipt removes its one claim file, a message id every claimed copy.
        Returns (messages acked, ids and receipts not held).
        """
        found_by_receipt, not_held = self._by_receipts(agent, receipts)
        targets: dict[str, list[Path]] = {}
        for path in found_by_receipt:
            parsed = _delivery(path.name)
            assert parsed is not None
            targets.setdefault(parsed[3], []).append(path)
        for mid in dict.fromkeys(message_ids):
            found = self._held(agent, mid, required=False)
            if not found:
                not_held.append(mid)
                continue
            targets.setdefault(mid, []).extend(p for p in found if p not in targets.get(mid, []))
        records: list[dict[str, Any]] = []
        for mid, paths in targets.items():
            msg: dict[str, Any] = {}
            with suppress(OSError):
                msg = _from_tapps(_message_in(paths[0].read_bytes()) or {})
            key = msg.get("idempotency_key")
            key = key if isinstance(key, str) else None
            records.append({"message_id": mid, "idempotency_key": key, "acked_at": ""})
        if records:
            now = _rfc3339(time.time())
            tapps = self.settings.compat == "tapps"
            self.ledger(agent).append([{**r, "acked_at": now} for r in records], bare_ids=tapps)
        for paths in targets.values():
            for path in paths:
                with suppress(FileNotFoundError):
                    os.unlink(path)
        return len(records), not_held

    def nack(
        self, agent: str, message_id: str | None, delay_s: float, receipt: str | None = None
    ) -> None:
        """Back to the inbox now, or (``delay_s`` > 0) when the sweep finds the lease over."""
        for path in self._one(agent, message_id, receipt):
            try:
                if delay_s > 0:
                    _set_lease(path, time.time() + delay_s)
                else:
                    self._return(path, self._dir("inbox", agent), path.name)
            except FileNotFoundError:
                raise NotFound(f"claim {path.name} was lost (lease expired?)") from None

    def extend(
        self, agent: str, message_id: str | None, lease_s: float, receipt: str | None = None
    ) -> datetime:
        expiry = time.time() + lease_s
        for path in self._one(agent, message_id, receipt):
            try:
                _set_lease(path, expiry)
            except FileNotFoundError:
                raise NotFound(f"claim {path.name} was lost (lease expired?)") from None
        return datetime.fromtimestamp(expiry, UTC)

    def reject(
        self, agent: str, message_id: str | None, reason: str, receipt: str | None = None
    ) -> str:
        """Dead-letter the claim (reason ``rejected``, ``detail`` = ``reason``), as busd's
        consumer does (protocol.md 6.2, 7): the data moves in first, then the record is
        written durably. Returns the first entry's name."""
        names = [
            self._dead_letter(agent, p, "rejected", reason)
            for p in self._one(agent, message_id, receipt)
        ]
        return names[0]

    def _dead_letter(self, agent: str, path: Path, reason: str, detail: str) -> str:
        # compat = "tapps": busd's entries live in dlq/busd/, out of Tapps' replay_dlq glob.
        dlq = self._dir("dlq", "busd") if self.settings.compat == "tapps" else self._dir("dlq")
        data = b""
        with suppress(OSError):
            data = path.read_bytes()
        parsed = _delivery(path.name)
        while True:
            name = f"{_arrivals.next()}-{path.name}"[:129]
            try:
                _move_noreplace(path, dlq / name)
                break
            except FileExistsError:
                continue
            except FileNotFoundError:
                raise NotFound(f"claim {path.name} was lost (lease expired?)") from None
        if self.settings.fsync:
            _fsync_dir(dlq)
            _fsync_dir(path.parent)
        msg = _from_tapps(_message_in(data) or {})
        now = _rfc3339(time.time())
        record = {
            "reason": reason,
            "detail": detail,
            "original_path": f"locks/{agent}/{path.name}",
            "sender": msg.get("agent_id") if isinstance(msg.get("agent_id"), str) else None,
            "recipient": agent,
            "message_id": parsed[3] if parsed else msg.get("message_id"),
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "first_failure_at": now,
            "last_failure_at": now,
            "delivery_count": int(parsed[2]) if parsed else 0,
            "replays": 0,
            "history": [{"at": now, "event": "failed", "detail": f"{reason}: {detail}"}],
            "schema": 1,
        }
        self._write_durable(dlq / f"{name}.reason.json", _encode(record) + b"\n")
        return name

    def _write_new(self, tmp: Path, data: bytes) -> None:
        """Create ``tmp`` (0600, never an existing file) holding ``data``; fsync it."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.settings.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _write_durable(self, target: Path, data: bytes) -> None:
        tmp = self._dir("tmp") / f"{os.getpid()}-{threading.get_ident()}-{next(self._counter)}.tmp"
        try:
            self._write_new(tmp, data)
            os.replace(tmp, target)
        except OSError as exc:
            with suppress(OSError):
                os.unlink(tmp)
            raise StorageError(f"cannot write {target}: {exc}") from exc
        if self.settings.fsync:
            _fsync_dir(target.parent)

    def peek(self, agent: str, limit: int) -> list[dict[str, Any]]:
        """The first ``limit`` deliveries waiting in ``inbox/<agent>/``, unclaimed: a summary
        each (``message_id``, ``from``, ``type``, ``created_at``, ``delivery_count``,
        ``workflow_id``, ``task_id``), in arrival order."""
        out: list[dict[str, Any]] = []
        with suppress(FileNotFoundError):
            names = sorted(os.listdir(self.root / "inbox" / _agent(agent)))
            for name in names:
                parsed = _delivery(name)
                if parsed is None:
                    continue
                if len(out) >= limit:
                    break
                try:
                    with open(self.root / "inbox" / agent / name, "rb") as f:
                        msg = _message_in(f.read(self.settings.max_message_bytes + 1)) or {}
                    msg = _from_tapps(msg) if parsed.kind is not None else msg
                except OSError:
                    continue  # claimed meanwhile
                out.append(_summary(msg, parsed[3], int(parsed[2])))
        return out

    def thread(
        self, workflow_id: str, task_id: str | None = None, limit: int = 50
    ) -> tuple[list[dict[str, Any]], bool]:
        """The accepted messages of ``workflow_id`` (and ``task_id``) in the journal, oldest
        first: the last ``limit`` of them, and whether older ones were left out."""
        found: list[dict[str, Any]] = []
        more = False
        for msg in self._accepted(workflow_id):
            if msg.get("workflow_id") != workflow_id:
                continue
            if task_id is not None and msg.get("task_id") != task_id:
                continue
            found.append(msg)
            if len(found) > limit:
                del found[0]
                more = True
        return found, more

    def message(self, message_id: str) -> dict[str, Any] | None:
        """The message ``message_id`` as the journal accepted it (the first time), or None."""
        for msg in self._accepted(message_id):
            if msg.get("message_id") == message_id:
                return msg
        return None

    def _accepted(self, needle: str) -> Iterator[dict[str, Any]]:
        """The messages of the journal's ``accepted`` lines holding ``needle``, in order.

        Read as protocol.md 8 says: no lock, segments by number, the torn tail and
        lines that do not parse skipped, a segment deleted meanwhile skipped.
        """
        journal = self.root / "journal"
        try:
            segments = sorted(n for n in os.listdir(journal) if _SEGMENT_RE.match(n))
        except FileNotFoundError:
            return
        key = json.dumps(needle, ensure_ascii=False)[1:-1].encode("utf-8")
        for segment in segments:
            try:
                with open(journal / segment, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            for line in data[: data.rfind(b"\n") + 1].splitlines():
                if key not in line:
                    continue  # cheap filter before parsing
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(entry, dict) or entry.get("event") != "accepted":
                    continue
                msg = entry.get("message")
                if isinstance(msg, dict):
                    yield msg

    def status(self) -> dict[str, Any]:
        """A summary from directory listings (the shape of busd's, fewer fields)."""

        def names(*parts: str) -> list[str]:
            with suppress(OSError):
                return [n for n in os.listdir(self.root.joinpath(*parts)) if n[:1] != "."]
            return []

        agents = sorted({a for d in ("inbox", "outbox", "locks") for a in names(d)})
        own_dlq = ("dlq", "busd") if self.settings.compat == "tapps" else ("dlq",)
        per = {
            a: {
                "ready": len(names("inbox", a)),
                "in_flight": len(names("locks", a)),
                "outbox": len(names("outbox", a)),
            }
            for a in agents
        }
        return {
            "root": str(self.root),
            "daemon": {"running": False},
            "agents": per,
            "outbox_backlog": sum(a["outbox"] for a in per.values()),
            "dlq": {"entries": sum(n.endswith(".reason.json") for n in names(*own_dlq))},
        }


# ---------------------------------------------------------------- operations shared by both clients


@dataclass(frozen=True)
class _Op(Generic[_T]):
    """One call: through the daemon (``live`` parses its result) or, failing that, ``files``."""

    method: str
    params: dict[str, Any]
    live: Callable[[Any], _T]
    files: Callable[[], _T] | None = None
    wait_s: float = 0.0


class _Base:
    """Discovery, settings and the operations; subclasses only run them."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        socket_path: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 1.0,
        fallback: bool = True,
    ) -> None:
        self.root = find_root(root)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.fallback = fallback
        self._socket_path = socket_path
        self._files = _Files(self.root)
        self._done: dict[str, None] = {}  # keys finished here, newest last (bounded)
        self._done_lock = threading.Lock()

    def _socket(self) -> Path | None:
        return find_socket(self.root, self._socket_path)

    def _send(self, message: Mapping[str, Any], sender: str | None) -> _Op[SendResult]:
        msg = _filled(message)
        params = {"message": msg, **({"sender": _agent(sender, "sender")} if sender else {})}
        return _Op("publish", params, _sent, lambda: self._files.publish(msg, sender))

    def _send_batch(
        self, messages: Iterable[Mapping[str, Any]], sender: str | None
    ) -> _Op[list[SendResult | BusError]]:
        msgs = [_filled(m) for m in messages]
        params = {"messages": msgs, **({"sender": _agent(sender, "sender")} if sender else {})}

        def live(result: Any) -> list[SendResult | BusError]:
            return [
                _sent(r["result"]) if "result" in r else _error_from(r.get("error"))
                for r in result["results"]
            ]

        def files() -> list[SendResult | BusError]:
            out: list[SendResult | BusError] = []
            for m in msgs:
                try:
                    out.append(self._files.publish(m, sender))
                except InvalidMessage as exc:
                    out.append(exc)
            return out

        return _Op("publish_batch", params, live, files)

    def _fetch(self, agent_id: str, max: int, wait_s: float) -> _Op[list[_Claimed]]:
        params = {"agent_id": agent_id, "max": max, "wait_s": wait_s}
        files = self._files
        return _Op("fetch", params, _claims_of, lambda: files.fetch(agent_id, max, wait_s), wait_s)

    def _ack(self, agent_id: str, message_ids: Iterable[str], receipts: Iterable[str]) -> _Op[int]:
        ids, named = list(message_ids), list(receipts)
        params: dict[str, Any] = {"agent_id": agent_id, "message_ids": ids}
        if named:  # only then: a daemon that predates receipts refuses the field
            params["receipts"] = named
        return _Op(
            "ack",
            params,
            lambda r: int(r["acked"]),
            lambda: self._files.ack(agent_id, ids, named)[0],
        )

    @staticmethod
    def _named(message_id: str | None, receipt: str | None) -> dict[str, str]:
        if (message_id is None) == (receipt is None):
            raise TypeError("name exactly one of message_id and receipt")
        return {"receipt": receipt} if receipt is not None else {"message_id": str(message_id)}

    def _nack(
        self, agent_id: str, message_id: str | None, receipt: str | None, delay_s: float
    ) -> _Op[None]:
        params = {"agent_id": agent_id, **self._named(message_id, receipt), "delay_s": delay_s}
        files = self._files
        return _Op(
            "nack",
            params,
            lambda r: None,
            lambda: files.nack(agent_id, message_id, delay_s, receipt),
        )

    def _extend(
        self, agent_id: str, message_id: str | None, receipt: str | None, lease_s: float
    ) -> _Op[datetime]:
        if not lease_s > 0:
            raise InvalidRequest(f"lease_s must be > 0, got {lease_s!r}", reason="invalid_params")
        params = {"agent_id": agent_id, **self._named(message_id, receipt), "lease_s": lease_s}
        files = self._files
        return _Op(
            "extend",
            params,
            _expiry_of,
            lambda: files.extend(agent_id, message_id, lease_s, receipt),
        )

    def _settle(
        self, agent_id: str, message_ids: Iterable[str], receipts: Iterable[str]
    ) -> _Op[tuple[int, list[str]]]:
        ids, named = list(message_ids), list(receipts)
        params: dict[str, Any] = {"agent_id": agent_id, "message_ids": ids}
        if named:
            params["receipts"] = named

        def live(r: Any) -> tuple[int, list[str]]:
            return int(r["acked"]), [str(x) for x in r.get("not_held", [])]

        return _Op("ack", params, live, lambda: self._files.ack(agent_id, ids, named))

    def _reject(
        self, agent_id: str, message_id: str | None, receipt: str | None, reason: str
    ) -> _Op[str]:
        if not reason:
            raise InvalidRequest("reason must not be empty", reason="invalid_params")
        params = {"agent_id": agent_id, **self._named(message_id, receipt), "reason": reason}
        files = self._files
        return _Op(
            "reject",
            params,
            lambda r: str(r["name"]),
            lambda: files.reject(agent_id, message_id, reason, receipt),
        )

    def _status(self) -> _Op[dict[str, Any]]:
        return _Op("status", {}, dict, self._files.status)

    def _peek(self, agent_id: str, limit: int) -> _Op[list[dict[str, Any]]]:
        agent, files = _agent(agent_id), self._files
        params = {"agent_id": agent, "max": min(limit, _PEEK_MAX)}
        return _Op("peek", params, _peeked, lambda: files.peek(agent, limit))

    def _daemon(self, method: str, params: dict[str, Any], key: str | None = None) -> _Op[Any]:
        return _Op(method, params, lambda r: r[key] if key else r)

    def _fresh(self, delivery: _DeliveryData) -> bool:
        known = any(k in self._done for k in _done_keys(delivery))
        key = delivery.message.get("idempotency_key")
        key = key if isinstance(key, str) else None
        return not known and not self._files.ledger(delivery.agent_id).acked(
            delivery.message_id, key
        )

    def _finished(self, delivery: _DeliveryData) -> None:
        with self._done_lock:
            self._done.update(dict.fromkeys(_done_keys(delivery)))
            while len(self._done) > 10_000:
                del self._done[next(iter(self._done))]


def _peeked(result: Any) -> list[dict[str, Any]]:
    return [dict(m) for m in result["messages"]]


def _unknown_method(exc: BusError) -> bool:
    """Whether the daemon answered "no such method" (it predates the call)."""
    return exc.code == -32601


def _done_keys(delivery: _DeliveryData) -> list[str]:
    # Tagged, so an id never matches an idempotency key (two key spaces, as in the ledger).
    key = delivery.message.get("idempotency_key")
    return [f"id:{delivery.message_id}", *([f"key:{key}"] if isinstance(key, str) else [])]


def _request(rid: int, method: str, params: Mapping[str, Any]) -> bytes:
    return _encode({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}) + b"\n"


def _parse_line(line: bytes) -> dict[str, Any]:
    with suppress(ValueError):
        msg = json.loads(line)
        if isinstance(msg, dict):
            return msg
    return {"method": "?"}  # not an answer: skipped


def _answer(msg: dict[str, Any], rid: int, pushes: list[dict[str, Any]] | None) -> tuple[bool, Any]:
    """(done, result) for a line read while waiting for the answer to ``rid``.

    Pushes are kept in ``pushes`` (a push may overtake the answer to ``subscribe``).
    """
    if msg.get("method") == "message" and pushes is not None:
        pushes.append(msg)
    if "method" in msg or msg.get("id") not in (rid, None):
        return False, None  # a push, or an answer to an abandoned request
    if "error" in msg:
        raise _error_from(msg["error"])
    return True, msg.get("result")


def _subscribe_params(agent: str, topics: list[str] | None, window: int | None) -> dict[str, Any]:
    names = None if topics is None else [_agent(t, "topic") for t in topics]
    return {"agent_id": _agent(agent), "topics": names, "max_in_flight": window}


# ---------------------------------------------------------------- the synchronous client


class _Conn:
    """One socket connection: requests out, answers and pushes in, one JSON line each."""

    def __init__(self, path: Path | None, connect_timeout: float) -> None:
        family = getattr(socket, "AF_UNIX", None)
        if path is None or family is None:
            raise Unavailable("no busd socket found (is the daemon running?)")
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(connect_timeout)
        try:
            self.sock.connect(os.fspath(path))
        except OSError as exc:
            self.sock.close()
            raise Unavailable(f"cannot connect to {path}: {exc}") from None
        self._buf = bytearray()
        self._ids = itertools.count(1)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    def read(self, timeout: float | None) -> dict[str, Any] | None:
        """The next line, or None once ``timeout`` passes (a partial line is kept)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (i := self._buf.find(b"\n")) < 0:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:
                self.sock.settimeout(left)
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                return None
            except OSError as exc:
                chunk, why = b"", str(exc)
            else:
                why = "the daemon closed the connection"
            if not chunk:
                self.close()
                raise _Lost(why)
            self._buf += chunk
        line = bytes(self._buf[:i])
        del self._buf[: i + 1]
        return _parse_line(line)

    def call(
        self,
        method: str,
        params: Mapping[str, Any],
        timeout: float,
        pushes: list[dict[str, Any]] | None = None,
    ) -> Any:
        rid = next(self._ids)
        data = _request(rid, method, params)
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)
        except OSError as exc:
            self.close()
            raise _Lost(f"connection lost: {exc}") from None
        deadline = time.monotonic() + timeout
        while True:
            msg = self.read(max(deadline - time.monotonic(), 0.0))
            if msg is None:  # the answer may still come: this connection is unusable now
                self.close()  # not _Lost: a hung daemon is not worth a second wait
                raise Unavailable(f"no answer to {method} within {timeout:g} s")
            if msg.get("id") is None and "error" in msg:
                self.close()  # refused at connect time (overloaded, forbidden): it hangs up
            done, result = _answer(msg, rid, pushes)
            if done:
                return result


class Client(_Base):
    """A synchronous busd client. Thread-safe: calls on its connection are serialised.

    ``root`` and ``socket_path`` override discovery. ``timeout`` bounds each call
    (``fetch`` adds ``wait_s``), and ``connect_timeout`` bounds reaching the daemon.
    With ``fallback=False``, calls raise :class:`Unavailable` instead of using the
    files.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        socket_path: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 1.0,
        fallback: bool = True,
    ) -> None:
        super().__init__(
            root,
            socket_path=socket_path,
            timeout=timeout,
            connect_timeout=connect_timeout,
            fallback=fallback,
        )
        self._conn: _Conn | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; a later call opens a new one."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def call(
        self, method: str, params: Mapping[str, Any] | None = None, *, wait_s: float = 0.0
    ) -> Any:
        """Call any daemon method and return its result. No fallback: :class:`Unavailable`."""
        with self._lock:
            for attempt in range(2):
                reused = self._conn is not None and not self._conn.closed
                if not reused:
                    self._conn = _Conn(self._socket(), self.connect_timeout)
                assert self._conn is not None
                try:
                    return self._conn.call(method, params or {}, self.timeout + wait_s)
                except _Lost:
                    if not reused or attempt:
                        raise  # a fresh connection failed as well: the daemon is gone
        raise AssertionError("unreachable")

    def _run(self, op: _Op[_T]) -> tuple[_T, _Via]:
        try:
            return op.live(self.call(op.method, op.params, wait_s=op.wait_s)), "socket"
        except Unavailable:
            if op.files is None or not self.fallback:
                raise
        return op.files(), "file"

    def ping(self) -> dict[str, Any]:
        """``{version, pid, uptime_s}`` of the daemon; :class:`Unavailable` without one."""
        return dict(self._run(self._daemon("ping", {}))[0])

    def send(self, message: Mapping[str, Any], *, sender: str | None = None) -> SendResult:
        """Publish ``message``, filling ``message_id`` and ``created_at`` when missing.

        Through the daemon, the message is accepted and journaled when this returns.
        Without one, it is validated here and written durably into
        ``outbox/<sender or agent_id>/``. Raises :class:`InvalidMessage` when refused.
        """
        return self._run(self._send(message, sender))[0]

    def send_batch(
        self, messages: Iterable[Mapping[str, Any]], *, sender: str | None = None
    ) -> list[SendResult | BusError]:
        """Publish several messages (the daemon fsyncs once for all); a result or error each."""
        return self._run(self._send_batch(messages, sender))[0]

    def fetch(self, agent_id: str, max: int = 1, wait_s: float = 0.0) -> list[Delivery]:
        """Claim up to ``max`` messages of ``agent_id``, waiting up to ``wait_s`` for the first."""
        items, via = self._run(self._fetch(agent_id, max, wait_s))
        return [Delivery(agent_id, m, n, t, via, self, receipt=r) for m, n, t, r in items]

    def ack(
        self, agent_id: str, message_ids: Iterable[str] = (), *, receipts: Iterable[str] = ()
    ) -> int:
        """Record claimed messages as processed, drop their claims; return how many were held.

        A receipt settles that one delivery (:class:`StaleReceipt`, and nothing
        settled, if any is no longer current); a message id its current claim.
        """
        return self._run(self._ack(agent_id, message_ids, receipts))[0]

    def nack(
        self,
        agent_id: str,
        message_id: str | None = None,
        *,
        receipt: str | None = None,
        delay_s: float = 0.0,
    ) -> None:
        """Give a claim back (by id or receipt), now or after ``delay_s``. NotFound if it is
        not held, :class:`StaleReceipt` if the receipt is no longer current."""
        self._run(self._nack(agent_id, message_id, receipt, delay_s))

    def extend(
        self,
        agent_id: str,
        message_id: str | None = None,
        lease_s: float = 0.0,
        *,
        receipt: str | None = None,
    ) -> datetime:
        """Make the claim's lease (by id or receipt) end ``lease_s`` (> 0) from now; return
        the new expiry."""
        return self._run(self._extend(agent_id, message_id, receipt, lease_s))[0]

    def settle(
        self, agent_id: str, message_ids: Iterable[str] = (), *, receipts: Iterable[str] = ()
    ) -> tuple[int, list[str]]:
        """:meth:`ack`, also returning the ids and receipts this agent did not hold."""
        return self._run(self._settle(agent_id, message_ids, receipts))[0]

    def reject(
        self,
        agent_id: str,
        message_id: str | None = None,
        *,
        receipt: str | None = None,
        reason: str,
    ) -> str:
        """Dead-letter a claim (by id or receipt) with reason ``rejected`` and ``reason`` as
        its detail; return the DLQ entry name. NotFound if not held, :class:`StaleReceipt`
        if the receipt is no longer current."""
        return self._run(self._reject(agent_id, message_id, receipt, reason))[0]

    def peek(self, agent_id: str, limit: int = 10) -> list[dict[str, Any]]:
        """Summaries (no bodies) of up to ``limit`` deliveries waiting for ``agent_id``,
        unclaimed, oldest first (in the order ``fetch`` takes them), without claiming
        anything: ``message_id``, ``from``, ``type``, ``created_at``, ``delivery_count``
        (deliveries so far), ``workflow_id``, ``task_id``.

        Through the daemon (at most 1000 a call): the inbox files and the messages it holds
        in memory for a socket-served agent. Without a daemon, or from one that predates
        ``peek``, the files in ``inbox/<agent_id>/``."""
        op = self._peek(agent_id, limit)
        if limit < 1:
            return []
        try:
            return self._run(op)[0]
        except BusError as exc:
            if not _unknown_method(exc):
                raise
        return self._files.peek(agent_id, limit)

    def thread(
        self, workflow_id: str, task_id: str | None = None, limit: int = 50
    ) -> tuple[list[dict[str, Any]], bool]:
        """The journaled messages of one workflow (and task), oldest first: the last
        ``limit``, and whether older ones were left out. Read from the files."""
        return self._files.thread(workflow_id, task_id, limit)

    def message(self, message_id: str) -> dict[str, Any] | None:
        """The message ``message_id`` as the journal accepted it, or None (read from the
        files: a message still in an outbox is not there yet)."""
        return self._files.message(message_id)

    def status(self) -> dict[str, Any]:
        """The daemon's status or, without one, a summary of the files."""
        return self._run(self._status())[0]

    def dlq_list(self, *, reason: str | None = None, agent: str | None = None) -> list[Any]:
        """Dead-letter entries, optionally filtered (daemon only)."""
        return list(
            self._run(self._daemon("dlq.list", {"reason": reason, "agent": agent}, "entries"))[0]
        )

    def dlq_show(self, name: str) -> dict[str, Any]:
        """One dead-letter entry: ``name``, ``record``, ``data`` (daemon only)."""
        return dict(self._run(self._daemon("dlq.show", {"name": name}))[0])

    def replay(self, names: list[str] | None = None, **options: Any) -> list[Any]:
        """Replay DLQ entries by ``names``, or ``reason=``/``all=True``; ``to=``, ``dry_run=``."""
        return list(self._run(self._daemon("replay", {"names": names, **options}, "replayed"))[0])

    def subscribe(
        self,
        agent_id: str,
        topics: list[str] | None = None,
        max_in_flight: int | None = None,
        *,
        poll_interval: float = 0.5,
    ) -> Subscription:
        """Deliveries pushed to ``agent_id`` (joining ``topics``), as a blocking iterator."""
        return Subscription(self, _subscribe_params(agent_id, topics, max_in_flight), poll_interval)

    @contextmanager
    def processing(self, delivery: Delivery, *, retry_delay_s: float = 0.0) -> Iterator[bool]:
        """Handle a delivery at most once; yields ``fresh``.

        ``fresh`` is False when the message (its id or idempotency key) is already in
        the agent's ledger or was finished by this client, so skip the side effect.
        When the block exits normally the delivery is acked, fresh or not. When it
        raises, the delivery is nacked (it returns after ``retry_delay_s``) and the
        exception propagates. A crash between the side effect and the ack can still
        repeat the effect: make effects idempotent, or commit them in the block.
        """
        fresh = self._fresh(delivery)
        try:
            yield fresh
        except BaseException:
            with suppress(BusError):
                delivery.nack(delay_s=retry_delay_s)
            raise
        self._finished(delivery)
        delivery.ack()


class Subscription(Iterator[Delivery]):
    """Pushed deliveries on a dedicated connection. While no daemon runs it polls the files.

    Iterating blocks until the next message; :meth:`next` takes a timeout. Acks go
    over the client's connection, and the daemon's flow control counts them all the
    same. When the daemon comes back, the subscription reconnects and re-subscribes.
    Claims pushed but never read come back when their lease expires.
    """

    def __init__(self, client: Client, params: dict[str, Any], poll_interval: float) -> None:
        self.client = client
        self.agent_id: str = params["agent_id"]
        self._params = params
        self._poll = poll_interval
        self._conn: _Conn | None = None
        self._queue: list[Delivery] = []
        self._retry_at = 0.0

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unsubscribe by closing the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __next__(self) -> Delivery:
        delivery = self.next(None)
        assert delivery is not None
        return delivery

    def next(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery, or None after ``timeout`` seconds (None: wait for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._queue:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            if self._conn is None and time.monotonic() >= self._retry_at:
                try:
                    conn = _Conn(self.client._socket(), self.client.connect_timeout)
                    early: list[dict[str, Any]] = []
                    try:
                        conn.call("subscribe", self._params, self.client.timeout, early)
                    except BaseException:
                        conn.close()
                        raise
                    self._conn = conn
                    for push in early:
                        m, n, t, r = _claimed(push["params"])
                        delivery = Delivery(
                            self.agent_id, m, n, t, "socket", self.client, receipt=r
                        )
                        self._queue.append(delivery)
                    continue
                except Unavailable:
                    if not self.client.fallback:
                        raise
                    self._retry_at = time.monotonic() + self._poll
            if self._conn is not None:
                try:
                    msg = self._conn.read(left)
                except _Lost:
                    self._conn = None
                    continue
                if msg is not None and msg.get("method") == "message":
                    m, n, t, r = _claimed(msg["params"])
                    delivery = Delivery(self.agent_id, m, n, t, "socket", self.client, receipt=r)
                    self._queue.append(delivery)
                continue
            for m, n, t, r in self.client._files.fetch(self.agent_id, 1, 0.0):
                self._queue.append(Delivery(self.agent_id, m, n, t, "file", self.client, receipt=r))
            if not self._queue:
                time.sleep(self._poll if left is None else min(self._poll, left))
        return self._queue.pop(0)


# ---------------------------------------------------------------- the asyncio client


class _AsyncConn:
    """:class:`_Conn` on asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._ids = itertools.count(1)
        self.closed = False

    @classmethod
    async def open(cls, path: Path | None, connect_timeout: float) -> _AsyncConn:
        if path is None or not hasattr(socket, "AF_UNIX"):
            raise Unavailable("no busd socket found (is the daemon running?)")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(os.fspath(path), limit=_LINE_LIMIT), connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise Unavailable(f"cannot connect to {path}: {exc}") from None
        return cls(reader, writer)

    def close(self) -> None:
        self.closed = True
        self.writer.close()

    async def read(self, timeout: float | None) -> dict[str, Any] | None:
        try:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
        except TimeoutError:
            return None  # readline keeps a partial line buffered
        except (OSError, ValueError) as exc:
            line, why = b"", str(exc)
        else:
            why = "the daemon closed the connection"
        if not line.endswith(b"\n"):
            self.close()
            raise _Lost(why)
        return _parse_line(line)

    async def call(
        self,
        method: str,
        params: Mapping[str, Any],
        timeout: float,
        pushes: list[dict[str, Any]] | None = None,
    ) -> Any:
        rid = next(self._ids)
        try:
            self.writer.write(_request(rid, method, params))
            await asyncio.wait_for(self.writer.drain(), timeout)
        except (OSError, TimeoutError) as exc:
            self.close()
            raise _Lost(f"connection lost: {exc}") from None
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.read(max(deadline - time.monotonic(), 0.0))
            if msg is None:
                self.close()
                raise Unavailable(f"no answer to {method} within {timeout:g} s")
            if msg.get("id") is None and "error" in msg:
                self.close()
            done, result = _answer(msg, rid, pushes)
            if done:
                return result


class AsyncClient(_Base):
    """:class:`Client` for asyncio: the same methods as coroutines. The file fallback
    runs in ``asyncio.to_thread``. Use one instance per event loop."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        socket_path: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 1.0,
        fallback: bool = True,
    ) -> None:
        super().__init__(
            root,
            socket_path=socket_path,
            timeout=timeout,
            connect_timeout=connect_timeout,
            fallback=fallback,
        )
        self._conn: _AsyncConn | None = None
        self._lock: asyncio.Lock | None = None  # made on first use, inside the loop

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; a later call opens a new one."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def call(
        self, method: str, params: Mapping[str, Any] | None = None, *, wait_s: float = 0.0
    ) -> Any:
        """See :meth:`Client.call`."""
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            for attempt in range(2):
                reused = self._conn is not None and not self._conn.closed
                if not reused:
                    self._conn = await _AsyncConn.open(self._socket(), self.connect_timeout)
                assert self._conn is not None
                try:
                    return await self._conn.call(method, params or {}, self.timeout + wait_s)
                except _Lost:
                    if not reused or attempt:
                        raise
        raise AssertionError("unreachable")

    async def _run(self, op: _Op[_T]) -> tuple[_T, _Via]:
        try:
            return op.live(await self.call(op.method, op.params, wait_s=op.wait_s)), "socket"
        except Unavailable:
            if op.files is None or not self.fallback:
                raise
        return await asyncio.to_thread(op.files), "file"

    async def ping(self) -> dict[str, Any]:
        """See :meth:`Client.ping`."""
        return dict((await self._run(self._daemon("ping", {})))[0])

    async def send(self, message: Mapping[str, Any], *, sender: str | None = None) -> SendResult:
        """See :meth:`Client.send`."""
        return (await self._run(self._send(message, sender)))[0]

    async def send_batch(
        self, messages: Iterable[Mapping[str, Any]], *, sender: str | None = None
    ) -> list[SendResult | BusError]:
        """See :meth:`Client.send_batch`."""
        return (await self._run(self._send_batch(messages, sender)))[0]

    async def fetch(self, agent_id: str, max: int = 1, wait_s: float = 0.0) -> list[AsyncDelivery]:
        """See :meth:`Client.fetch`."""
        items, via = await self._run(self._fetch(agent_id, max, wait_s))
        return [AsyncDelivery(agent_id, m, n, t, via, self, receipt=r) for m, n, t, r in items]

    async def ack(
        self, agent_id: str, message_ids: Iterable[str] = (), *, receipts: Iterable[str] = ()
    ) -> int:
        """See :meth:`Client.ack`."""
        return (await self._run(self._ack(agent_id, message_ids, receipts)))[0]

    async def nack(
        self,
        agent_id: str,
        message_id: str | None = None,
        *,
        receipt: str | None = None,
        delay_s: float = 0.0,
    ) -> None:
        """See :meth:`Client.nack`."""
        await self._run(self._nack(agent_id, message_id, receipt, delay_s))

    async def extend(
        self,
        agent_id: str,
        message_id: str | None = None,
        lease_s: float = 0.0,
        *,
        receipt: str | None = None,
    ) -> datetime:
        """See :meth:`Client.extend`."""
        return (await self._run(self._extend(agent_id, message_id, receipt, lease_s)))[0]

    async def settle(
        self, agent_id: str, message_ids: Iterable[str] = (), *, receipts: Iterable[str] = ()
    ) -> tuple[int, list[str]]:
        """See :meth:`Client.settle`."""
        return (await self._run(self._settle(agent_id, message_ids, receipts)))[0]

    async def message(self, message_id: str) -> dict[str, Any] | None:
        """See :meth:`Client.message`."""
        return await asyncio.to_thread(self._files.message, message_id)

    async def reject(
        self,
        agent_id: str,
        message_id: str | None = None,
        *,
        receipt: str | None = None,
        reason: str,
    ) -> str:
        """See :meth:`Client.reject`."""
        return (await self._run(self._reject(agent_id, message_id, receipt, reason)))[0]

    async def peek(self, agent_id: str, limit: int = 10) -> list[dict[str, Any]]:
        """See :meth:`Client.peek`."""
        op = self._peek(agent_id, limit)
        if limit < 1:
            return []
        try:
            return (await self._run(op))[0]
        except BusError as exc:
            if not _unknown_method(exc):
                raise
        return await asyncio.to_thread(self._files.peek, agent_id, limit)

    async def thread(
        self, workflow_id: str, task_id: str | None = None, limit: int = 50
    ) -> tuple[list[dict[str, Any]], bool]:
        """See :meth:`Client.thread`."""
        return await asyncio.to_thread(self._files.thread, workflow_id, task_id, limit)

    async def status(self) -> dict[str, Any]:
        """See :meth:`Client.status`."""
        return (await self._run(self._status()))[0]

    async def dlq_list(self, *, reason: str | None = None, agent: str | None = None) -> list[Any]:
        """See :meth:`Client.dlq_list`."""
        op = self._daemon("dlq.list", {"reason": reason, "agent": agent}, "entries")
        return list((await self._run(op))[0])

    async def dlq_show(self, name: str) -> dict[str, Any]:
        """See :meth:`Client.dlq_show`."""
        return dict((await self._run(self._daemon("dlq.show", {"name": name})))[0])

    async def replay(self, names: list[str] | None = None, **options: Any) -> list[Any]:
        """See :meth:`Client.replay`."""
        op = self._daemon("replay", {"names": names, **options}, "replayed")
        return list((await self._run(op))[0])

    def subscribe(
        self,
        agent_id: str,
        topics: list[str] | None = None,
        max_in_flight: int | None = None,
        *,
        poll_interval: float = 0.5,
    ) -> AsyncSubscription:
        """See :meth:`Client.subscribe`; iterate with ``async for``."""
        params = _subscribe_params(agent_id, topics, max_in_flight)
        return AsyncSubscription(self, params, poll_interval)

    @asynccontextmanager
    async def processing(
        self, delivery: AsyncDelivery, *, retry_delay_s: float = 0.0
    ) -> AsyncIterator[bool]:
        """See :meth:`Client.processing` (``async with``)."""
        fresh = await asyncio.to_thread(self._fresh, delivery)
        try:
            yield fresh
        except BaseException:
            with suppress(BusError):
                await delivery.nack(delay_s=retry_delay_s)
            raise
        self._finished(delivery)
        await delivery.ack()


class AsyncSubscription(AsyncIterator[AsyncDelivery]):
    """:class:`Subscription` for asyncio: ``async for``, ``await sub.next(timeout)``."""

    def __init__(self, client: AsyncClient, params: dict[str, Any], poll_interval: float) -> None:
        self.client = client
        self.agent_id: str = params["agent_id"]
        self._params = params
        self._poll = poll_interval
        self._conn: _AsyncConn | None = None
        self._queue: list[AsyncDelivery] = []
        self._retry_at = 0.0

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unsubscribe by closing the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def __anext__(self) -> AsyncDelivery:
        delivery = await self.next(None)
        assert delivery is not None
        return delivery

    async def next(self, timeout: float | None = None) -> AsyncDelivery | None:
        """See :meth:`Subscription.next`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._queue:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            if self._conn is None and time.monotonic() >= self._retry_at:
                try:
                    conn = await _AsyncConn.open(self.client._socket(), self.client.connect_timeout)
                    early: list[dict[str, Any]] = []
                    try:
                        await conn.call("subscribe", self._params, self.client.timeout, early)
                    except BaseException:
                        conn.close()
                        raise
                    self._conn = conn
                    for push in early:
                        m, n, t, r = _claimed(push["params"])
                        delivery = AsyncDelivery(
                            self.agent_id, m, n, t, "socket", self.client, receipt=r
                        )
                        self._queue.append(delivery)
                    continue
                except Unavailable:
                    if not self.client.fallback:
                        raise
                    self._retry_at = time.monotonic() + self._poll
            if self._conn is not None:
                try:
                    msg = await self._conn.read(left)
                except _Lost:
                    self._conn = None
                    continue
                if msg is not None and msg.get("method") == "message":
                    m, n, t, r = _claimed(msg["params"])
                    self._queue.append(
                        AsyncDelivery(self.agent_id, m, n, t, "socket", self.client, receipt=r)
                    )
                continue
            claims = await asyncio.to_thread(self.client._files.fetch, self.agent_id, 1, 0.0)
            for m, n, t, r in claims:
                delivery = AsyncDelivery(self.agent_id, m, n, t, "file", self.client, receipt=r)
                self._queue.append(delivery)
            if not self._queue:
                await asyncio.sleep(self._poll if left is None else min(self._poll, left))
        return self._queue.pop(0)
