"""The values of a routing pass: what the router takes in, hands on, and reports.

:class:`~busd.routing.router.Router` (which re-exports every public name here)
takes these in and gives them back; they are plain data and touch no file:

- :class:`Incoming`: a socket publish; ``Router.commit`` sets its ``outcome``;
- :class:`Batch`: one group commit, handed from the commit lane to the delivery
  lane: its accepted messages and crash redos (each an :class:`Item` that knows
  its ``accepted`` journal line) wait in it until ``Router.finish``; ``size``
  says about how many bytes it holds meanwhile;
- :class:`RouteReport`: counts that :meth:`RouteReport.add` sums across passes,
  with the :class:`Kept` deliveries left to the daemon's memory;
- :data:`Served` and :data:`Held`: the questions ``Router.finish`` asks its
  caller (which agents are socket-served; which messages its memory owns).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import msgspec

from busd.core.model import Message
from busd.errors import BusdError
from busd.store.journal import START, Position

__all__ = ["Batch", "Held", "Incoming", "Item", "Kept", "RouteReport", "Served"]

Served = Callable[[str], bool]
"""Whether an agent is socket-served (its messages stay in memory, no inbox file)."""
Held = Callable[[str, str], bool]
"""Whether ``(agent, message_id)`` is the daemon's memory's to deliver (no file for it)."""


class Kept(NamedTuple):
    """An accepted message kept in memory for a served ``agent``: its journal line."""

    agent: str
    message_id: str
    key: str | None
    position: Position
    length: int


class RouteReport(msgspec.Struct, kw_only=True):
    """Counts of what one or more routing passes did."""

    accepted: int = 0
    delivered: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    redone: int = 0
    recipients: set[str] = msgspec.field(default_factory=set)
    kept: list[Kept] = msgspec.field(default_factory=list)
    """Deliveries :meth:`Router.finish` left to the daemon's memory (served agents)."""

    def add(self, other: RouteReport) -> None:
        """Add ``other``'s counts to these (``recipients`` is a union, ``kept`` joined)."""
        for f in self.__struct_fields__:
            if f == "recipients":
                self.recipients |= other.recipients
            elif f == "kept":
                self.kept.extend(other.kept)
            else:
                setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass(slots=True)
class Incoming:
    """A socket publish for :meth:`Router.commit` (its bytes, or a decoded ``message``).

    ``commit`` admits it in its worker thread and sets ``outcome``: ``"accepted"``,
    ``"duplicate"``, or the :class:`BusdError` that refused it (dead-lettered,
    journaled, counted); ``message`` is then the decoded message, if it decoded.
    """

    message: Message | None = None
    sender: str | None = None
    raw: bytes | None = None
    outcome: str | BusdError | None = None

    def __post_init__(self) -> None:
        if self.message is None and self.raw is None:
            raise ValueError("Incoming needs raw bytes or a message")


@dataclass(slots=True)
class Batch:
    """A committed batch awaiting :meth:`Router.finish`."""

    report: RouteReport = field(default_factory=lambda: RouteReport())
    accepted: list[Item] = field(default_factory=list)
    redo: list[Item] = field(default_factory=list)
    position: Position = START

    @property
    def size(self) -> int:
        """About the bytes held until :meth:`Router.finish` (body + decoded message)."""
        return sum(2 * len(i.body) for i in (*self.accepted, *self.redo))


@dataclass(slots=True)
class Item:
    """One admitted message of a :class:`Batch`: its body, recipients, source and journal line."""

    msg: Message
    body: bytes
    recipients: list[str]
    rel: str | None
    path: Path | None
    incoming: Incoming | None
    position: Position = START  # start of its `accepted` line (set by commit)
    length: int = 0  # bytes of that line, newline included
