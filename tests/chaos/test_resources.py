"""Resource faults: a full disk, a read-only filesystem, many waiting files, the inotify
limits, an unwritable journal at start, and a clock that jumps backwards.

Disk full and read-only use a small tmpfs mounted by the test (root on Linux; skipped
elsewhere). A tmpfs cannot be remounted read-only while the daemon has files open for
writing (EBUSY), so "read-only" is a read-only bind mount over the bus root, made while
the daemon runs: every path the daemon opens from then on is read-only.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from datetime import UTC, datetime, tzinfo
from pathlib import Path

import pytest
from _chaos import (
    LONG,
    ChaosDaemon,
    accepted_ids,
    fill,
    hidden_leftovers,
    journal_entries,
    report,
    rss_kb,
    scale,
    tmpfs,
    umount,
    wait_until,
)

from _rpc import Rpc, RpcFailure
from busd.config import load_config
from busd.core import ids as busd_ids
from busd.core.codec import decode
from busd.routing import router as busd_router
from busd.routing.consumer import Consumer
from busd.routing.router import Incoming, Router
from busd.store.layout import delivery_name, init_bus, parse_delivery_name
from busd.store.mailbox import arrival_clock
from daemon_harness import BUSD, clean_env, drop, files, message, wait_for

pytestmark = pytest.mark.timeout(600 if LONG else 120)

BODY = "x" * 20_000


def _publish_until_refused(root: Path, start: int) -> tuple[list[str], list[str], bool]:
    """Publish 20 KB messages until refused 3 times or the connection drops.

    Returns (acknowledged ids, refusal reasons, connection lost)."""
    acked: list[str] = []
    reasons: list[str] = []
    try:
        with Rpc(root / "busd.sock", timeout=10) as c:
            for i in range(start, start + 400):
                try:
                    c("publish", {"message": message(i, body=BODY)})
                    acked.append(f"m-{i:06d}")
                except RpcFailure as exc:
                    reasons.append(str(exc.data.get("reason")))
                    if len(reasons) >= 3:
                        break
    except (OSError, EOFError):
        return acked, reasons, True
    return acked, reasons, False


def _all_inbox_files_whole(root: Path) -> list[str]:
    """Names of visible inbox files that do not hold a whole valid message."""
    bad = []
    for d in files(root / "inbox"):
        for p in files(d):
            try:
                decode(p.read_bytes())
            except Exception:  # noqa: BLE001 - any failure means a half file
                bad.append(p.name)
    return bad


def _drain_ids(root: Path, agent: str = "bob") -> set[str]:
    """Message ids of the delivery files in ``inbox/<agent>/``."""
    out = set()
    for p in files(root / "inbox" / agent):
        parsed = parse_delivery_name(p.name)
        if parsed is not None:
            out.add(parsed.message_id)
    return out


def _recover_and_check(root: Path, acked: list[str], dropped: list[str]) -> None:
    """Restart on the freed filesystem: every acknowledged message is there, whole."""
    d = ChaosDaemon(root).ready(timeout=30)
    try:
        wait_for(lambda: not files(root / "outbox" / "alice"), timeout=30, what="outbox drained")
        journaled = set(accepted_ids(root))
        delivered = _drain_ids(root)
        assert set(acked) <= journaled, sorted(set(acked) - journaled)
        assert set(acked) | set(dropped) <= delivered, sorted(set(acked) - delivered)
        assert _all_inbox_files_whole(root) == []
        assert journal_entries(root)[1] == 0
        assert d.stop() == 0
    finally:
        d.kill()


# -- disk full -----------------------------------------------------------------------------


def test_disk_full_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Publishing into a full disk: every acknowledged publish and every file that reached
    the outbox survives and is delivered once space returns; nothing half-written is read."""
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        root = init_bus(mnt / "bus").root
        d = ChaosDaemon(root).ready()
        try:
            dropped = []
            for i in range(5):
                drop(root, message(1000 + i), f"before-{i}.json")
                dropped.append(f"m-{1000 + i:06d}")
            wait_for(lambda: len(_drain_ids(root)) == 5, what="the drops delivered")
            time.sleep(1.5)  # and checkpointed, so the disk fills under the publishes
            filler = fill(mnt)
            os.truncate(filler, max(0, filler.stat().st_size - 600_000))
            acked, reasons, lost = _publish_until_refused(root, 0)
        finally:
            d.kill()
        filler.unlink()
        report("disk full", acknowledged=len(acked), refusals=reasons, connection_lost=lost)
        assert acked, "some publishes fit before the disk filled"
        _recover_and_check(root, acked, dropped)


def test_disk_full_publish_is_refused_and_the_daemon_resumes(tmp_path: Path) -> None:
    """On a full disk a publish is answered storage_error, the daemon stays up, no half file
    remains, and publishing works again once space returns."""
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        root = init_bus(mnt / "bus").root
        d = ChaosDaemon(root).ready()
        try:
            filler = fill(mnt)
            os.truncate(filler, max(0, filler.stat().st_size - 400_000))
            _acked, reasons, lost = _publish_until_refused(root, 0)
            time.sleep(1.5)  # a checkpoint pass on the full disk
            assert not lost and d.alive(), d.stderr_text()[-600:]
            assert reasons and set(reasons) == {"storage_error"}
            filler.unlink()
            with Rpc(root / "busd.sock") as c:
                c("publish", {"message": message(999)})
            time.sleep(1.5)
            assert hidden_leftovers(root) == []
            assert d.stop() == 0
        finally:
            d.kill()


def test_busd_send_on_a_full_disk_fails_clearly_and_leaves_no_half_file(tmp_path: Path) -> None:
    """``busd send`` with no daemon on a full disk: exit 74 (storage_error), a one-line
    message, nothing half-written in the outbox or tmp/."""
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        root = init_bus(mnt / "bus").root
        (root / "outbox" / "alice").mkdir()
        src = tmp_path / "m.json"
        src.write_text(json.dumps(message(1, body=BODY * 5)))
        fill(mnt)
        done = subprocess.run(
            [BUSD, "--root", str(root), "send", "--from", "alice", str(src)],
            capture_output=True,
            env=clean_env(),
            timeout=30,
            check=False,
        )
        err = done.stderr.decode()
        assert done.returncode == 74, err
        assert err.startswith("busd: storage_error:") and "Traceback" not in err
        assert files(root / "outbox" / "alice") == []
        assert os.listdir(root / "tmp") == []


# -- read-only ------------------------------------------------------------------------------


def _bind_ro(path: Path) -> None:
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True)


def test_read_only_filesystem_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """The bus turns read-only under a running daemon: every publish acknowledged before
    or during it is delivered once the filesystem is writable again."""
    with tmpfs(tmp_path / "mnt", "64m") as mnt:
        root = init_bus(mnt / "bus").root
        d = ChaosDaemon(root).ready()
        acked, reasons, _ = _publish_until_refused(root, 0)
        assert not reasons
        mounted = False
        try:
            _bind_ro(root)
            mounted = True
            more, reasons, lost = _publish_until_refused(root, 500)
        finally:
            d.kill()
            if mounted:
                umount(root)
        report(
            "read-only",
            acknowledged=len(acked) + len(more),
            acknowledged_while_ro=len(more),
            refusals=reasons,
            connection_lost=lost,
        )
        _recover_and_check(root, acked + more, [])


def test_read_only_publish_is_refused_and_the_daemon_resumes(tmp_path: Path) -> None:
    """While read-only a publish is answered storage_error and the daemon stays up; once
    writable again, publishing works."""
    with tmpfs(tmp_path / "mnt", "64m") as mnt:
        root = init_bus(mnt / "bus").root
        d = ChaosDaemon(root).ready()
        mounted = False
        try:
            _bind_ro(root)
            mounted = True
            _, reasons, lost = _publish_until_refused(root, 0)
            assert not lost and d.alive(), d.stderr_text()[-600:]
            assert reasons and set(reasons) == {"storage_error"}
            umount(root)
            mounted = False
            with Rpc(root / "busd.sock") as c:
                c("publish", {"message": message(999)})
            assert d.stop() == 0
        finally:
            if mounted:
                umount(root)
            d.kill()


# -- unwritable journal at start -------------------------------------------------------------


def _start_and_fail(root: Path, prefix: list[str] | None = None) -> tuple[int, str]:
    done = subprocess.run(
        [*(prefix or []), BUSD, "run", "--root", str(root), "--log-format", "json"],
        capture_output=True,
        env=clean_env(),
        timeout=30,
        check=False,
    )
    lines = [ln for ln in done.stderr.decode().splitlines() if not ln.startswith("{")]
    return done.returncode, "\n".join(lines)


def test_read_only_journal_at_start_is_a_clear_error(tmp_path: Path) -> None:
    """journal/ read-only at start: the daemon exits non-zero with one line naming it."""
    root = init_bus(tmp_path / "bus").root
    _bind_ro(root / "journal")
    try:
        rc, err = _start_and_fail(root)
    finally:
        umount(root / "journal")
    assert rc != 0
    assert err.startswith("busd: ") and "journal" in err and "Read-only" in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


_NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
_needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"),
    reason="needs root and setpriv to run the daemon without CAP_DAC_OVERRIDE",
)


@_needs_setpriv
def test_unwritable_journal_at_start_is_a_clear_error(tmp_path: Path) -> None:
    """journal/ owned by someone else (0700): a one-line error naming it, no traceback."""
    root = init_bus(tmp_path / "bus").root
    os.chown(root / "journal", 65534, 65534)
    rc, err = _start_and_fail(root, _NO_DAC)
    assert rc != 0
    assert err.startswith("busd: ") and "journal" in err, err[-800:]
    assert "Traceback" not in err, err[-800:]


@_needs_setpriv
def test_unreadable_file_in_an_outbox_is_dead_lettered(tmp_path: Path) -> None:
    """A file owned by another user, mode 0600, with the daemon not allowed to read it:
    dead-lettered with a reason (or left with a warning), the daemon stays up."""
    root = init_bus(tmp_path / "bus").root
    d = ChaosDaemon(root, prefix=_NO_DAC).ready()
    try:
        outbox = root / "outbox" / "alice"
        outbox.mkdir()
        tmp = root / "tmp" / "other"
        tmp.write_bytes(json.dumps(message(1)).encode())
        os.chmod(tmp, 0o600)
        os.chown(tmp, 65534, 65534)
        os.rename(tmp, outbox / "not-mine.json")
        drop(root, message(2), "mine.json")
        wait_for(lambda: _drain_ids(root) or not d.alive(), timeout=10, what="routing")
        time.sleep(0.5)
        assert d.alive(), d.stderr_text()[-600:]
        assert _drain_ids(root) == {"m-000002"}
    finally:
        d.kill()


# -- many waiting files ----------------------------------------------------------------------


def test_many_messages_waiting_in_one_inbox(tmp_path: Path) -> None:
    """A full inbox (5,000 in CI; 100,000 routed through the outbox under ``make chaos``):
    the daemon starts, and a consumer drains it all, in arrival order, with bounded memory."""
    n = scale(5_000, 100_000)
    root = init_bus(tmp_path / "bus").root
    body = json.dumps(message(0, body="w"))
    t0 = time.monotonic()
    if LONG:  # the real path: the router routes them all from the outbox
        outbox = root / "outbox" / "alice"
        outbox.mkdir()
        for i in range(n):
            (outbox / f"{i:07d}.json").write_text(body.replace("m-000000", f"m-{i:07d}"))
    else:  # CI: already delivered, as the router names them
        inbox = root / "inbox" / "bob"
        inbox.mkdir()
        (root / "locks" / "bob").mkdir()
        for i in range(n):
            name = delivery_name(f"{1_700_000_000_000_000_000 + i:020d}", 0, f"m-{i:07d}")
            (inbox / name).write_text(body.replace("m-000000", f"m-{i:07d}"))
    made = time.monotonic() - t0
    t0 = time.monotonic()
    d = ChaosDaemon(root).ready(timeout=600)
    started = time.monotonic() - t0
    try:
        if LONG:
            wait_until(
                lambda: len(os.listdir(root / "inbox" / "bob")) == n,
                timeout=900,
                what="routing",
                interval=2,
            )
        routed = time.monotonic() - t0
        base = rss_kb(d.proc.pid)
        order: list[str] = []
        t1 = time.monotonic()
        with Rpc(root / "busd.sock", timeout=120) as c:
            while len(order) < n:
                msgs = c("fetch", {"agent_id": "bob", "max": 1000})["messages"]
                assert msgs, f"stalled after {len(order)}"
                ids = [m["message"]["message_id"] for m in msgs]
                order.extend(ids)
                c("ack", {"agent_id": "bob", "message_ids": ids})
        drained = time.monotonic() - t1
        growth = rss_kb(d.proc.pid) - base
        assert d.stop() == 0
    finally:
        d.kill()
    assert order == [f"m-{i:07d}" for i in range(n)]
    report(
        "many waiting files",
        messages=n,
        via="outbox" if LONG else "inbox",
        create_s=round(made, 1),
        start_s=round(started, 1),
        route_s=round(routed, 1),
        drain_s=round(drained, 1),
        rss_growth_kib=growth,
    )
    assert growth < 128 * 1024


# -- inotify ----------------------------------------------------------------------------------


def _userns_limit(name: str, value: int) -> list[str]:
    """A prefix running the command in a private user namespace with an inotify limit
    lowered there only (these sysctls are per user namespace; the host is untouched)."""
    script = f'echo {value} > /proc/sys/user/{name} && exec "$0" "$@"'
    return ["unshare", "--user", "--map-root-user", "sh", "-c", script]


def _userns_ok() -> bool:
    try:
        done = subprocess.run(
            [*_userns_limit("max_inotify_watches", 5), "true"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


_needs_userns = pytest.mark.skipif(not _userns_ok(), reason="needs unprivileged user namespaces")


def _drop_everywhere(root: Path, agents: int) -> set[str]:
    for a in range(agents):
        drop(root, message(a), f"x{a}.json", agent=f"agent{a}")
    return {f"m-{a:06d}" for a in range(agents)}


def test_force_polling_routes_files(tmp_path: Path) -> None:
    """``force_polling = true`` (for filesystems without inotify): dropped files are routed
    by the poller, with the periodic re-scan pushed out of the way."""
    root = init_bus(tmp_path / "bus").root
    env = {"BUSD_FORCE_POLLING": "true", "BUSD_RESCAN_INTERVAL_SECONDS": "3600"}
    d = ChaosDaemon(root, env=env).ready()
    try:
        assert d.events("watcher_starting")[0]["mode"] == "polling"
        want = _drop_everywhere(root, 4)
        wait_for(lambda: _drain_ids(root) == want, timeout=10, what="polled delivery")
        with Rpc(root / "busd.sock") as c:
            assert c("status")["daemon"]["watcher"] == "polling"
    finally:
        d.kill()


@_needs_userns
def test_inotify_watch_limit_still_routes_every_file(tmp_path: Path) -> None:
    """With the inotify watch limit reached, files in unwatched directories are still
    routed by the periodic re-scan: late, never lost."""
    root = init_bus(tmp_path / "bus").root
    for a in range(6):
        (root / "outbox" / f"agent{a}").mkdir()
    env = {"BUSD_RESCAN_INTERVAL_SECONDS": "1"}
    d = ChaosDaemon(root, env=env, prefix=_userns_limit("max_inotify_watches", 3)).ready()
    try:
        want = _drop_everywhere(root, 6)
        wait_for(lambda: _drain_ids(root) == want, timeout=15, what="delivery by re-scan")
    finally:
        d.kill()


@_needs_userns
def test_inotify_watch_limit_warns_and_polls(tmp_path: Path) -> None:
    """Past the watch limit the daemon warns and polls: files arrive without the re-scan."""
    root = init_bus(tmp_path / "bus").root
    for a in range(6):
        (root / "outbox" / f"agent{a}").mkdir()
    env = {"BUSD_RESCAN_INTERVAL_SECONDS": "3600"}
    d = ChaosDaemon(root, env=env, prefix=_userns_limit("max_inotify_watches", 3)).ready()
    try:
        want = _drop_everywhere(root, 6)
        wait_for(lambda: _drain_ids(root) == want, timeout=4, what="delivery without re-scan")
        assert any(e.get("level") == "warning" and "watch" in e["event"] for e in d.log)
    finally:
        d.kill()


@_needs_userns
def test_inotify_instance_limit_falls_back_to_polling(tmp_path: Path) -> None:
    """No inotify instance available: the daemon warns, polls, and routes files."""
    root = init_bus(tmp_path / "bus").root
    d = ChaosDaemon(root, prefix=_userns_limit("max_inotify_instances", 0)).ready()
    try:
        want = _drop_everywhere(root, 2)
        wait_for(lambda: _drain_ids(root) == want or not d.alive(), timeout=10, what="routing")
        assert d.alive(), d.stderr_text()[-500:]
        assert any(e.get("level") == "warning" for e in d.log)
    finally:
        d.kill()


# -- the clock jumps backwards -------------------------------------------------------------


class _Backwards:
    """A nanosecond clock that jumps back an hour every third reading."""

    def __init__(self) -> None:
        self.now = time.time_ns()
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        self.now += -3_600 * 10**9 if self.calls % 3 == 0 else 1_000
        return self.now


def test_clock_jumping_backwards_keeps_ids_unique_and_journal_in_append_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every clock busd reads jumping back an hour again and again: generated message
    ids stay unique, the journal is in append order (its ``at`` may go back), and delivery
    names still sort in delivery order, so consumers take messages in that order."""
    root = init_bus(tmp_path / "bus").root
    config = load_config(root=str(root), env={})
    clock = _Backwards()
    monkeypatch.setattr(busd_ids._default, "_clock", clock)
    monkeypatch.setattr(arrival_clock, "_clock", clock)

    class _Dt(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
            return datetime.fromtimestamp(clock() / 1e9, tz or UTC)

    monkeypatch.setattr(busd_router, "datetime", _Dt)
    sent: list[str] = []
    with Router(config) as router:
        for batch in range(20):
            incoming = []
            for k in range(10):
                raw = json.dumps(message(0, message_id=None, body=f"{batch}-{k}")).encode()
                msg = decode(raw, fill_missing=True)
                incoming.append(Incoming(msg, raw=raw))
                sent.append(msg.message_id)
            router.route([], incoming)
            assert all(i.outcome == "accepted" for i in incoming)
    assert len(set(sent)) == len(sent) == 200
    entries, skipped = journal_entries(root)
    assert skipped == 0
    assert [e.message_id for e in entries] == sent
    assert any(b.at < a.at for a, b in itertools.pairwise(entries)), "clock jumped"
    claimed = [c.message.message_id for c in Consumer(config, "bob").claim(500)]
    assert claimed == sent
    report("clock backwards", ids=len(sent), clock_readings=clock.calls)


def test_recovery_reads_each_ledger_once_not_once_per_entry(tmp_path: Path) -> None:
    """150 acked entries after the checkpoint, a 60,000-record ledger: recovery is quick."""
    from busd.routing.recovery import recover_deliveries

    root = init_bus(tmp_path / "bus").root
    config = load_config(root=str(root), env={})
    n = 150
    with Router(config) as router:
        incoming = [Incoming(decode(json.dumps(message(i)).encode())) for i in range(n)]
        router.route([], incoming)
        router.sync()
    consumer = Consumer(config, "bob")
    claims = consumer.claim(n)
    assert consumer.ack([c.message.message_id for c in claims]) == n
    with (root / "processed" / "bob.jsonl").open("a") as f:
        for i in range(60_000):
            f.write(f'{{"message_id":"old-{i:06d}","acked_at":"2026-11-20T00:00:00.000000Z"}}\n')
    (root / "journal" / "checkpoint").unlink(missing_ok=True)  # recheck every entry
    with Router(config) as router:
        t0 = time.monotonic()
        assert recover_deliveries(router) == 0
        took = time.monotonic() - t0
    assert took < 1.5, f"recovery of {n} entries took {took:.1f} s"
