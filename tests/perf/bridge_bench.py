"""The bridge row of ``make bench``: publish on bus A -> fetch on bus B over NATS JetStream,
beside JetStream publish -> fetch alone on the same server, in the same run.

Two figures each: messages/s for a burst (publishes of 100, fetches of up to 100, the
consumer acking as it goes), and the p50/p99 latency from the start of a publish to the
fetch that returned it, at a steady :data:`LAT_RATE` msg/s. Both sides use the same
server (``sync_interval: always``), so the difference is what the bridge adds: two busd
journal fsyncs, the ``_bridge`` queue, and two socket hops.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats_harness import BridgeProc

from . import common as C

QUICK = os.environ.get("BENCH_QUICK") == "1"
BURST = 1000 if QUICK else 5000
LAT_COUNT = 300 if QUICK else 1000
LAT_RATE = 200.0
KEYS = [
    "bridge.rate",
    "bridge.p50",
    "bridge.p99",
    "nats.bridge.rate",
    "nats.bridge.p50",
    "nats.bridge.p99",
]


def _msg(mid: str, to: str) -> dict[str, Any]:
    return json.loads(C.envelope(mid, to=to))  # type: ignore[no-any-return]


def _bus(root: Path, name: str, tmp_init: Callable[[Path], None]) -> None:
    tmp_init(root)
    (root / "busd.toml").write_text(f'bus_name = "{name}"\n')


def _busd_run(
    a_root: Path, b_root: Path, prefix: str, count: int, rate: float | None
) -> tuple[float, list[float]]:
    """(msg/s, latencies ms) for ``count`` messages alice@a -> bob@busb fetched on b."""
    from busd.config import load_config
    from busd.rpc.client import call

    ca = load_config(root=str(a_root), env={})
    cb = load_config(root=str(b_root), env={})
    sent: dict[str, float] = {}
    got: dict[str, float] = {}
    done = threading.Event()

    def consume() -> None:
        while len(got) < count and not done.is_set():
            out = call(cb, "fetch", {"agent_id": "bob", "max": 100, "wait_s": 1.0}, timeout=30)
            now = time.perf_counter()
            msgs = out["messages"]
            for m in msgs:
                got.setdefault(m["message"]["message_id"], now)
            if msgs:
                call(cb, "ack", {"agent_id": "bob", "receipts": [m["receipt"] for m in msgs]})

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    ids = [f"{prefix}-{i:07d}" for i in range(count)]
    start = time.perf_counter()
    if rate is None:
        for i in range(0, count, 100):
            chunk = ids[i : i + 100]
            t = time.perf_counter()
            for mid in chunk:
                sent[mid] = t
            call(ca, "publish_batch", {"messages": [_msg(m, "bob@busb") for m in chunk]})
    else:
        for i, mid in enumerate(ids):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent[mid] = time.perf_counter()
            call(ca, "publish", {"message": _msg(mid, "bob@busb")})
    consumer.join(timeout=300)
    done.set()
    if len(got) < count:
        raise RuntimeError(f"bridge bench: {len(got)} of {count} arrived on bus B")
    end = max(got.values())
    return count / (end - start), [(got[m] - sent[m]) * 1000 for m in ids]


async def _nats_run(
    url: str, prefix: str, count: int, rate: float | None
) -> tuple[float, list[float]]:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    stream = f"NB{prefix.replace('-', '')}"
    await js.add_stream(
        StreamConfig(name=stream, subjects=[f"nb.{stream}"], storage=StorageType.FILE)
    )
    await js.add_consumer(
        stream, ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1)
    )
    sub = await js.pull_subscribe_bind("c", stream=stream)
    sent: dict[str, float] = {}
    got: dict[str, float] = {}

    async def consume() -> None:
        while len(got) < count:
            try:
                msgs = await sub.fetch(100 if rate is None else 1, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            now = time.perf_counter()
            for m in msgs:
                got.setdefault(m.headers["id"] if m.headers else "", now)
                await m.ack()

    task = asyncio.create_task(consume())
    ids = [f"{prefix}-{i:07d}" for i in range(count)]
    body = C.envelope("x", to="bob")
    start = time.perf_counter()
    subject = f"nb.{stream}"
    if rate is None:
        for i in range(0, count, 100):
            chunk = ids[i : i + 100]
            t = time.perf_counter()
            for mid in chunk:
                sent[mid] = t
            await asyncio.gather(*(js.publish(subject, body, headers={"id": m}) for m in chunk))
    else:
        for i, mid in enumerate(ids):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[mid] = time.perf_counter()
            await js.publish(subject, body, headers={"id": mid})
    await asyncio.wait_for(task, 300)
    await nc.close()
    end = max(got.values())
    return count / (end - start), [(got[m] - sent[m]) * 1000 for m in ids]


def run(b: Any, say: Callable[..., None], reps: int) -> None:
    """The scenario: ``b`` is the Bench (its nats server, daemons and ``record``)."""
    with b.nats("bridge") as server:
        if server is None:
            raise RuntimeError("no nats-server for the bridge row")
        a_root, b_root = b.tmp / "bus-bridge-a", b.tmp / "bus-bridge-b"
        _bus(a_root, "busa", C.busd_init)
        _bus(b_root, "busb", C.busd_init)
        da, db = b.daemon(a_root), b.daemon(b_root)
        da.wait_ready()
        db.wait_ready()
        args = ["--monitor-url", str(server.monitor_url)]
        if not server.sync_always:  # a distribution's nats-server without sync_interval
            args.append("--accept-weaker-durability")
        bridges = [BridgeProc(r, server.url, *args).ready() for r in (a_root, b_root)]
        try:
            for rep in range(reps):
                say(f" repetition {rep + 1}/{reps}")
                rate, _ = _busd_run(a_root, b_root, f"bb{rep}", BURST, None)
                b.record("bridge.rate", rate, f"{rate:,.0f} msg/s")
                _, lat = _busd_run(a_root, b_root, f"bl{rep}", LAT_COUNT, LAT_RATE)
                p50, p99 = C.percentile(lat, 50), C.percentile(lat, 99)
                b.record("bridge.p50", p50, f"{p50:.2f} ms")
                b.record("bridge.p99", p99, f"{p99:.2f} ms")
                rate, _ = asyncio.run(_nats_run(server.url, f"nb{rep}", BURST, None))
                b.record("nats.bridge.rate", rate, f"{rate:,.0f} msg/s")
                _, lat = asyncio.run(_nats_run(server.url, f"nl{rep}", LAT_COUNT, LAT_RATE))
                p50, p99 = C.percentile(lat, 50), C.percentile(lat, 99)
                b.record("nats.bridge.p50", p50, f"{p50:.2f} ms")
                b.record("nats.bridge.p99", p99, f"{p99:.2f} ms")
        finally:
            for bridge in bridges:
                bridge.stop()
            b.release(da)
            b.release(db)
