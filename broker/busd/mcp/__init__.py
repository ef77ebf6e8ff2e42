"""``busd mcp``: the bus as a Model Context Protocol server, for coding agents.

A layer at the level of :mod:`busd.app`: a thin shell over :mod:`busclient` (the
socket when a daemon runs, the files when none does) that keeps no state a
restart would lose. The SDK (the ``mcp`` package, the ``busd[mcp]`` extra) is
imported by these modules only; ``busd.cli.mcp`` imports them lazily.
"""

__all__: list[str] = []
