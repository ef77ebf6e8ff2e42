"""busd: a durable local message broker whose protocol is files.

The public Python surface is small: :func:`busd.config.load_config` to find a
bus, and the modules documented in docs/internals.md. Agents should use the
``busclient`` library in clients/python instead.
"""

__all__ = ["__version__"]

# The single source of the version: pyproject.toml reads it from here, and a
# constant costs nothing at import, unlike importlib.metadata (~20 ms).
__version__ = "0.1.0"
