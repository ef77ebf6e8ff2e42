"""Wake-ups: "something may have arrived for agent X" and "there is work, loop".

Both are level-triggered and lossless in the way that matters: a wake-up
given while nobody waits is kept until the next wait (:class:`Wakeup`), or,
for an agent nobody waits for, dropped because whoever waits next first looks
at the inbox itself (:class:`Arrivals`). The hand-over of anyio events lives
here, in one place, instead of in every loop.
"""

from __future__ import annotations

from collections.abc import Iterable

import anyio

__all__ = ["Arrivals", "Wakeup"]


class Wakeup:
    """A flag one loop waits on: :meth:`set` from anywhere on the loop, :meth:`wait` clears."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        """Wake the waiter (now, or at its next :meth:`wait`)."""
        self._event.set()

    def clear(self) -> None:
        """Forget a wake-up given before now."""
        if self._event.is_set():
            self._event = anyio.Event()

    def is_set(self) -> bool:
        """Whether a wake-up is pending."""
        return self._event.is_set()

    async def wait(self) -> None:
        """Return once set; the flag is cleared for the next wait."""
        await self._event.wait()
        self.clear()


class Arrivals:
    """Fetchers and pushers waiting for an agent's inbox, one event per waited-for agent."""

    def __init__(self) -> None:
        self._events: dict[str, anyio.Event] = {}

    async def wait(self, agent: str, timeout: float) -> None:
        """Return when something may have arrived for ``agent``, or after ``timeout``."""
        event = self._events.setdefault(agent, anyio.Event())
        with anyio.move_on_after(timeout):
            await event.wait()

    def notify(self, agents: Iterable[str] | None) -> None:
        """Wake everyone waiting for ``agents`` (None: for any agent)."""
        for agent in list(self._events) if agents is None else agents:
            event = self._events.pop(agent, None)
            if event is not None:
                event.set()
