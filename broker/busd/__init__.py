"""busd: a durable local message broker whose protocol is files.

The public Python surface is small and imported on first use (so ``busd status``
and the other short-lived commands pay only for what they touch):
:class:`~busd.config.Config` and :func:`~busd.config.load_config` to find and read
a bus, :class:`~busd.errors.BusdError` (every error busd raises, with a stable
``code``), and the layers documented in docs/internals.md. Agents should use the
``busclient`` library in clients/python instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["BusdError", "Config", "__version__", "load_config"]

# The single source of the version: pyproject.toml reads it from here, and a
# constant costs nothing at import, unlike importlib.metadata (~20 ms).
__version__ = "0.1.0"

if TYPE_CHECKING:
    from busd.config import Config, load_config
    from busd.errors import BusdError

_LAZY = {"Config": "busd.config", "load_config": "busd.config", "BusdError": "busd.errors"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'busd' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
