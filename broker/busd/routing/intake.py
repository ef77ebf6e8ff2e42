"""The one door: every message, from a file or the socket, is admitted here.

A message enters as a :class:`Parcel` (where it came from, and its bytes when
they are at hand) and passes a chain of small stages, in order, each of which
fills in one thing or refuses the message:

=================  ==========================================================
``check_name``     the file's name is UTF-8 (journal lines and reason records are)
``read``           the file, with the size limit, never following links or FIFOs
``decode``         bytes to a validated message (JSON or Markdown front matter)
``decode_filling`` the same, filling a missing ``message_id``/``created_at`` (socket)
``check_size``     the canonical JSON form, which the journal and inboxes hold, fits
``resolve``        the recipients (topics expanded; ``agent@bus`` addressed; the owner of
                   a foreign inbox file)
=================  ==========================================================

:data:`FILE` (outbox and foreign inbox files), :data:`SOCKET` (publishes) and
:data:`CLAIM` (the consumer's claim-time decoding: the inbox is the truth) are
the chains; :func:`admit` runs one and returns :class:`Admitted` or
:class:`Refused`. A refusal is an :class:`InvalidMessage`, :class:`Unroutable`
or :class:`InvalidName`; what happens to it is :mod:`busd.routing.refusals`'
business. A file that vanished meanwhile (claimed or removed by someone else)
is neither: ``FileNotFoundError`` leaves :func:`admit` for the caller to skip it.

Stages are pure functions of ``(rules, parcel)``; :class:`Rules` is immutable,
so one admission sees one configuration however the router is reconfigured.
Synchronous: runs in the router's (or consumer's) worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from busd.config import Config, with_mirrors
from busd.core import codec
from busd.core.model import Message, effective_recipients
from busd.errors import InvalidMessage, InvalidName, Reason, Unroutable
from busd.store.fsio import read_limited
from busd.store.layout import Layout

__all__ = [
    "BRIDGE_AGENT",
    "CLAIM",
    "FILE",
    "SOCKET",
    "Admitted",
    "Origin",
    "Parcel",
    "Refused",
    "Rules",
    "Stage",
    "admit",
    "check_name",
    "check_size",
    "decode",
    "decode_filling",
    "read",
    "resolve",
]

OriginKind = Literal["file", "socket", "claim"]

BRIDGE_AGENT = "_bridge"
"""The reserved agent whose queue is ``busd bridge nats``'s outbound backlog, and the
sender of every message the bridge brings in (docs/multi-host.md). A message whose
origin sender is this agent was bridged: it is delivered on this bus only."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a message came from: what its journal line and reason record name.

    ``rel`` is the root-relative, ``/``-separated, UTF-8-safe form of ``path``
    (``None`` for the socket). ``sender`` is the outbox directory (or the
    socket's ``sender``); ``recipient`` the inbox it sits in (a foreign file,
    or the claiming agent). ``name_ok`` is False for a file name that is not
    UTF-8 (``rel`` then holds a readable form of it).
    """

    kind: OriginKind
    path: Path | None = None
    rel: str | None = None
    sender: str | None = None
    recipient: str | None = None
    name_ok: bool = True

    @classmethod
    def file(cls, layout: Layout, path: Path) -> Origin:
        """A file the router found in ``outbox/[<sender>/]`` or ``inbox/<agent>/``."""
        rel = path.relative_to(layout.root).as_posix()
        name_ok = _utf8(rel)
        if not name_ok:
            rel = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        owner = path.parent.name if path.parent != layout.outbox else None
        # An inbox file's directory names its recipient; an outbox file's, its sender.
        if path.parent.parent == layout.inbox:
            return cls("file", path, rel, None, owner, name_ok)
        return cls("file", path, rel, owner, None, name_ok)

    @classmethod
    def socket(cls, sender: str | None) -> Origin:
        """A message published on the socket, by ``sender`` if it said so."""
        return cls("socket", sender=sender)

    @classmethod
    def claim(cls, layout: Layout, agent: str, path: Path, rel: str | None = None) -> Origin:
        """A file ``agent`` claimed into ``locks/``; ``rel`` overrides where it was."""
        return cls("claim", path, rel or path.relative_to(layout.root).as_posix(), None, agent)

    @property
    def in_inbox(self) -> bool:
        """A foreign inbox file: routed in place, never removed once journaled."""
        return self.kind == "file" and self.recipient is not None

    @property
    def journal_source(self) -> str | None:
        """The journal's ``source``: the file, relative to the root (absent for the socket)."""
        return self.rel if self.kind == "file" else None

    @property
    def original_path(self) -> str | None:
        """The reason record's ``original_path`` (``"socket"`` for a publish)."""
        return "socket" if self.kind == "socket" else self.rel


@dataclass(slots=True)
class Parcel:
    """What the stages pass along; each fills in one field."""

    origin: Origin
    data: bytes | None = None
    message: Message | None = None
    body: bytes | None = None
    recipients: list[str] | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    """A message that passed every stage: ``body`` is its canonical JSON."""

    origin: Origin
    message: Message
    body: bytes
    recipients: list[str]
    data: bytes | None


@dataclass(frozen=True, slots=True)
class Refused:
    """A message a stage refused; ``message`` when it decoded, ``data`` when it was read."""

    origin: Origin
    error: InvalidMessage | Unroutable | InvalidName
    message: Message | None = None
    data: bytes | None = None


class Rules:
    """What intake checks against: the config and the topic map, immutable.

    ``subscriptions`` defaults to the config's own (the daemon merges in the
    runtime ones). The router swaps a whole :class:`Rules` on reconfigure.
    """

    __slots__ = (
        "bridged_topics",
        "bus_name",
        "config",
        "default_recipient",
        "dlq_unknown",
        "layout",
        "limit",
        "subscriptions",
    )

    def __init__(
        self, config: Config, subscriptions: Mapping[str, list[str]] | None = None
    ) -> None:
        subs = (
            with_mirrors(config, config.subscriptions) if subscriptions is None else subscriptions
        )
        self.config = config
        self.layout = config.layout
        self.limit = config.max_message_bytes
        self.default_recipient = config.default_recipient
        self.dlq_unknown = config.unknown_recipient == "dlq"
        self.bus_name = config.bus_name
        self.bridged_topics = frozenset(config.bridge.topics)
        self.subscriptions: Mapping[str, tuple[str, ...]] = MappingProxyType(
            {topic: tuple(agents) for topic, agents in subs.items()}
        )


Stage = Callable[[Rules, Parcel], Parcel]
"""One step of a chain: fills in part of the parcel or raises a refusal."""


def check_name(rules: Rules, p: Parcel) -> Parcel:
    """Refuse a file whose name is not UTF-8 (``invalid_utf8``), before opening it."""
    if not p.origin.name_ok:
        raise InvalidMessage(Reason.INVALID_UTF8, f"file name {p.origin.rel!r} is not UTF-8")
    return p


def read(rules: Rules, p: Parcel) -> Parcel:
    """Read the file, at most ``max_message_bytes`` (``too_large``, ``not_a_regular_file``)."""
    assert p.origin.path is not None, "read needs a file"
    p.data = read_limited(p.origin.path, rules.limit)
    return p


def decode(rules: Rules, p: Parcel) -> Parcel:
    """Decode and validate the bytes (every decode reason of protocol.md section 7)."""
    if p.message is None:  # an in-process caller may hand a decoded message
        assert p.data is not None, "decode needs bytes"
        p.message = codec.decode(p.data, max_bytes=rules.limit)
    return p


def decode_filling(rules: Rules, p: Parcel) -> Parcel:
    """:func:`decode`, filling a missing ``message_id``/``created_at`` (socket publishes)."""
    if p.message is None:
        assert p.data is not None, "decode needs bytes"
        p.message = codec.decode(p.data, fill_missing=True, max_bytes=rules.limit)
    return p


def check_size(rules: Rules, p: Parcel) -> Parcel:
    """Encode canonical JSON and refuse it over the limit (``too_large``).

    The journal and the inbox hold this form; a Markdown message, or one whose
    missing fields were filled, can grow in it and must not pass here only to
    fail at claim time.
    """
    assert p.message is not None, "check_size needs a message"
    body = codec.encode_json(p.message)
    if len(body) > rules.limit:
        raise InvalidMessage(
            Reason.TOO_LARGE, f"{len(body)} bytes as JSON is over the limit of {rules.limit}"
        )
    p.body = body
    return p


def resolve(rules: Rules, p: Parcel) -> Parcel:
    """The recipients: the inbox a foreign file sits in, else ``to`` with topics expanded.

    ``agent@<bus_name>`` is plain ``agent``; ``agent@<other bus>``, and a topic named in
    ``[bridge] topics``, add :data:`BRIDGE_AGENT` (once): the bridge publishes it on, reading
    the destinations from the message's ``to``. A message the bridge brought in (origin
    sender :data:`BRIDGE_AGENT`) goes to this bus's own recipients only: ``agent@<bus_name>``
    and local topic subscribers; plain names and other buses were the origin bus's to serve,
    so a bridged message never loops.

    ``unroutable``: a topic without subscribers (or bridge), a bridged message naming no one
    here, or (``unknown_recipient = "dlq"``) a recipient without an inbox.
    """
    assert p.message is not None, "resolve needs a message"
    if p.origin.recipient is not None:
        p.recipients = [p.origin.recipient]
        return p
    bridged = p.origin.sender == BRIDGE_AGENT
    out: list[str] = []
    for r in effective_recipients(p.message, rules.default_recipient):
        if r.startswith("topic:"):
            topic = r[6:]
            subscribers = rules.subscriptions.get(topic, ())
            shared = topic in rules.bridged_topics and not bridged
            if not subscribers and not shared:
                raise Unroutable(f"topic {topic!r} has no subscribers")
            out.extend(subscribers)
            if shared:
                out.append(BRIDGE_AGENT)
            continue
        agent, _, bus = r.partition("@")
        if bus and bus != rules.bus_name:
            if not bridged:
                out.append(BRIDGE_AGENT)
        elif bus or not bridged:
            out.append(agent)
    out = list(dict.fromkeys(out))
    if not out:
        raise Unroutable(f"no recipient on bus {rules.bus_name!r}")
    if rules.dlq_unknown:
        unknown = [r for r in out if r != BRIDGE_AGENT and not rules.layout.inbox_dir(r).is_dir()]
        if unknown:
            raise Unroutable(f"unknown recipient(s): {', '.join(unknown)}")
    p.recipients = out
    return p


FILE: tuple[Stage, ...] = (check_name, read, decode, check_size, resolve)
"""Outbox and foreign inbox files."""

SOCKET: tuple[Stage, ...] = (decode_filling, check_size, resolve)
"""Socket publishes (the bytes came with the request)."""

CLAIM: tuple[Stage, ...] = (read, decode)
"""A file just claimed into ``locks/``: routed before, but the inbox is the truth."""


def admit(rules: Rules, parcel: Parcel, chain: tuple[Stage, ...]) -> Admitted | Refused:
    """Run ``parcel`` through ``chain``; ``FileNotFoundError`` if its file vanished.

    For a chain without :func:`check_size`/:func:`resolve` (:data:`CLAIM`),
    ``Admitted.body`` is the bytes read and ``recipients`` the claiming agent.
    """
    p = parcel
    try:
        for stage in chain:
            p = stage(rules, p)
    except (InvalidMessage, Unroutable, InvalidName) as exc:
        return Refused(p.origin, exc, p.message, p.data)
    assert p.message is not None, "a chain must decode"
    body = p.body if p.body is not None else p.data
    assert body is not None
    recipients = p.recipients
    if recipients is None:
        recipients = [p.origin.recipient] if p.origin.recipient is not None else []
    return Admitted(p.origin, p.message, body, recipients, p.data)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
