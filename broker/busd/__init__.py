"""busd: a durable local message broker whose protocol is files.

The public Python surface is small: :func:`busd.config.load_config` to find a
bus, and the modules documented in docs/internals.md. Agents should use the
``busclient`` library in clients/python instead.
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("busd")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
