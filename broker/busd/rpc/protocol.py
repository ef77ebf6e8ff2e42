"""The socket protocol: JSON-RPC 2.0, one UTF-8 JSON object per ``\\n``-terminated line.

Contracts:

* :func:`parse_request` never raises: a line that is not valid JSON-RPC gives
  an :class:`RpcError` with the standard code (-32700 parse error, -32600
  invalid request) and ``data.reason``; the connection stays usable.
* Params are validated into msgspec Structs per method; a wrong param gives
  -32602 with ``data.reason = "invalid_params"`` and ``data.path``.
* Server-side failures carry the ``rpc_code`` of the :class:`BusdError` and
  ``data.reason`` = its stable ``code`` (for an invalid message, the DLQ
  reason code, e.g. ``schema``).
* Notifications pushed to subscribers are requests without an ``id``, method
  ``message``.
* Results are msgspec Structs (``*Result``) whose fields are, in order, the
  keys of docs/protocol.md §11: they encode to the same JSON as the dicts they
  replaced, byte for byte.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from busd.errors import BusdError, InvalidMessage

__all__ = [
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "AckParams",
    "AckResult",
    "AgentParams",
    "BatchItem",
    "ClaimedMessage",
    "DlqListParams",
    "DlqListResult",
    "DlqShowParams",
    "DlqShowResult",
    "ErrorBody",
    "ExtendParams",
    "ExtendResult",
    "FetchParams",
    "FetchResult",
    "NackParams",
    "NackResult",
    "PeekParams",
    "PeekResult",
    "PeekedMessage",
    "PingResult",
    "PublishBatchParams",
    "PublishBatchResult",
    "PublishParams",
    "PublishResult",
    "RejectParams",
    "RejectResult",
    "ReplayParams",
    "ReplayResult",
    "Request",
    "RpcError",
    "SubscribeParams",
    "SubscribeResult",
    "encode_error",
    "encode_notification",
    "encode_result",
    "error_from_exception",
    "parse_params",
    "parse_request",
]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

RequestId = int | str | None
_YEAR_S = 366 * 86400.0  # leases and delays beyond a year are mistakes, not plans
_T = TypeVar("_T")
_Agent = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class Request(msgspec.Struct, frozen=True):
    """A parsed request; ``id`` is ``msgspec.UNSET`` for a notification."""

    jsonrpc: Literal["2.0"]
    method: str
    params: msgspec.Raw = msgspec.Raw(b"{}")
    id: int | str | msgspec.UnsetType | None = msgspec.UNSET


class RpcError(Exception):
    """An error answer: JSON-RPC ``code``, a message and ``data`` (with ``reason``)."""

    def __init__(
        self, code: int, message: str, reason: str, data: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data: dict[str, Any] = {"reason": reason, **(data or {})}
        self.id: RequestId = None


class _Params(msgspec.Struct, forbid_unknown_fields=True):
    pass


class PublishParams(_Params):
    """``publish``: the message is kept raw so a refused one reaches the DLQ byte for byte."""

    message: msgspec.Raw
    sender: _Agent | None = None


class PublishBatchParams(_Params):
    """``publish_batch``: one result or error per message, one fsync for all."""

    messages: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=10_000)]
    sender: _Agent | None = None


class FetchParams(_Params):
    """``fetch``: claim up to ``max`` messages, waiting up to ``wait_s`` for the first."""

    agent_id: _Agent
    max: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1
    wait_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.0


class AckParams(_Params):
    """``ack``: settle deliveries by ``receipts`` and/or the current claims of ``message_ids``.

    At least one of the two lists is non-empty (checked by the method).
    """

    agent_id: _Agent
    message_ids: Annotated[list[str], msgspec.Meta(max_length=10_000)] = []
    receipts: Annotated[list[str], msgspec.Meta(max_length=10_000)] = []


class NackParams(_Params):
    """``nack``: put a delivery back (by ``receipt``, or the current claim of ``message_id``)."""

    agent_id: _Agent
    message_id: str | None = None
    receipt: str | None = None
    delay_s: Annotated[float, msgspec.Meta(ge=0, le=_YEAR_S)] = 0.0


class ExtendParams(_Params):
    """``extend``: push the lease of a delivery (``receipt`` or ``message_id``) to ``lease_s``."""

    agent_id: _Agent
    lease_s: Annotated[float, msgspec.Meta(gt=0, le=_YEAR_S)]
    message_id: str | None = None
    receipt: str | None = None


class RejectParams(_Params):
    """``reject``: dead-letter a held delivery (``receipt``, or the current claim of
    ``message_id``) with reason ``rejected`` and the consumer's ``reason`` as detail."""

    agent_id: _Agent
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    message_id: str | None = None
    receipt: str | None = None


class PeekParams(_Params):
    """``peek``: summaries of up to ``max`` deliveries waiting for ``agent_id``, unclaimed."""

    agent_id: _Agent
    max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10


class SubscribeParams(_Params):
    """``subscribe``: push messages of ``agent_id`` (and join ``topics``)."""

    agent_id: _Agent
    topics: list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]] | None = None
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None


class AgentParams(_Params):
    """Methods that take nothing (``ping``, ``status``)."""


class DlqListParams(_Params):
    """``dlq.list`` filters."""

    reason: str | None = None
    agent: str | None = None


class DlqShowParams(_Params):
    """``dlq.show``: one entry by name."""

    name: str


class ReplayParams(_Params):
    """``replay``: entries by ``names`` or by ``reason`` (or ``all``), optionally ``to``."""

    names: list[str] | None = None
    reason: str | None = None
    all: bool = False
    to: _Agent | None = None
    dry_run: bool = False


class PingResult(msgspec.Struct):
    """``ping``."""

    version: str
    pid: int
    uptime_s: float


class PublishResult(msgspec.Struct):
    """``publish``, and each accepted message of ``publish_batch``."""

    message_id: str
    duplicate: bool


class ErrorBody(msgspec.Struct):
    """The ``error`` member of an answer (and of a ``publish_batch`` item)."""

    code: int
    message: str
    data: dict[str, Any]

    @classmethod
    def of(cls, err: RpcError) -> ErrorBody:
        """The body of ``err``."""
        return cls(err.code, err.message, err.data)


class BatchItem(msgspec.Struct, omit_defaults=True):
    """One ``publish_batch`` item: ``{"result": ...}`` or ``{"error": ...}``."""

    result: PublishResult | None = None
    error: ErrorBody | None = None


class PublishBatchResult(msgspec.Struct):
    """``publish_batch``: one item per message, in order."""

    results: list[BatchItem]


class ClaimedMessage(msgspec.Struct):
    """A claimed message, as ``fetch`` returns it and ``subscribe`` pushes it."""

    message: msgspec.Raw
    delivery_count: int
    lease_expires_at: datetime
    receipt: str


class FetchResult(msgspec.Struct):
    """``fetch``."""

    messages: list[ClaimedMessage]


class PeekedMessage(msgspec.Struct):
    """One waiting delivery as ``peek`` shows it: no body, every key always present
    (null when the message lacks it). The keys and values of busclient's ``_summary``,
    so the daemon's answer and the client's file listing agree."""

    message_id: str
    from_: str | None = msgspec.field(name="from")
    type: str | None
    created_at: str | None
    delivery_count: int
    workflow_id: str | None
    task_id: str | None


class PeekResult(msgspec.Struct):
    """``peek``: oldest first, as ``fetch`` would take them."""

    messages: list[PeekedMessage]


class AckResult(msgspec.Struct):
    """``ack``: how many deliveries are now settled, and the ids/receipts not held."""

    acked: int
    not_held: list[str] = []


class NackResult(msgspec.Struct):
    """``nack``: ``{}``."""


class ExtendResult(msgspec.Struct):
    """``extend``."""

    lease_expires_at: datetime


class RejectResult(msgspec.Struct):
    """``reject``: the DLQ entry that now holds the message's bytes."""

    name: str


class SubscribeResult(msgspec.Struct):
    """``subscribe``, answered before the first push."""

    subscribed: bool = True


class DlqListResult(msgspec.Struct):
    """``dlq.list``: each entry is ``{name, ...its reason record}``."""

    entries: list[dict[str, Any]]


class DlqShowResult(msgspec.Struct):
    """``dlq.show``: the reason record and the original bytes (as UTF-8, replaced)."""

    name: str
    record: dict[str, Any]
    data: str


class ReplayResult(msgspec.Struct):
    """``replay``: ``[{name, status, target, message_id, detail}]``."""

    replayed: list[dict[str, Any]]


_request_decoder = msgspec.json.Decoder(Request)
_encoder = msgspec.json.Encoder()


def parse_request(line: bytes) -> Request:
    """Parse one line; raise :class:`RpcError` (-32700 / -32600) when it is not a request."""
    try:
        return _request_decoder.decode(line)
    except msgspec.ValidationError as exc:
        # msgspec skips unknown keys without checking their UTF-8: a refused
        # envelope that is not UTF-8 is a parse error. (Bad bytes inside a valid
        # request's message are the codec's to judge, and reach the DLQ.)
        if not line.isascii():
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                raise RpcError(PARSE_ERROR, "request is not valid UTF-8", "invalid_utf8") from exc
        err = RpcError(INVALID_REQUEST, f"invalid request: {exc}", "invalid_request")
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            raise RpcError(PARSE_ERROR, "request is not valid UTF-8", "invalid_utf8") from exc
        raise RpcError(PARSE_ERROR, f"parse error: {exc}", "parse_error") from exc
    # A request whose id we can still read gets it back in the error answer.
    try:
        probe = msgspec.json.decode(line)
        if isinstance(probe, dict) and isinstance(probe.get("id"), int | str):
            err.id = probe["id"]
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        pass
    raise err


def parse_params(raw: msgspec.Raw, kind: type[_T]) -> _T:
    """Decode ``raw`` params into ``kind``, raising -32602 with the JSON path."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        text = str(exc)
        path = text.rsplit("at `", 1)[1].rstrip("`") if "at `" in text else "$"
        raise RpcError(
            INVALID_PARAMS, f"invalid params: {text}", "invalid_params", {"path": path}
        ) from exc


def error_from_exception(exc: BusdError) -> RpcError:
    """The answer for a :class:`BusdError`: its ``rpc_code``, ``data.reason`` = its code."""
    data = {k: v for k, v in exc.context.items() if v is not None}
    if isinstance(exc, InvalidMessage):
        data["reason"] = exc.reason.value
        data["detail"] = exc.detail
    reason = data.pop("reason", exc.code)
    data["error"] = exc.code
    return RpcError(exc.rpc_code, exc.message, reason, data)


def encode_result(request_id: RequestId, result: Any) -> bytes:
    """A success answer line (with its newline)."""
    return _encoder.encode({"jsonrpc": "2.0", "id": request_id, "result": result}) + b"\n"


def encode_error(err: RpcError, request_id: RequestId = None) -> bytes:
    """An error answer line (with its newline)."""
    rid = request_id if request_id is not None else err.id
    body = {"code": err.code, "message": err.message, "data": err.data}
    return _encoder.encode({"jsonrpc": "2.0", "id": rid, "error": body}) + b"\n"


def encode_notification(method: str, params: Any) -> bytes:
    """A notification line (no id), as pushed to subscribers."""
    return _encoder.encode({"jsonrpc": "2.0", "method": method, "params": params}) + b"\n"
