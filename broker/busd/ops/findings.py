"""What a ``busd doctor`` check finds: :class:`Finding`, shared by the bus and host checks.

A finding's ``status`` is ``ok``, ``warn`` or ``error``; ``detail`` says what was
seen and what to do; ``fixed`` tells whether a repair was made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Finding", "Status", "fixed", "shown"]

Status = Literal["ok", "warn", "error"]
_SHOWN = 5


@dataclass(slots=True)
class Finding:
    """The outcome of one check."""

    check: str
    status: Status
    detail: str
    fixed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape: ``{check, status, detail, fixed}``."""
        return {
            "check": self.check,
            "status": self.status,
            "detail": self.detail,
            "fixed": self.fixed,
        }


def fixed(finding: Finding, how: str) -> Finding:
    """Mark ``finding`` repaired, saying how."""
    finding.fixed = True
    finding.detail = f"{finding.detail}; fixed: {how}"
    return finding


def shown(items: list[str]) -> str:
    """The first few ``items`` and how many more, for a finding's detail."""
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more
