"""Bytes <-> messages: JSON, and Markdown with YAML front matter.

:func:`decode` chooses the encoding by content, never by file name: data that
starts (after an optional UTF-8 BOM) with a ``---`` line is Markdown with YAML
front matter, anything else is JSON. It returns a validated
:data:`busd.model.Message` or raises :class:`busd.errors.InvalidMessage` --
never anything else, whatever the bytes (deep nesting, invalid UTF-8, YAML
bombs and tags included).

Round trip contract, for every valid message ``m``:
``decode(encode_json(m)) == m`` and ``decode(encode_markdown(m)) == m``.

Markdown layout (the format of the older message-bus files)::

    ---
    msg_id: MSG-...          # = message_id
    ts: 2024-05-01T12:00:00Z  # = created_at
    type: FACT                # = message_type, any case
    workflow_id: ...          # other envelope fields by their own names
    ---
    <body, byte-exact, up to the end of the data>

The header is read with a restricted safe YAML loader: no anchors, aliases or
explicit tags, plain data only (strings, numbers, booleans, null, lists,
mappings), mapping keys taken as strings, duplicate keys and non-finite floats
rejected, timestamps left as text (RFC 3339 is parsed by the model, which
requires an offset). ``schema_version`` defaults to "1.0" in this encoding only.

One file is one message: Markdown holding a second header (a body line ``---``
followed by a YAML mapping with ``msg_id``, ``type`` or ``message_type`` and a
closing ``---``: a conductor-loop bus file) is refused with reason
``multiple_messages``, never read as one message with the rest in its body
(:func:`busd.core.conductor.looks_like_bus`). A ``---`` rule between prose stays
body.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any, Final, NoReturn, cast

import msgspec
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from busd.core.conductor import looks_like_bus
from busd.core.goyaml import refuse_expanding
from busd.core.ids import new_message_id
from busd.core.model import SCHEMA_VERSION, SCHEMA_VERSION_PATTERN, Message
from busd.errors import InvalidMessage, Reason

__all__ = [
    "MAX_FRONT_MATTER_BYTES",
    "decode",
    "encode_json",
    "encode_markdown",
    "to_builtins",
]

MAX_FRONT_MATTER_BYTES: Final = 64 * 1024
"""Largest YAML header :func:`decode` reads (bytes between the ``---`` lines)."""

_BOM: Final = b"\xef\xbb\xbf"
_CLOSE_RE: Final = re.compile(rb"^---(?:\r?\n|\Z)", re.MULTILINE)
_VERSION_RE: Final = re.compile(SCHEMA_VERSION_PATTERN)
_OTHER_VERSION_RE: Final = re.compile(r"([0-9]+)(?:\.[0-9]+)*\Z")
_PATH_RE: Final = re.compile(r" - at `(?:key` in `)?(\$[^`]*)`\Z")
_FIELD_RE: Final = re.compile(r"Object (?:missing required|contains unknown) field `([^`]*)`")
_SEED_NAMES: Final = (("msg_id", "message_id"), ("ts", "created_at"), ("type", "message_type"))
_MISSING: Final[Any] = object()
# Folding long lines is where PyYAML's writers have round-trip bugs; never fold.
_NO_FOLDING: Final = 1 << 30


class _Probe(msgspec.Struct):
    """Just the version of an invalid JSON message, to classify the failure."""

    schema_version: Any = _MISSING


_DECODER: Final[msgspec.json.Decoder[Message]] = msgspec.json.Decoder(Message)
_ANY_DECODER: Final = msgspec.json.Decoder()
_PROBE_DECODER: Final = msgspec.json.Decoder(_Probe)
_ENCODER: Final = msgspec.json.Encoder()


# ---------------------------------------------------------------- YAML


_TAG = "tag:yaml.org,2002:"
# Hex/octal/binary YAML ints escape Python's 4300-digit str limit; msgspec's
# JSON decoder takes at most 4300 characters, sign included. Keep to that.
_INT_MAX: Final = 10**4300
_INT_MIN: Final = -(10**4299)


def _resolvers_without(
    base: dict[Any, Any], dropped: frozenset[str]
) -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    return {
        first: [(tag, rx) for tag, rx in pairs if tag not in dropped]
        for first, pairs in base.items()
    }


class _FrontMatterLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases and explicit tags while composing.

    Rejecting at compose time means an alias bomb is refused before anything
    is expanded. Timestamps, ``<<`` merge keys and ``=`` resolve to plain strings.
    """

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        """Compose one node after refusing aliases, anchors and explicit tags."""
        refuse_expanding(self)
        return super().compose_node(parent, index)


_FrontMatterLoader.yaml_implicit_resolvers = _resolvers_without(
    yaml.SafeLoader.yaml_implicit_resolvers,
    frozenset({_TAG + "timestamp", _TAG + "merge", _TAG + "value"}),
)


class _FrontMatterDumper(yaml.SafeDumper):
    """SafeDumper writing timestamp-like strings plain (the loader keeps them text).

    Strings holding line breaks, controls or other characters PyYAML's plain and
    single-quoted writers mangle (NEL is read back as a space, for one) are
    always written double-quoted, where every such character is escaped.
    """


_FrontMatterDumper.yaml_implicit_resolvers = _resolvers_without(
    yaml.SafeDumper.yaml_implicit_resolvers, frozenset({_TAG + "timestamp"})
)
_NEEDS_ESCAPES: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff]")


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if _NEEDS_ESCAPES.search(value) else None
    return dumper.represent_scalar(_TAG + "str", value, style=style)


_FrontMatterDumper.add_representer(str, _represent_str)


class _PlainDataError(ValueError):
    """A YAML node that has no JSON equivalent."""


def _plain(loader: _FrontMatterLoader, node: Node) -> Any:
    """Convert a composed node to JSON-model data (str/int/float/bool/None/list/dict)."""
    if isinstance(node, ScalarNode):
        tag = node.tag.removeprefix(_TAG)
        if tag == "str":
            return node.value
        if tag == "int":
            number = loader.construct_yaml_int(node)
            if not _INT_MIN < number < _INT_MAX:
                raise _PlainDataError(f"integer too large at {node.start_mark}")
            return number
        if tag == "bool":
            return loader.construct_yaml_bool(node)
        if tag == "null":
            return None
        if tag == "float":
            value = loader.construct_yaml_float(node)
            if not math.isfinite(value):
                raise _PlainDataError(f"non-finite number {node.value!r} at {node.start_mark}")
            return value
        raise _PlainDataError(f"unsupported scalar {node.tag!r} at {node.start_mark}")
    if isinstance(node, SequenceNode):
        return [_plain(loader, item) for item in node.value]
    if isinstance(node, MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise _PlainDataError(f"mapping keys must be scalars at {key_node.start_mark}")
            # Keys are strings in the JSON model: take the source text, so that
            # `1:` or `yes:` is the key "1" or "yes", not an int or a bool.
            key = key_node.value
            if key in result:
                raise _PlainDataError(f"duplicate key {key!r:.80} at {key_node.start_mark}")
            result[key] = _plain(loader, value_node)
        return result
    raise _PlainDataError(f"unsupported node at {node.start_mark}")


def _load_front_matter(text: str) -> Any:
    loader = _FrontMatterLoader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _plain(loader, node)
    finally:
        loader.dispose()


# ---------------------------------------------------------------- errors


def _fail(reason: Reason, detail: str, path: str | None = None) -> NoReturn:
    raise InvalidMessage(reason, detail, path)


def _check_utf8(data: bytes | memoryview) -> None:
    try:
        str(data, "utf-8")
    except UnicodeDecodeError as exc:
        _fail(Reason.INVALID_UTF8, f"not valid UTF-8: {exc.reason} at byte {exc.start}")


def _check_version(value: Any) -> None:
    """Raise unless ``value`` is a supported schema_version string."""
    path = "$.schema_version"
    if value is _MISSING:
        _fail(Reason.SCHEMA, "Object missing required field `schema_version`", path)
    if not isinstance(value, str):
        _fail(Reason.SCHEMA, f"schema_version must be a string, got {type(value).__name__}", path)
    if _VERSION_RE.match(value):
        return
    other = _OTHER_VERSION_RE.match(value)
    if other is not None and other.group(1) != "1":
        _fail(
            Reason.UNSUPPORTED_SCHEMA_VERSION,
            f"unsupported schema_version {value!r:.40}; this busd reads 1.x",
            path,
        )
    _fail(Reason.SCHEMA, f"invalid schema_version {value!r:.40}; expected 1.<minor>", path)


def _schema_error(exc: msgspec.ValidationError) -> NoReturn:
    """Raise SCHEMA for a msgspec validation error, with the JSON path it names."""
    detail = str(exc)
    match = _PATH_RE.search(detail)
    path = match.group(1) if match else "$"
    # msgspec names a missing or unknown field of the top object without a path.
    field = _FIELD_RE.match(detail)
    if field is not None and match is None:
        path = f"$.{field.group(1)}"
    _fail(Reason.SCHEMA, detail, path)


def _convert(obj: dict[str, Any], fill_missing: bool) -> Message:
    if fill_missing:
        if obj.get("message_id") is None:
            obj["message_id"] = new_message_id()
        if obj.get("created_at") is None:
            obj["created_at"] = datetime.now(UTC)
    try:
        return cast("Message", msgspec.convert(obj, Message))
    except msgspec.ValidationError as exc:
        _schema_error(exc)
    except RecursionError:
        _fail(Reason.SCHEMA, "nested too deeply")


# ---------------------------------------------------------------- decode


def decode(data: bytes, *, fill_missing: bool = False, max_bytes: int | None = None) -> Message:
    """Decode and validate one message; raise InvalidMessage with a Reason otherwise.

    ``max_bytes`` bounds ``len(data)`` (TOO_LARGE). With ``fill_missing``, an
    absent or null ``message_id`` gets a new id and ``created_at`` the current
    time, so producers may leave both out.
    """
    if max_bytes is not None and len(data) > max_bytes:
        _fail(Reason.TOO_LARGE, f"message is {len(data)} bytes; the limit is {max_bytes}")
    start = 3 if data.startswith(_BOM) else 0
    if data.startswith(b"---\n", start) or data.startswith(b"---\r\n", start):
        if looks_like_bus(data[start:]):
            _fail(
                Reason.MULTIPLE_MESSAGES,
                "more than one message header: a bus file holds many messages "
                "(import it with `busd import conductor`)",
            )
        return _decode_markdown(data, data.index(b"\n", start) + 1, fill_missing)
    return _decode_json(memoryview(data)[start:] if start else data, fill_missing)


def _decode_json(data: bytes | memoryview, fill_missing: bool) -> Message:
    # Fast path. msgspec checks UTF-8 in every string it decodes (and rejects
    # any non-ASCII byte outside strings), so success implies valid UTF-8.
    try:
        return _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        error = exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        _check_utf8(data)
        _fail(Reason.INVALID_JSON, str(exc))
    except RecursionError:
        _check_utf8(data)
        _fail(Reason.INVALID_JSON, "JSON nested too deeply")

    # Slow path: classify the failure. msgspec validates while it parses, so
    # the error may predate a syntax error further on: parse everything first.
    _check_utf8(data)
    try:
        probe = _PROBE_DECODER.decode(data)
    except msgspec.ValidationError:
        _parse_any(data)  # raises INVALID_JSON if malformed
        _fail(Reason.SCHEMA, "expected a JSON object", "$")
    except msgspec.DecodeError as exc:
        _fail(Reason.INVALID_JSON, str(exc))
    except RecursionError:
        _fail(Reason.INVALID_JSON, "JSON nested too deeply")
    _check_version(probe.schema_version)
    if fill_missing:
        return _convert(_parse_any(data), fill_missing=True)
    _schema_error(error)


def _parse_any(data: bytes | memoryview) -> Any:
    try:
        return _ANY_DECODER.decode(data)
    except msgspec.ValidationError as exc:  # e.g. an integer over 4300 digits
        _schema_error(exc)
    except msgspec.DecodeError as exc:
        _fail(Reason.INVALID_JSON, str(exc))
    except RecursionError:
        _fail(Reason.INVALID_JSON, "JSON nested too deeply")


def _decode_markdown(data: bytes, header_start: int, fill_missing: bool) -> Message:
    close = _CLOSE_RE.search(data, header_start)
    header_end = len(data) if close is None else close.start()
    if header_end - header_start > MAX_FRONT_MATTER_BYTES:
        _fail(
            Reason.TOO_LARGE,
            f"front matter is larger than {MAX_FRONT_MATTER_BYTES} bytes",
        )
    if close is None:
        _fail(Reason.SCHEMA, "front matter: no closing '---' line")
    try:
        header_text = data[header_start:header_end].decode("utf-8")
        body = data[close.end() :].decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(Reason.INVALID_UTF8, f"not valid UTF-8: {exc.reason}")
    try:
        header = _load_front_matter(header_text)
    except (yaml.YAMLError, ValueError, TypeError, KeyError, OverflowError) as exc:
        _fail(Reason.SCHEMA, f"front matter: {exc}")
    except RecursionError:
        _fail(Reason.SCHEMA, "front matter: nested too deeply")
    if not isinstance(header, dict):
        _fail(Reason.SCHEMA, "front matter: expected a YAML mapping", "$")
    for seed, name in _SEED_NAMES:
        if seed in header:
            if name in header:
                _fail(Reason.SCHEMA, f"front matter has both {seed!r} and {name!r}", f"$.{name}")
            header[name] = header.pop(seed)
    if "body" in header:
        _fail(Reason.SCHEMA, "front matter: the body follows the header, not in it", "$.body")
    if isinstance(header.get("message_type"), str):
        header["message_type"] = header["message_type"].lower()
    header.setdefault("schema_version", SCHEMA_VERSION)
    _check_version(header["schema_version"])
    header["body"] = body or None
    return _convert(header, fill_missing)


# ---------------------------------------------------------------- encode


def to_builtins(msg: Message) -> dict[str, Any]:
    """The message as JSON-model data: tag included, defaults and nulls left out."""
    return cast(dict[str, Any], msgspec.to_builtins(msg))


def encode_json(msg: Message) -> bytes:
    """Compact UTF-8 JSON, no trailing newline; ``created_at`` in UTC with ``Z``."""
    return _ENCODER.encode(msg)


def encode_markdown(msg: Message) -> bytes:
    """Markdown with YAML front matter, seed names first (``type`` upper case)."""
    fields = to_builtins(msg)
    body = fields.pop("body", None)
    header: dict[str, Any] = {
        "msg_id": fields.pop("message_id"),
        "ts": fields.pop("created_at"),
        "type": fields.pop("message_type").upper(),
    }
    header.update(fields)
    text = yaml.dump(
        header,
        Dumper=_FrontMatterDumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=_NO_FOLDING,
    )
    return b"".join((b"---\n", text.encode("utf-8"), b"---\n", (body or "").encode("utf-8")))
