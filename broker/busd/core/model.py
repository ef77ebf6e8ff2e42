"""The message contract (schema_version ``1.x``) as frozen msgspec Structs.

A message is one of eight Struct types, told apart by the ``message_type`` tag
(see :data:`MESSAGE_TYPES`); :data:`Message` is their union. Decoding with
msgspec (``msgspec.json.Decoder(Message)`` or ``msgspec.convert``) validates
every rule of the contract; constructing a Struct directly in Python checks
only the rules implemented in ``__post_init__`` (names, attachment path) and
raises :class:`ValueError` for them, so build messages from untrusted data via
:mod:`busd.codec`, never by calling the constructors.

Invariants of every constructed message: ``created_at`` is an aware datetime
in UTC; ``body`` is ``None`` or a non-empty string.

Fidelity (schema 1.1): a message keeps the fields its producer wrote. A field
left out stays out (``priority`` absent means "medium", ``inputs`` absent means
``{}``), an explicit default stays explicit (``"priority": "medium"``), and a
number keeps its JSON kind (``900`` stays an integer, ``900.5`` a float).
``agent_id`` names the producer in free text (``"Builder Agent"``); only names
that become directories (recipients, topics, ``assigned_to``) keep the strict
:data:`AGENT_NAME_PATTERN`.

Error messages raised from ``__post_init__`` end in `` - at `$.field` ``, the
form msgspec uses for its own errors: msgspec does not add a path for errors
raised while validating the top-level object, so the codec can report one path
format for every rule.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec
from msgspec import Meta

from busd.errors import InvalidName

__all__ = [
    "AGENT_ID_MAX",
    "AGENT_NAME_PATTERN",
    "MAX_NESTING",
    "MESSAGE_ID_PATTERN",
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "SCHEMA_VERSION_PATTERN",
    "TOPIC_PREFIX",
    "Decision",
    "ErrorNote",
    "Fact",
    "Message",
    "MessageBase",
    "Progress",
    "Review",
    "StatusUpdate",
    "TaskAssignment",
    "TaskComplete",
    "check_agent_name",
    "dedupe_key",
    "effective_recipients",
]

SCHEMA_VERSION: Final = "1.0"
"""The version busd writes. Any ``1.<minor>`` is accepted on input."""

# ``\Z``, not ``$``: msgspec (like ``re.search``) lets ``$`` match before a
# trailing newline, and "alice\n" must never become a directory name.
SCHEMA_VERSION_PATTERN: Final = r"^1\.[0-9]+\Z"
MESSAGE_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z"
AGENT_NAME_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\Z"
"""Agent names (also topic names). Besides matching, a name must not end with
``.`` and its part before the first ``.`` must not be a Windows device name."""
TOPIC_PREFIX: Final = "topic:"
AGENT_ID_MAX: Final = 256
"""Longest ``agent_id`` (characters): free text without control characters."""
MAX_NESTING: Final = 64
"""Deepest nesting of lists/objects in metadata, inputs, retry_policy, results
(the field's own object is level 1). Bounded so that every valid message also
survives the recursive YAML encoder and decoder."""
_NAME: Final = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}"
# ``agent@bus`` names an agent on another bus (docs/multi-host.md): a minor widening.
_ADDRESS_PATTERN: Final = rf"^{_NAME}(?:@{_NAME})?\Z"
_RECIPIENT_PATTERN: Final = rf"^(?:topic:{_NAME}|{_NAME}(?:@{_NAME})?)\Z"

_AGENT_NAME_RE: Final = re.compile(AGENT_NAME_PATTERN)
_RECIPIENT_RE: Final = re.compile(_RECIPIENT_PATTERN)
_RESERVED: Final = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"COM{i}" for i in range(1, 10)]
    + [f"LPT{i}" for i in range(1, 10)]
)
_DRIVE_RE: Final = re.compile(r"^[A-Za-z]:")

_SchemaVersion = Annotated[str, Meta(pattern=SCHEMA_VERSION_PATTERN)]
_MessageId = Annotated[str, Meta(pattern=MESSAGE_ID_PATTERN)]
_AgentName = Annotated[str, Meta(pattern=AGENT_NAME_PATTERN)]
_Address = Annotated[str, Meta(pattern=_ADDRESS_PATTERN)]
_RecipientList = Annotated[list[_Address], Meta(min_length=1, max_length=256)]
_ShortText = Annotated[str, Meta(min_length=1, max_length=256)]
_AgentText = Annotated[
    str, Meta(min_length=1, max_length=AGENT_ID_MAX, pattern=r"^[^\x00-\x1f\x7f-\x9f]+\Z")
]
# Two branches so that each keeps its JSON kind: 900 decodes (and encodes) as an int.
_PositiveNumber = Annotated[int, Meta(ge=1)] | Annotated[float, Meta(gt=0)]
_Percent = Annotated[int, Meta(ge=0, le=100)] | Annotated[float, Meta(ge=0, le=100)]
_UtcDatetime = Annotated[_dt.datetime, Meta(tz=True)]
_Priority = Literal["low", "medium", "high"]
_TaskState = Literal["queued", "in_progress", "blocked", "failed", "completed"]
_FinalState = Literal["completed", "failed"]


def _name_problem(value: str) -> str | None:
    """Why a string matching the agent pattern is still not a safe name, or None."""
    if value.endswith("."):
        return "must not end with '.'"
    if value.split(".", 1)[0].upper() in _RESERVED:
        return "is a reserved Windows device name"
    return None


def check_agent_name(value: str, what: str = "agent id") -> str:
    """Return ``value`` if it is a valid agent (or topic) name, else raise InvalidName.

    ``what`` names the value in the error message ("agent id", "topic", ...).
    """
    if not isinstance(value, str) or _AGENT_NAME_RE.match(value) is None:
        shown = value[:80] if isinstance(value, str) else value
        raise InvalidName(f"invalid {what} {shown!r}: must match {AGENT_NAME_PATTERN}", name=shown)
    problem = _name_problem(value)
    if problem is not None:
        raise InvalidName(f"invalid {what} {value!r}: {problem}", name=value)
    return value


def _check_name_field(value: str, path: str) -> None:
    problem = _name_problem(value)
    if problem is not None:
        raise ValueError(f"Invalid agent name {value!r}: {problem} - at `{path}`")


def _check_nesting(value: dict[str, Any] | None, path: str) -> None:
    # Iterative: the point is to refuse depth before anything recurses on it.
    if not value:
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                if depth >= MAX_NESTING:
                    raise ValueError(f"nested deeper than {MAX_NESTING} levels - at `{path}`")
                stack.append((child, depth + 1))


def _check_attachment_path(value: str) -> None:
    problem: str | None = None
    if "\x00" in value:
        problem = "contains NUL"
    elif value.startswith(("/", "\\")):
        problem = "must be relative"
    elif _DRIVE_RE.match(value):
        problem = "must not start with a drive letter"
    elif ".." in re.split(r"[/\\]", value):
        problem = "must not contain a '..' component"
    if problem is not None:
        raise ValueError(
            f"Invalid attachment path {value!r:.80}: {problem} - at `$.attachment_path`"
        )


class MessageBase(
    msgspec.Struct,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="message_type",
    omit_defaults=True,
    frozen=True,
):
    """Envelope fields common to every message type. Never instantiated itself."""

    schema_version: _SchemaVersion
    message_id: _MessageId
    created_at: _UtcDatetime
    workflow_id: _ShortText
    task_id: _ShortText
    agent_id: _AgentText
    # The str branch carries no Meta pattern on purpose: msgspec 0.22 can crash
    # the interpreter at exit (msgspec issue #717) when a union mixes a
    # pattern-constrained str with a list; __post_init__ checks it instead.
    to: str | _RecipientList | None = None
    idempotency_key: _ShortText | None = None
    parents: list[_MessageId] | None = None
    project_id: str | None = None
    run_id: str | None = None
    attachment_path: Annotated[str, Meta(min_length=1)] | None = None
    body: str | None = None
    metadata: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        """Check the name and path rules msgspec cannot express; normalise."""
        created = self.created_at
        if created.utcoffset() is None:
            # Only reachable by constructing in Python: decoding enforces tz=True.
            raise ValueError("Expected `datetime` with a timezone component - at `$.created_at`")
        if created.tzinfo is not _dt.UTC:
            try:
                created = created.astimezone(_dt.UTC)
            except OverflowError:
                raise ValueError(
                    "created_at is out of range once converted to UTC - at `$.created_at`"
                ) from None
            msgspec.structs.force_setattr(self, "created_at", created)
        to = self.to
        if isinstance(to, str):
            if _RECIPIENT_RE.match(to) is None:
                raise ValueError(
                    f"Invalid recipient {to!r:.80}: expected an agent name, agent@bus or "
                    f"topic:<name> matching {_RECIPIENT_PATTERN} - at `$.to`"
                )
            for part in to.removeprefix(TOPIC_PREFIX).split("@"):
                _check_name_field(part, "$.to")
        elif to is not None:
            for i, name in enumerate(to):
                for part in name.split("@"):
                    _check_name_field(part, f"$.to[{i}]")
        if self.attachment_path is not None:
            _check_attachment_path(self.attachment_path)
        if self.body == "":
            msgspec.structs.force_setattr(self, "body", None)
        _check_nesting(self.metadata, "$.metadata")


class TaskAssignment(MessageBase, tag="task_assignment", frozen=True):
    """Work for an agent. ``assigned_to`` is the recipient when ``to`` is unset.

    Absent (or ``null``) ``priority`` means "medium", absent ``inputs`` and
    ``retry_policy`` mean ``{}``; they stay absent so delivery keeps what the
    producer wrote (see :attr:`effective_priority`).
    """

    assigned_to: _AgentName | None = None
    priority: _Priority | None = None
    inputs: dict[str, Any] | None = None
    timeout_seconds: _PositiveNumber | None = None
    retry_policy: dict[str, Any] | None = None

    @property
    def effective_priority(self) -> str:
        """``priority``, or its default "medium" when the producer left it out."""
        return self.priority or "medium"

    def __post_init__(self) -> None:
        """Base checks, and the name rule for ``assigned_to``."""
        super().__post_init__()
        if self.assigned_to is not None:
            _check_name_field(self.assigned_to, "$.assigned_to")
        _check_nesting(self.inputs, "$.inputs")
        _check_nesting(self.retry_policy, "$.retry_policy")


class StatusUpdate(MessageBase, tag="status_update", frozen=True):
    """Where a task stands; ``progress_percent`` is within 0..100."""

    status: _TaskState
    progress_percent: _Percent | None = None
    current_step: str | None = None


class TaskComplete(MessageBase, tag="task_complete", frozen=True):
    """The final outcome of a task; absent ``results`` means ``{}``."""

    status: _FinalState
    results: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        """Base checks and the nesting bound of ``results``."""
        super().__post_init__()
        _check_nesting(self.results, "$.results")


class Fact(MessageBase, tag="fact", frozen=True):
    """A note stating a fact; the content is ``body``."""


class Progress(MessageBase, tag="progress", frozen=True):
    """A free-form progress note; the content is ``body``."""


class Decision(MessageBase, tag="decision", frozen=True):
    """A note recording a decision; the content is ``body``."""


class Review(MessageBase, tag="review", frozen=True):
    """A review note; the content is ``body``."""


class ErrorNote(MessageBase, tag="error", frozen=True):
    """A note reporting an error (``message_type`` "error"); the content is ``body``."""


Message: TypeAlias = (
    TaskAssignment | StatusUpdate | TaskComplete | Fact | Progress | Decision | Review | ErrorNote
)
"""Any valid message: the tagged union msgspec decodes into."""

MESSAGE_TYPES: Final[tuple[str, ...]] = (
    "task_assignment",
    "status_update",
    "task_complete",
    "fact",
    "progress",
    "decision",
    "review",
    "error",
)


def effective_recipients(msg: Message, default_recipient: str) -> list[str]:
    """Who a message goes to, before topic expansion.

    ``to`` when set (a list is de-duplicated, order kept; ``"topic:x"`` is
    returned as is for the router to expand), else ``assigned_to`` of a task
    assignment, else ``[default_recipient]``.
    """
    to = msg.to
    if isinstance(to, str):
        return [to]
    if to is not None:
        return list(dict.fromkeys(to))
    if isinstance(msg, TaskAssignment) and msg.assigned_to is not None:
        return [msg.assigned_to]
    return [default_recipient]


def dedupe_key(msg: Message) -> str:
    """The idempotency_key, else the message_id: what a producer's retries share.

    Not one key space: deduplication keeps message ids and idempotency keys in
    two separate sets and never compares one with the other (the rule is in
    :mod:`busd.routing.dedupe` and protocol.md), so this names the value only.
    """
    return msg.idempotency_key if msg.idempotency_key is not None else msg.message_id
