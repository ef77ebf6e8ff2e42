"""conductor-loop framing and mapping (busd.core.conductor): fixtures written in
conductor's format, and Hypothesis round trips through its writer and reader rules."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from busd.core import conductor
from busd.core.codec import decode
from busd.core.model import Message

FIXTURES = Path(__file__).parent.parent / "fixtures" / "conductor"
ALL_TYPES = FIXTURES / "all-types-MESSAGE-BUS.md"
TYPES = "FACT PROGRESS DECISION REVIEW ERROR ISSUE QUESTION INFO USER RUN_START RUN_STOP RUN_CRASH"

pytestmark = pytest.mark.timeout(60)


def _records() -> list[conductor.Record]:
    records, end = conductor.split(ALL_TYPES.read_bytes(), final=True)
    assert end == ALL_TYPES.stat().st_size
    return records


def _mapped(record: conductor.Record) -> Message:
    return decode(msgspec.json.encode(conductor.to_message(record, to="ops", source="f.md")))


def test_every_conductor_type_is_read_and_mapped() -> None:
    headers = [r for r in _records() if r.header is not None and not r.legacy]
    assert set(TYPES.split()) <= {r.header["type"] for r in headers if r.header}
    for record in headers:
        msg = _mapped(record)
        assert record.header is not None
        kind = record.header["type"]
        tag = msgspec.to_builtins(msg)["message_type"]
        assert tag == (kind.lower() if kind in TYPES.split()[:5] else "fact")
        assert msg.agent_id == "conductor-loop"
        assert msg.metadata is not None
        assert msg.metadata["conductor"]["type"] == kind
        assert msg.metadata["conductor"]["source"] == {"path": "f.md", "offset": record.offset}


def test_legacy_lines_of_each_layout_are_messages_and_the_rest_is_ignored() -> None:
    legacy = [r for r in _records() if r.legacy]
    assert [(r.header or {}).get("type") for r in legacy] == [
        "DECISION", "PROGRESS", "FACT", "ERROR", "INFO", "REVIEW"
    ]  # fmt: skip
    assert [r.line for r in legacy] == [5, 6, 7, 8, 9, 11]
    assert legacy[3].time == "2026-02-05T10:53:30.25Z"  # +02:00 taken to UTC
    assert legacy[4].body == "just text without a type token"
    assert legacy[5].body == "a CRLF legacy line"
    msg = _mapped(legacy[0])
    assert msg.message_id.startswith("cl-legacy-")
    assert msg.metadata is not None and msg.metadata["conductor"]["legacy"] is True
    assert msg.task_id == "project" and msg.workflow_id == "conductor"


def test_parents_links_meta_issue_id_and_project_level_messages_are_kept() -> None:
    by_type = {r.header["type"]: r for r in _records() if r.header and not r.legacy}
    decision = _mapped(by_type["DECISION"])
    assert decision.parents == [
        "MSG-20260220-155400-100000000-PID30154-0001",
        "MSG-20260220-155401-100001111-PID30154-0002",
    ]
    kept = (decision.metadata or {})["conductor"]
    assert kept["parents"][0] == {
        "msg_id": "MSG-20260220-155400-100000000-PID30154-0001",
        "kind": "depends_on",
        "meta": {"reason": "needs the fact"},
    }
    assert kept["links"] == [{"url": "https://example.com/pr/1", "label": "the PR", "kind": "pr"}]
    assert kept["meta"] == {"agent": "codex", "attempt": "2"}
    review = (_mapped(by_type["REVIEW"]).metadata or {})["conductor"]
    assert [p["msg_id"] for p in review["parents"]][1].endswith("-0003")  # old string parents
    issue = (_mapped(by_type["ISSUE"]).metadata or {})["conductor"]
    assert issue["issue_id"] == issue["msg_id"]
    info = _mapped(by_type["INFO"])
    assert info.task_id == "project" and info.run_id is None
    assert (info.metadata or {})["conductor"]["task_id"] == ""


def test_a_body_rule_ends_the_message_and_a_broken_header_is_dropped() -> None:
    records = _records()
    dashes = next(r for r in records if r.header and r.header["task_id"] == "dashes")
    assert dashes.body == "before the rule"
    after = records[records.index(dashes) + 1]
    assert after.error is not None and after.raw == b"---\nafter the rule\n\n"
    broken = [r for r in records if r.error and b"unclosed" in r.raw]
    assert len(broken) == 1 and "yaml" in (broken[0].error or "")
    survivor = records[-1]
    assert survivor.header is not None and survivor.header["task_id"] == "after-broken"
    crlf = next(r for r in records if r.header and r.header["task_id"] == "crlf")
    assert crlf.body == "crlf body\r\nsecond line"
    # Records tile what they cover: each ends where the next begins.
    covered = [r for r in records if not r.legacy]
    assert all(a.end == b.offset for a, b in itertools.pairwise(covered))


def test_export_of_an_imported_entry_gives_back_its_bytes() -> None:
    """yaml.v3's layout (4-space indents, indented sequences, quoting) byte for byte."""
    for record in _records():
        if record.header is None or record.legacy or b"\r" in record.raw:
            continue
        if b"    - MSG" in record.raw:  # old string parents come back as objects
            continue
        raw = record.raw[:-1] if record.raw.endswith(b"\n\n") else record.raw
        assert conductor.from_message(_mapped(record)) == raw


def test_split_leaves_an_unfinished_tail_for_later() -> None:
    data = ALL_TYPES.read_bytes()
    whole, _ = conductor.split(data, final=True)
    cut = data.index(b"type: RUN_STOP") + 3
    first, resume = conductor.split(data[:cut])
    assert resume < cut and data[resume : resume + 4] == b"---\n"
    rest, end = conductor.split(data, start=resume, final=True)
    assert end == len(data)
    assert [r.raw for r in first + rest] == [r.raw for r in whole]


def test_looks_like_bus() -> None:
    assert conductor.looks_like_bus((FIXTURES / "two-messages.md").read_bytes())
    assert not conductor.looks_like_bus((FIXTURES / "single-fact.md").read_bytes())
    rule = b"---\nmsg_id: a\ntype: FACT\n---\nintro\n---\nmore: prose\n---\nend\n"
    assert not conductor.looks_like_bus(rule)


def test_unrepresentable_or_broken_ts_are_dropped_like_conductor() -> None:
    entry = b"---\nmsg_id: M-1\nts: yesterday\ntype: FACT\n---\nx\n"
    records, _ = conductor.split(entry, final=True)
    assert records[0].error is not None and records[0].header is None
    entry = b"---\nmsg_id: M-1\nts: 2026-1-2 3:4:5\ntype: FACT\n---\nx\n"
    (record,), _ = conductor.split(entry, final=True)
    assert record.time == "2026-01-02T03:04:05Z"


# ---------------------------------------------------------------- properties

_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
    max_size=40,
)
_line = _text.filter(lambda s: "\n" not in s and "\r" not in s and s.strip() != "---")
_body = (
    st.lists(_line, min_size=1, max_size=5)
    .map("\n".join)
    .filter(lambda b: b.strip() != "" and not b.endswith("\n"))
)


def _header(draw: Any) -> dict[str, Any]:
    return {
        "msg_id": draw(
            st.from_regex(r"MSG-[0-9]{8}-[0-9]{6}-[0-9]{9}-PID[0-9]{5}-[0-9]{4}", fullmatch=True)
        ),
        "ts": "2026-02-20T15:54:54.390976Z",
        "type": draw(st.sampled_from(TYPES.split())),
        "project_id": draw(_text),
        "task_id": draw(_text),
        "run_id": draw(_text),
        "issue_id": draw(_text),
        "parents": draw(
            st.lists(
                st.fixed_dictionaries(
                    {"msg_id": _text.filter(bool)}, optional={"kind": _text.filter(bool)}
                ),
                max_size=2,
            )
        ),
        "links": [],
        "meta": draw(st.dictionaries(_line, _text, max_size=3)),
    }


@st.composite
def _messages(draw: Any) -> Message:
    header = _header(draw)
    kept = {k: v for k, v in header.items() if v or k in ("project_id", "task_id", "run_id")}
    data = {
        "schema_version": "1.0",
        "message_type": "fact",
        "message_id": "m-1",
        "created_at": "2026-02-20T15:54:54.390976Z",
        "workflow_id": "w",
        "task_id": "t",
        "agent_id": "conductor-loop",
        "body": draw(_body),
        "metadata": {"conductor": kept},
    }
    return decode(msgspec.json.encode(data))


def _fact_with_meta(meta: dict[str, str]) -> Message:
    header: dict[str, Any] = {"msg_id": "MSG-20260220-155454-000000000-PID00001-0001"}
    header["ts"] = "2026-02-20T15:54:54Z"
    header |= {"type": "FACT", "project_id": "", "task_id": "", "run_id": "", "meta": meta}
    data: dict[str, Any] = {"schema_version": "1.0", "message_type": "fact", "message_id": "m-1"}
    data |= {"created_at": "2026-02-20T15:54:54Z", "workflow_id": "w", "task_id": "t"}
    data |= {"agent_id": "conductor-loop", "body": "b", "metadata": {"conductor": header}}
    return decode(msgspec.json.encode(data))


def test_meta_keys_sort_as_yaml_v3_sorts_them() -> None:
    """Map keys come out in yaml.v3's keyList order, where only decimal digits (Go's IsDigit)
    count as digits: "²" is none, so it sorts before "0" (no digits against one digit of
    value 0), as Go sorts it; Python's isdigit took it for a digit and crashed."""
    entry = conductor.from_message(_fact_with_meta({"²": "", "0": "", "a10": "", "a9": ""}))
    lines = [
        ln.strip().split(":")[0] for ln in entry.decode().splitlines() if ln.startswith("    ")
    ]
    assert lines == ["²", '"0"', "a9", "a10"]
    (record,), _ = conductor.split(entry, final=True)
    back = conductor.to_message(record, to="ops", source="x")
    assert back["metadata"]["conductor"]["meta"] == {"²": "", "0": "", "a10": "", "a9": ""}


@settings(max_examples=60, deadline=None)
@given(_messages(), _messages())
def test_property_from_message_split_to_message_round_trips(a: Message, b: Message) -> None:
    data = conductor.from_message(a) + b"\n" + conductor.from_message(b)
    records, end = conductor.split(data, final=True)
    assert end == len(data)
    assert [r.error for r in records] == [None, None]
    for msg, record in zip((a, b), records, strict=True):
        back = conductor.to_message(record, to="ops", source="x")
        want = dict((msg.metadata or {})["conductor"])
        got = dict(back["metadata"]["conductor"])
        got.pop("source")
        assert got == want
        assert back.get("body") == msg.body


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_property_split_never_raises_and_tiles(data: bytes) -> None:
    records, end = conductor.split(data, final=True)
    assert end == len(data)
    for record in records:
        assert data[record.offset : record.end] == record.raw
    conductor.looks_like_bus(data)


def test_a_header_with_a_control_character_is_dropped_not_raised() -> None:
    """yaml's reader refuses NUL while it is built: a dropped record (and, in the codec, one
    message), never an exception (the fuzzer found it through looks_like_bus)."""
    entry = b"---\n\x00msg_id: m-1\ntype: FACT\n---\nbody\n"
    records, _ = conductor.split(entry, final=True)
    assert records and records[0].error is not None
    assert not conductor.looks_like_bus(entry + b"---\nmore\n")
