"""conductor-loop bus files: framing, and the mapping to and from busd messages. Pure.

A conductor bus file (``TASK-MESSAGE-BUS.md``, ``PROJECT-MESSAGE-BUS.md``,
``MESSAGE-BUS.md``) is read as conductor's ``parseMessagesReader`` reads it: a
state machine over lines (``\\r\\n`` trimmed). Seeking a header, a ``---`` line
opens one and a legacy line ``[YYYY-MM-DD HH:MM:SS] TYPE: text`` is a message
(ids ``LEGACY-LINE-%09d`` of its line number); every other line is ignored. A
header runs to the next ``---`` line; a header conductor's YAML decoding refuses
is dropped and the line that closed it opens the next header. A body runs to
the next ``---`` line, which ends the message and opens the next header, so a
body can never hold a ``---`` line. At the end of the data a body counts only
when it ends in a newline.

:func:`split` returns every :class:`Record` in that order: messages, legacy
lines, and what conductor would drop (``error`` set: a refused header, and, with
``final``, an unterminated header or last message) with the bytes they span.
Records tile the bytes they cover: a record ends where the next begins.

Bodies: conductor's reader trims one ``\\n`` and one ``\\r`` off a body; before
that, :func:`split` also takes off the empty line that conductor's writer puts
between two entries (``appendEntry``'s separator), so a message reads the same
whether it is the last in the file or not. A body written by
:func:`from_message` therefore reads back equal unless it ends in a line break
(one trailing line break is lost, as it is in conductor) or holds a ``---``
line (conductor cannot carry one).

Mapping (the table is in docs/compatibility.md): :func:`to_message` gives a busd
JSON-model dict keeping every conductor header field in
``metadata["conductor"]``; :func:`from_message` gives back those exact fields for
a message that has them, and derives a conductor entry for any other message.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from busd.core.gotime import GoTime, format_ts, parse_legacy_ts, parse_ts
from busd.core.goyaml import STRING_FIELDS, HeaderError, read_header
from busd.core.goyaml_write import write_header
from busd.core.model import MESSAGE_ID_PATTERN, SCHEMA_VERSION, Message
from busd.errors import InvalidMessage, Reason

__all__ = [
    "AGENT_ID",
    "BUS_FILE_SUFFIX",
    "Record",
    "body_is_conductor_safe",
    "conductor_id",
    "from_message",
    "looks_like_bus",
    "split",
    "to_message",
]

AGENT_ID: Final = "conductor-loop"
"""The ``agent_id`` of every message imported from a conductor bus file."""
BUS_FILE_SUFFIX: Final = "MESSAGE-BUS.md"
"""A directory given to the import is searched for files whose name ends so."""

_NOTE_TYPES: Final = frozenset({"FACT", "PROGRESS", "DECISION", "REVIEW", "ERROR"})
_MESSAGE_ID_RE: Final = re.compile(MESSAGE_ID_PATTERN)
_DASHES: Final = b"---"
# Go's unicode.IsSpace, which strings.TrimSpace uses.
_GO_SPACE: Final = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006" + (
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_LEGACY_TYPE_RE: Final = re.compile(r"[A-Za-z0-9_\-/]+\Z")


@dataclass(frozen=True)
class Record:
    """One record of a bus file, as conductor's reader sees it.

    ``offset``/``end``: the byte range in the data (``raw`` is exactly those
    bytes). ``header``: conductor's header fields (strings, ``ts`` its source
    text, ``parents``/``links``/``meta`` as conductor holds them), None for a
    dropped record. ``error``: why conductor drops it, else None. ``line``: the
    1-based line number of its first line. ``time``: the decoded ``ts`` as
    RFC3339Nano in UTC (None when dropped or out of Python's range).
    """

    offset: int
    end: int
    raw: bytes
    header: dict[str, Any] | None
    body: str
    legacy: bool
    error: str | None
    line: int = 0
    time: str | None = None
    created_at: str | None = None


def _go_trim(s: str) -> str:
    return s.strip(_GO_SPACE)


def _legacy(trimmed: bytes, line_no: int) -> tuple[dict[str, Any], str, GoTime] | None:
    """conductor's parseLegacyMessageLine: (header, body, time) or None."""
    text = _go_trim(trimmed.decode("utf-8", "surrogateescape"))
    if not text.startswith("["):
        return None
    closing = text.find("]")
    if closing <= 1:
        return None
    when = parse_legacy_ts(_go_trim(text[1:closing]))
    if when is None:
        return None
    content = _go_trim(text[closing + 1 :])
    if not content:
        return None
    kind, body = "INFO", content
    colon = content.find(":")
    if colon > 0:
        token = _go_trim(content[:colon])
        if _LEGACY_TYPE_RE.match(token):
            kind, body = token.upper(), _go_trim(content[colon + 1 :])
    header: dict[str, Any] = dict.fromkeys(STRING_FIELDS, "")
    header.update(msg_id=f"LEGACY-LINE-{line_no:09d}", type=kind, ts=format_ts(when))
    header.update(parents=[], links=[], meta={})
    return header, body or content, when


def _finish_body(body: bytes, separated: bool) -> str:
    if separated and body.endswith(b"\n"):
        # The empty line appendEntry writes before the next entry is not body.
        prev = body.rfind(b"\n", 0, len(body) - 1)
        if body[prev + 1 : -1] in (b"", b"\r"):
            body = body[: prev + 1]
    body = body.removesuffix(b"\n").removesuffix(b"\r")
    return body.decode("utf-8", "surrogateescape")


def _created_at(when: GoTime) -> str | None:
    t = when.utc
    if t is None:
        return None
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        f".{when.nanos // 1000:06d}Z"
    )


def _lines(data: bytes, start: int) -> list[tuple[int, int]]:
    """(start, end) of each line of data[start:], ends after the ``\\n`` (or at EOF)."""
    out: list[tuple[int, int]] = []
    pos = start
    size = len(data)
    while pos < size:
        nl = data.find(b"\n", pos)
        end = size if nl < 0 else nl + 1
        out.append((pos, end))
        pos = end
    return out


def split(data: bytes, *, start: int = 0, final: bool = False) -> tuple[list[Record], int]:
    """The records in ``data[start:]`` by conductor's rules, and the complete offset.

    ``start`` must be 0 or an offset this function returned (reading resumes
    seeking a header there). The offset returned is where a later call resumes:
    everything before it is in the records; an unfinished tail (an unterminated
    line, header or last message) is left for later. With ``final`` the data
    is whole: the tail becomes records too (dropped ones, ``error`` set, as
    conductor drops them) and the offset is ``len(data)``.
    """
    records: list[Record] = []
    line_no = data.count(b"\n", 0, start)
    seek, in_header, in_body = 0, 1, 2
    state = seek
    complete = start
    rec_start = rec_line = text_start = 0
    header: dict[str, Any] | None = None
    when: GoTime | None = None
    size = len(data)
    for pos, end in _lines(data, start):
        line_no += 1
        terminated = data[end - 1 : end] == b"\n"
        if not terminated and not final:
            break
        trimmed = data[pos:end].rstrip(b"\r\n")
        if state == seek:
            if trimmed == _DASHES:
                state, rec_start, rec_line, text_start = in_header, pos, line_no, end
                continue
            got = _legacy(trimmed, line_no)
            if got is not None:
                head, body, stamp = got
                records.append(_record(data, pos, end, head, body, True, None, line_no, stamp))
            complete = end
        elif trimmed != _DASHES:
            continue
        elif state == in_header:
            try:
                header, when = read_header(_header_text(data, text_start, pos))
            except HeaderError as exc:
                records.append(_record(data, rec_start, pos, None, "", False, str(exc), rec_line))
                rec_start, rec_line, text_start, complete = pos, line_no, end, pos
                continue
            state, text_start = in_body, end
        else:
            body = _finish_body(data[text_start:pos], separated=True)
            records.append(_record(data, rec_start, pos, header, body, False, None, rec_line, when))
            state, rec_start, rec_line, text_start, complete = in_header, pos, line_no, end, pos
    if state == seek:
        return records, (size if final else complete)
    if state == in_body and data.endswith(b"\n") and text_start < size:
        body = _finish_body(data[text_start:], separated=False)
        records.append(_record(data, rec_start, size, header, body, False, None, rec_line, when))
        return records, size
    if not final:
        return records, complete
    tail = data[text_start:]
    if state == in_body:
        why = "the last message has no body line ending in a newline: conductor drops it"
    elif tail.strip():
        why = "unterminated header: no closing '---' line"
    else:
        return records, size
    records.append(_record(data, rec_start, size, None, "", False, why, rec_line))
    return records, size


def _header_text(data: bytes, start: int, end: int) -> str:
    try:
        return data[start:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"yaml: invalid UTF-8 at byte {start + exc.start}") from None


def _record(
    data: bytes,
    start: int,
    end: int,
    header: dict[str, Any] | None,
    body: str,
    legacy: bool,
    error: str | None,
    line: int,
    when: GoTime | None = None,
) -> Record:
    return Record(
        offset=start,
        end=end,
        raw=data[start:end],
        header=header,
        body=body,
        legacy=legacy,
        error=error,
        line=line,
        time=None if when is None or when.utc is None else format_ts(when),
        created_at=None if when is None else _created_at(when),
    )


# ---------------------------------------------------------------- conductor -> busd


def _hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _busd_id(record: Record, header: dict[str, Any]) -> str:
    msg_id = str(header["msg_id"])
    if record.legacy:
        return "cl-legacy-" + _hex(b"%d\n%s" % (record.line, record.raw))
    if _MESSAGE_ID_RE.match(msg_id):
        return msg_id
    if not msg_id:
        # No id at all: only the bytes tell two such messages apart.
        return "cl-" + _hex(b"\0" + record.raw)
    return f"cl-{_hex(msg_id.encode('utf-8', 'surrogateescape'))}"


def to_message(record: Record, *, to: str, source: str) -> dict[str, Any]:
    """The busd JSON-model dict for a conductor record (validate it with the codec).

    Raises InvalidMessage for a record conductor drops (``schema``, detail
    naming the error) and for bytes busd cannot carry (``invalid_utf8``).
    """
    header = record.header
    if header is None or record.error is not None:
        raise InvalidMessage(Reason.SCHEMA, f"conductor drops this record: {record.error}")
    try:
        record.body.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMessage(
            Reason.INVALID_UTF8, f"body is not valid UTF-8 at character {exc.start}"
        ) from None
    kind = str(header["type"])
    project = str(header["project_id"])
    kept: dict[str, Any] = {name: header[name] for name in ("msg_id", "ts", "type")}
    kept.update({name: header[name] for name in ("project_id", "task_id", "run_id")})
    for name in ("issue_id", "parents", "links", "meta"):
        if header.get(name):
            kept[name] = header[name]
    if record.legacy:
        kept["legacy"] = True
    kept["source"] = {"path": source, "offset": record.offset}
    msg: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "message_type": kind.lower() if kind in _NOTE_TYPES else "fact",
        "message_id": _busd_id(record, header),
        "created_at": record.created_at or str(header["ts"]),
        "workflow_id": project or "conductor",
        "task_id": str(header["task_id"]) or "project",
        "agent_id": AGENT_ID,
        "to": to,
    }
    if project:
        msg["project_id"] = project
    if header["run_id"]:
        msg["run_id"] = header["run_id"]
    parents = [
        p["msg_id"] for p in header["parents"] if _MESSAGE_ID_RE.match(str(p.get("msg_id", "")))
    ]
    if parents:
        msg["parents"] = list(dict.fromkeys(parents))
    if record.body:
        msg["body"] = record.body
    msg["metadata"] = {"conductor": kept}
    return msg


# ---------------------------------------------------------------- busd -> conductor


def _origin(msg: Message) -> dict[str, Any] | None:
    """metadata.conductor when it is a well-formed conductor header, else None."""
    kept = (msg.metadata or {}).get("conductor")
    if not isinstance(kept, dict):
        return None
    if not all(isinstance(kept.get(name, ""), str) for name in (*STRING_FIELDS, "ts")):
        return None
    if not isinstance(kept.get("msg_id"), str):
        return None
    parents = kept.get("parents", [])
    links = kept.get("links", [])
    meta = kept.get("meta", {})
    if not (_str_map(meta) and isinstance(parents, list) and isinstance(links, list)):
        return None
    for parent in parents:
        if not (isinstance(parent, dict) and isinstance(parent.get("msg_id", ""), str)):
            return None
        if not (isinstance(parent.get("kind", ""), str) and _str_map(parent.get("meta", {}))):
            return None
    for link in links:
        if not (isinstance(link, dict) and _str_map(link)):
            return None
    return kept


def _str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _go_time(msg: Message) -> GoTime:
    t = msg.created_at
    return GoTime(t.replace(microsecond=0), t.microsecond * 1000)


def conductor_id(msg: Message) -> str:
    """The conductor ``msg_id`` of ``msg``: the original one, or a derived ``MSG-...`` id.

    Derived ids are deterministic (created_at and a hash of message_id), so an
    export or a mirror restart writes the same id again.
    """
    kept = _origin(msg)
    if kept is not None:
        return str(kept["msg_id"])
    digest = hashlib.sha256(msg.message_id.encode()).digest()
    pid = int.from_bytes(digest[:4], "big") % 100_000
    seq = int.from_bytes(digest[4:8], "big") % 10_000
    t = msg.created_at
    return (
        f"MSG-{t.year:04d}{t.month:02d}{t.day:02d}-{t.hour:02d}{t.minute:02d}{t.second:02d}"
        f"-{t.microsecond * 1000:09d}-PID{pid:05d}-{seq:04d}"
    )


_MAPPED: Final = frozenset(
    {"message_id", "created_at", "message_type", "task_id", "run_id", "parents", "body"}
)


def _derived_header(msg: Message) -> dict[str, Any]:
    fields = msgspec.to_builtins(msg)
    meta: dict[str, str] = {"busd_message_id": msg.message_id}
    for name, value in fields.items():
        if name in _MAPPED or (name == "project_id" and value):
            continue
        meta[name] = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return {
        "msg_id": conductor_id(msg),
        "type": str(fields.get("message_type", "")).upper(),
        "project_id": msg.project_id or msg.workflow_id,
        "task_id": msg.task_id,
        "run_id": msg.run_id or "",
        "issue_id": "",
        "parents": [{"msg_id": p} for p in msg.parents or ()],
        "links": [],
        "meta": meta,
    }


def from_message(msg: Message) -> bytes:
    """One conductor entry for ``msg``, as conductor's serializeMessage writes it.

    The ``"\\n"`` separator that goes before an entry in a non-empty file is
    the appender's job, not part of the entry.
    """
    kept = _origin(msg)
    if kept is not None:
        header = {name: kept.get(name, "") for name in STRING_FIELDS}
        header.update({name: kept.get(name) or [] for name in ("parents", "links")})
        header["meta"] = kept.get("meta") or {}
        ts = str(kept.get("ts", ""))
        if not ts or parse_ts(ts, plain=True) is None:
            ts = format_ts(_go_time(msg)) if ts else format_ts(GoTime(None, 0))
    else:
        header = _derived_header(msg)
        ts = format_ts(_go_time(msg))
    body = msg.body or ""
    text = write_header(header, ts)
    tail = "" if body.endswith("\n") else "\n"
    return f"---\n{text}---\n{body}{tail}".encode()


def body_is_conductor_safe(body: str | None) -> bool:
    """True unless ``body`` holds a line conductor reads as ``---`` (it would split there)."""
    if not body:
        return True
    return not any(line.rstrip("\r\n") == "---" for line in body.split("\n"))


# ---------------------------------------------------------------- detection

_DELIM_RE: Final = re.compile(rb"^---\r*(?:\n|\Z)", re.MULTILINE)
_HEADER_KEY_RE: Final = re.compile(rb"^['\"]?(?:msg_id|type|message_type)['\"]?[ \t]*:", re.M)
_MAX_CHUNK: Final = 64 * 1024


def looks_like_bus(data: bytes) -> bool:
    """True when ``data`` holds more than one conductor/busd header: a bus file.

    A header is a YAML mapping with ``msg_id``, ``type`` or ``message_type``
    between two ``---`` lines. A Markdown horizontal rule (``---`` with prose
    around it) is not one.
    """
    delims = [(m.start(), m.end()) for m in _DELIM_RE.finditer(data)]
    found = 0
    for (_, after), (there, _) in itertools.pairwise(delims):
        chunk = data[after:there]
        if len(chunk) > _MAX_CHUNK or _HEADER_KEY_RE.search(chunk) is None:
            continue
        try:
            header, _ = read_header(chunk.decode("utf-8"))
        except (HeaderError, UnicodeDecodeError):
            continue
        if header.get("msg_id") or header.get("type") or _has_message_type(chunk):
            found += 1
            if found > 1:
                return True
    return False


def _has_message_type(chunk: bytes) -> bool:
    return re.search(rb"^['\"]?message_type['\"]?[ \t]*:", chunk, re.M) is not None
