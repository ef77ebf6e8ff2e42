"""Tests for busd.model: the message contract as msgspec Structs."""

from __future__ import annotations

import datetime as dt
from typing import Any, get_args

import msgspec
import pytest

from busd.core import model
from busd.core.model import (
    MAX_NESTING,
    MESSAGE_TYPES,
    Decision,
    ErrorNote,
    Fact,
    Message,
    Progress,
    Review,
    StatusUpdate,
    TaskAssignment,
    TaskComplete,
    check_agent_name,
    dedupe_key,
    effective_recipients,
)
from busd.errors import InvalidName

WHEN = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


def envelope(message_type: str, **extra: Any) -> dict[str, Any]:
    """A valid message as builtins (what msgspec.convert receives)."""
    data: dict[str, Any] = {
        "message_type": message_type,
        "schema_version": "1.0",
        "message_id": "m-1",
        "created_at": "2024-05-01T12:00:00Z",
        "workflow_id": "wf",
        "task_id": "t1",
        "agent_id": "alice",
    }
    data.update(extra)
    return data


def convert(data: dict[str, Any]) -> Message:
    """Validate builtins into a Message, as the codec does."""
    msg: Message = msgspec.convert(data, Message)
    return msg


def convert_error(data: dict[str, Any]) -> str:
    """The msgspec validation message for invalid builtins."""
    with pytest.raises(msgspec.ValidationError) as info:
        convert(data)
    return str(info.value)


VALID_EXTRAS: dict[str, dict[str, Any]] = {
    "task_assignment": {
        "assigned_to": "bob",
        "priority": "high",
        "inputs": {"repo": "x"},
        "timeout_seconds": 30,
        "retry_policy": {"max": 3},
    },
    "status_update": {"status": "in_progress", "progress_percent": 42.5, "current_step": "build"},
    "task_complete": {"status": "completed", "results": {"ok": True}},
    "fact": {"body": "The sky is blue."},
    "progress": {"body": "halfway"},
    "decision": {"body": "use msgspec"},
    "review": {"body": "LGTM"},
    "error": {"body": "it broke"},
}

CLASSES = {
    "task_assignment": TaskAssignment,
    "status_update": StatusUpdate,
    "task_complete": TaskComplete,
    "fact": Fact,
    "progress": Progress,
    "decision": Decision,
    "review": Review,
    "error": ErrorNote,
}


def test_message_types_match_union_tags() -> None:
    """MESSAGE_TYPES lists exactly the tags of the Message union, in order."""
    tags = tuple(cls.__struct_config__.tag for cls in get_args(Message))
    assert tags == MESSAGE_TYPES
    assert len(set(MESSAGE_TYPES)) == 8


@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_valid_example_of_each_type(message_type: str) -> None:
    """A full valid message of every type converts to its Struct class."""
    msg = convert(envelope(message_type, **VALID_EXTRAS[message_type]))
    assert type(msg) is CLASSES[message_type]
    assert msg.created_at == WHEN


@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_minimal_example_of_each_type(message_type: str) -> None:
    """Only required fields: every optional field is None or its default."""
    extra = {"status": "completed"} if message_type in ("status_update", "task_complete") else {}
    msg = convert(envelope(message_type, **extra))
    assert msg.to is None and msg.body is None and msg.metadata is None


def test_all_envelope_fields_accepted() -> None:
    """Every optional envelope field, set, is kept."""
    msg = convert(
        envelope(
            "fact",
            to=["bob", "carol"],
            idempotency_key="k",
            parents=["m-0", "550e8400-e29b-41d4-a716-446655440000"],
            project_id="p",
            run_id="r",
            attachment_path="att/file.txt",
            body="# hi",
            metadata={"a": [1, {"b": None}]},
        )
    )
    assert msg.parents == ["m-0", "550e8400-e29b-41d4-a716-446655440000"]
    assert msg.attachment_path == "att/file.txt"


def test_optional_fields_may_be_null() -> None:
    """Optional envelope fields given as null are accepted."""
    nulls = dict.fromkeys(
        ["to", "idempotency_key", "parents", "project_id", "run_id", "attachment_path"], None
    )
    msg = convert(envelope("fact", body=None, metadata=None, **nulls))
    assert msg.to is None


def test_null_defaults_read_as_absent() -> None:
    """null priority/inputs/retry_policy/results are as if left out: effective priority
    medium, and nothing written back for them."""
    ta = convert(envelope("task_assignment", priority=None, inputs=None, retry_policy=None))
    assert isinstance(ta, TaskAssignment)
    assert (ta.priority, ta.inputs, ta.retry_policy) == (None, None, None)
    assert ta.effective_priority == "medium"
    assert set(msgspec.to_builtins(ta)) == set(envelope("task_assignment"))
    tc = convert(envelope("task_complete", status="failed", results=None))
    assert isinstance(tc, TaskComplete) and tc.results is None


def test_created_at_normalised_to_utc() -> None:
    """An offset timestamp is stored as the same instant in UTC."""
    msg = convert(envelope("fact", created_at="2024-05-01T14:30:00+02:30"))
    assert msg.created_at.tzinfo is dt.UTC
    assert msg.created_at == dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


def test_created_at_needs_offset() -> None:
    """A naive timestamp is rejected at $.created_at."""
    err = convert_error(envelope("fact", created_at="2024-05-01T12:00:00"))
    assert "timezone" in err and "$.created_at" in err


def test_created_at_overflowing_utc_rejected() -> None:
    """A timestamp that leaves the datetime range in UTC is a validation error, not a crash."""
    err = convert_error(envelope("fact", created_at="0001-01-01T00:00:00+01:00"))
    assert "$.created_at" in err


def test_empty_body_is_none() -> None:
    """An empty body is normalised to None (so encodings round-trip)."""
    assert convert(envelope("fact", body="")).body is None


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.10", "1.999"])
def test_schema_version_1x_accepted(version: str) -> None:
    """Any 1.<minor> schema_version is accepted."""
    assert convert(envelope("fact", schema_version=version)).schema_version == version


@pytest.mark.parametrize("version", ["2.0", "0.9", "1", "1.0.1", "1.x", "1.0\n", "", " 1.0"])
def test_schema_version_other_rejected(version: str) -> None:
    """Other versions fail at $.schema_version."""
    assert "$.schema_version" in convert_error(envelope("fact", schema_version=version))


@pytest.mark.parametrize(
    "message_id",
    ["m1", "MSG-20240501-120000-000000001-PID00001-0001", "550e8400-e29b-41d4-a716-446655440000"],
)
def test_message_id_accepted(message_id: str) -> None:
    """Seed-format ids and UUIDs are valid message ids."""
    assert convert(envelope("fact", message_id=message_id)).message_id == message_id


@pytest.mark.parametrize("message_id", ["", "-a", ".a", "a/b", "a:b", "a\n", "x" * 129, "é"])
def test_message_id_rejected(message_id: str) -> None:
    """Ids outside the pattern fail at $.message_id."""
    assert "$.message_id" in convert_error(envelope("fact", message_id=message_id))


GOOD_NAMES = ["alice", "a", "_x", "agent_1", "A-b.c_d", "0", "x" * 64, "CONSOLE", "COM10", "com0"]
BAD_NAMES = [
    "",
    "a:b",
    "a/b",
    "a\\b",
    "..",
    "../x",
    ".hidden",
    "-x",
    "a\x00b",
    "a b",
    "alice\n",
    "é",
    "x" * 65,
    "x" * 10_000,
    "alice.",
    "CON",
    "con",
    "Prn",
    "aux.txt",
    "NUL.a.b",
    "COM1",
    "com9",
    "LPT1",
    "lpt9.log",
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_check_agent_name_accepts(name: str) -> None:
    """Valid names are returned unchanged."""
    assert check_agent_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_check_agent_name_rejects(name: str) -> None:
    """Unsafe names raise InvalidName naming what was checked."""
    with pytest.raises(InvalidName) as info:
        check_agent_name(name, "topic")
    assert info.value.code == "invalid_name"
    assert "topic" in info.value.message


@pytest.mark.parametrize("name", BAD_NAMES)
def test_struct_accepts_free_text_agent_id(name: str) -> None:
    """agent_id is free text (schema 1.1): names unsafe as directories are valid there,
    and the same names still fail as a recipient."""
    if name == "" or len(name) > 256 or any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        assert "$.agent_id" in convert_error(envelope("fact", agent_id=name))
        return
    assert convert(envelope("fact", agent_id=name)).agent_id == name
    if name.strip() and len(name) <= 64 and "/" not in name and "\\" not in name:
        assert "$.to" in convert_error(envelope("fact", to=name))


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_struct_accepts_good_agent_id(name: str) -> None:
    """Valid names pass struct validation."""
    assert convert(envelope("fact", agent_id=name)).agent_id == name


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("to", "CON", "$.to"),
        ("to", "topic:a.", "$.to"),
        ("to", "topic:", "$.to"),
        ("to", "topic:a/b", "$.to"),
        ("to", "queue:x", "$.to"),
        ("to", [], "$.to"),
        ("to", ["topic:x"], "$.to[0]"),
        ("to", ["ok", "bad/"], "$.to[1]"),
        ("to", ["ok", "aux"], "$.to[1]"),
        ("to", ["a"] * 257, "$.to"),
        ("workflow_id", "", "$.workflow_id"),
        ("task_id", "x" * 257, "$.task_id"),
        ("idempotency_key", "", "$.idempotency_key"),
        ("parents", ["ok", "../x"], "$.parents[1]"),
        ("metadata", [1], "$.metadata"),
        ("body", 5, "$.body"),
        ("project_id", 1, "$.project_id"),
        ("unknown_field", 1, None),
    ],
)
def test_envelope_rules(field: str, value: Any, path: str | None) -> None:
    """Each envelope rule rejects bad values at the field's path."""
    err = convert_error(envelope("fact", **{field: value}))
    assert (path or field) in err


def test_to_forms_accepted() -> None:
    """to may be an agent, a topic, or a list of up to 256 agents."""
    assert convert(envelope("fact", to="bob")).to == "bob"
    assert convert(envelope("fact", to="topic:builds")).to == "topic:builds"
    assert convert(envelope("fact", to=["a"] * 256)).to == ["a"] * 256


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "\\\\server\\share",
        "\\x",
        "..",
        "../x",
        "a/../../b",
        "a\\..\\b",
        "a/..",
        "C:\\x",
        "c:x",
        "a\x00b",
        "",
    ],
)
def test_attachment_path_rejected(path: str) -> None:
    """Attachment paths that could leave the bus root fail at $.attachment_path."""
    assert "$.attachment_path" in convert_error(envelope("fact", attachment_path=path))


@pytest.mark.parametrize("path", ["a.txt", "dir/a.txt", "./a", "a/..b/c", "...", "a..b"])
def test_attachment_path_accepted(path: str) -> None:
    """Relative paths without a '..' component are fine."""
    assert convert(envelope("fact", attachment_path=path)).attachment_path == path


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ({"status": "done"}, "$.status"),
        ({}, "status"),
        ({"status": "in_progress", "progress_percent": 100.5}, "$.progress_percent"),
        ({"status": "in_progress", "progress_percent": -1}, "$.progress_percent"),
        ({"status": "in_progress", "current_step": 3}, "$.current_step"),
    ],
)
def test_status_update_rules(extra: dict[str, Any], path: str) -> None:
    """status_update requires a known status and a 0..100 progress."""
    assert path in convert_error(envelope("status_update", **extra))


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ({"priority": "urgent"}, "$.priority"),
        ({"timeout_seconds": 0}, "$.timeout_seconds"),
        ({"timeout_seconds": -5}, "$.timeout_seconds"),
        ({"assigned_to": "a/b"}, "$.assigned_to"),
        ({"assigned_to": "LPT3"}, "$.assigned_to"),
        ({"inputs": []}, "$.inputs"),
        ({"retry_policy": "x"}, "$.retry_policy"),
        ({"status": "queued"}, "status"),
    ],
)
def test_task_assignment_rules(extra: dict[str, Any], path: str) -> None:
    """task_assignment field rules, and no fields of other types."""
    assert path in convert_error(envelope("task_assignment", **extra))


@pytest.mark.parametrize(
    ("extra", "path"),
    [({"status": "in_progress"}, "$.status"), ({"status": "failed", "results": 1}, "$.results")],
)
def test_task_complete_rules(extra: dict[str, Any], path: str) -> None:
    """task_complete takes only completed/failed and a dict of results."""
    assert path in convert_error(envelope("task_complete", **extra))


@pytest.mark.parametrize("note", ["fact", "progress", "decision", "review", "error"])
def test_notes_have_no_extra_fields(note: str) -> None:
    """Note types reject fields of other types."""
    assert "status" in convert_error(envelope(note, status="completed"))


def test_unknown_message_type_rejected() -> None:
    """An unknown tag fails at $.message_type."""
    assert "$.message_type" in convert_error(envelope("FACT"))


@pytest.mark.parametrize(
    ("message_type", "field"),
    [
        ("fact", "metadata"),
        ("task_assignment", "inputs"),
        ("task_assignment", "retry_policy"),
        ("task_complete", "results"),
    ],
)
def test_nesting_limit(message_type: str, field: str) -> None:
    """Free-form dicts may nest MAX_NESTING levels deep (the dict itself is 1), no deeper."""
    extra: dict[str, Any] = {"status": "completed"} if message_type == "task_complete" else {}
    lists: Any = 1
    for _ in range(MAX_NESTING - 1):
        lists = [lists]
    msg = convert(envelope(message_type, **extra, **{field: {"k": lists}}))
    assert getattr(msg, field) == {"k": lists}
    err = convert_error(envelope(message_type, **extra, **{field: {"k": [lists]}}))
    assert f"$.{field}" in err and "nested deeper" in err


def test_task_assignment_defaults() -> None:
    """Left out: priority None (effective "medium"), inputs and retry policy None."""
    msg = convert(envelope("task_assignment"))
    assert isinstance(msg, TaskAssignment)
    assert msg.priority is None and msg.effective_priority == "medium"
    assert msg.inputs is None and msg.retry_policy is None
    assert msg.assigned_to is None and msg.timeout_seconds is None


def test_explicit_defaults_kept_when_encoded() -> None:
    """What the producer wrote comes back: an explicit "medium" and {} stay, absent stays out."""
    msg = convert(envelope("task_assignment", priority="medium", inputs={}))
    assert set(msgspec.to_builtins(msg)) == set(envelope("task_assignment")) | {
        "priority",
        "inputs",
    }
    bare = convert(envelope("task_assignment"))
    assert set(msgspec.to_builtins(bare)) == set(envelope("task_assignment"))


def test_messages_are_frozen() -> None:
    """Assigning to a field raises."""
    msg = convert(envelope("fact"))
    with pytest.raises(AttributeError):
        msg.body = "x"  # type: ignore[misc]


def test_direct_construction_checks_names() -> None:
    """Constructing in Python runs the __post_init__ rules (ValueError)."""
    with pytest.raises(ValueError, match="reserved"):
        Fact(
            schema_version="1.0",
            message_id="m",
            created_at=WHEN,
            workflow_id="w",
            task_id="t",
            agent_id="a",
            to="nul",
        )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, ["inbox-default"]),
        ({"to": "bob"}, ["bob"]),
        ({"to": "topic:ci"}, ["topic:ci"]),
        ({"to": ["b", "a", "b", "c", "a"]}, ["b", "a", "c"]),
    ],
)
def test_effective_recipients_notes(extra: dict[str, Any], expected: list[str]) -> None:
    """to wins; lists are de-duplicated in order; else the default."""
    assert effective_recipients(convert(envelope("fact", **extra)), "inbox-default") == expected


def test_effective_recipients_assigned_to() -> None:
    """For task assignments, assigned_to is used when to is unset."""
    msg = convert(envelope("task_assignment", assigned_to="worker"))
    assert effective_recipients(msg, "d") == ["worker"]
    msg = convert(envelope("task_assignment", assigned_to="worker", to="boss"))
    assert effective_recipients(msg, "d") == ["boss"]
    assert effective_recipients(convert(envelope("task_assignment")), "d") == ["d"]


def test_dedupe_key() -> None:
    """idempotency_key if set, else message_id."""
    assert dedupe_key(convert(envelope("fact"))) == "m-1"
    assert dedupe_key(convert(envelope("fact", idempotency_key="job-7"))) == "job-7"


def test_all_exports_exist() -> None:
    """Every name in __all__ is defined."""
    for name in model.__all__:
        assert hasattr(model, name), name
