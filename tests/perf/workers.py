"""Load generators, each run in its own spawned process by :func:`common.run_group`.

Every worker prepares its requests and connects first, waits on the barrier, then
times only its loop and returns ``{"start", "end", "count", ...}``. Peer client
libraries are imported inside the workers that use them.
"""

from __future__ import annotations

import json
import os
import queue
import select
import threading
import time
from pathlib import Path
from typing import Any

from .common import (
    Inotify,
    Rpc,
    count_files,
    envelope,
    publish_batch_line,
    publish_line,
)


def _ids(args: dict[str, Any]) -> list[str]:
    return [f"{args['prefix']}-{i:07d}" for i in range(args["count"])]


def _payloads(args: dict[str, Any]) -> list[bytes]:
    return [envelope(mid, to=args.get("to", "bob")) for mid in _ids(args)]


def _chunks(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def _timed(start: float, count: int, **extra: Any) -> dict[str, Any]:
    return {"start": start, "end": time.monotonic(), "count": count, **extra}


# -- busd ---------------------------------------------------------------------------


def busd_publish(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """``publish`` one message per request, or ``publish_batch`` of ``batch``."""
    envs = _payloads(args)
    batch = args.get("batch", 1)
    if batch == 1:
        lines = [publish_line(e) for e in envs]
    else:
        lines = [publish_batch_line(c) for c in _chunks(envs, batch)]
    rpc = Rpc(args["socket"])
    barrier.wait(60)
    start = time.monotonic()
    for line in lines:
        result = rpc.send_line(line)
        if batch != 1 and any("error" in r for r in result["results"]):
            raise RuntimeError(f"publish_batch refused a message: {result}")
    return _timed(start, len(envs))


def busd_consume(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """``fetch`` up to ``batch`` then ``ack`` them, until ``count`` messages are acked."""
    agent, batch, count = args["agent"], args["batch"], args["count"]
    rpc = Rpc(args["socket"])
    barrier.wait(60)
    start = time.monotonic()
    done = 0
    while done < count:
        got = rpc("fetch", {"agent_id": agent, "max": batch, "wait_s": 5})["messages"]
        if not got:
            raise RuntimeError(f"fetch returned nothing after {done} of {count}")
        ids = [m["message"]["message_id"] for m in got]
        acked = rpc("ack", {"agent_id": agent, "message_ids": ids})["acked"]
        if acked != len(ids):
            raise RuntimeError(f"acked {acked} of {len(ids)}")
        done += len(ids)
    return _timed(start, done)


def push_latency(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """publish -> ``message`` push latency; ``role`` is ``subscriber`` or ``publisher``."""
    if args["role"] == "subscriber":
        return _subscriber(args, barrier)
    return _paced_publisher(args, barrier)


def _paced_publisher(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    # Several connections (one thread each) so that one slow fsync does not hold the
    # schedule back; each message carries its send time (monotonic ns) in metadata.
    count, rate, threads = args["count"], args["rate"], args.get("threads", 16)
    placeholder = b'"t0":"' + b"0" * 19 + b'"'
    envs = [envelope(mid, to=args["to"], metadata={"t0": "0" * 19}) for mid in _ids(args)]
    conns = [Rpc(args["socket"]) for _ in range(threads)]
    barrier.wait(60)
    start = time.monotonic() + 0.05
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            for i in range(k, count, threads):
                due = start + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                stamp = b'"t0":"%019d"' % time.monotonic_ns()
                conns[k].send_line(publish_line(envs[i].replace(placeholder, stamp, 1)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the worker
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return _timed(start, count)


def _subscriber(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    count, agent = args["count"], args["agent"]
    sub = Rpc(args["socket"])
    sub("subscribe", {"agent_id": agent, "max_in_flight": 10_000})
    acker = Rpc(args["socket"])
    pending: queue.Queue[str | None] = queue.Queue()

    def ack_loop() -> None:  # acks in small batches, off the reading thread
        while True:
            ids = [pending.get()]
            time.sleep(0.01)
            while not pending.empty():
                ids.append(pending.get_nowait())
            last = None in ids
            ids = [i for i in ids if i is not None]
            if ids:
                acker("ack", {"agent_id": agent, "message_ids": ids})
            if last:
                return

    t = threading.Thread(target=ack_loop)
    t.start()
    barrier.wait(60)
    start = time.monotonic()
    latencies: list[float] = []
    sock = sub.sock
    buf = sub.buf
    deadline = time.monotonic() + args["timeout"]
    while len(latencies) < count:
        if not select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TimeoutError(f"got {len(latencies)} of {count} pushes")
        chunk = sock.recv(1 << 20)
        now = time.monotonic_ns()
        if not chunk:
            raise EOFError("subscriber connection closed")
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            obj = json.loads(line)
            if obj.get("method") != "message":
                continue
            msg = obj["params"]["message"]
            latencies.append((now - int(msg["metadata"]["t0"])) / 1e6)
            pending.put(msg["message_id"])
    pending.put(None)
    t.join()
    return _timed(start, count, latencies_ms=latencies)


def _wait_drained(outbox: Path, deadline: float) -> None:
    """Until no visible file is left in ``outbox`` (every one journaled)."""
    while True:
        with os.scandir(outbox) as it:
            if not any(not e.name.startswith(".") for e in it):
                return
        if time.monotonic() > deadline:
            raise TimeoutError("the outbox did not drain")
        time.sleep(0.005)


def drop_files(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """Rename ``count`` staged files into ``outbox/<sender>/``.

    Done when the outbox is empty (every file journaled) and every delivery file
    exists in ``inbox/<agent>/`` for ``agents``.
    """
    root = Path(args["root"])
    outbox = root / "outbox" / "alice"
    staged = sorted((root / "tmp").glob("stage-*"))
    assert len(staged) == args["count"], len(staged)
    barrier.wait(60)
    start = time.monotonic()
    for p in staged:
        os.rename(p, outbox / p.name[len("stage-") :])
    deadline = start + args["timeout"]
    _wait_drained(outbox, deadline)
    inboxes = [root / "inbox" / a for a in args["agents"]]
    while sum(count_files(d) for d in inboxes) < len(staged):
        if time.monotonic() > deadline:
            raise TimeoutError("the deliveries did not all appear")
        time.sleep(0.02)
    return _timed(start, len(staged))


def drop_files_served(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """Rename ``count`` staged files into ``outbox/alice/`` for socket-served ``agents``.

    Done when the outbox is empty (every file journaled) and the daemon's status counts
    every message ready or in flight for ``agents`` (in its memory queues: no inbox file
    is waited for, since a socket-served agent gets none).
    """
    root = Path(args["root"])
    outbox = root / "outbox" / "alice"
    staged = sorted((root / "tmp").glob("stage-*"))
    assert len(staged) == args["count"], len(staged)
    rpc = Rpc(args["socket"])
    barrier.wait(60)
    start = time.monotonic()
    for p in staged:
        os.rename(p, outbox / p.name[len("stage-") :])
    deadline = start + args["timeout"]
    _wait_drained(outbox, deadline)
    while True:
        agents = rpc("status")["agents"]
        held = sum(
            agents[a]["ready"] + agents[a]["in_flight"] for a in args["agents"] if a in agents
        )
        if held >= len(staged):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {held} of {len(staged)} queued for the served agents")
        time.sleep(0.01)
    rpc.close()
    return _timed(start, len(staged))


def drop_latency(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """A file renamed into the outbox at ``rate`` per second -> its delivery in the inbox."""
    root = Path(args["root"])
    outbox = root / "outbox" / "alice"
    inbox = root / "inbox" / args.get("to", "bob")
    count, rate = args["count"], args["rate"]
    ids = _ids(args)
    staged = []
    for mid in ids:
        p = root / "tmp" / f"lat-{mid}.json"
        p.write_bytes(envelope(mid, to=args.get("to", "bob")))
        staged.append(p)
    watch = Inotify([inbox])
    sent: dict[str, int] = {}
    latencies: list[float] = []
    barrier.wait(60)
    start = time.monotonic()
    i = 0
    deadline = start + count / rate + args.get("timeout", 30)
    while len(latencies) < count:
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"{len(latencies)} of {count} files arrived")
        due = start + i / rate if i < count else deadline
        if i < count and now >= due:
            sent[ids[i]] = time.monotonic_ns()
            os.rename(staged[i], outbox / staged[i].name)
            i += 1
            continue
        if select.select([watch], [], [], max(0.0, due - now))[0]:
            t1 = time.monotonic_ns()
            for _, name in watch.read():
                # <arrival:20>-<deliveries:3>-<message_id>.json
                mid = name[25:-5]
                if mid in sent:
                    latencies.append((t1 - sent.pop(mid)) / 1e6)
    watch.close()
    return _timed(start, count, latencies_ms=latencies)


# -- Redis Streams --------------------------------------------------------------------


def _redis(args: dict[str, Any]) -> Any:
    import redis

    return redis.Redis(unix_socket_path=args["socket"])


def redis_publish(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """XADD one per round trip, or pipelined (no MULTI) batches of ``batch``."""
    r = _redis(args)
    r.ping()
    payloads = _payloads(args)
    stream, batch = args["stream"], args.get("batch", 1)
    barrier.wait(60)
    start = time.monotonic()
    if batch == 1:
        for p in payloads:
            r.xadd(stream, {"data": p})
    else:
        for chunk in _chunks(payloads, batch):
            pipe = r.pipeline(transaction=False)
            for p in chunk:
                pipe.xadd(stream, {"data": p})
            pipe.execute()
    return _timed(start, len(payloads))


def redis_consume(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """XREADGROUP COUNT ``batch`` then XACK of those ids."""
    r = _redis(args)
    stream, group, batch, count = args["stream"], args["group"], args["batch"], args["count"]
    r.ping()
    barrier.wait(60)
    start = time.monotonic()
    done = 0
    while done < count:
        got = r.xreadgroup(group, "c1", {stream: ">"}, count=batch)
        if not got or not got[0][1]:
            raise RuntimeError(f"XREADGROUP returned nothing after {done}")
        ids = [mid for mid, _ in got[0][1]]
        r.xack(stream, group, *ids)
        done += len(ids)
    return _timed(start, done)


# -- NATS JetStream ---------------------------------------------------------------------


def nats_publish(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """js.publish (waits for the PubAck), one at a time or ``batch`` in flight at once."""
    import asyncio

    import nats

    payloads = _payloads(args)
    batch = args.get("batch", 1)

    async def main() -> dict[str, Any]:
        nc = await nats.connect(args["url"])
        js = nc.jetstream()
        barrier.wait(60)
        start = time.monotonic()
        if batch == 1:
            for p in payloads:
                await js.publish(args["subject"], p)
        else:
            for chunk in _chunks(payloads, batch):
                await asyncio.gather(*(js.publish(args["subject"], p) for p in chunk))
        result = _timed(start, len(payloads))
        await nc.close()
        return result

    return asyncio.run(main())


def nats_consume(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """Pull consumer: fetch ``batch``, ack all but the last, ack_sync the last."""
    import asyncio

    import nats

    batch, count = args["batch"], args["count"]

    async def main() -> dict[str, Any]:
        nc = await nats.connect(args["url"])
        js = nc.jetstream()
        psub = await js.pull_subscribe(args["subject"], durable=args["durable"])
        barrier.wait(60)
        start = time.monotonic()
        done = 0
        while done < count:
            msgs = await psub.fetch(batch, timeout=10)
            for m in msgs[:-1]:
                await m.ack()
            await msgs[-1].ack_sync()
            done += len(msgs)
        result = _timed(start, done)
        await nc.close()
        return result

    return asyncio.run(main())


# -- persist-queue (SQLiteAckQueue) -------------------------------------------------------


def pq_publish(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """``put`` (one committed transaction each) from ``threads`` threads of one process."""
    import persistqueue

    threads = args.get("threads", 1)
    q = persistqueue.SQLiteAckQueue(args["path"], multithreading=True, auto_resume=False)
    payloads = _payloads(args)
    parts = [payloads[k::threads] for k in range(threads)]

    def run(part: list[bytes]) -> None:
        for p in part:
            q.put(p)

    workers = [threading.Thread(target=run, args=(part,)) for part in parts]
    barrier.wait(60)
    start = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    result = _timed(start, len(payloads))
    q.close()
    return result


def pq_consume(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """``get`` then ``ack`` (each its own transaction), ``batch`` gets before the acks."""
    import persistqueue

    batch, count = args["batch"], args["count"]
    q = persistqueue.SQLiteAckQueue(args["path"], multithreading=True, auto_resume=False)
    barrier.wait(60)
    start = time.monotonic()
    done = 0
    while done < count:
        items = [q.get(block=False, raw=True) for _ in range(min(batch, count - done))]
        for item in items:
            q.ack(id=item["pqid"])
        done += len(items)
    result = _timed(start, done)
    q.close()
    return result


# -- the disk's own limits --------------------------------------------------------------------


def disk_append(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """500-byte appends to one file, an fsync every ``per_fsync`` records."""
    path = Path(args["dir"]) / "append.log"
    count, every = args["count"], args["per_fsync"]
    record = b"x" * (args.get("size", 500) - 1) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    barrier.wait(60)
    start = time.monotonic()
    for i in range(1, count + 1):
        os.write(fd, record)
        if i % every == 0:
            os.fsync(fd)
    os.fsync(fd)
    result = _timed(start, count)
    os.close(fd)
    path.unlink()
    return result


def disk_create(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """Per message: create a tmp file, write it, close, rename it into place (no fsync):
    what one delivery costs the filesystem before any durability."""
    return _disk_files(args, barrier, durable=False)


def disk_files(args: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """Per message: write a tmp file, fsync it, rename it into place, fsync the directory."""
    return _disk_files(args, barrier, durable=True)


def _disk_files(args: dict[str, Any], barrier: Any, *, durable: bool) -> dict[str, Any]:
    base = Path(args["dir"])
    suffix = "" if durable else "-c"
    tmp, target = base / f"tmp{suffix}", base / f"target{suffix}"
    tmp.mkdir(exist_ok=True)
    target.mkdir(exist_ok=True)
    data = b"x" * args.get("size", 500)
    count = args["count"]
    barrier.wait(60)
    start = time.monotonic()
    for i in range(count):
        src = tmp / f"{i}.tmp"
        fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        if durable:
            os.fsync(fd)
        os.close(fd)
        os.rename(src, target / f"{i}.json")
        if durable:
            dfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
    result = _timed(start, count)
    for p in target.iterdir():
        p.unlink()
    return result
