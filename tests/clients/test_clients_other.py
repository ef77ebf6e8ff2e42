"""The non-Python clients: clients/sh/busd-send, clients/node/busd.js, socat on the socket.

Each test runs the real interpreter (dash or sh, node, socat) against a real
bus in tmp_path, with a real ``busd run`` where the test needs a daemon.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from busd.core.codec import decode
from busd.core.ids import pid_field
from busd.store.layout import init_bus, parse_delivery_name
from daemon_harness import Daemon, drop, files, message, wait_for

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
BUSD_SEND = REPO / "clients" / "sh" / "busd-send"
BUSD_JS = REPO / "clients" / "node" / "busd.js"
SH = shutil.which("dash") or shutil.which("sh") or "sh"
NODE = shutil.which("node")
SOCAT = shutil.which("socat")
SEED_ID = re.compile(r"^MSG-\d{8}-\d{6}-\d{9}-PID[0-9A-Z]{5}-\d{4}\Z")
OUTBOX_NAME = re.compile(r"^(\d{20})-(.+)\.json\Z")

needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (CI installs nodejs)")
needs_socat = pytest.mark.skipif(SOCAT is None, reason="socat is not installed (apt-get socat)")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}
    env.update(extra)
    return env


def sh_send(
    root: Path | None,
    data: bytes,
    sender: str = "alice",
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run busd-send with POSIX sh, the message on stdin."""
    cmd = [SH, str(BUSD_SEND), "--from", sender, *args]
    if root is not None:
        cmd[2:2] = ["--root", str(root)]
    return subprocess.run(
        cmd, input=data, capture_output=True, timeout=20, cwd=cwd, env=env or _env()
    )


def node(*args: str, data: bytes = b"", env: dict[str, str] | None = None) -> str:
    """Run ``node busd.js ARGS``; fail on a non-zero exit; return stdout."""
    assert NODE is not None
    proc = subprocess.run(
        [NODE, str(BUSD_JS), *args], input=data, capture_output=True, timeout=30, env=env or _env()
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def node_lib_send(root: Path, msg: dict[str, object], sender: str = "alice") -> dict[str, object]:
    """Call ``send()`` of the node library; return its result object."""
    assert NODE is not None
    script = (
        "const busd = require(process.argv[1]);"
        "busd.send(JSON.parse(process.argv[2]), {root: process.argv[3], from: process.argv[4]})"
        ".then((r) => console.log(JSON.stringify(r)),"
        " (e) => { console.error(e.message); process.exitCode = 1; });"
    )
    proc = subprocess.run(
        [NODE, "-e", script, str(BUSD_JS), json.dumps(msg), str(root), sender],
        capture_output=True,
        timeout=30,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def delivered(root: Path, agent: str = "bob") -> list[str]:
    """Message ids in ``inbox/<agent>/``, in arrival order."""
    out = []
    for p in files(root / "inbox" / agent):
        parsed = parse_delivery_name(p.name)
        assert parsed is not None, p.name
        out.append(parsed.message_id)
    return out


def without(msg: dict[str, object], *keys: str) -> dict[str, object]:
    """``msg`` minus ``keys``."""
    return {k: v for k, v in msg.items() if k not in keys}


# ---------------------------------------------------------------- busd-send (sh)


def test_sh_send_with_daemon_is_delivered(root: Path) -> None:
    """busd-send with a running daemon: the message reaches the recipient's inbox."""
    d = Daemon(root).ready()
    try:
        proc = sh_send(root, json.dumps(message(1)).encode())
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout == b"m-000001\n"
        wait_for(lambda: delivered(root) == ["m-000001"], what="delivery")
    finally:
        d.kill()
    assert files(root / "tmp") == []


def test_sh_send_without_daemon_waits_in_outbox(root: Path) -> None:
    """busd-send with no daemon leaves one durable outbox file, delivered once a daemon starts."""
    raw = json.dumps(message(2), indent=2).encode()
    proc = sh_send(root, raw)
    assert proc.returncode == 0, proc.stderr.decode()
    [published] = files(root / "outbox" / "alice")
    m = OUTBOX_NAME.match(published.name)
    assert m is not None and m.group(2) == "m-000002", published.name
    assert published.read_bytes() == raw  # a complete message is published byte for byte
    assert published.stat().st_mode & 0o777 == 0o600
    assert files(root / "tmp") == []
    d = Daemon(root).ready()
    try:
        wait_for(lambda: delivered(root) == ["m-000002"], what="delivery after start")
        wait_for(lambda: files(root / "outbox" / "alice") == [], what="outbox drained")
    finally:
        d.kill()


def test_sh_send_generates_valid_id_and_created_at(root: Path) -> None:
    """A message without message_id/created_at gets seed-format values that busd validates."""
    msg = without(message(3), "message_id", "created_at")
    msg["metadata"] = {"message_id": "nested, not top-level", "created_at": 1}
    msg["body"] = 'tricky "message_id": "x", {'
    before = datetime.now(UTC) - timedelta(seconds=1)
    proc = subprocess.Popen(
        [SH, str(BUSD_SEND), "--root", str(root), "--from", "alice"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    out, err = proc.communicate(json.dumps(msg).encode(), timeout=20)
    assert proc.returncode == 0, err.decode()
    mid = out.decode().strip()
    assert SEED_ID.match(mid), mid
    assert f"-PID{pid_field(proc.pid)}-" in mid  # the shell's own $$, as ids.py formats it
    [published] = files(root / "outbox" / "alice")
    decoded = decode(published.read_bytes())  # no fill_missing: exactly what the router sees
    assert decoded.message_id == mid
    assert before <= decoded.created_at <= datetime.now(UTC) + timedelta(seconds=1)
    assert decoded.metadata == msg["metadata"]
    assert decoded.body == msg["body"]


def test_sh_send_concurrent_writers_get_distinct_ids(root: Path) -> None:
    """Twenty busd-send processes at once publish twenty distinct, valid messages."""
    data = json.dumps(without(message(8), "message_id", "created_at")).encode()
    procs = [
        subprocess.Popen(
            [SH, str(BUSD_SEND), "--root", str(root), "--from", "alice"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        for _ in range(20)
    ]
    ids = []
    for p in procs:
        out, err = p.communicate(data, timeout=20)
        assert p.returncode == 0, err.decode()
        ids.append(out.decode().strip())
    assert len(set(ids)) == 20
    published = files(root / "outbox" / "alice")
    assert sorted(decode(p.read_bytes()).message_id for p in published) == sorted(ids)


def test_sh_send_without_gnu_date_and_sync(root: Path, tmp_path: Path) -> None:
    """Where date has no %N and sync takes no FILE (BSD-like), busd-send still publishes."""
    real_date, real_sync = shutil.which("date"), shutil.which("sync")
    assert real_date and real_sync
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "date").write_text(
        "#!/bin/sh\n"  # BSD date prints a plain N for %N
        'for a; do shift; set -- "$@" "$(printf %s "$a" | sed s/%N/N/g)"; done\n'
        f'exec {real_date} "$@"\n'
    )
    (bin_dir / "sync").write_text(f"#!/bin/sh\n[ $# -eq 0 ] || exit 1\nexec {real_sync}\n")
    for tool in ("date", "sync"):
        (bin_dir / tool).chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    data = json.dumps(without(message(9), "message_id", "created_at")).encode()
    proc = sh_send(root, data, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    mid = proc.stdout.decode().strip()
    assert SEED_ID.match(mid) and "-000000000-PID" in mid, mid
    [published] = files(root / "outbox" / "alice")
    assert decode(published.read_bytes()).message_id == mid


def test_sh_send_fills_front_matter(root: Path) -> None:
    """Markdown front matter without an id gets message_id/created_at header lines."""
    text = b"---\ntype: FACT\nworkflow_id: w\ntask_id: t\nagent_id: alice\nto: bob\n---\nhi\n"
    proc = sh_send(root, text)
    assert proc.returncode == 0, proc.stderr.decode()
    [published] = files(root / "outbox" / "alice")
    decoded = decode(published.read_bytes())
    assert decoded.message_id == proc.stdout.decode().strip()
    assert decoded.body == "hi\n"


def test_sh_send_finds_root_upwards_and_from_env(root: Path, tmp_path: Path) -> None:
    """Without --root, busd-send uses BUSD_ROOT, else the nearest .busd/ above the cwd."""
    dot = init_bus(tmp_path / "proj" / ".busd").root
    deep = tmp_path / "proj" / "a" / "b"
    deep.mkdir(parents=True)
    proc = sh_send(None, json.dumps(message(4)).encode(), cwd=deep)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(files(dot / "outbox" / "alice")) == 1
    proc = sh_send(None, json.dumps(message(5)).encode(), cwd=deep, env=_env(BUSD_ROOT=str(root)))
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(files(root / "outbox" / "alice")) == 1


@pytest.mark.parametrize("agent", ["bad/name", ".hidden", "ends.", "con", "Nul.txt", "a" * 65, "é"])
def test_sh_send_rejects_bad_agent(root: Path, agent: str) -> None:
    """An invalid --from agent id exits 64 and writes nothing."""
    proc = sh_send(root, json.dumps(message(6)).encode(), agent)
    assert proc.returncode == 64, proc.stderr.decode()
    assert proc.stdout == b""
    assert files(root / "outbox") == [] and files(root / "tmp") == []


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[1, 2]",
        b'{"schema_version": "1.0", "body": "trunc',
        b'{"a": 1} {"b": 2}',
        b'{"message_id": null}',
        b'{"message_id": "has space"}',
        b'{"message_id": "a", "message_id": "b"}',
    ],
)
def test_sh_send_rejects_unpublishable_input(root: Path, data: bytes) -> None:
    """Input busd-send cannot name or fix exits 65 and leaves no file behind."""
    proc = sh_send(root, data)
    assert proc.returncode == 65, proc.stderr.decode()
    assert files(root / "outbox") == [] and files(root / "tmp") == []


def test_sh_send_without_bus_exits_69(tmp_path: Path) -> None:
    """A root that is not an initialized bus exits 69."""
    proc = sh_send(tmp_path / "nobus", json.dumps(message(7)).encode())
    assert proc.returncode == 69, proc.stderr.decode()


# ---------------------------------------------------------------- busd.js (node)


@needs_node
def test_node_send_via_socket(root: Path) -> None:
    """busd.js send with the daemon running publishes over the socket and is delivered."""
    d = Daemon(root).ready()
    try:
        result = node_lib_send(root, message(10))
        assert result == {"message_id": "m-000010", "duplicate": False, "via": "socket"}
        wait_for(lambda: delivered(root) == ["m-000010"], what="delivery")
        out = node(
            "send", "--from", "alice", "--root", str(root), data=json.dumps(message(11)).encode()
        )
        assert out == "m-000011\n"
        wait_for(lambda: delivered(root) == ["m-000010", "m-000011"], what="CLI delivery")
    finally:
        d.kill()
    assert files(root / "tmp") == []


@needs_node
def test_node_send_via_files_when_daemon_stopped(root: Path) -> None:
    """With the daemon stopped (stale socket file too), busd.js falls back to the outbox."""
    d = Daemon(root).ready()
    d.kill()  # SIGKILL leaves busd.sock behind: nobody listens on it
    assert (root / "busd.sock").exists() or (root / "busd.sock.path").exists()
    msg = without(message(12), "message_id", "created_at")
    result = node_lib_send(root, msg)
    assert result["via"] == "file"
    mid = result["message_id"]
    assert isinstance(mid, str) and SEED_ID.match(mid), mid
    [published] = files(root / "outbox" / "alice")
    assert OUTBOX_NAME.match(published.name) and published.name.endswith(f"-{mid}.json")
    assert decode(published.read_bytes()).message_id == mid
    out = node(
        "send",
        "--from",
        "alice",
        data=json.dumps(message(13)).encode(),
        env=_env(BUSD_ROOT=str(root)),
    )
    assert out == "m-000013\n"
    assert files(root / "tmp") == []
    d = Daemon(root).ready()
    try:
        wait_for(lambda: sorted(delivered(root)) == sorted([mid, "m-000013"]), what="delivery")
    finally:
        d.kill()


@needs_node
def test_node_send_front_matter_uses_files(root: Path) -> None:
    """busd.js sends Markdown front matter through the outbox, adding a message_id."""
    text = b"---\ntype: FACT\nworkflow_id: w\ntask_id: t\nagent_id: alice\nto: bob\n---\nhi\n"
    mid = node("send", "--from", "alice", "--root", str(root), data=text).strip()
    assert SEED_ID.match(mid), mid
    [published] = files(root / "outbox" / "alice")
    decoded = decode(published.read_bytes())
    assert (decoded.message_id, decoded.body) == (mid, "hi\n")


@needs_node
def test_node_fetch_ack_round_trip(root: Path) -> None:
    """busd.js fetch claims the messages and ack records them in the ledger."""
    d = Daemon(root).ready()
    try:
        drop(root, message(20), "m20.json")
        drop(root, message(21), "m21.json")
        wait_for(lambda: len(delivered(root)) == 2, what="delivery")
        lines = node("fetch", "bob", "--max", "5", "--root", str(root)).splitlines()
        claims = [json.loads(line) for line in lines]
        ids = [c["message"]["message_id"] for c in claims]
        assert ids == ["m-000020", "m-000021"]
        assert all(c["delivery_count"] == 1 for c in claims)
        assert len(files(root / "locks" / "bob")) == 2
        assert node("ack", "bob", *ids, "--root", str(root)) == "acked 2\n"
        assert files(root / "locks" / "bob") == []
        ledger = (root / "processed" / "bob.jsonl").read_text().splitlines()
        assert [json.loads(line)["message_id"] for line in ledger] == ids
        assert node("fetch", "bob", "--root", str(root)) == ""
    finally:
        d.kill()


@needs_node
def test_node_fetch_carries_receipts_and_ack_settles_by_receipt(root: Path) -> None:
    """Fetched claims carry a receipt; ack --receipt settles that delivery; a stale one fails.

    The first delivery's lease runs out and the message is delivered again: its
    receipt is then refused (stale_receipt) and the second delivery survives.
    """
    d = Daemon(root, env={"BUSD_LEASE_SECONDS": "0.5"}).ready()
    try:
        drop(root, message(30), "m30.json")
        where = ("--root", str(root))
        [line] = node("fetch", "bob", "--wait", "5", *where).splitlines()
        first = json.loads(line)
        assert first["message"]["message_id"] == "m-000030"
        r1 = first["receipt"]
        parsed = parse_delivery_name(f"{r1}.json")
        assert parsed is not None and parsed.message_id == "m-000030"
        [line] = node("fetch", "bob", "--wait", "5", *where).splitlines()
        second = json.loads(line)
        assert second["delivery_count"] == 2 and second["receipt"] != r1
        assert NODE is not None
        stale = subprocess.run(
            [NODE, str(BUSD_JS), "ack", "bob", "--receipt", r1, *where],
            capture_output=True,
            timeout=30,
            env=_env(),
        )
        assert stale.returncode == 65, stale.stderr.decode()  # stale_receipt
        assert node("ack", "bob", "--receipt", second["receipt"], *where) == "acked 1\n"
        assert node("fetch", "bob", *where) == ""
    finally:
        d.kill()


# ---------------------------------------------------------------- socat


@needs_socat
def test_socat_ping(root: Path) -> None:
    """A JSON-RPC ping through socat answers with the daemon's version and pid."""
    d = Daemon(root).ready()
    try:
        sock = root / "busd.sock"
        if not sock.exists():
            sock = Path((root / "busd.sock.path").read_text().strip())
        proc = subprocess.run(
            [str(SOCAT), "-t", "5", "-", f"UNIX-CONNECT:{sock}"],
            input=b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n',
            capture_output=True,
            timeout=15,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        answer = json.loads(proc.stdout)
        assert answer["id"] == 1 and answer["jsonrpc"] == "2.0"
        assert answer["result"]["pid"] == d.proc.pid
        assert isinstance(answer["result"]["version"], str)
    finally:
        d.kill()
