"""conductor-loop's header YAML, read the way its Go code (yaml.v3) does. Pure.

Reading (:func:`read_header`) follows ``yaml.Unmarshal`` into conductor's message
struct: every string field takes the scalar's text (``task_id: 123`` is "123"),
null is "", a mapping or list where a string belongs is an error, unknown keys
are ignored, a known key twice is an error, ``ts`` is a Go ``time.Time`` (see
:func:`parse_ts`), ``parents`` never fails the header (conductor decodes it
leniently: old string lists or object lists, anything else is no parents).
busd is stricter in one way: anchors, aliases and explicit tags are refused (a
:class:`HeaderError`), as the codec refuses them; conductor's writer never
emits them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final, cast

import yaml
from yaml.composer import ComposerError
from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from busd.core.gotime import GoTime, parse_ts

__all__ = ["STRING_FIELDS", "HeaderError", "read_header", "refuse_expanding"]

STRING_FIELDS: Final = ("msg_id", "type", "project_id", "task_id", "run_id", "issue_id")
"""The header's string fields (``ts`` is a time; parents, links and meta are lists/maps)."""


_NON_SPECIFIC: Final = frozenset({"!"})


class HeaderError(ValueError):
    """A header conductor's yaml.Unmarshal refuses (or busd's stricter reader does)."""


def refuse_expanding(loader: yaml.SafeLoader, allowed_tags: frozenset[str] = frozenset()) -> None:
    """Raise :class:`ComposerError` if ``loader``'s next event is an alias, an anchor or an
    explicit tag not in ``allowed_tags``: refused while composing, before anything expands
    (an alias bomb never grows). For a loader's ``compose_node``."""
    event: yaml.Event = loader.peek_event()  # type: ignore[no-untyped-call]
    problem: str | None = None
    if isinstance(event, yaml.AliasEvent):
        problem = "aliases are not allowed"
    elif isinstance(event, yaml.NodeEvent) and event.anchor is not None:
        problem = "anchors are not allowed"
    elif (
        isinstance(event, yaml.ScalarEvent | yaml.CollectionStartEvent)
        and event.tag is not None
        and event.tag not in allowed_tags
    ):
        problem = f"tags are not allowed (found {event.tag!r:.80})"
    if problem is not None:
        raise ComposerError(None, None, problem, cast("Mark | None", event.start_mark))


class _Loader(yaml.SafeLoader):
    """Composes nodes only; refuses anchors, aliases and tags before anything expands."""

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        """Compose one node after refusing aliases, anchors and explicit tags but yaml.v3's
        non-specific ``!``."""
        refuse_expanding(self, _NON_SPECIFIC)
        return super().compose_node(parent, index)


_NULLS: Final = frozenset({"", "~", "null", "Null", "NULL"})


def _kind(node: Node) -> str:
    return (
        "mapping"
        if isinstance(node, MappingNode)
        else ("sequence" if isinstance(node, SequenceNode) else "scalar")
    )


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.style is None and node.value in _NULLS


def _text(node: Node, what: str) -> str:
    """A scalar decoded into a Go string: its text; null is ""."""
    if not isinstance(node, ScalarNode):
        raise HeaderError(f"cannot unmarshal a {_kind(node)} into the string {what}")
    return "" if _is_null(node) else str(node.value)


def _pairs(node: MappingNode, what: str, known: frozenset[str] | None) -> dict[str, Node]:
    """Key -> value node. ``known`` None: a map (every key twice is an error)."""
    out: dict[str, Node] = {}
    for key_node, value in node.value:
        key = _text(key_node, f"key of {what}")
        if key == "<<" and key_node.style is None:
            raise HeaderError(f"merge keys are not supported in {what}")
        if known is not None and key not in known:
            continue
        if key in out:
            raise HeaderError(f"{what}: key {key!r:.80} already set")
        out[key] = value
    return out


def _string_map(node: Node, what: str) -> dict[str, str]:
    if _is_null(node):
        return {}
    if not isinstance(node, MappingNode):
        raise HeaderError(f"cannot unmarshal a {_kind(node)} into the map {what}")
    return {key: _text(value, f"{what}.{key}") for key, value in _pairs(node, what, None).items()}


_PARENT_KEYS: Final = frozenset({"msg_id", "kind", "meta"})
_LINK_KEYS: Final = frozenset({"url", "label", "kind"})


def _parent(node: Node) -> dict[str, Any]:
    if _is_null(node):
        return {"msg_id": ""}
    if not isinstance(node, MappingNode):
        raise HeaderError("parent is not a mapping")
    fields = _pairs(node, "parent", _PARENT_KEYS)
    out: dict[str, Any] = {
        "msg_id": _text(fields["msg_id"], "msg_id") if "msg_id" in fields else ""
    }
    kind = _text(fields["kind"], "kind") if "kind" in fields else ""
    if kind:
        out["kind"] = kind
    meta = _string_map(fields["meta"], "parent.meta") if "meta" in fields else {}
    if meta:
        out["meta"] = meta
    return out


def _parents(node: Node) -> list[dict[str, Any]]:
    """conductor's parseParents: never an error, only fewer parents."""
    if not isinstance(node, SequenceNode) or not node.value:
        return []
    try:
        if isinstance(node.value[0], ScalarNode):
            try:
                names = [_text(item, "parent") for item in node.value]
            except HeaderError:
                pass
            else:
                return [{"msg_id": name} for name in names if name]
        return [_parent(item) for item in node.value]
    except HeaderError:
        return []


def _links(node: Node) -> list[dict[str, str]]:
    if _is_null(node):
        return []
    if not isinstance(node, SequenceNode):
        raise HeaderError(f"cannot unmarshal a {_kind(node)} into links")
    out: list[dict[str, str]] = []
    for item in node.value:
        if _is_null(item):
            out.append({"url": ""})
            continue
        if not isinstance(item, MappingNode):
            raise HeaderError(f"cannot unmarshal a {_kind(item)} into a link")
        fields = _pairs(item, "link", _LINK_KEYS)
        link = {"url": _text(fields["url"], "url") if "url" in fields else ""}
        for key in ("label", "kind"):
            value = _text(fields[key], key) if key in fields else ""
            if value:
                link[key] = value
        out.append(link)
    return out


_KNOWN: Final = frozenset({*STRING_FIELDS, "ts", "parents", "links", "meta"})


def read_header(text: str) -> tuple[dict[str, Any], GoTime]:
    """Decode a header as conductor does; raise HeaderError where it would drop it.

    Returns the header (every string field, "" when absent; ``ts`` the scalar's
    source text; ``parents``, ``links``, ``meta`` as conductor holds them, empty
    when absent) and the decoded time.
    """
    try:
        # The reader refuses control characters when it is built, as yaml.v3 does.
        loader = _Loader(text)
    except yaml.YAMLError as exc:
        raise HeaderError(f"yaml: {exc}") from None
    try:
        node = loader.get_node() if loader.check_node() else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise HeaderError(f"yaml: {exc.problem or exc.context}{where}") from None
    except (yaml.YAMLError, ValueError, TypeError, KeyError, OverflowError) as exc:
        raise HeaderError(f"yaml: {exc}") from None
    except RecursionError:
        raise HeaderError("yaml: nested too deeply") from None
    finally:
        loader.dispose()
    header: dict[str, Any] = dict.fromkeys(STRING_FIELDS, "")
    header.update(ts="", parents=[], links=[], meta={})
    zero = GoTime(datetime(1, 1, 1, tzinfo=UTC), 0)
    if node is None or _is_null(node):
        return header, zero
    if not isinstance(node, MappingNode):
        raise HeaderError(f"cannot unmarshal a {_kind(node)} into a conductor message")
    fields = _pairs(node, "header", _KNOWN)
    for name in STRING_FIELDS:
        if name in fields:
            header[name] = _text(fields[name], name)
    when = zero
    if "ts" in fields:
        ts = fields["ts"]
        if not isinstance(ts, ScalarNode):
            raise HeaderError(f"cannot unmarshal a {_kind(ts)} into the time ts")
        header["ts"] = "" if _is_null(ts) else str(ts.value)
        if not _is_null(ts):
            parsed = parse_ts(ts.value, plain=ts.style is None)
            if parsed is None:
                raise HeaderError(f"ts {ts.value!r:.80} is not a time conductor reads")
            when = parsed
    if "parents" in fields:
        header["parents"] = _parents(fields["parents"])
    if "links" in fields:
        header["links"] = _links(fields["links"])
    if "meta" in fields:
        header["meta"] = _string_map(fields["meta"], "meta")
    return header, when
