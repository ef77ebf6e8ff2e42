"""conductor-loop's header YAML, written the way its Go code (yaml.v3) does. Pure.

Writing (:func:`write_header`) emits what ``yaml.Marshal`` writes for that
struct: fields in struct order, ``omitempty`` fields left out when empty,
4-space indents, sequences indented under their key, map keys in yaml.v3's
order, and each string in the style yaml.v3 picks (plain when it reads back as
the same string, else single- or double-quoted, literal ``|`` blocks for
strings with a newline). Lines are never folded.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Final

from busd.core.gotime import parse_ts

__all__ = ["write_header"]

_DIGITS: Final = frozenset("0123456789")


_NULL_OR_BOOL: Final = frozenset(
    {"", "~", "null", "Null", "NULL", "true", "True", "TRUE", "false", "False", "FALSE"}
    | {".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"}
    | {"-.inf", "-.Inf", "-.INF"}
)
_OLD_BOOLS: Final = frozenset(
    [
        "y",
        "Y",
        "yes",
        "Yes",
        "YES",
        "on",
        "On",
        "ON",
        "n",
        "N",
        "no",
        "No",
        "NO",
        "off",
        "Off",
        "OFF",
    ]
)
_BASE60_RE: Final = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?\Z")
_YAML_FLOAT_RE: Final = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?\Z")
_DOT_FLOAT_RE: Final = re.compile(r"\.[0-9]+(?:[eE][-+]?[0-9]+)?\Z")
_INT_RES: Final = (
    (re.compile(r"[-+]?0[xX][0-9a-fA-F]+\Z"), 16),
    (re.compile(r"[-+]?0[oO][0-7]+\Z"), 8),
    (re.compile(r"[-+]?0[bB][01]+\Z"), 2),
    (re.compile(r"[-+]?0[0-7]*\Z"), 8),
    (re.compile(r"[-+]?[1-9][0-9]*\Z"), 10),
)


def _go_int(s: str) -> bool:
    """strconv.ParseInt(s, 0, 64) or ParseUint succeeds."""
    for pattern, base in _INT_RES:
        if pattern.match(s):
            digits = s.lstrip("+-")
            if base != 10 and len(digits) > 1 and digits[1] in "xXoObB":
                digits = digits[2:]
            value = int(digits, base) if digits else 0
            if s.startswith("-"):
                return value <= 2**63
            return value < 2**64
    return False


def _resolves_to_str(s: str) -> bool:
    """yaml.v3's resolve("", s) gives !!str (so a plain scalar reads back as this string)."""
    if s in _NULL_OR_BOOL:
        return False
    first = s[:1]
    if first == ".":
        return _DOT_FLOAT_RE.match(s) is None
    if first and first in "+-0123456789":
        if first in _DIGITS and parse_ts(s, plain=True) is not None and len(s) > 4:
            return False
        plain = s.replace("_", "")
        if _go_int(plain) or _YAML_FLOAT_RE.match(plain):
            return False
    return True


def _printable(c: str) -> bool:
    o = ord(c)
    return (
        o == 0x0A
        or 0x20 <= o <= 0x7E
        or 0xA0 <= o <= 0xD7FF
        or (0xE000 <= o <= 0xFFFD and o != 0xFEFF)
    )


_BREAKS: Final = "\r\n\x85\u2028\u2029"


def _style(value: str, simple_key: bool, *, time: bool = False) -> str:
    """The style yaml.v3 writes ``value`` in: "plain", "single", "double" or "literal".

    ``time``: a time.Time, which yaml.v3 asks to be plain whatever it resolves to.
    """
    multiline = "\n" in value
    can_plain = time or (
        _resolves_to_str(value) and not (_BASE60_RE.match(value) or value in _OLD_BOOLS)
    )
    if not value:
        return "single" if simple_key else "double"
    block_ind = value.startswith(("---", "..."))
    line_breaks = special = tabs = False
    leading_space = leading_break = trailing_space = trailing_break = False
    break_space = space_break = previous_space = previous_break = False
    preceded_ws = True
    n = len(value)
    for i, c in enumerate(value):
        followed_ws = i + 1 >= n or value[i + 1] in " \t"
        if i == 0:
            if c in "#,[]{}&*!|>'\"%@`":
                block_ind = True
            elif c in "?:":
                block_ind = block_ind or followed_ws
            elif c == "-" and followed_ws:
                block_ind = True
        elif c in ",?[]{}":
            pass
        elif c == ":":
            block_ind = block_ind or followed_ws
        elif c == "#" and preceded_ws:
            block_ind = True
        if c == "\t":
            tabs = True
        elif not _printable(c):
            special = True
        if c == " ":
            leading_space = leading_space or i == 0
            trailing_space = trailing_space or i == n - 1
            break_space = break_space or previous_break
            previous_space, previous_break = True, False
        elif c in _BREAKS:
            line_breaks = True
            leading_break = leading_break or i == 0
            trailing_break = trailing_break or i == n - 1
            space_break = space_break or previous_space
            previous_space, previous_break = False, True
        else:
            previous_space = previous_break = False
        preceded_ws = c in " \t\0" or c in _BREAKS
    block_plain = not (
        leading_space
        or leading_break
        or trailing_space
        or trailing_break
        or break_space
        or space_break
        or tabs
        or special
        or line_breaks
        or block_ind
    )
    single = not (break_space or space_break or tabs or special)
    block = not (trailing_space or space_break or special)
    if multiline:
        return "literal" if block and not simple_key else "double"
    if can_plain and block_plain:
        return "plain"
    if can_plain and single and not line_breaks:
        return "single"
    return "double"


_ESCAPES: Final = {
    "\0": "0", "\a": "a", "\b": "b", "\t": "t", "\n": "n", "\v": "v", "\f": "f",
    "\r": "r", "\x1b": "e", '"': '"', "\\": "\\", "\x85": "N", "\xa0": "_",
    "\u2028": "L", "\u2029": "P",
}  # fmt: skip


def _double(value: str) -> str:
    out = ['"']
    for c in value:
        o = ord(c)
        if _printable(c) and o != 0xFEFF and c not in _BREAKS and c not in '"\\':
            out.append(c)
        elif c in _ESCAPES:
            out.append("\\" + _ESCAPES[c])
        elif o <= 0xFF:
            out.append(f"\\x{o:02X}")
        elif o <= 0xFFFF:
            out.append(f"\\u{o:04X}")
        else:
            out.append(f"\\U{o:08X}")
    out.append('"')
    return "".join(out)


def _literal(value: str, indent: int) -> str:
    hints = "|"
    if value[:1] in (" ", *_BREAKS):
        hints += "4"
    if not value.endswith(tuple(_BREAKS)):
        hints += "-"
    elif len(value) == 1 or value[-2] in _BREAKS:
        hints += "+"
    lines = value.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    body = "".join((" " * indent + line if line else "") + "\n" for line in lines)
    return f"{hints}\n{body}"


def _scalar(value: str, indent: int, simple_key: bool = False) -> str:
    """``value`` as yaml.v3 writes it; a literal block ends with its own newline."""
    style = _style(value, simple_key)
    if style == "plain":
        return value
    if style == "single":
        return "'" + value.replace("'", "''") + "'"
    if style == "literal":
        return _literal(value, indent)
    return _double(value)


def _go_key_less(a: str, b: str) -> bool:
    """yaml.v3's keyList.Less for two string keys (digit runs compare as numbers).

    Go's unicode.IsDigit is the Nd category (only 0-9 below U+0100):
    ``str.isdecimal``, not ``isdigit``, which also takes "²".
    """
    digits = False
    for i in range(min(len(a), len(b))):
        x, y = a[i], b[i]
        if x == y:
            digits = x.isdecimal()
            continue
        xl, yl = x.isalpha(), y.isalpha()
        if xl and yl:
            return x < y
        if xl or yl:
            return xl if digits else yl
        an = bn = 0
        if x == "0" or y == "0":
            j = i - 1
            while j >= 0 and a[j].isdecimal():
                if a[j] != "0":
                    an = bn = 1
                    break
                j -= 1
        ai = i
        while ai < len(a) and a[ai].isdecimal():
            an = an * 10 + ord(a[ai]) - 48  # Go: int64(r - '0'), for any Nd digit
            ai += 1
        bi = i
        while bi < len(b) and b[bi].isdecimal():
            bn = bn * 10 + ord(b[bi]) - 48
            bi += 1
        if an != bn:
            return an < bn
        if ai != bi:
            return ai < bi
        return x < y
    return len(a) < len(b)


def _sorted_keys(keys: list[str]) -> list[str]:
    def cmp(a: str, b: str) -> int:
        return -1 if _go_key_less(a, b) else (1 if _go_key_less(b, a) else 0)

    return sorted(keys, key=functools.cmp_to_key(cmp))


def _value_indent(indent: int, in_seq_item: bool = False) -> int:
    """yaml.v3's indent for a node nested under one at ``indent`` (best indent 4)."""
    return indent + 2 if in_seq_item else 4 * ((indent + 4) // 4)


def _entry(key: str, value: str, indent: int, first_pad: str | None = None) -> str:
    """``key: value`` at ``indent`` (``first_pad`` replaces the indent: after "- ")."""
    pad = " " * indent if first_pad is None else first_pad
    k = _scalar(key, indent, simple_key=True)
    v = _scalar(value, _value_indent(indent))
    return f"{pad}{k}: {v}" + ("" if v.endswith("\n") else "\n")


def _map_block(values: dict[str, str], indent: int) -> str:
    return "".join(_entry(k, values[k], indent) for k in _sorted_keys(list(values)))


def _item_block(fields: list[tuple[str, Any]], seq_indent: int) -> str:
    """One ``- key: value`` sequence item of mapping ``fields`` at ``seq_indent``."""
    inner = seq_indent + 2
    out: list[str] = []
    for n, (key, value) in enumerate(fields):
        pad = " " * seq_indent + "- " if n == 0 else None
        if isinstance(value, dict):
            head = (pad if pad is not None else " " * inner) + f"{_scalar(key, inner, True)}:\n"
            out.append(head + _map_block(value, _value_indent(inner)))
        else:
            out.append(_entry(key, value, inner, pad))
    return "".join(out)


def write_header(header: dict[str, Any], ts: str) -> str:
    """yaml.Marshal of conductor's Message for ``header`` (as :func:`read_header` returns).

    ``ts`` is written as Go writes a time.Time: plain, as given (callers pass
    RFC3339Nano or the original text).
    """
    out = [_entry("msg_id", header.get("msg_id", ""), 0)]
    plain = _style(ts, False, time=True) == "plain"
    out.append(f"ts: {ts}\n" if plain else f"ts: {_double(ts)}\n")
    for name in ("type", "project_id", "task_id", "run_id"):
        out.append(_entry(name, header.get(name, ""), 0))
    if header.get("issue_id"):
        out.append(_entry("issue_id", header["issue_id"], 0))
    parents = header.get("parents") or []
    if parents:
        out.append("parents:\n")
        for parent in parents:
            fields: list[tuple[str, Any]] = [("msg_id", parent.get("msg_id", ""))]
            if parent.get("kind"):
                fields.append(("kind", parent["kind"]))
            if parent.get("meta"):
                fields.append(("meta", parent["meta"]))
            out.append(_item_block(fields, 4))
    links = header.get("links") or []
    if links:
        out.append("links:\n")
        for link in links:
            fields = [("url", link.get("url", ""))]
            fields += [(k, link[k]) for k in ("label", "kind") if link.get(k)]
            out.append(_item_block(fields, 4))
    meta = header.get("meta") or {}
    if meta:
        out.append("meta:\n" + _map_block(meta, 4))
    return "".join(out)
