"""Go's ``time.Time`` as conductor-loop's code reads and writes it. Pure.

:func:`parse_ts` follows yaml.v3's decoding of a ``ts`` scalar into ``time.Time``
(RFC 3339 with nanoseconds, and the shorter layouts yaml.v3 accepts when the
scalar is plain); :func:`parse_legacy_ts` the layouts of conductor's legacy lines;
:func:`format_ts` writes ``RFC3339Nano`` in UTC, as Go's ``MarshalText`` does.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = ["ZERO_TS", "GoTime", "format_ts", "parse_legacy_ts", "parse_ts"]

ZERO_TS: Final = "0001-01-01T00:00:00Z"
"""Go's zero time, as conductor writes a message without ``ts``."""
_DIGITS: Final = frozenset("0123456789")


class GoTime:
    """A parsed Go ``time.Time`` in UTC: whole seconds as a datetime, plus nanoseconds.

    ``utc`` is None when the instant is outside what Python's datetime holds
    (year 0, or past 9999 after the offset): conductor keeps such a time, busd
    cannot carry it.
    """

    __slots__ = ("nanos", "utc")

    def __init__(self, utc: datetime | None, nanos: int) -> None:
        self.utc = utc
        self.nanos = nanos


def _num(s: str, i: int, fixed: bool) -> tuple[int, int] | None:
    """Go's getnum: one or two digits (exactly two when fixed) at s[i:]."""
    if i >= len(s) or s[i] not in _DIGITS:
        return None
    if i + 1 >= len(s) or s[i + 1] not in _DIGITS:
        return None if fixed else (int(s[i]), i + 1)
    return int(s[i : i + 2]), i + 2


def _go_parse(s: str, *, short: bool, sep: str, zone: bool, clock: bool = True) -> GoTime | None:
    """Go's time.Parse for the layouts conductor uses (see :func:`parse_ts`)."""
    if len(s) < 4 or not set(s[:4]) <= _DIGITS:
        return None
    year, i = int(s[:4]), 4
    fields: list[int] = []
    for lead, fixed in (("-", not short), ("-", not short)):
        if not s.startswith(lead, i):
            return None
        got = _num(s, i + 1, fixed)
        if got is None:
            return None
        fields.append(got[0])
        i = got[1]
    month, day = fields
    hour = minute = second = nanos = 0
    if clock:
        if i >= len(s) or s[i] not in sep:
            return None
        parts: list[int] = []
        for n, fixed in enumerate((False, not short, not short)):
            if n and not s.startswith(":", i):
                return None
            got = _num(s, i + 1, fixed)
            if got is None:
                return None
            parts.append(got[0])
            i = got[1]
        hour, minute, second = parts
        if i + 1 < len(s) and s[i] in ".," and s[i + 1] in _DIGITS:
            j = i + 1
            while j < len(s) and s[j] in _DIGITS:
                j += 1
            nanos = int(s[i + 1 : min(j, i + 10)].ljust(9, "0"))
            i = j
    offset = 0
    if zone:
        if s.startswith("Z", i):
            i += 1
        else:
            tz = s[i : i + 6]
            if (
                len(tz) < 6
                or tz[0] not in "+-"
                or tz[3] != ":"
                or not set(tz[1:3] + tz[4:6]) <= _DIGITS
            ):
                return None
            hh, mm = int(tz[1:3]), int(tz[4:6])
            if hh > 24 or mm > 60:
                return None
            offset = (hh * 3600 + mm * 60) * (-1 if tz[0] == "-" else 1)
            i += 6
    if i != len(s) or not 1 <= month <= 12 or hour >= 24 or minute >= 60 or second >= 60:
        return None
    return _build(year, month, day, hour, minute, second, nanos, offset)


def _days_in(year: int, month: int) -> int:
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _build(
    year: int, month: int, day: int, hour: int, minute: int, second: int, nanos: int, offset: int
) -> GoTime | None:
    if not 1 <= day <= _days_in(year, month):
        return None
    try:
        local = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
        return GoTime(local - timedelta(seconds=offset), nanos)
    except (ValueError, OverflowError):
        return GoTime(None, nanos)


_STRICT_RE: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:Z|([+-])([0-9]{2}):([0-9]{2}))\Z"
)


def _strict_rfc3339(s: str) -> GoTime | None:
    """Go's Time.UnmarshalText (strict RFC 3339): quoted timestamps go this way."""
    m = _STRICT_RE.match(s)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if not 1 <= month <= 12 or hour > 23 or minute > 59 or second > 59:
        return None
    nanos = int((m.group(7) or "0")[:9].ljust(9, "0"))
    offset = 0
    if m.group(8):
        hh, mm = int(m.group(9)), int(m.group(10))
        if hh > 23 or mm > 59:
            return None
        offset = (hh * 3600 + mm * 60) * (-1 if m.group(8) == "-" else 1)
    return _build(year, month, day, hour, minute, second, nanos, offset)


def parse_ts(text: str, *, plain: bool) -> GoTime | None:
    """conductor's ``ts`` as yaml.v3 decodes it into time.Time, or None (an error).

    A plain scalar is tried as a YAML timestamp (``2006-1-2T15:4:5.999999999Z07:00``,
    lower-case ``t`` too, ``2006-1-2 15:4:5.999999999`` in UTC, ``2006-1-2``);
    anything else (and every quoted scalar) must be strict RFC 3339. Null ("")
    is Go's zero time.
    """
    if text == "" and plain:
        return GoTime(datetime(1, 1, 1, tzinfo=UTC), 0)
    if plain and len(text) > 4 and set(text[:4]) <= _DIGITS and text[4] == "-":
        for sep, zone in (("T", True), ("t", True), (" ", False)):
            got = _go_parse(text, short=True, sep=sep, zone=zone)
            if got is not None:
                return got
        got = _go_parse(text, short=True, sep="", zone=False, clock=False)
        if got is not None:
            return got
    return _strict_rfc3339(text)


def parse_legacy_ts(text: str) -> GoTime | None:
    """A legacy line's timestamp: ``2006-01-02 15:04:05``, ``...T15:04:05`` or RFC 3339."""
    for sep, zone in ((" ", False), ("T", False), ("T", True)):
        got = _go_parse(text, short=False, sep=sep, zone=zone)
        if got is not None:
            return got
    return None


def format_ts(t: GoTime) -> str:
    """Go's ``Format(time.RFC3339Nano)`` of a UTC time (trailing zeros of the fraction cut)."""
    if t.utc is None:
        return ZERO_TS
    base = t.utc.strftime("%Y-%m-%dT%H:%M:%S")
    base = f"{t.utc.year:04d}{base[base.index('-') :]}"
    frac = f"{t.nanos:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"
