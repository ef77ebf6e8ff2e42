"""Operator commands (status, dlq, replay, tail, doctor): real ``busd`` subprocesses on
tmp_path buses, each with the daemon stopped (files) and running (socket)."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _rpc import Rpc
from busd.config import Config, load_config
from busd.core.codec import decode
from busd.routing.consumer import Consumer
from busd.routing.offline import route_pending
from busd.rpc.client import daemon_running
from busd.runtime.metrics import RateTracker
from busd.store.layout import init_bus
from conftest import message_dict
from daemon_harness import BUSD, Daemon, wait_for

MODES = ["stopped", "running"]


# -- helpers -------------------------------------------------------------------


def _holds(root: Path, agent: str, n: int) -> Callable[[], bool]:
    """A ``wait_for`` predicate: ``agent``'s inbox holds ``n`` messages."""
    return lambda: len(inbox(root, agent)) == n


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without BUSD_* variables (nor an editor), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BUSD_") and k not in ("EDITOR", "VISUAL")
    }
    env.update(extra)
    return env


def busd(
    root: Path, *args: str, env: dict[str, str] | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[str]:
    """Run ``busd --root ROOT args...`` to completion; text output."""
    proc = subprocess.run(
        [BUSD, "--root", str(root), *args],
        input=stdin,
        capture_output=True,
        env=env or clean_env(),
        timeout=60,
        check=False,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def many(root: Path, *commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run several read-only ``busd`` commands at once (they are independent); in order."""
    procs = [
        subprocess.Popen(
            [BUSD, "--root", str(root), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(),
        )
        for args in commands
    ]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        done.append(
            subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())
        )
    return done


def js(result: subprocess.CompletedProcess[str], rc: int = 0) -> Any:
    """Assert the exit code and parse stdout as one JSON document."""
    assert result.returncode == rc, (result.args, result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


def lines(result: subprocess.CompletedProcess[str]) -> list[Any]:
    """Assert exit 0 and parse stdout as JSON lines."""
    assert result.returncode == 0, (result.args, result.stderr)
    return [json.loads(x) for x in result.stdout.splitlines()]


def shape(obj: Any) -> Any:
    """The structure of a JSON value: dict keys and list element shapes, leaves erased."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shape(obj[0])] if obj else []
    return "leaf"


def drop(root: Path, data: bytes | dict[str, Any], name: str, agent: str = "alice") -> None:
    """Publish a file the way any producer does (tmp/, then a rename into outbox/<agent>/)."""
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    outbox = root / "outbox" / agent
    outbox.mkdir(mode=0o700, exist_ok=True)
    tmp = root / "tmp" / f"drop-{name}"
    tmp.write_bytes(raw)
    os.rename(tmp, outbox / name)


def cfg_of(root: Path, **flags: Any) -> Config:
    """The config of ``root`` as the CLI would load it, with ``flags`` set."""
    return load_config(root=str(root), env={}, **flags)


def inbox(root: Path, agent: str) -> list[Path]:
    """Ready files of ``agent``, sorted."""
    d = root / "inbox" / agent
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def entries(root: Path) -> list[str]:
    """Names of the DLQ entries (those with a record)."""
    return sorted(p.name[: -len(".reason.json")] for p in (root / "dlq").glob("*.reason.json"))


SCHEMA_BAD = {**message_dict("m-bad"), "oops": 1}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A bus with two messages for bob, one for carol and one schema dead letter."""
    root = init_bus(tmp_path / "bus").root
    drop(root, message_dict("m-1"), "1.json")
    drop(root, message_dict("m-2", message_type="decision", workflow_id="wf2"), "2.json")
    drop(root, message_dict("m-3", to="carol"), "3.json")
    drop(root, SCHEMA_BAD, "bad.json")
    assert route_pending(cfg_of(root)) is not None
    return root


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, root: Path) -> Iterator[Daemon | None]:
    """Each test runs twice: no daemon, then a daemon (started after the bus is built)."""
    if request.param == "stopped":
        yield None
        return
    daemon = Daemon(root).ready()
    try:
        yield daemon
    finally:
        daemon.stop()


# -- status --------------------------------------------------------------------


def test_status_same_shape_from_files_and_daemon(root: Path) -> None:
    """status --json has one shape with and without the daemon; exit 3 when down, 0 when up."""
    off = js(busd(root, "status", "--json"), 3)
    assert off["daemon"]["running"] is False and off["daemon"]["pid"] is None
    assert off["rates_per_min"]["accepted"] == {"1m": None, "15m": None}
    assert off["dedupe"]["index_size"] is None
    assert off["journal"]["undelivered"] is None  # only a daemon knows
    assert off["agents"]["bob"]["ready"] == 2 and off["agents"]["carol"]["ready"] == 1
    assert off["agents"]["bob"]["last_delivery_at"].endswith("Z")
    assert off["dlq"] == {
        "entries": 1,
        "by_reason": {"schema": 1},
        "oldest_age_s": off["dlq"]["oldest_age_s"],
    }
    assert off["attention"][0] == "the daemon is not running"
    text = busd(root, "status")
    assert text.returncode == 3 and "not running" in text.stdout and "bob" in text.stdout
    daemon = Daemon(root).ready()
    try:
        drop(root, message_dict("m-4"), "4.json")
        wait_for(lambda: len(inbox(root, "bob")) == 3, what="m-4 routed")
        on = js(busd(root, "status", "--json"))
        checked = busd(root, "status", "--check", "--json")
    finally:
        daemon.stop()
    assert shape(on) == shape(off)
    assert on["daemon"]["running"] is True and on["daemon"]["pid"] == daemon.proc.pid
    assert on["daemon"]["version"] == on["version"] and on["daemon"]["watcher"] == "native"
    assert on["dedupe"]["index_size"] >= 4
    assert on["journal"]["undelivered"] == 0  # m-4's inbox file exists
    assert on["rates_per_min"]["accepted"]["1m"] >= 1.0
    assert on["agents"]["bob"]["ready"] == 3
    assert on["dlq"]["entries"] == 1 and on["healthy"] is False
    # --check: the daemon runs but the DLQ is not empty.
    assert js(checked, 4)["attention"] == on["attention"]


def test_status_shows_how_each_agent_is_served_and_its_oldest_unsettled(root: Path) -> None:
    """Without a daemon every agent is served by files (there is no memory), with 0
    connections; the oldest unsettled message is named per agent, in --json and in the
    table's "served" and "oldest unsettled" columns."""
    off = js(busd(root, "status", "--json"), 3)
    bob, carol = off["agents"]["bob"], off["agents"]["carol"]
    assert (bob["served"], bob["connections"], bob["oldest_unsettled"]) == ("files", 0, "m-1")
    assert (carol["served"], carol["oldest_unsettled"]) == ("files", "m-3")
    text = busd(root, "status").stdout.splitlines()
    header = next(line for line in text if line.startswith("agent"))
    assert header.split()[:2] == ["agent", "served"] and header.endswith("oldest unsettled")
    bob_row = next(line for line in text if line.startswith("bob "))
    assert bob_row.split()[1] == "files" and bob_row.split()[-1] == "m-1"


def test_status_shows_an_agent_served_by_a_socket_subscriber(root: Path) -> None:
    """With a daemon, an agent with a socket subscriber is `socket (1)`: served from memory;
    what it holds in memory counts in its ready number. carol, unsubscribed, stays `files`."""
    daemon = Daemon(root).ready()
    try:
        with Rpc(root / "busd.sock") as sub:
            assert sub("subscribe", {"agent_id": "dave"}) == {"subscribed": True}
            on = js(busd(root, "status", "--json"))
            text = busd(root, "status").stdout.splitlines()
    finally:
        daemon.stop()
    dave = on["agents"]["dave"]
    assert (dave["served"], dave["connections"]) == ("socket", 1)
    assert on["agents"]["carol"]["served"] == "files"
    row = next(line for line in text if line.startswith("dave "))
    assert "socket (1)" in row


def test_status_check_is_0_on_a_healthy_bus(tmp_path: Path) -> None:
    """status --check: 0 with a daemon on a healthy bus, 3 without; --root after subcommands."""
    root = init_bus(tmp_path / "bus").root
    assert busd(root, "status", "--check").returncode == 3
    # --root also works after the subcommand, and on the dlq group.
    for argv in (["status", "--root", str(root)], ["dlq", "--root", str(root), "list", "--json"]):
        proc = subprocess.run([BUSD, *argv], capture_output=True, env=clean_env(), check=False)
        assert proc.returncode in (0, 3) and proc.stdout, (argv, proc.stderr)
    with_daemon = Daemon(root).ready()
    try:
        result = busd(root, "status", "--check", "--json")
    finally:
        with_daemon.stop()
    data = js(result, 0)
    assert data["healthy"] is True and data["attention"] == []


def test_rate_tracker_counts_per_minute_over_1_and_15_minutes() -> None:
    """RateTracker: counts in the window per minute, the 1 m window forgets older events."""
    now = [1000.0]
    rates = RateTracker(clock=lambda: now[0])
    rates.add(accepted=30, delivered=60)
    now[0] += 120  # two minutes later
    rates.add(accepted=6, dead_lettered=3)
    r = rates.per_minute()
    assert r["accepted"] == {"1m": 6.0, "15m": 18.0}  # 36 over 2 minutes of uptime
    assert r["delivered"] == {"1m": 0.0, "15m": 30.0}
    assert r["dead_lettered"] == {"1m": 3.0, "15m": 1.5}
    now[0] += 3600
    assert rates.per_minute()["accepted"] == {"1m": 0.0, "15m": 0.0}


# -- dlq -----------------------------------------------------------------------


def test_dlq_list_and_show(root: Path, mode: Daemon | None) -> None:
    """dlq list filters by reason, agent and time; dlq show gives record, bytes and JSON."""
    listed = js(busd(root, "dlq", "list", "--json"))["entries"]
    (entry,) = listed
    assert entry["reason"] == "schema" and entry["sender"] == "alice"
    assert entry["original_path"] == "outbox/alice/bad.json"
    name = entry["name"]
    future = "2999-01-01T00:00:00Z"
    recent, rejected, nobody, later, shown, text, missing, table = many(
        root,
        ["dlq", "list", "--reason", "schema", "--since", "1h", "--json"],
        ["dlq", "list", "--reason", "rejected", "--json"],
        ["dlq", "list", "--agent", "zed", "--json"],
        ["dlq", "list", "--since", future, "--json"],
        ["dlq", "show", name, "--json"],
        ["dlq", "show", name],
        ["dlq", "show", "01234567890123456789-nope.json"],
        ["dlq", "list"],
    )
    assert js(recent) == {"entries": listed}
    assert js(rejected) == js(nobody) == js(later) == {"entries": []}
    shown_data = js(shown)
    record = {k: v for k, v in entry.items() if k != "name"}
    assert shown_data["name"] == name and shown_data["record"] == record
    assert json.loads(shown_data["data"]) == SCHEMA_BAD and shown_data["json"] == SCHEMA_BAD
    assert text.returncode == 0 and '  "oops": 1' in text.stdout and "schema" in text.stdout
    assert missing.returncode == 66 and "busd: not_found:" in missing.stderr
    assert table.returncode == 0 and name in table.stdout and "unknown field" in table.stdout


def test_dlq_purge_needs_yes_and_removes_only_old_entries(root: Path, mode: Daemon | None) -> None:
    """purge without --yes off a terminal exits 2; with --yes it removes entries older than D."""
    cfg = cfg_of(root)
    drop(root, b"{not json", "junk.json")
    route_pending(cfg) if mode is None else wait_for(lambda: len(entries(root)) == 2)
    old, new = entries(root)
    record = root / "dlq" / f"{old}.reason.json"
    data = json.loads(record.read_text())
    data["last_failure_at"] = "2020-01-01T00:00:00.000000Z"
    record.write_text(json.dumps(data) + "\n")
    refused = busd(root, "dlq", "purge", "--older-than", "7d")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert entries(root) == [old, new]
    bad = busd(root, "dlq", "purge", "--older-than", "soon", "--yes")
    assert bad.returncode == 2
    assert js(busd(root, "dlq", "purge", "--older-than", "7d", "--yes", "--json")) == {
        "purged": [old],
        "count": 1,
    }
    assert entries(root) == [new]


def test_dlq_edit_replays_the_corrected_copy(
    root: Path, tmp_path: Path, mode: Daemon | None
) -> None:
    """dlq edit runs $EDITOR on a copy in tmp/ and replays it; an unchanged copy stays put."""
    (name,) = entries(root)
    editor = tmp_path / "fix.py"
    editor.write_text(
        "import json, sys\n"
        "p = sys.argv[1]\n"
        "d = json.load(open(p))\n"
        "d.pop('oops')\n"
        "open(p, 'w').write(json.dumps(d))\n"
    )
    unchanged = js(busd(root, "dlq", "edit", name, "--json", env=clean_env(EDITOR="true")))
    assert unchanged["results"][0]["status"] == "unchanged" and entries(root) == [name]
    failing = busd(root, "dlq", "edit", name, env=clean_env(EDITOR="false"))
    assert failing.returncode == 1 and entries(root) == [name]
    env = clean_env(EDITOR=f"{sys.executable} {editor}")
    done = js(busd(root, "dlq", "edit", name, "--json", env=env))
    (result,) = done["results"]
    assert result["status"] == "replayed" and result["message_id"] == "m-bad"
    assert entries(root) == []
    wait_for(lambda: any("m-bad" in p.name for p in inbox(root, "bob")), what="m-bad delivered")
    assert [p.name for p in (root / "tmp").iterdir()] == []


# -- replay --------------------------------------------------------------------


def _failed_entries(root: Path) -> tuple[str, str]:
    """Add an unroutable entry (topic without subscribers) and a rejected one (bob's m-1)."""
    cfg = cfg_of(root)
    drop(root, message_dict("m-topic", to="topic:nobody"), "topic.json")
    route_pending(cfg)
    consumer = Consumer(cfg, "bob")
    claims = consumer.claim(10)
    assert {c.message.message_id for c in claims} == {"m-1", "m-2"}
    consumer.fail("m-1", "cannot handle it")
    consumer.release("m-2")
    reasons = {
        json.loads((root / "dlq" / f"{n}.reason.json").read_text())["reason"]: n
        for n in entries(root)
    }
    return reasons["unroutable"], reasons["rejected"]


def test_replay_twice_delivers_once(tmp_path: Path) -> None:
    """replay --all then again: each valid entry is delivered once, the second run finds none."""
    for mode in MODES:
        root = init_bus(tmp_path / mode).root
        drop(root, message_dict("m-1"), "1.json")
        drop(root, message_dict("m-2"), "2.json")
        route_pending(cfg_of(root))
        unroutable, rejected = _failed_entries(root)
        daemon = Daemon(root).ready() if mode == "running" else None
        try:
            first = js(busd(root, "replay", "--all", "--to", "carol", "--json"))
            assert first["counts"]["replayed"] == 2, first
            assert {r["name"] for r in first["results"]} == {unroutable, rejected}
            targets = {r["name"]: r["target"] for r in first["results"]}
            assert targets[rejected].startswith("inbox/carol/")  # accepted before: straight in
            assert targets[unroutable].startswith("outbox/alice/")  # never accepted: routed
            wait_for(_holds(root, "carol", 2), what="both delivered to carol")
            again = js(busd(root, "replay", "--all", "--json"))
            assert again == {"results": [], "counts": again["counts"]} and entries(root) == []
            named = busd(root, "replay", rejected, "--json")
            assert js(named, 66)["results"][0]["status"] == "not_found"
            time.sleep(0.3)  # give a wrong second delivery the time to appear
            ids = sorted(decode(p.read_bytes()).message_id for p in inbox(root, "carol"))
            assert ids == ["m-1", "m-topic"], mode
            kept = list((root / "dlq" / "replayed").glob("*.json"))
            assert len(kept) == 2
            history = [json.loads(p.read_text())["history"][-1]["event"] for p in kept]
            assert history == ["replayed", "replayed"]
        finally:
            if daemon is not None:
                daemon.stop()


def test_replay_of_a_still_invalid_entry_updates_its_record(
    root: Path, mode: Daemon | None
) -> None:
    """A still-invalid entry stays (one entry, not two) with replays + 1; exit 65."""
    (name,) = entries(root)
    dry = js(busd(root, "replay", name, "--dry-run", "--json"), 65)
    assert dry["results"][0]["status"] == "still_invalid"
    result = js(busd(root, "replay", "--reason", "schema", "--json"), 65)
    (r,) = result["results"]
    assert r["status"] == "still_invalid" and "oops" in r["detail"]
    assert entries(root) == [name]
    assert len(list((root / "dlq").iterdir())) == 3  # data, record, .lock
    record = json.loads((root / "dlq" / f"{name}.reason.json").read_text())
    assert record["replays"] == 1  # the dry run counted nothing
    assert [h["event"] for h in record["history"]] == ["failed", "replay_failed"]


def test_replay_from_a_corrected_file(root: Path, tmp_path: Path, mode: Daemon | None) -> None:
    """replay NAME --from FILE publishes the corrected bytes and keeps the record's history."""
    (name,) = entries(root)
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps(message_dict("m-bad", body="corrected")))
    usage = busd(root, "replay", "--all", "--from", str(fixed))
    assert usage.returncode == 2
    assert busd(root, "replay").returncode == 2
    assert busd(root, "replay", name).returncode == 65  # as it is, it still fails
    result = js(busd(root, "replay", name, "--from", str(fixed), "--json"))
    assert result["results"][0]["status"] == "replayed"
    assert entries(root) == []
    got = wait_for(
        lambda: [p for p in inbox(root, "bob") if "m-bad" in p.name], what="corrected delivered"
    )
    assert decode(got[0].read_bytes()).body == "corrected"
    (kept,) = (root / "dlq" / "replayed").glob("*.json")
    events = [h["event"] for h in json.loads(kept.read_text())["history"]]
    assert events == ["failed", "replay_failed", "replayed"]


# -- tail ----------------------------------------------------------------------


def test_tail_filters_and_markdown(root: Path) -> None:
    """tail --type/--workflow/--agent/--since filter; --format md front matter decodes back."""
    results = many(
        root,
        ["tail", "--json"],
        ["tail", "--format", "json"],
        ["tail", "--type", "decision", "--json"],
        ["tail", "--workflow", "wf2", "--json"],
        ["tail", "--agent", "carol", "--json"],
        ["tail", "--since", "m-1", "--json"],
        ["tail", "--since", "10m", "--json"],
        ["tail", "--since", "2999-01-01T00:00:00Z", "--json"],
        ["tail", "--since", "no-such-id"],
        ["tail", "--type", "decision", "--format", "md"],
        ["tail", "--agent", "carol"],
    )
    everything, as_format, decisions, wf2, carol, after, recent, future, unknown, md, plain = (
        results
    )
    all_entries = lines(everything)
    assert sorted(e["event"] for e in all_entries) == ["accepted"] * 3 + ["dead_lettered"]
    assert lines(as_format) == all_entries
    assert [e["message_id"] for e in lines(decisions)] == ["m-2"]
    assert [e["message_id"] for e in lines(wf2)] == ["m-2"]
    assert [e["message_id"] for e in lines(carol)] == ["m-3"]
    assert [e.get("message_id") for e in lines(after)] == ["m-2", "m-3"]
    assert lines(recent) == all_entries
    assert lines(future) == []
    assert unknown.returncode == 66 and "not_found" in unknown.stderr
    assert md.returncode == 0 and md.stdout.startswith("---\n")
    msg = decode(md.stdout.encode().removesuffix(b"\n"))
    expected = message_dict("m-2", message_type="decision", workflow_id="wf2")
    assert msg == decode(json.dumps(expected).encode())
    text = plain.stdout.splitlines()
    assert len(text) == 1 and " accepted m-3 from=alice to=carol" in text[0]


def _reader(proc: subprocess.Popen[bytes]) -> queue.Queue[bytes]:
    out: queue.Queue[bytes] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            out.put(raw)

    threading.Thread(target=pump, daemon=True).start()
    return out


@pytest.mark.parametrize("with_daemon", [False, True], ids=MODES)
def test_tail_follow_across_segment_rotation(tmp_path: Path, with_daemon: bool) -> None:
    """tail -f keeps printing while the journal rotates into new 4 KiB segments."""
    root = init_bus(tmp_path / "bus").root
    env = clean_env(BUSD_JOURNAL_SEGMENT_BYTES="4096")
    daemon = (
        Daemon(root, env={"BUSD_JOURNAL_SEGMENT_BYTES": "4096"}).ready() if with_daemon else None
    )
    follower = subprocess.Popen(
        [BUSD, "--root", str(root), "tail", "-f", "--format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        got = _reader(follower)
        cfg = cfg_of(root, journal_segment_bytes=4096)
        for i in range(8):  # 8 passes of 4 messages: about 2 KiB of journal each
            for j in range(4):
                drop(root, message_dict(f"m-{i}-{j}", body="x" * 200), f"{i}-{j}.json")
            if daemon is None:
                route_pending(cfg)
            else:
                wait_for(_holds(root, "bob", 4 * (i + 1)), what=f"pass {i}")
        seen: list[str] = []
        deadline = time.monotonic() + 20
        while len(seen) < 32 and time.monotonic() < deadline:
            try:
                seen.append(json.loads(got.get(timeout=0.5))["message_id"])
            except queue.Empty:
                continue
        assert seen == [f"m-{i}-{j}" for i in range(8) for j in range(4)]
        assert len(list((root / "journal").glob("*.ndjson"))) >= 3
        assert follower.poll() is None  # still following
    finally:
        follower.terminate()
        follower.wait(10)
        if daemon is not None:
            daemon.stop()


# -- doctor --------------------------------------------------------------------


def _findings(result: subprocess.CompletedProcess[str], rc: int) -> dict[str, dict[str, Any]]:
    data = js(result, rc)
    assert data["healthy"] is (rc == 0)
    for f in data["findings"]:
        assert set(f) == {"check", "status", "detail", "fixed"}
        assert f["status"] in ("ok", "warn", "error")
    return {f["check"]: f for f in data["findings"]}


def test_doctor_finds_and_fixes_stale_socket_old_tmp_and_expired_claims(root: Path) -> None:
    """doctor sees a stale socket, old tmp file, wide dir, old claim, dead lock; --fix repairs."""
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(root / "busd.sock"))
    stale.close()  # the file stays; nothing listens
    assert not daemon_running(cfg_of(root))
    old_tmp = root / "tmp" / "abandoned.tmp"
    old_tmp.write_bytes(b"half a message")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old_tmp, (two_days_ago, two_days_ago))
    (root / "inbox" / "bob").chmod(0o755)
    claims = Consumer(cfg_of(root), "bob").claim(1)
    os.utime(claims[0].path, (two_days_ago, two_days_ago))  # lease expired long ago
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / "busd.lock").write_text(json.dumps({"pid": dead.pid, "role": "daemon", "since": 1.0}))

    found = _findings(busd(root, "doctor", "--json"), 1)
    assert list(found) == [
        "layout",
        "root_permissions",
        "directory_permissions",
        "socket",
        "lock",
        "expired_claims",
        "tmp_files",
        "dlq_location",
        "inotify",
        "disk_space",
        "filesystem",
    ]
    for check in ("socket", "tmp_files", "directory_permissions", "expired_claims", "lock"):
        assert found[check]["status"] == "warn", found[check]
        assert not found[check]["fixed"]
    assert "stale socket" in found["socket"]["detail"]
    assert "inbox/bob" in found["directory_permissions"]["detail"]
    assert (root / "busd.sock").exists() and old_tmp.exists()
    text = busd(root, "doctor")
    assert text.returncode == 1 and "stale socket" in text.stdout

    fixed = _findings(busd(root, "doctor", "--fix", "--json"), 0)
    for check in ("socket", "tmp_files", "directory_permissions", "expired_claims", "lock"):
        assert fixed[check]["fixed"], fixed[check]
    assert not (root / "busd.sock").exists() and not old_tmp.exists()
    assert (root / "inbox" / "bob").stat().st_mode & 0o777 == 0o700
    assert len(inbox(root, "bob")) == 2  # the claim came back
    again = _findings(busd(root, "doctor", "--json"), 0)
    assert all(f["status"] == "ok" for f in again.values()), again


def test_doctor_with_a_running_daemon(root: Path) -> None:
    """With the daemon up, doctor sees its socket and lock as healthy (same findings shape)."""
    off = js(busd(root, "doctor", "--json"))
    daemon = Daemon(root).ready()
    try:
        on = js(busd(root, "doctor", "--json"))
    finally:
        daemon.stop()
    assert shape(on) == shape(off) and on["healthy"] is True
    by_check = {f["check"]: f for f in on["findings"]}
    assert "daemon listening" in by_check["socket"]["detail"]
    assert str(daemon.proc.pid) in by_check["lock"]["detail"]


def test_doctor_on_a_missing_root_exits_66(tmp_path: Path) -> None:
    """doctor on a root that does not exist says so (66) instead of inventing a bus."""
    result = busd(tmp_path / "nowhere", "doctor")
    assert result.returncode == 66 and "no bus at" in result.stderr
    assert not (tmp_path / "nowhere").exists()
