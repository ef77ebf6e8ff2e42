"""Crash tests: SIGKILL the daemon, consumers and writers at random moments; lose nothing.

* The kill -9 loop: socket publishers (``publish`` and ``publish_batch``), a
  busclient producer (socket, or files while the daemon is down), a raw file-drop
  producer, a socket consumer and a daemon-less file consumer all run while the
  daemon is SIGKILLed and restarted (30 times in CI, 300 under ``make chaos``).
  At the end every acknowledged publish and every file renamed into an outbox is in
  the journal exactly once and was delivered, nothing was delivered after its ack
  was confirmed, and nothing went to the DLQ or stayed behind.
* Consumers SIGKILLed while holding claims: the messages come back after the lease.
* Writers SIGKILLed mid-write (``busd send``, busclient file fallback, journal
  appends): nothing partial is ever read.
* Power loss: under strace, every publish answer and every outbox removal comes
  after the journal fsync that covers it, and a checkpoint is written only after
  the deliveries it covers are fsynced.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _chaos import (
    LONG,
    ChaosDaemon,
    accepted_ids,
    dlq_records,
    hidden_leftovers,
    journal_entries,
    report,
    scale,
    wait_until,
)

from _rpc import Rpc, RpcFailure
from busclient import BusError, Client
from busd.config import load_config
from busd.routing.consumer import Consumer
from busd.store.fsio import fsync_dir
from busd.store.layout import init_bus, parse_delivery_name
from daemon_harness import BUSD, clean_env, drop, files, message, wait_for

pytestmark = pytest.mark.timeout(5400 if LONG else 240)

KILLS = scale(30, 300)
ENV = {
    "BUSD_LEASE_SECONDS": "2",
    "BUSD_MAX_DELIVERIES": "500",
    "BUSD_RESCAN_INTERVAL_SECONDS": "0.5",
}
_CONN_ERRORS = (OSError, EOFError, TimeoutError, ValueError, AssertionError)
# Recipients: bob fetches over the socket, carol is a daemon-less file consumer, dave a
# socket subscriber that acks by receipt.
_AGENTS = ("bob", "carol", "dave")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return init_bus(tmp_path / "bus").root


def _msg(mid: str, to: str, agent: str = "alice") -> dict[str, Any]:
    return message(0, message_id=mid, to=to, agent_id=agent, body=f"body of {mid}")


def _markdown(mid: str, to: str) -> bytes:
    return (
        f"---\nmsg_id: {mid}\nts: 2026-11-21T12:00:00Z\ntype: FACT\nworkflow_id: w1\n"
        f"task_id: t1\nagent_id: alice\nto: {to}\n---\nbody of {mid}\n---\nnot a header\n"
    ).encode()


@dataclass
class Observed:
    """What producers and consumers saw. Times are ``time.monotonic()``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    must: dict[str, str] = field(default_factory=dict)  # acknowledged: id -> producer
    uncertain: set[str] = field(default_factory=set)  # no answer (daemon killed)
    refused: list[str] = field(default_factory=list)
    deliveries: list[tuple[str, str, float]] = field(default_factory=list)  # (agent, id, sent)
    acked: dict[tuple[str, str], float] = field(default_factory=dict)  # (agent, id) -> confirmed
    errors: list[str] = field(default_factory=list)

    def confirm(self, mid: str, how: str) -> None:
        with self.lock:
            self.must[mid] = how

    def delivered(self, agent: str, ids: list[str], sent: float) -> None:
        with self.lock:
            self.deliveries.extend((agent, mid, sent) for mid in ids)

    def confirm_ack(self, agent: str, ids: list[str]) -> None:
        now = time.monotonic()
        with self.lock:
            for mid in ids:
                self.acked.setdefault((agent, mid), now)

    def seen(self) -> set[str]:
        with self.lock:
            return {mid for _, mid, _ in self.deliveries}


def _connect(root: Path) -> Rpc | None:
    try:
        return Rpc(root / "busd.sock", timeout=5)
    except OSError:
        time.sleep(0.02)
        return None


def _socket_publisher(
    root: Path, stop: threading.Event, obs: Observed, tag: str, batch: int
) -> None:
    conn, n = None, 0
    while not stop.is_set():
        conn = conn or _connect(root)
        if conn is None:
            continue
        ids = [f"{tag}-{n + i:06d}" for i in range(batch)]
        n += batch
        msgs = [_msg(mid, _AGENTS[(n + i) % 3]) for i, mid in enumerate(ids)]
        try:
            if batch == 1:
                answer = conn.call("publish", {"message": msgs[0]})
            else:
                answer = conn.call("publish_batch", {"messages": msgs})
        except _CONN_ERRORS:
            with obs.lock:
                obs.uncertain.update(ids)
            conn.close()
            conn = None
            continue
        if "error" in answer:
            obs.refused.append(f"{ids}: {answer['error']}")
            continue
        results = [answer["result"]] if batch == 1 else answer["result"]["results"]
        for mid, res in zip(ids, results, strict=True):
            if batch > 1 and "error" in res:
                obs.refused.append(f"{mid}: {res['error']}")
            else:
                obs.confirm(mid, "socket")
        time.sleep(0.002)
    if conn is not None:
        conn.close()


def _client_producer(root: Path, stop: threading.Event, obs: Observed) -> None:
    n = 0
    with Client(root, timeout=5, connect_timeout=0.5) as client:
        while not stop.is_set():
            mid = f"c-{n:06d}"
            n += 1
            try:
                client.send(_msg(mid, _AGENTS[n % 3]))
            except BusError as exc:
                with obs.lock:
                    obs.uncertain.add(mid)
                if type(exc).__name__ not in ("Unavailable", "_Lost", "ShuttingDown"):
                    obs.errors.append(f"client send {mid}: {exc!r}")
                continue
            except Exception as exc:  # noqa: BLE001 - a client bug: record it, go on
                obs.errors.append(f"client send {mid} raised {exc!r}")
                with obs.lock:
                    obs.uncertain.add(mid)
                continue
            obs.confirm(mid, "client")
            time.sleep(0.005)


def _file_producer(root: Path, stop: threading.Event, obs: Observed) -> None:
    """Write in tmp/, fsync, rename into outbox/alice/, fsync: the protocol's producer."""
    outbox = root / "outbox" / "alice"
    outbox.mkdir(exist_ok=True)
    n = 0
    while not stop.is_set():
        mid = f"f-{n:06d}"
        to = _AGENTS[n % 3]
        data = _markdown(mid, to) if n % 5 == 0 else json.dumps(_msg(mid, to)).encode()
        n += 1
        tmp = root / "tmp" / f"chaos-{mid}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, outbox / f"{time.time_ns():020d}-{mid}.json")
        fsync_dir(outbox)
        obs.confirm(mid, "file")
        time.sleep(0.01)


def _socket_consumer(root: Path, stop: threading.Event, obs: Observed, agent: str) -> None:
    conn = None
    while not stop.is_set():
        conn = conn or _connect(root)
        if conn is None:
            continue
        sent = time.monotonic()
        try:
            answer = conn.call("fetch", {"agent_id": agent, "max": 50, "wait_s": 0.2})
            if "error" in answer:
                obs.errors.append(f"fetch: {answer['error']}")
                continue
            ids = [m["message"]["message_id"] for m in answer["result"]["messages"]]
            obs.delivered(agent, ids, sent)
            if not ids:
                continue
            answer = conn.call("ack", {"agent_id": agent, "message_ids": ids})
        except _CONN_ERRORS:
            conn.close()
            conn = None
            continue
        if "error" in answer:
            obs.errors.append(f"ack: {answer['error']}")
        elif answer["result"]["acked"] == len(ids):
            obs.confirm_ack(agent, ids)
    if conn is not None:
        conn.close()


def _subscriber(root: Path, stop: threading.Event, obs: Observed, agent: str) -> None:
    """Subscribe, take pushes, ack each by its receipt; resubscribe after every kill."""
    conn: Rpc | None = None
    while not stop.is_set():
        if conn is None:
            conn = _connect(root)
            if conn is None:
                continue
            try:
                conn("subscribe", {"agent_id": agent, "max_in_flight": 20})
            except (*_CONN_ERRORS, RpcFailure):
                conn.close()
                conn = None
                continue
        try:
            pushed = conn.push(timeout=0.3)
        except TimeoutError:
            continue
        except _CONN_ERRORS:
            conn.close()
            conn = None
            continue
        params = pushed.get("params") or {}
        mid, receipt = params["message"]["message_id"], params["receipt"]
        obs.delivered(agent, [mid], time.monotonic())
        try:
            answer = conn.call("ack", {"agent_id": agent, "receipts": [receipt]})
        except _CONN_ERRORS:
            conn.close()
            conn = None
            continue
        if "error" in answer:
            # stale after a restart (the daemon rebuilt it as ready): it comes again
            if answer["error"]["data"].get("reason") != "stale_receipt":
                obs.errors.append(f"ack by receipt: {answer['error']}")
        elif answer["result"]["acked"] == 1:
            obs.confirm_ack(agent, [mid])
    if conn is not None:
        conn.close()


def _file_consumer(root: Path, stop: threading.Event, obs: Observed, agent: str) -> None:
    """busd's daemon-less consumer, in this process: works with or without the daemon."""
    config = load_config(root=str(root), env=ENV)
    consumer = Consumer(config, agent)
    while not stop.is_set():
        sent = time.monotonic()
        try:
            claims = consumer.claim(50)
            ids = [c.message.message_id for c in claims]
            obs.delivered(agent, ids, sent)
            if ids and consumer.ack(ids) == len(ids):
                obs.confirm_ack(agent, ids)
        except Exception as exc:  # noqa: BLE001 - recorded, fails the test at the end
            obs.errors.append(f"file consumer: {exc!r}")
            ids = []
        if not ids:
            time.sleep(0.05)


# Start-up replays the journal after the checkpoint: under make chaos, with ledgers of
# ~100,000 acks, it has taken a minute (see test_recovery_reads_each_ledger_once_...).
_READY_S = 300 if LONG else 60


def _ready_or_dead(d: ChaosDaemon) -> bool:
    """Wait for ``daemon_ready``; False if the daemon died first."""
    try:
        d.ready(timeout=_READY_S)
    except AssertionError:
        if d.alive():
            raise
        return False
    return True


def test_kill_9_loop_loses_nothing(root: Path) -> None:
    """SIGKILL the daemon at random moments under load; every acknowledged message survives."""
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    obs = Observed()
    produce, consume = threading.Event(), threading.Event()
    producers = [
        threading.Thread(target=_socket_publisher, args=(root, produce, obs, "s", 1)),
        threading.Thread(target=_socket_publisher, args=(root, produce, obs, "b", 10)),
        threading.Thread(target=_client_producer, args=(root, produce, obs)),
        threading.Thread(target=_file_producer, args=(root, produce, obs)),
    ]
    consumers = [
        threading.Thread(target=_socket_consumer, args=(root, consume, obs, "bob")),
        threading.Thread(target=_file_consumer, args=(root, consume, obs, "carol")),
        threading.Thread(target=_subscriber, args=(root, consume, obs, "dave")),
    ]
    crashes: list[str] = []
    killed_before_ready = 0
    slowest_start = 0.0
    started = time.monotonic()
    for t in (*producers, *consumers):
        t.daemon = True
        t.start()
    d = None
    try:
        for k in range(KILLS):
            d = ChaosDaemon(root, env=ENV)
            if k % 2:  # half the kills land while it serves, half anywhere (start-up too)
                t0 = time.monotonic()
                _ready_or_dead(d)
                slowest_start = max(slowest_start, time.monotonic() - t0)
                time.sleep(rng.uniform(0.0, 0.6))
            else:
                time.sleep(rng.uniform(0.05, 1.0))
            if not d.alive():
                d.kill()
                crashes.append(d.stderr_text()[-2000:])
            killed_before_ready += not d.events("daemon_ready")
            d.kill()
        d = ChaosDaemon(root, env=ENV)
        assert _ready_or_dead(d), d.stderr_text()[-2000:]
        time.sleep(0.5)
        produce.set()
        for t in producers:
            t.join(30)
        must = dict(obs.must)

        def drained() -> bool:
            journaled = set(accepted_ids(root))
            seen = obs.seen()
            pending = [files(root / s / a) for s in ("inbox", "locks") for a in _AGENTS]
            return set(must) <= seen and journaled <= seen and not any(pending)

        wait_until(
            drained, timeout=300 if LONG else 90, what="every accepted message delivered and acked"
        )
        consume.set()
        for t in consumers:
            t.join(30)
        assert d.stop() == 0
    finally:
        produce.set()
        consume.set()
        if d is not None:
            d.kill()

    assert not crashes, f"the daemon died on its own: {crashes}"
    entries, skipped = journal_entries(root)
    accepted = [e.message_id or "" for e in entries if e.event == "accepted"]
    counts: dict[str, int] = defaultdict(int)
    for mid in accepted:
        counts[mid] += 1
    twice = sorted(m for m, c in counts.items() if c > 1)
    missing_journal = sorted(set(must) - set(accepted))
    seen = obs.seen()
    missing_delivery = sorted((set(must) | set(accepted)) - seen)
    after_ack = [
        (agent, mid)
        for agent, mid, sent in obs.deliveries
        if (ack := obs.acked.get((agent, mid))) is not None and sent > ack
    ]
    by_how: dict[str, int] = defaultdict(int)
    for how in must.values():
        by_how[how] += 1
    report(
        "kill -9 loop",
        seed=seed,
        kills=KILLS,
        kills_before_ready=killed_before_ready,
        daemon_deaths=len(crashes),
        slowest_start_s=round(slowest_start, 1),
        acknowledged=len(must),
        **{f"acknowledged_{k}": v for k, v in sorted(by_how.items())},
        unanswered=len(obs.uncertain),
        unanswered_but_journaled=len(obs.uncertain & set(accepted)),
        journal_lines=len(entries),
        deliveries=len(obs.deliveries),
        redeliveries=len(obs.deliveries) - len(seen),
        confirmed_acks=len(obs.acked),
        lost=len(missing_journal) + len(missing_delivery),
        seconds=round(time.monotonic() - started, 1),
    )
    assert not missing_journal, f"acknowledged but not journaled: {missing_journal[:20]}"
    assert not missing_delivery, f"journaled but never delivered: {missing_delivery[:20]}"
    assert not twice, f"accepted more than once: {twice[:20]}"
    assert not after_ack, f"delivered after a confirmed ack: {after_ack[:20]}"
    assert skipped == 0, "the journal holds lines that do not decode"
    assert not obs.refused, f"publishes refused: {obs.refused[:5]}"
    assert not obs.errors, f"client errors: {obs.errors[:5]}"
    assert dlq_records(root) == [], "nothing here is invalid: a DLQ entry means a partial read"
    assert all(files(root / "outbox" / a) == [] for a in os.listdir(root / "outbox"))
    assert len(must) > KILLS * 10, "too little traffic to mean anything"


# -- consumers killed while holding claims ----------------------------------------------

_HOLDER = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "fetch",
                      "params": {"agent_id": "bob", "max": int(sys.argv[2])}}).encode() + b"\n")
buf = b""
while b"\n" not in buf:
    buf += s.recv(1 << 20)
print(len(json.loads(buf)["result"]["messages"]), flush=True)
time.sleep(3600)
"""

_FILE_HOLDER = r"""
import sys, time
from busd.config import load_config
from busd.routing.consumer import Consumer
config = load_config(root=sys.argv[1], env={"BUSD_LEASE_SECONDS": "1"})
print(len(Consumer(config, "bob").claim(int(sys.argv[2]))), flush=True)
time.sleep(3600)
"""


@pytest.mark.parametrize("how", ["socket", "file"])
def test_consumer_killed_holding_claims_gets_them_back(root: Path, how: str) -> None:
    """A consumer SIGKILLed while holding claims: after the lease they are fetched again."""
    n = 20
    d = ChaosDaemon(root, env={"BUSD_LEASE_SECONDS": "1"}).ready()
    try:
        with Rpc(root / "busd.sock") as c:
            c("publish_batch", {"messages": [message(i) for i in range(n)]})
        code = _HOLDER if how == "socket" else _FILE_HOLDER
        arg = str(root / "busd.sock") if how == "socket" else str(root)
        holder = subprocess.Popen(
            [sys.executable, "-c", code, arg, str(n)], stdout=subprocess.PIPE, env=clean_env()
        )
        assert holder.stdout is not None
        assert int(holder.stdout.readline()) == n
        assert len(files(root / "locks" / "bob")) == n
        held_at = time.monotonic()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        got: set[str] = set()
        with Rpc(root / "busd.sock") as c:
            while len(got) < n and time.monotonic() - held_at < 15:
                msgs = c("fetch", {"agent_id": "bob", "max": n, "wait_s": 1})["messages"]
                got |= {m["message"]["message_id"] for m in msgs}
                assert all(m["delivery_count"] == 2 for m in msgs)
                if msgs:
                    ids = [m["message"]["message_id"] for m in msgs]
                    c("ack", {"agent_id": "bob", "message_ids": ids})
        assert got == {f"m-{i:06d}" for i in range(n)}
        assert time.monotonic() - held_at >= 0.9, "came back before the lease expired"
        assert files(root / "locks" / "bob") == []
    finally:
        d.kill()


# -- writers killed mid-write -----------------------------------------------------------


def _mid(path: Path) -> str:
    parsed = parse_delivery_name(path.name)
    assert parsed is not None, path.name
    return parsed.message_id


_CLIENT_WRITER = r"""
import sys
from busclient import Client
with Client(sys.argv[1], connect_timeout=0.2) as c:
    c.send({"schema_version": "1.0", "message_type": "fact", "message_id": sys.argv[2],
            "workflow_id": "w", "task_id": "t", "agent_id": "alice", "to": "bob",
            "body": "x" * int(sys.argv[3])})
"""


def test_writers_killed_mid_write_never_leave_a_partial_message(root: Path, tmp_path: Path) -> None:
    """``busd send`` (which also runs a routing pass) and busclient's file fallback are
    SIGKILLed at random points while writing big messages with no daemon running:
    nothing partial is ever read, and every send that completed is delivered."""
    rng = random.Random(7)
    rounds = scale(24, 300)
    completed: list[str] = []
    killed = 0
    for i in range(rounds):
        mid = f"w-{i:06d}"
        if i % 2:
            src = tmp_path / f"{mid}.json"
            src.write_text(json.dumps(message(0, message_id=mid, body="y" * 900_000)))
            cmd = [BUSD, "--root", str(root), "send", "--from", "alice", str(src)]
        else:
            cmd = [sys.executable, "-c", _CLIENT_WRITER, str(root), mid, "900000"]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env()
        )
        try:
            proc.wait(rng.uniform(0.1, 0.8))
        except subprocess.TimeoutExpired:
            proc.kill()
            killed += 1
        proc.wait(30)
        if proc.returncode == 0:
            completed.append(mid)
    d = ChaosDaemon(root).ready(timeout=60)
    try:
        wait_for(lambda: not files(root / "outbox" / "alice"), timeout=30, what="outbox drained")
        assert d.stop() == 0
    finally:
        d.kill()
    delivered = {_mid(p) for p in files(root / "inbox" / "bob")}
    report(
        "writers killed mid-write",
        attempts=rounds,
        killed=killed,
        completed=len(completed),
        delivered=len(delivered),
        hidden_leftovers=len(hidden_leftovers(root)),
    )
    assert dlq_records(root) == [], "a partial file was read"
    assert set(completed) <= delivered
    assert killed > 0 and completed, "the kills should land both during and after writes"
    for name in hidden_leftovers(root):
        assert name.startswith(("tmp/", "outbox/alice/.", "journal/.")), name


def test_journal_appends_killed_mid_write_leave_whole_lines(root: Path) -> None:
    """A daemon SIGKILLed while appending big batches leaves only whole journal lines."""
    body = "z" * 200_000
    rng = random.Random(11)
    for round_ in range(scale(6, 40)):
        for i in range(20):
            drop(root, message(round_ * 100 + i, body=body), f"{round_:03d}-{i:03d}.json")
        d = ChaosDaemon(root)
        time.sleep(rng.uniform(0.3, 0.9))
        d.kill()
    d = ChaosDaemon(root).ready(timeout=60)
    try:
        wait_for(lambda: not files(root / "outbox" / "alice"), timeout=60, what="drained")
        assert d.stop() == 0
    finally:
        d.kill()
    entries, skipped = journal_entries(root)
    for seg in sorted((root / "journal").glob("*.ndjson")):
        assert seg.read_bytes().endswith(b"\n")
    assert skipped == 0
    assert dlq_records(root) == []
    ids = [e.message_id for e in entries if e.event == "accepted"]
    assert len(ids) == len(set(ids)) == scale(6, 40) * 20


# -- power loss: the fsync order under strace -------------------------------------------

_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*)$")


def _trace(path: Path) -> list[tuple[int, str, str]]:
    """(pid, syscall, arguments and result) of every *completed* call, in completion order.

    A call interrupted by another thread's (``<unfinished ...>``) is stitched to its
    ``<... resumed>`` line and placed where it completed.
    """
    out: list[tuple[int, str, str]] = []
    pending: dict[int, tuple[str, str]] = {}
    for raw in path.read_text(errors="replace").splitlines():
        m = _LINE.match(raw)
        if m is None:
            continue
        pid, resumed, call, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if raw.endswith("<unfinished ...>"):
            pending[pid] = (call, rest.removesuffix("<unfinished ...>"))
            continue
        if resumed is not None:
            call, head = pending.pop(pid, (resumed, ""))
            rest = head + rest
        out.append((pid, call, rest))
    return out


@pytest.mark.skipif(not os.path.exists("/usr/bin/strace"), reason="needs strace")
def test_every_accept_path_fsyncs_before_it_answers(root: Path, tmp_path: Path) -> None:
    """What a power cut could lose, checked on the syscalls: a publish is answered, and an
    outbox file removed, only after a journal fsync that covers it; a checkpoint is
    written only after fsyncs of the deliveries before it."""
    trace = tmp_path / "strace.out"
    prefix = [
        "strace", "-f", "-y", "-s", "65536", "-o", str(trace),
        "-e", "trace=fsync,fdatasync,syncfs,write,pwrite64,sendto,sendmsg,"
        "rename,renameat,renameat2,link,linkat,unlink,unlinkat",
    ]  # fmt: skip
    d = ChaosDaemon(root, prefix=prefix).ready(timeout=60)
    n = 10
    pid = 0
    try:
        with Rpc(root / "busd.sock") as c:
            pid = c("ping")["pid"]  # strace's child: signals go to it, not to strace
            for i in range(n):
                c("publish", {"message": message(i)})
        for i in range(n):
            drop(root, message(100 + i), f"drop-{i:03d}.json")
        wait_for(lambda: len(files(root / "inbox" / "bob")) == 2 * n, what="all delivered")
        wait_for(lambda: not files(root / "outbox" / "alice"), what="outbox emptied")
        time.sleep(1.5)  # one checkpoint after the last delivery
        os.kill(pid, signal.SIGTERM)
        assert d.proc.wait(30) == 0
    finally:
        if pid and d.alive():
            os.kill(pid, signal.SIGKILL)
        d.kill()
    calls = _trace(trace)
    journal_write: dict[str, int] = {}  # message id or source -> index of its journal write
    journal_syncs: list[int] = []
    delivery_syncs: list[int] = []
    answers: dict[str, int] = {}
    removals: dict[str, int] = {}
    checkpoints: list[int] = []
    for i, (_, call, rest) in enumerate(calls):
        if call in ("write", "pwrite64") and "/journal/0" in rest.split(",")[0]:
            for mid in re.findall(r'\\"message_id\\":\\"(m-\d+)\\"', rest):
                journal_write.setdefault(mid, i)
            for src in re.findall(r'\\"source\\":\\"outbox/alice/([^\\]+)\\"', rest):
                journal_write.setdefault(src, i)
        elif call in ("fsync", "fdatasync", "syncfs"):  # syncfs: a checkpoint of many files
            target = rest.split(">")[0]
            if "/journal/0" in target:
                journal_syncs.append(i)
            elif "/inbox/bob" in target:
                delivery_syncs.append(i)
        elif call in ("sendto", "sendmsg", "write") and '\\"jsonrpc\\"' in rest:
            for mid in re.findall(r'\\"message_id\\":\\"(m-\d+)\\"', rest):
                answers.setdefault(mid, i)
        elif call in ("unlink", "unlinkat") and "/outbox/alice/" in rest:
            m = re.search(r"outbox/alice/(drop-\d+\.json)", rest)
            if m:
                removals[m.group(1)] = i
        elif call in ("rename", "renameat", "renameat2") and "/journal/checkpoint" in rest:
            checkpoints.append(i)

    def synced_between(start: int, end: int) -> bool:
        return any(start < s < end for s in journal_syncs)

    assert len(answers) == n, f"publish answers seen: {sorted(answers)}"
    for mid, at in answers.items():
        assert mid in journal_write, f"{mid} answered but never written to the journal"
        assert synced_between(journal_write[mid], at), f"{mid} answered before its journal fsync"
    assert len(removals) == n, f"outbox removals seen: {sorted(removals)}"
    for name, at in removals.items():
        assert name in journal_write, f"{name} removed but never journaled"
        assert synced_between(journal_write[name], at), f"{name} removed before journal fsync"
    last_delivery_sync = max(delivery_syncs)
    assert any(c > last_delivery_sync for c in checkpoints), "no checkpoint after the deliveries"
    report(
        "fsync order (strace)",
        publishes_checked=len(answers),
        drops_checked=len(removals),
        journal_fsyncs=len(journal_syncs),
        checkpoints=len(checkpoints),
    )


def test_power_cut_that_loses_unsynced_deliveries_loses_no_message(root: Path) -> None:
    """A simulated power cut: the daemon dies, the checkpoint rolls back to nothing, and the
    deliveries it no longer covers are lost (deleted) or torn (cut to any length, zero
    included); the journal keeps a torn last line. After restart every acknowledged
    message is in its inbox exactly once, whole, byte for byte as journaled."""
    rng = random.Random(3)
    n = 60
    d = ChaosDaemon(root).ready()
    try:
        with Rpc(root / "busd.sock") as c:
            c("publish_batch", {"messages": [message(i) for i in range(n // 2)]})
        for i in range(n // 2, n):
            drop(root, message(i), f"{i:03d}.json")
        wait_for(lambda: len(files(root / "inbox" / "bob")) == n, what="all delivered")
        wait_for(lambda: not files(root / "outbox" / "alice"), what="outbox emptied")
    finally:
        d.kill()
    (root / "journal" / "checkpoint").unlink()  # the last checkpoint never reached the disk
    lost = torn = 0
    for p in files(root / "inbox" / "bob"):
        fate = rng.choice(["keep", "lose", "tear"])
        if fate == "lose":
            p.unlink()
            lost += 1
        elif fate == "tear":
            os.truncate(p, rng.randrange(0, p.stat().st_size))
            torn += 1
    segment = sorted((root / "journal").glob("*.ndjson"))[-1]
    with segment.open("ab") as f:
        f.write(b'{"event":"accepted","at":"2026-11-21T12:00:00Z","message_id":"gh')
    ledger = root / "processed" / "bob.jsonl"
    ledger.write_bytes(b'{"message_id":"m-999999","acked_at":"2026-')  # a torn ack record
    d = ChaosDaemon(root).ready()
    try:
        journaled = {
            e.message_id: bytes(e.message)
            for e in journal_entries(root)[0]
            if e.event == "accepted" and e.message is not None and e.message_id
        }
        copies: dict[str, list[bytes]] = defaultdict(list)
        for p in files(root / "inbox" / "bob"):
            copies[_mid(p)].append(p.read_bytes())
        assert sorted(copies) == [f"m-{i:06d}" for i in range(n)]
        assert all(len(v) == 1 for v in copies.values()), "a message was delivered twice"
        assert all(v[0] == journaled[k] for k, v in copies.items()), "a copy differs"
        with Rpc(root / "busd.sock") as c:
            got = c("fetch", {"agent_id": "bob", "max": n})["messages"]
            assert len(got) == n
        assert d.stop() == 0
    finally:
        d.kill()
    assert journal_entries(root)[1] == 0
    report("power cut", messages=n, deliveries_lost=lost, deliveries_torn=torn)


def test_claim_during_a_checkpoint_does_not_kill_the_daemon(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer claims a delivery exactly while the checkpoint fsyncs it."""
    from busd.routing.recovery import write_checkpoint
    from busd.routing.router import Router

    config = load_config(root=str(root), env={})
    drop(root, message(1), "a.json")
    consumer = Consumer(config, "bob")
    real_open = os.open

    def claim_then_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if "/inbox/bob/" in os.fspath(path):
            consumer.claim(1)  # the consumer wins the race by a hair
        return real_open(path, flags, *args, **kwargs)

    with Router(config) as router:
        router.route_all()
        monkeypatch.setattr(os, "open", claim_then_open)
        write_checkpoint(router)
    assert len(files(root / "locks" / "bob")) == 1
