"""Tests for busd.codec: decoding by content, both encodings, and every failure reason."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busd.core import codec
from busd.core.codec import decode, encode_json, encode_markdown, to_builtins
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
)
from busd.errors import InvalidMessage, Reason

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def envelope(message_type: str = "fact", **extra: Any) -> dict[str, Any]:
    """A valid message as a JSON-ready dict."""
    data: dict[str, Any] = {
        "message_type": message_type,
        "schema_version": "1.0",
        "message_id": "m-1",
        "created_at": "2024-05-01T12:00:00+02:00",
        "workflow_id": "wf",
        "task_id": "t1",
        "agent_id": "alice",
    }
    data.update(extra)
    return data


def jbytes(data: Any) -> bytes:
    """Encode any value as JSON bytes."""
    return json.dumps(data).encode()


def rejected(data: bytes, **kwargs: Any) -> InvalidMessage:
    """Decode, expecting InvalidMessage; return it."""
    with pytest.raises(InvalidMessage) as info:
        decode(data, **kwargs)
    return info.value


SEED_MD = (
    b"---\n"
    b"msg_id: MSG-20240501-120000-000000001-PID00001-0001\n"
    b"ts: 2024-05-01T12:00:00.123456789Z\n"
    b"type: FACT\n"
    b"project_id: proj\n"
    b"task_id: t1\n"
    b"run_id: ''\n"
    b"workflow_id: wf\n"
    b"agent_id: alice\n"
    b"parents:\n"
    b"- MSG-0\n"
    b"attachment_path: runs/out.log\n"
    b"---\n"
    b"# Title\n\nSome *markdown*.\n"
)


def md(header: str, body: str = "") -> bytes:
    """A Markdown message from header lines and a body."""
    return f"---\n{header}---\n{body}".encode()


MD_BASE = (
    "msg_id: m-1\nts: 2024-05-01T12:00:00Z\ntype: fact\nworkflow_id: wf\ntask_id: t\nagent_id: a\n"
)

EXTRAS: dict[str, dict[str, Any]] = {
    "task_assignment": {"assigned_to": "bob", "priority": "low", "inputs": {"k": [1, 2]}},
    "status_update": {"status": "blocked", "progress_percent": 10, "current_step": "wait"},
    "task_complete": {"status": "failed", "results": {"error": "boom"}},
    "fact": {"body": "fact"},
    "progress": {"body": "p"},
    "decision": {"body": "d"},
    "review": {"body": "r"},
    "error": {"body": "e"},
}


# ---------------------------------------------------------------- valid input


@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_json_each_type(message_type: str) -> None:
    """A valid JSON message of every type decodes and round-trips."""
    msg = decode(jbytes(envelope(message_type, **EXTRAS[message_type])))
    assert to_builtins(msg)["message_type"] == message_type
    assert decode(encode_json(msg)) == msg
    assert decode(encode_markdown(msg)) == msg


@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_markdown_each_type_case_insensitive(message_type: str) -> None:
    """type: in any case selects the message type."""
    extra = {"task_complete": "status: completed\n", "status_update": "status: queued\n"}
    header = MD_BASE.replace("type: fact", f"type: {message_type.title()}")
    msg = decode(md(header + extra.get(message_type, ""), "body"))
    assert to_builtins(msg)["message_type"] == message_type
    assert msg.body == "body"


def test_seed_message() -> None:
    """A message in the older message-bus layout (plus workflow/agent ids) decodes."""
    msg = decode(SEED_MD)
    assert isinstance(msg, Fact)
    assert msg.message_id == "MSG-20240501-120000-000000001-PID00001-0001"
    assert msg.created_at == dt.datetime(2024, 5, 1, 12, 0, 0, 123457, tzinfo=dt.UTC)
    assert msg.schema_version == "1.0"
    assert msg.parents == ["MSG-0"]
    assert msg.run_id == ""
    assert msg.body == "# Title\n\nSome *markdown*.\n"


def test_markdown_envelope_names_accepted() -> None:
    """Envelope names work in front matter as well as the seed names."""
    header = (
        "message_id: m-2\ncreated_at: 2024-05-01T12:00:00+01:00\nmessage_type: DECISION\n"
        "schema_version: '1.3'\nworkflow_id: wf\ntask_id: t\nagent_id: a\n"
    )
    msg = decode(md(header))
    assert isinstance(msg, Decision)
    assert (msg.message_id, msg.schema_version, msg.body) == ("m-2", "1.3", None)
    assert msg.created_at == dt.datetime(2024, 5, 1, 11, 0, tzinfo=dt.UTC)


def test_markdown_crlf() -> None:
    """CRLF delimiters are recognised; the body keeps its CRLFs."""
    data = md(MD_BASE, "").replace(b"\n", b"\r\n") + b"line1\r\n---\r\nline2\r\n"
    assert decode(data).body == "line1\r\n---\r\nline2\r\n"


def test_markdown_body_byte_exact() -> None:
    """Everything after the closing line is the body, including later --- lines."""
    body = "\n\n---\nnot: yaml\n---\n\ntrailing  \n\n"
    msg = decode(md(MD_BASE, body))
    assert msg.body == body
    assert decode(encode_markdown(msg)) == msg
    assert decode(encode_json(msg)) == msg


def test_markdown_closing_line_at_eof() -> None:
    """A closing --- without a newline ends the header; the body is None."""
    assert decode(md(MD_BASE)[:-1]).body is None
    assert decode(md(MD_BASE)).body is None


def test_markdown_detected_by_content_only() -> None:
    """Leading blank lines or a --- not alone on the first line mean JSON."""
    assert rejected(b"\n" + md(MD_BASE)).reason is Reason.INVALID_JSON
    assert rejected(b"--- \n" + md(MD_BASE)[4:]).reason is Reason.INVALID_JSON
    assert rejected(b"----\n" + md(MD_BASE)[4:]).reason is Reason.INVALID_JSON


def test_bom_tolerated() -> None:
    """A UTF-8 BOM before JSON or front matter is skipped."""
    bom = b"\xef\xbb\xbf"
    assert decode(bom + jbytes(envelope())).message_id == "m-1"
    assert decode(bom + md(MD_BASE)).message_id == "m-1"
    assert rejected(bom + bom + jbytes(envelope())).reason is Reason.INVALID_JSON


def test_uuid_message_id() -> None:
    """A UUID is an acceptable message id."""
    uid = "550e8400-e29b-41d4-a716-446655440000"
    assert decode(jbytes(envelope(message_id=uid))).message_id == uid


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.42"])
def test_schema_1x_accepted(version: str) -> None:
    """Any 1.x version is accepted in both encodings."""
    assert decode(jbytes(envelope(schema_version=version))).schema_version == version
    header = MD_BASE + f"schema_version: '{version}'\n"
    assert decode(md(header)).schema_version == version


# ---------------------------------------------------------------- encode


def test_encode_json_format() -> None:
    """Compact UTF-8, no trailing newline, created_at in UTC with Z."""
    msg = decode(jbytes(envelope(body="héllo")))
    data = encode_json(msg)
    assert not data.endswith(b"\n")
    assert b", " not in data and b": " not in data
    assert b'"created_at":"2024-05-01T10:00:00Z"' in data
    assert "héllo".encode() in data
    assert json.loads(data)["message_type"] == "fact"


def test_encode_markdown_format() -> None:
    """Seed names first, TYPE upper case, then the body after ---."""
    msg = decode(jbytes(envelope("task_complete", status="completed", body="done\n")))
    text = encode_markdown(msg).decode()
    assert text.startswith("---\nmsg_id: m-1\nts: 2024-05-01T10:00:00Z\ntype: TASK_COMPLETE\n")
    assert text.endswith("\n---\ndone\n")
    assert "message_id" not in text and "created_at" not in text


def test_to_builtins() -> None:
    """to_builtins gives JSON-model data with the tag; explicit defaults stay, absent stay out."""
    msg = decode(jbytes(envelope("task_assignment", priority="medium")))
    data = to_builtins(msg)
    assert data["message_type"] == "task_assignment"
    assert data["created_at"] == "2024-05-01T10:00:00Z"
    assert data["priority"] == "medium" and "body" not in data and "inputs" not in data


def test_empty_body_normalised() -> None:
    """An empty body decodes to None in both encodings."""
    assert decode(jbytes(envelope(body=""))).body is None
    assert decode(md(MD_BASE, "")).body is None


# ---------------------------------------------------------------- size, bytes


def test_too_large() -> None:
    """Data longer than max_bytes is TOO_LARGE; at the limit it is fine."""
    data = jbytes(envelope())
    assert decode(data, max_bytes=len(data)).message_id == "m-1"
    assert rejected(data, max_bytes=len(data) - 1).reason is Reason.TOO_LARGE


def test_front_matter_size_limit() -> None:
    """A YAML header over 64 KiB is TOO_LARGE, whether closed or not."""
    big = MD_BASE + "metadata:\n" + "".join(f"  k{i}: {'x' * 60}\n" for i in range(1200))
    assert rejected(md(big)).reason is Reason.TOO_LARGE
    assert rejected(b"---\n" + b"a: b\n" * 20000).reason is Reason.TOO_LARGE


@pytest.mark.parametrize(
    "data",
    [
        b'{"message_type":"fact","body":"\xff"}',
        b'{"message_type":"fact","agent_id":"\xc3"}',
        b'{"message_type":"fact","metadata":{"k\xed\xa0\x80":1}}',
        b'{"message_type":"fact",\xff}',
        b"\xff\xfe{}",
        jbytes(envelope(body="ok"))[:-2] + b'\xe2\x82"}',
        jbytes(envelope(status="nope"))[:-1] + b',"x":"\xc0\xaf"}',
    ],
)
def test_invalid_utf8_json(data: bytes) -> None:
    """Invalid UTF-8 anywhere in JSON is INVALID_UTF8, even alongside other errors."""
    assert rejected(data).reason is Reason.INVALID_UTF8


@pytest.mark.parametrize(
    "data",
    [md(MD_BASE, "ok").replace(b"task_id: t", b"task_id: \xff"), md(MD_BASE, "ok") + b"\xff"],
)
def test_invalid_utf8_markdown(data: bytes) -> None:
    """Invalid UTF-8 in the header or the body is INVALID_UTF8."""
    assert rejected(data).reason is Reason.INVALID_UTF8


def test_lone_surrogate_escape_rejected() -> None:
    """A \\ud800 escape (not encodable as UTF-8) is rejected, not accepted."""
    data = jbytes(envelope(body="x")).replace(b'"x"', b'"\\ud800"')
    assert rejected(data).reason is Reason.INVALID_JSON


# ---------------------------------------------------------------- JSON errors


@pytest.mark.parametrize("data", [b"", b"{", b"{'a': 1}", b"nul", b'{"a":1}x', b"NaN", b"   "])
def test_invalid_json(data: bytes) -> None:
    """Unparseable JSON is INVALID_JSON with msgspec's detail."""
    err = rejected(data)
    assert err.reason is Reason.INVALID_JSON
    assert err.detail


@pytest.mark.parametrize(
    "data", [b"[]", b"1", b'"x"', b"null", b"true", b"[" + jbytes(envelope()) + b"]"]
)
def test_not_an_object(data: bytes) -> None:
    """Valid JSON that is not an object is SCHEMA: expected a JSON object."""
    err = rejected(data)
    assert (err.reason, err.detail) == (Reason.SCHEMA, "expected a JSON object")
    err = rejected(data, fill_missing=True)
    assert (err.reason, err.detail) == (Reason.SCHEMA, "expected a JSON object")


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        ("2.0", Reason.UNSUPPORTED_SCHEMA_VERSION),
        ("3", Reason.UNSUPPORTED_SCHEMA_VERSION),
        ("0.9", Reason.UNSUPPORTED_SCHEMA_VERSION),
        ("10.1", Reason.UNSUPPORTED_SCHEMA_VERSION),
        ("1", Reason.SCHEMA),
        ("1.0.0", Reason.SCHEMA),
        ("v1.0", Reason.SCHEMA),
        ("", Reason.SCHEMA),
        (1.0, Reason.SCHEMA),
        (None, Reason.SCHEMA),
        ("9" * 5000 + ".0", Reason.UNSUPPORTED_SCHEMA_VERSION),
    ],
)
def test_schema_version_classified(version: Any, reason: Reason) -> None:
    """Other majors are UNSUPPORTED_SCHEMA_VERSION (naming it); junk is SCHEMA."""
    for fill in (False, True):
        err = rejected(jbytes(envelope(schema_version=version)), fill_missing=fill)
        assert err.reason is reason
        assert err.path == "$.schema_version"
        if reason is Reason.UNSUPPORTED_SCHEMA_VERSION:
            assert str(version)[:10] in err.detail


def test_unsupported_version_wins_over_other_errors() -> None:
    """A 2.0 message with a different shape is reported as unsupported, not schema."""
    data = jbytes({"schema_version": "2.0", "kind": "new-thing", "payload": [1]})
    assert rejected(data).reason is Reason.UNSUPPORTED_SCHEMA_VERSION


def test_missing_schema_version() -> None:
    """Missing schema_version in JSON is SCHEMA at $.schema_version (no default)."""
    data = envelope()
    del data["schema_version"]
    err = rejected(jbytes(data))
    assert (err.reason, err.path) == (Reason.SCHEMA, "$.schema_version")


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    (envelope("status_update", status="done"), "$.status"),
    (envelope("status_update"), "$.status"),
    (envelope("status_update", status="queued", progress_percent=101), "$.progress_percent"),
    (envelope("task_complete", status="queued"), "$.status"),
    (envelope("task_assignment", priority="urgent"), "$.priority"),
    (envelope("task_assignment", timeout_seconds=0), "$.timeout_seconds"),
    (envelope("task_assignment", assigned_to="../x"), "$.assigned_to"),
    (envelope("nope"), "$.message_type"),
    (envelope(extra_field=1), "$.extra_field"),
    (envelope(message_id="a b"), "$.message_id"),
    (envelope(message_id=None), "$.message_id"),
    (envelope(created_at="2024-05-01T12:00:00"), "$.created_at"),
    (envelope(created_at="yesterday"), "$.created_at"),
    (envelope(workflow_id=""), "$.workflow_id"),
    (envelope(task_id=7), "$.task_id"),
    (envelope(agent_id="a\nb"), "$.agent_id"),
    (envelope(to=["ok", "a:b"]), "$.to[1]"),
    (envelope(to="topic:con"), "$.to"),
    (envelope(idempotency_key="x" * 257), "$.idempotency_key"),
    (envelope(parents="m-0"), "$.parents"),
    (envelope(attachment_path="../../etc/passwd"), "$.attachment_path"),
]


@pytest.mark.parametrize(("data", "path"), BAD_FIELDS)
def test_schema_errors_have_paths(data: dict[str, Any], path: str) -> None:
    """Every rule violation is SCHEMA with the JSON path of the field."""
    err = rejected(jbytes(data))
    assert err.reason is Reason.SCHEMA
    assert err.path is not None and err.path.startswith(path)
    assert err.to_dict()["path"] == err.path


def test_number_out_of_range() -> None:
    """A JSON number beyond float range is SCHEMA, not infinity."""
    data = jbytes(envelope(metadata={"deep": ["X"]})).replace(b'"X"', b"1e400")
    err = rejected(data)
    assert err.reason is Reason.SCHEMA
    assert err.path is not None and err.path.startswith("$.metadata")


def test_missing_tag() -> None:
    """A JSON object without message_type is SCHEMA at $.message_type."""
    data = envelope()
    del data["message_type"]
    err = rejected(jbytes(data))
    assert (err.reason, err.path) == (Reason.SCHEMA, "$.message_type")


@pytest.mark.parametrize(
    "agent_id", ["", "a\x00", "a\nb", "tab\there", "\x7f", "c1\x85", "x" * 257]
)
def test_bad_agent_ids(agent_id: str) -> None:
    """agent_id is free text: empty, over 256 characters or with a control character is
    SCHEMA at $.agent_id, in both encodings."""
    err = rejected(jbytes(envelope(agent_id=agent_id)))
    assert (err.reason, err.path) == (Reason.SCHEMA, "$.agent_id")
    header = MD_BASE.replace("agent_id: a\n", f"agent_id: {json.dumps(agent_id)}\n")
    err = rejected(md(header))
    assert (err.reason, err.path) == (Reason.SCHEMA, "$.agent_id")


@pytest.mark.parametrize("agent_id", ["Builder Agent", "a:b", "a/b", "..", "CON", "a.", "ü"])
def test_agent_id_is_free_text(agent_id: str) -> None:
    """Names other systems write (spaces, slashes, device names) are valid agent ids:
    agent_id names a producer and never becomes a directory."""
    msg = decode(jbytes(envelope(agent_id=agent_id)))
    assert msg.agent_id == agent_id
    assert decode(encode_json(msg)) == msg


def test_delivery_keeps_explicit_defaults_and_integers() -> None:
    """An explicit default stays and an integer stays an integer in the canonical JSON
    (a Tapps producer's "priority": "medium" and "timeout_seconds": 900)."""
    data = envelope("task_assignment", priority="medium", timeout_seconds=900, inputs={})
    out = json.loads(encode_json(decode(jbytes(data))))
    assert out["priority"] == "medium" and out["inputs"] == {}
    assert out["timeout_seconds"] == 900 and isinstance(out["timeout_seconds"], int)
    update = json.loads(
        encode_json(decode(jbytes(envelope("status_update", status="queued", progress_percent=40))))
    )
    assert isinstance(update["progress_percent"], int)
    fraction = decode(jbytes(envelope("task_assignment", timeout_seconds=1.5)))
    assert isinstance(fraction, TaskAssignment) and fraction.timeout_seconds == 1.5
    bare = decode(jbytes(envelope("task_assignment")))
    assert isinstance(bare, TaskAssignment) and bare.effective_priority == "medium"
    assert "priority" not in json.loads(encode_json(bare))


@pytest.mark.parametrize(
    "path",
    ["../x", "a/../../b", "/etc/passwd", "\\x", "C:\\Windows", "d:x", "a\\..\\..\\b", "a\x00"],
)
def test_attachment_traversal(path: str) -> None:
    """Attachment paths leaving the bus root are SCHEMA at $.attachment_path."""
    err = rejected(jbytes(envelope(attachment_path=path)))
    assert (err.reason, err.path) == (Reason.SCHEMA, "$.attachment_path")


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        jbytes(envelope())[:-1] + b',"metadata":{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        jbytes(envelope())[:-1] + b',"metadata":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001,
        b"[" * 100_000,
    ],
)
def test_deep_nesting(data: bytes) -> None:
    """100,000 levels of nesting raise InvalidMessage, never RecursionError."""
    for fill in (False, True):
        with pytest.raises(InvalidMessage):
            decode(data, fill_missing=fill)


def test_deep_nesting_in_version() -> None:
    """Deep nesting in schema_version itself is still an InvalidMessage."""
    data = b'{"a":1,"schema_version":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(InvalidMessage):
        decode(data)


def nested(levels: int) -> Any:
    """A value with exactly ``levels`` levels of alternating objects and lists."""
    value: Any = "leaf"
    for i in range(levels):
        value = {"n": value} if i % 2 else [value]
    return value


def test_max_nesting_round_trips() -> None:
    """Metadata nested MAX_NESTING deep is valid and survives both encodings."""
    msg = decode(jbytes(envelope(metadata={"m": nested(MAX_NESTING - 1)})))
    assert decode(encode_markdown(msg)) == msg
    assert decode(encode_json(msg)) == msg


def test_beyond_max_nesting_rejected() -> None:
    """One level deeper is SCHEMA at the field, in both encodings."""
    err = rejected(jbytes(envelope(metadata={"m": nested(MAX_NESTING)})))
    assert (err.reason, err.path) == (Reason.SCHEMA, "$.metadata")
    header = MD_BASE + "metadata: " + json.dumps({"m": nested(MAX_NESTING)}) + "\n"
    err = rejected(md(header))
    assert (err.reason, err.path) == (Reason.SCHEMA, "$.metadata")


# ---------------------------------------------------------------- fill_missing


def test_fill_missing_json() -> None:
    """Missing or null message_id/created_at are filled only with fill_missing."""
    for value in ("absent", None):
        data = envelope()
        if value == "absent":
            del data["message_id"], data["created_at"]
        else:
            data.update(message_id=None, created_at=None)
        assert rejected(jbytes(data)).path == "$.message_id"
        before = dt.datetime.now(dt.UTC)
        msg = decode(jbytes(data), fill_missing=True)
        assert msg.message_id.startswith("MSG-")
        assert before <= msg.created_at <= dt.datetime.now(dt.UTC)
        assert msg.created_at.tzinfo is dt.UTC


def test_fill_missing_keeps_given_values() -> None:
    """fill_missing never replaces values that are present."""
    msg = decode(jbytes(envelope()), fill_missing=True)
    assert msg.message_id == "m-1"
    data = envelope(status="completed")
    del data["message_id"]
    err = rejected(jbytes(data), fill_missing=True)
    assert (err.reason, err.path) == (Reason.SCHEMA, "$.status")


def test_fill_missing_unique_ids() -> None:
    """Each filled message gets its own id."""
    data = envelope()
    del data["message_id"]
    ids = {decode(jbytes(data), fill_missing=True).message_id for _ in range(50)}
    assert len(ids) == 50


def test_fill_missing_markdown() -> None:
    """fill_missing works for front matter too."""
    header = "type: progress\nworkflow_id: wf\ntask_id: t\nagent_id: a\n"
    assert rejected(md(header, "x")).path == "$.message_id"
    msg = decode(md(header, "x"), fill_missing=True)
    assert isinstance(msg, Progress) and msg.message_id.startswith("MSG-")


def test_fill_missing_still_reports_schema_errors() -> None:
    """With fill_missing, other errors keep their reason and path."""
    data = envelope("status_update", status="nope")
    del data["created_at"]
    err = rejected(jbytes(data), fill_missing=True)
    assert (err.reason, err.path) == (Reason.SCHEMA, "$.status")


# ---------------------------------------------------------------- front matter errors


def test_yaml_alias_bomb() -> None:
    """A billion-laughs header is refused before expansion."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    err = rejected(md(MD_BASE + "metadata:\n" + "".join(f"  {x}\n" for x in lines)))
    assert err.reason is Reason.SCHEMA
    assert "anchor" in err.detail


@pytest.mark.parametrize(
    "snippet",
    [
        "metadata: {a: &x 1}\n",
        "metadata: *x\n",
        "<<: {task_id: t2}\n",
        "metadata: !!python/object:os.system {}\n",
        "metadata: !!python/object/apply:os.system ['true']\n",
        "metadata: !!python/name:os.system\n",
        "metadata: !!binary aGVsbG8=\n",
        "metadata: !!set {a, b}\n",
        "metadata: !!omap [a: 1]\n",
        "metadata: !custom 1\n",
        "metadata: !!str 1\n",
        "metadata: !!int x\n",
        "metadata: {a: 1, a: 2}\n",
        "metadata: {[1]: x}\n",
        "metadata: {x: .inf}\n",
        "metadata: {x: .nan}\n",
        "metadata: [unclosed\n",
        "metadata:\n\t- tab\n",
        "body: inline\n",
        "msg_id: m-2\nmessage_id: m-3\n",
        "created_at: 2024-05-01T12:00:00Z\n",
        "message_type: fact\n",
        "metadata: " + "[" * 20_000 + "]" * 20_000 + "\n",
    ],
)
def test_front_matter_rejections(snippet: str) -> None:
    """Unsafe or ambiguous YAML is SCHEMA, with no object ever constructed."""
    err = rejected(md(MD_BASE + snippet))
    assert err.reason is Reason.SCHEMA


def test_front_matter_error_detail() -> None:
    """YAML syntax errors are SCHEMA with a 'front matter:' detail."""
    err = rejected(md(MD_BASE + "metadata: [unclosed\n"))
    assert err.detail.startswith("front matter: ")


@pytest.mark.parametrize("header", ["", "- a\n- b\n", "just text\n", "null\n", "'x'\n"])
def test_front_matter_not_a_mapping(header: str) -> None:
    """A header that is not a mapping is SCHEMA."""
    assert rejected(md(header)).reason is Reason.SCHEMA


def test_front_matter_unclosed() -> None:
    """Front matter without a closing --- line is SCHEMA."""
    assert rejected(MD_BASE.join(["---\n", ""]).encode()).reason is Reason.SCHEMA


def test_front_matter_timestamps() -> None:
    """ts needs an offset: naive and date-only timestamps are rejected."""
    for ts in ("2024-05-01T12:00:00", "2024-05-01 12:00:00", "2024-05-01"):
        err = rejected(md(MD_BASE.replace("2024-05-01T12:00:00Z", ts)))
        assert (err.reason, err.path) == (Reason.SCHEMA, "$.created_at")
    msg = decode(md(MD_BASE.replace("12:00:00Z", "12:00:00-05:00")))
    assert msg.created_at == dt.datetime(2024, 5, 1, 17, 0, tzinfo=dt.UTC)


def test_front_matter_scalars_keep_json_types() -> None:
    """Plain data: timestamps stay text, keys are strings, numbers and booleans typed."""
    header = MD_BASE + "metadata:\n  when: 2024-01-01\n  1: one\n  yes: true\n  n: 1.5\n  z: ~\n"
    msg = decode(md(header))
    assert msg.metadata == {"when": "2024-01-01", "1": "one", "yes": True, "n": 1.5, "z": None}
    assert decode(encode_json(msg)) == msg


def test_schema_version_default_markdown_only() -> None:
    """Front matter defaults schema_version to 1.0; 2.0 there is still unsupported."""
    assert decode(md(MD_BASE)).schema_version == "1.0"
    err = rejected(md(MD_BASE + "schema_version: '2.0'\n"))
    assert err.reason is Reason.UNSUPPORTED_SCHEMA_VERSION
    assert rejected(md(MD_BASE + "schema_version: 1.0\n")).reason is Reason.SCHEMA


def test_schema_errors_in_markdown_have_paths() -> None:
    """Validation errors of front matter use the same JSON paths."""
    err = rejected(md(MD_BASE.replace("type: fact", "type: status_update") + "status: nope\n"))
    assert (err.reason, err.path) == (Reason.SCHEMA, "$.status")


TRICKY_STRINGS = [
    "\x85",
    "a\x85b",
    "\u2028",
    "\u2029x",
    "\ufeff",
    "\ufeffstart",
    "tab\there",
    "\t",
    " leading",
    "trailing ",
    "  ",
    "",
    "line\nbreak",
    "\r\n",
    "\n---\n",
    "---",
    "...",
    "- item",
    "? key",
    "# comment",
    "a: b",
    "{x}",
    "[x]",
    "&anchor",
    "*alias",
    "!tag",
    "%directive",
    "@at",
    "`tick",
    "'quote",
    '"dq',
    "\\",
    "2024-01-01",
    "2024-01-01T00:00:00Z",
    "1:30",
    "0x1F",
    "0o17",
    "1_000",
    "1e5",
    "1.5",
    ".inf",
    ".nan",
    "yes",
    "No",
    "off",
    "~",
    "null",
    "true",
    "<<",
    "=",
    "\x00",
    "\x7f",
    "\x9f",
    "\ud7ff\ue000\ufffd",
    "\U0001f600 emoji",
    "word " * 60,
    "x" * 300,
    "é" * 50 + " " + "ü" * 50,
    "a  \n  b",
    "\n\nlead and trail\n\n",
]


@pytest.mark.parametrize("text", TRICKY_STRINGS)
def test_tricky_strings_round_trip_markdown(text: str) -> None:
    """Strings that trip YAML writers survive the front matter as values and keys."""
    msg = decode(
        jbytes(
            envelope(
                project_id=text,
                run_id=text * 2,
                metadata={text: text, "list": [text, {text: [text]}], "k" * 200 + text: 1},
                body=text,
            )
        )
    )
    data = encode_markdown(msg)
    assert decode(data) == msg
    assert decode(encode_json(msg)) == msg


def test_big_integers() -> None:
    """Integers up to 4300 digits round-trip; bigger ones are SCHEMA, never a crash."""
    big = int("9" * 4300)
    msg = decode(jbytes(envelope(metadata={"n": big, "m": -(big // 10)})))
    assert decode(encode_markdown(msg)) == msg
    assert decode(encode_json(msg)) == msg
    too_big = jbytes(envelope(metadata={"n": "X"})).replace(b'"X"', b"9" * 4301)
    for fill in (False, True):
        err = rejected(too_big, fill_missing=fill)
        assert err.reason is Reason.SCHEMA
    err = rejected(md(MD_BASE + "metadata: {n: 0x" + "f" * 4000 + "}\n"))
    assert err.reason is Reason.SCHEMA
    for number in ("9" * 4301, "-" + "9" * 4300):
        err = rejected(md(MD_BASE + "metadata: {n: " + number + "}\n"))
        assert err.reason is Reason.SCHEMA


def test_no_crash_at_interpreter_exit() -> None:
    """Importing and using the codec never crashes the interpreter at exit (msgspec #717)."""
    code = (
        "from busd.core import codec; import json; "
        f"m = codec.decode({jbytes(envelope(to=['a', 'b']))!r}); "
        "codec.decode(codec.encode_markdown(m))"
    )
    for _ in range(6):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")


# ---------------------------------------------------------------- properties

_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10))} | {
    f"LPT{i}" for i in range(1, 10)
}
_NAME = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,20}\Z").filter(
    lambda s: not s.endswith(".") and s.split(".")[0].upper() not in _RESERVED
)
_MSG_ID = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,40}\Z")
_SHORT = st.text(min_size=1, max_size=40)
_JSON_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
_JSON = st.recursive(
    _JSON_SCALAR,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_DICT = st.dictionaries(st.text(max_size=12), _JSON, max_size=4)
_OFFSET = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
    lambda m: dt.timezone(dt.timedelta(minutes=m))
)
_WHEN = st.datetimes(
    min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 12, 31), timezones=_OFFSET
)
_PATH_PART = st.from_regex(r"\A[A-Za-z0-9_ .-]{1,12}\Z").filter(lambda s: s.strip(".") != "")


def _opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


_ENVELOPE = {
    "schema_version": st.from_regex(r"\A1\.[0-9]{1,3}\Z"),
    "message_id": _MSG_ID,
    "created_at": _WHEN,
    "workflow_id": _SHORT,
    "task_id": _SHORT,
    "agent_id": _NAME,
    "to": _opt(_NAME | _NAME.map(lambda n: "topic:" + n) | st.lists(_NAME, min_size=1, max_size=4)),
    "idempotency_key": _opt(_SHORT),
    "parents": _opt(st.lists(_MSG_ID, max_size=3)),
    "project_id": _opt(st.text(max_size=20)),
    "run_id": _opt(st.text(max_size=20)),
    "attachment_path": _opt(st.lists(_PATH_PART, min_size=1, max_size=3).map("/".join)),
    "body": _opt(st.text()),
    "metadata": _opt(_DICT),
}

_BY_TYPE: dict[Any, dict[str, st.SearchStrategy[Any]]] = {
    TaskAssignment: {
        "assigned_to": _opt(_NAME),
        "priority": st.sampled_from(["low", "medium", "high", None]),
        "inputs": _DICT,
        "timeout_seconds": _opt(
            st.floats(min_value=0, exclude_min=True, allow_infinity=False, allow_nan=False)
        ),
        "retry_policy": _DICT,
    },
    StatusUpdate: {
        "status": st.sampled_from(["queued", "in_progress", "blocked", "failed", "completed"]),
        "progress_percent": _opt(st.floats(min_value=0, max_value=100)),
        "current_step": _opt(st.text(max_size=20)),
    },
    TaskComplete: {"status": st.sampled_from(["completed", "failed"]), "results": _DICT},
    Fact: {},
    Progress: {},
    Decision: {},
    Review: {},
    ErrorNote: {},
}

messages: st.SearchStrategy[Message] = st.one_of(
    [st.builds(cls, **_ENVELOPE, **extra) for cls, extra in _BY_TYPE.items()]
)


@PROPERTY
@given(messages)
def test_round_trip_json(msg: Message) -> None:
    """decode(encode_json(m)) == m for every valid message."""
    assert decode(encode_json(msg)) == msg


@PROPERTY
@given(messages)
def test_round_trip_markdown(msg: Message) -> None:
    """decode(encode_markdown(m)) == m for every valid message."""
    data = encode_markdown(msg)
    assert decode(data) == msg
    assert decode(data, max_bytes=len(data)) == msg


@PROPERTY
@given(messages)
def test_builtins_convert_back(msg: Message) -> None:
    """to_builtins output validates back into the same message."""
    assert msgspec.convert(to_builtins(msg), Message) == msg


def _only_invalid_message(data: bytes, fill_missing: bool) -> None:
    try:
        decode(data, fill_missing=fill_missing, max_bytes=1 << 20)
    except InvalidMessage as err:
        assert isinstance(err.reason, Reason)
        assert err.path is None or err.path.startswith("$")


@PROPERTY
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes(data: bytes, fill_missing: bool) -> None:
    """Arbitrary bytes decode or raise InvalidMessage, nothing else."""
    _only_invalid_message(data, fill_missing)


@PROPERTY
@given(st.text(max_size=300), st.booleans())
def test_arbitrary_front_matter(text: str, fill_missing: bool) -> None:
    """Arbitrary text after a --- line raises only InvalidMessage."""
    _only_invalid_message(b"---\n" + text.encode("utf-8", "surrogatepass"), fill_missing)


_KEYS = st.sampled_from([*envelope("task_assignment"), "status", "to", "body", "metadata"])


@PROPERTY
@given(
    _JSON | st.dictionaries(_KEYS | st.text(max_size=8), _JSON, max_size=10),
    st.booleans(),
)
def test_arbitrary_json_values(value: Any, fill_missing: bool) -> None:
    """Arbitrary JSON values raise only InvalidMessage (or decode)."""
    _only_invalid_message(jbytes(value), fill_missing)


@PROPERTY
@given(st.dictionaries(_KEYS, _JSON | _NAME, max_size=12), st.booleans())
def test_arbitrary_front_matter_mappings(value: dict[str, Any], fill_missing: bool) -> None:
    """Arbitrary YAML mappings of envelope-ish keys raise only InvalidMessage."""
    _only_invalid_message(b"---\n" + yaml.safe_dump(value).encode() + b"---\n", fill_missing)


@PROPERTY
@given(messages, st.data())
def test_mutated_messages(msg: Message, data: st.DataObject) -> None:
    """Valid JSON with one field replaced by junk raises only InvalidMessage."""
    fields = to_builtins(msg)
    key = data.draw(st.sampled_from(sorted(fields)))
    fields[key] = data.draw(_JSON)
    _only_invalid_message(jbytes(fields), False)


def test_module_exports() -> None:
    """codec exports exactly its documented names."""
    assert set(codec.__all__) == {
        "MAX_FRONT_MATTER_BYTES",
        "decode",
        "encode_json",
        "encode_markdown",
        "to_builtins",
    }


# ---------------------------------------------------------------- multiple_messages (issue 13)

_TWO_HEADERS = (
    b"---\nmsg_id: MSG-1\nts: 2026-02-20T15:54:54Z\ntype: FACT\nworkflow_id: w\ntask_id: t\n"
    b"agent_id: a\n---\nfirst\n\n---\nmsg_id: MSG-2\nts: 2026-02-20T15:54:55Z\ntype: FACT\n"
    b"project_id: p\ntask_id: t\nrun_id: ''\n---\nsecond\n"
)


def test_a_file_with_two_headers_is_refused_as_multiple_messages() -> None:
    with pytest.raises(InvalidMessage) as info:
        decode(_TWO_HEADERS)
    assert info.value.reason is Reason.MULTIPLE_MESSAGES
    with pytest.raises(InvalidMessage) as info:
        decode(b"\xef\xbb\xbf" + _TWO_HEADERS.replace(b"\n", b"\r\n"))
    assert info.value.reason is Reason.MULTIPLE_MESSAGES


def test_a_horizontal_rule_in_a_body_stays_a_single_message() -> None:
    data = (
        b"---\nmsg_id: m-1\ntype: FACT\nworkflow_id: w\ntask_id: t\nagent_id: a\n"
        b"created_at: 2026-02-20T15:54:54Z\n---\nintro\n---\nnot: a header\n---\nend\n"
    )
    msg = decode(data)
    assert msg.body == "intro\n---\nnot: a header\n---\nend\n"
