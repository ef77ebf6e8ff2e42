"""StatusReport: one shape for ``busd status --json``, the ``status`` RPC and the files."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import msgspec

from _rpc import Rpc
from busd import __version__
from busd.config import load_config
from busd.ops.status import DaemonInfo, QueueInfo, Rate, Rates, StatusReport, Totals, report
from busd.store.layout import init_bus
from daemon_harness import BUSD, Daemon, clean_env, drop, message, wait_for


def _keys(obj: Any, at: str = "") -> set[str]:
    """Every key path of a JSON value (``/daemon/pid``...), recursively."""
    if not isinstance(obj, dict):
        return set()
    out: set[str] = set()
    for k, v in obj.items():
        out.add(f"{at}/{k}")
        out |= _keys(v, f"{at}/{k}")
    return out


def _status_json(root: Path, rc: int) -> Any:
    proc = subprocess.run(
        [BUSD, "--root", str(root), "status", "--json"],
        capture_output=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == rc, proc.stderr
    return json.loads(proc.stdout)


def _info(**changes: Any) -> DaemonInfo:
    fields: dict[str, Any] = {
        "pid": 42,
        "uptime_s": 1.5,
        "socket": "/run/busd.sock",
        "watcher": "native",
        "config_file": None,
        "dedupe_index": 3,
        "undelivered": 0,
        "totals": Totals(accepted=3, delivered=3, duplicates=0, dead_lettered=0),
        "rates_per_min": Rates(accepted=Rate(one_min=3.0, fifteen_min=0.2)),
    }
    fields.update(changes)
    return DaemonInfo(**fields)


def test_cli_rpc_and_files_give_identical_keys(tmp_path: Path) -> None:
    """busd status --json, the raw status RPC and the daemon-less report: the same key sets."""
    root = init_bus(tmp_path / "bus").root
    drop(root, message(1), "1.json")
    drop(root, b"{not json", "bad.json")  # a dead letter: by_reason has a key
    daemon = Daemon(root).ready()
    try:
        wait_for(lambda: list((root / "dlq").glob("*.reason.json")), what="bad.json refused")
        inbox = root / "inbox" / "bob"
        wait_for(lambda: inbox.is_dir() and list(inbox.iterdir()), what="m-1 delivered")
        on = _status_json(root, 0)
        with Rpc(root / "busd.sock") as rpc:
            raw = rpc.call("status", {})["result"]
    finally:
        assert daemon.stop() == 0
    off = _status_json(root, 3)
    local = msgspec.to_builtins(report(load_config(root=str(root), env={}), None))
    assert _keys(raw) == _keys(on) == _keys(off) == _keys(local)
    assert raw["daemon"]["running"] is True and raw["daemon"]["pid"] == daemon.proc.pid
    assert raw["rates_per_min"]["dead_lettered"]["1m"] is not None  # rates reach the RPC too
    assert raw["attention"] == on["attention"] and raw["healthy"] is on["healthy"] is False
    assert off["daemon"]["pid"] is None and off["totals"]["accepted"] is None


def test_report_without_a_daemon_needs_attention(tmp_path: Path) -> None:
    """No daemon: running false, the first attention item says so, daemon fields null."""
    cfg = load_config(root=str(init_bus(tmp_path / "bus").root), env={})
    got = report(cfg, None)
    assert got.daemon.running is False and got.daemon.socket.endswith("busd.sock")
    assert got.attention == ["the daemon is not running"] and got.healthy is False
    assert got.totals == Totals() and got.rates_per_min == Rates()
    encoded = json.loads(msgspec.json.encode(got))
    assert encoded["rates_per_min"]["accepted"] == {"1m": None, "15m": None}
    assert encoded["dedupe"]["index_size"] is None and encoded["journal"]["undelivered"] is None


def test_report_with_a_daemon_is_healthy_on_a_quiet_bus(tmp_path: Path) -> None:
    """A DaemonInfo fills the daemon fields; nothing waits, so the bus is healthy."""
    cfg = load_config(root=str(init_bus(tmp_path / "bus").root), env={})
    got = report(cfg, _info())
    assert got.healthy is True and got.attention == []
    d = got.daemon
    assert (d.pid, d.socket, d.version) == (42, "/run/busd.sock", __version__)
    assert got.dedupe.index_size == 3 and got.journal.undelivered == 0
    assert msgspec.to_builtins(got.rates_per_min.accepted) == {"1m": 3.0, "15m": 0.2}


def test_report_of_a_daemon_that_does_not_answer(tmp_path: Path) -> None:
    """daemon_error: running (it listens) yet unhealthy, and the attention says why."""
    cfg = load_config(root=str(init_bus(tmp_path / "bus").root), env={})
    got = report(cfg, None, daemon_error="timeout: no answer in 10 s")
    assert got.daemon.running is True and got.daemon.error == "timeout: no answer in 10 s"
    assert got.attention == ["the daemon does not answer: timeout: no answer in 10 s"]
    assert got.healthy is False and got.daemon.pid is None


def test_report_flags_a_stale_outbox_and_too_many_claims(tmp_path: Path) -> None:
    """An outbox file older than a minute and claims over max_in_flight need attention."""
    root = init_bus(tmp_path / "bus").root
    stale = drop(root, message(1), "1.json")
    old = time.time() - 300
    os.utime(stale, (old, old))
    locks = root / "locks" / "bob"
    locks.mkdir(mode=0o700, parents=True, exist_ok=True)
    for i in range(3):
        (locks / f"{i:020d}-000-m-{i}.json").write_bytes(b"{}")
    (root / "inbox" / "bob").mkdir(mode=0o700, exist_ok=True)
    cfg = load_config(root=str(root), env={}, max_in_flight=2)
    got = report(cfg, _info())
    assert got.outbox.backlog == 1 and got.outbox.oldest_age_s is not None
    assert got.outbox.oldest_age_s >= 299
    assert got.attention == [
        "1 files wait in outboxes, the oldest for 5m: nothing routes the bus",
        "bob holds 3 claims, over max_in_flight",
    ]
    assert got.healthy is False


def test_a_status_answer_converts_back_to_the_report(tmp_path: Path) -> None:
    """What the RPC sends (the report as JSON) decodes to an equal StatusReport."""
    cfg = load_config(root=str(init_bus(tmp_path / "bus").root), env={})
    sent = report(cfg, _info())
    assert msgspec.json.decode(msgspec.json.encode(sent), type=StatusReport) == sent


def _delivery(directory: Path, arrival: int, count: int, mid: str) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / f"{arrival:020d}-{count:03d}-{mid}.json").write_bytes(b"{}")


def test_memory_queues_add_to_the_agents_files_and_say_how_each_is_served(
    tmp_path: Path,
) -> None:
    """DaemonInfo.queues: an agent's ready/in-flight count its files plus its memory messages;
    served and connections come from the queue; the oldest unsettled is its oldest file when it
    has one, else the memory's; an agent with a queue but no directory is listed too; an agent
    without a queue is served by files."""
    root = init_bus(tmp_path / "bus").root
    _delivery(root / "inbox" / "bob", 2_000, 0, "m-file")
    _delivery(root / "locks" / "dave", 3_000, 1, "m-claimed")
    _delivery(root / "inbox" / "dave", 4_000, 0, "m-ready")
    cfg = load_config(root=str(root), env={})
    queues = {
        "bob": QueueInfo("socket", 2, 5, 2, "m-mem"),
        "carol": QueueInfo(
            served="socket", connections=1, ready=0, in_flight=1, oldest_unsettled="m-c"
        ),
    }
    got = report(cfg, _info(queues=queues)).agents
    bob, carol, dave = got["bob"], got["carol"], got["dave"]
    assert (bob.ready, bob.in_flight, bob.served, bob.connections) == (6, 2, "socket", 2)
    assert bob.oldest_unsettled == "m-file"
    assert (carol.ready, carol.in_flight, carol.served, carol.connections) == (0, 1, "socket", 1)
    assert carol.oldest_unsettled == "m-c"
    assert (dave.ready, dave.in_flight, dave.served, dave.connections) == (1, 1, "files", 0)
    assert dave.oldest_unsettled == "m-claimed"  # the claim arrived before the ready file
    encoded = json.loads(msgspec.json.encode(report(cfg, _info(queues=queues))))
    assert encoded["agents"]["bob"]["served"] == "socket"
    assert encoded["agents"]["carol"]["oldest_unsettled"] == "m-c"


def test_without_a_daemon_every_agent_is_served_by_files(tmp_path: Path) -> None:
    """The daemon-less report has no memory: files only, 0 connections, oldest from the files
    (None when the agent holds nothing)."""
    root = init_bus(tmp_path / "bus").root
    _delivery(root / "inbox" / "bob", 9_000, 0, "m-late")
    _delivery(root / "inbox" / "bob", 1_000, 2, "m-early")
    (root / "inbox" / "carol").mkdir(mode=0o700)
    got = report(load_config(root=str(root), env={}), None).agents
    assert [(a.served, a.connections) for a in got.values()] == [("files", 0)] * 2
    assert (got["bob"].ready, got["bob"].oldest_unsettled) == (2, "m-early")
    assert got["carol"].oldest_unsettled is None


def test_a_report_from_an_older_daemon_converts_and_queues_round_trip(tmp_path: Path) -> None:
    """Keys are added, never renamed: an answer without the new agent keys converts (files,
    0 connections), and DaemonInfo.queues survives JSON (the RPC's path)."""
    root = init_bus(tmp_path / "bus").root
    _delivery(root / "inbox" / "bob", 1_000, 0, "m-1")
    cfg = load_config(root=str(root), env={})
    sent = msgspec.to_builtins(report(cfg, _info()))
    for key in ("served", "connections", "oldest_unsettled"):
        del sent["agents"]["bob"][key]
    old = msgspec.convert(sent, StatusReport)
    assert (old.agents["bob"].served, old.agents["bob"].connections) == ("files", 0)
    info = _info(queues={"bob": QueueInfo("socket", 3, 1, 0, None)})
    assert msgspec.json.decode(msgspec.json.encode(info), type=DaemonInfo) == info
    assert _info().queues == {}
