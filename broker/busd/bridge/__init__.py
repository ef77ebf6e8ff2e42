"""``busd bridge nats``: buses on several machines, carried over NATS JetStream.

A separate process beside the daemon (docs/multi-host.md). It is a socket client of its
own bus (the ``_bridge`` queue outbound, ``publish_batch`` inbound) and a JetStream client
through nats-py (the ``busd[bridge]`` extra, imported only when the bridge runs). Modules:
:mod:`~busd.bridge.names` (subjects, ids, headers), :mod:`~busd.bridge.checks` (what NATS
must promise), :mod:`~busd.bridge.local` (the socket), :mod:`~busd.bridge.outbound`,
:mod:`~busd.bridge.inbound`, :mod:`~busd.bridge.state` (counters, the status file) and
:mod:`~busd.bridge.service` (the process).
"""

from __future__ import annotations

__all__: list[str] = []
