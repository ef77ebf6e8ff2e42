"""Tests of the real ``busd`` console script (subprocesses on tmp_path buses, no daemon)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer.main

from busd import __version__
from busd.cli.common import EXIT_CODES
from busd.cli.main import app
from busd.config import load_config
from busd.core.codec import decode
from busd.routing.offline import route_pending
from busd.store.journal import Journal
from busd.store.layout import Layout
from conftest import message_dict, run_python
from daemon_harness import BUSD, clean_env

ID_RE = re.compile(r"^MSG-\d{8}-\d{6}-\d{9}-PID[0-9A-Z]{5}-\d{4}$")

_HOLD_LOCK = """
import sys, time
from pathlib import Path
from busd.store.buslock import BusLock
from busd.store.layout import Layout
lock = BusLock(Layout(Path(sys.argv[1])), role="daemon")
assert lock.acquire(timeout=5)
print("locked", flush=True)
time.sleep(120)
"""


def start(
    *args: str, cwd: Path, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``busd args...``; pass ``stdin`` again to ``communicate`` to feed it."""
    return subprocess.Popen(
        [BUSD, *args],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env or clean_env(),
    )


def busd(
    *args: str, cwd: Path, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``busd args...`` to completion; text output."""
    proc = subprocess.run(
        [BUSD, *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        cwd=cwd,
        env=env or clean_env(),
        timeout=30,
        check=False,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """Assert exit 0 and return stdout."""
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result.stdout


def new_message(**fields: Any) -> bytes:
    """A valid fact from alice to bob WITHOUT message_id and created_at (busd fills them)."""
    data = message_dict(**fields)
    for key in ("message_id", "created_at"):
        if key not in fields:
            data.pop(key, None)
    return json.dumps(data).encode()


def drop(root: Path, *messages: dict[str, Any]) -> None:
    """Publish messages the way any producer does (a file in outbox/alice/), not via the CLI."""
    outbox = root / "outbox" / "alice"
    outbox.mkdir(exist_ok=True)
    for i, data in enumerate(messages):
        tmp = root / "tmp" / f"drop-{i}"
        tmp.write_bytes(json.dumps(data).encode())
        os.rename(tmp, outbox / f"{i:04d}-{data['message_id']}.json")


def inbox(root: Path, agent: str) -> list[Path]:
    """Delivered (ready) files in inbox/<agent>/, sorted."""
    d = root / "inbox" / agent
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def test_version(tmp_path: Path) -> None:
    """busd --version prints the package version and exits 0."""
    assert ok(busd("--version", cwd=tmp_path)).strip() == f"busd {__version__}"


def test_init_creates_a_bus_and_is_idempotent(tmp_path: Path) -> None:
    """init PATH creates the layout; running it again succeeds and keeps what is there."""
    out = ok(busd("init", "newbus", cwd=tmp_path))
    assert str(tmp_path / "newbus") in out
    layout = Layout(tmp_path / "newbus")
    assert layout.is_initialized()
    (layout.inbox / "bob").mkdir()
    again = json.loads(ok(busd("init", str(tmp_path / "newbus"), "--json", cwd=tmp_path)))
    assert again == {"root": str(tmp_path / "newbus")}
    assert (layout.inbox / "bob").is_dir()


# Arguments per command. Every command must accept --root before the subcommand
# (the global option) and after it (its own option).
_COMMANDS: dict[str, list[str]] = {
    "init": [],
    "send": ["--from", "alice", "-"],
    "recv": ["bob"],
    "ack": ["bob", "m-1"],
    "tail": [],
    "gc": [],
    "run": [],
}


def test_every_registered_command_takes_root_and_config() -> None:
    """Every subcommand declares its own --root and --config, so both may follow it."""
    group = typer.main.get_command(app)
    commands = getattr(group, "commands", {})
    assert set(_COMMANDS) <= set(commands)
    for name, command in commands.items():
        opts = {o for p in command.params for o in getattr(p, "opts", [])}
        assert {"--root", "--config"} <= opts, name


@pytest.mark.parametrize("position", ["before", "after"])
def test_root_before_or_after_the_subcommand_for_every_command(
    tmp_path: Path, position: str
) -> None:
    """--root in either position: init creates that root; every other command exits 66 naming it."""
    procs = {}
    for name, args in _COMMANDS.items():
        where = tmp_path / f"{name}-root"
        argv = ["--root", str(where), name, *args]
        if position == "after":
            argv = [name, *args, "--root", str(where)]
        procs[name] = start(*argv, cwd=tmp_path, stdin=b"" if name == "send" else None)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=30)
        where = tmp_path / f"{name}-root"
        if name == "init":
            assert proc.returncode == 0, err.decode()
            assert Layout(where).is_initialized()
        else:
            # Not initialised: exit 66 naming exactly that root, and nothing created there.
            assert proc.returncode == 66, (name, out, err)
            assert f"no bus at {where}" in err.decode(), (name, err)
            assert not where.exists(), name
    assert not (tmp_path / ".busd").exists()


def test_send_from_stdin_fills_message_id_and_created_at(root: Path, tmp_path: Path) -> None:
    """A message without message_id/created_at gets both; plain output is the new id."""
    before = datetime.now(UTC)
    argv = ("--root", str(root), "send", "--from", "alice")
    mid = ok(busd(*argv, cwd=tmp_path, stdin=new_message())).strip()
    assert ID_RE.match(mid), mid
    (delivered,) = inbox(root, "bob")
    msg = decode(delivered.read_bytes())
    assert msg.message_id == mid
    assert before.replace(microsecond=0) <= msg.created_at <= datetime.now(UTC)


def test_send_a_markdown_file_with_json_output(root: Path, tmp_path: Path) -> None:
    """A Markdown front-matter file: seed names map, given id kept, --json output parsed."""
    md = tmp_path / "note.md"
    md.write_bytes(
        b"---\n"
        b"msg_id: md-note-1\n"
        b"ts: 2024-05-01T12:00:00Z\n"
        b"type: DECISION\n"
        b"workflow_id: wf\n"
        b"task_id: t1\n"
        b"agent_id: alice\n"
        b"to: bob\n"
        b"---\n"
        b"# Decision\n\nWe ship *today*.\n"
    )
    argv = ("send", "--from", "alice", str(md), "--json", "--root", str(root))
    out = json.loads(ok(busd(*argv, cwd=tmp_path)))
    assert out["message_id"] == "md-note-1"
    assert out["routed"] is True
    assert Path(out["path"]).parent == root / "outbox" / "alice"
    assert not Path(out["path"]).exists()  # routed: moved on to bob's inbox
    (delivered,) = inbox(root, "bob")
    envelope = json.loads(delivered.read_bytes())
    assert envelope["message_id"] == "md-note-1"
    assert envelope["message_type"] == "decision"
    assert envelope["created_at"] == "2024-05-01T12:00:00Z"
    assert envelope["body"] == "# Decision\n\nWe ship *today*.\n"


def test_recv_max_json_prints_one_envelope_per_line(root: Path, tmp_path: Path) -> None:
    """recv --max 3 --json claims 3 of 5, one JSON object per line; the next recv gets the rest."""
    ids = [f"m-{i}" for i in range(5)]
    drop(root, *(message_dict(mid, body=f"line one\nline two {i}") for i, mid in enumerate(ids)))
    first = ok(busd("--root", str(root), "recv", "bob", "--max", "3", "--json", cwd=tmp_path))
    lines = first.splitlines()
    assert len(lines) == 3
    envelopes = [json.loads(line) for line in lines]
    assert [e["message_id"] for e in envelopes] == ids[:3]  # arrival order
    assert envelopes[1]["body"] == "line one\nline two 1"
    rest = ok(busd("--root", str(root), "recv", "bob", "--max", "10", "--json", cwd=tmp_path))
    assert [json.loads(line)["message_id"] for line in rest.splitlines()] == ids[3:]


def test_recv_without_json_prints_markdown_front_matter(root: Path, tmp_path: Path) -> None:
    """Plain recv prints Markdown with YAML front matter that decodes to the sent message."""
    sent = message_dict("m-md", body="# Heading\n\ntext")
    drop(root, sent)
    out = ok(busd("--root", str(root), "recv", "bob", cwd=tmp_path))
    assert out.startswith("---\n")
    assert "msg_id: m-md" in out
    assert "type: FACT" in out
    msg = decode(out.encode().removesuffix(b"\n"))
    assert msg == decode(json.dumps(sent).encode())


def test_ack_then_recv_gets_nothing_even_after_the_lease(root: Path, tmp_path: Path) -> None:
    """An acked message never comes back; an unacked one returns once its lease expires."""
    env = clean_env({"BUSD_LEASE_SECONDS": "0.5"})
    drop(root, message_dict("m-acked"), message_dict("m-dropped"))
    recv = ("--root", str(root), "recv", "bob", "--max", "5", "--json")
    claimed = ok(busd(*recv, cwd=tmp_path, env=env))
    assert [json.loads(x)["message_id"] for x in claimed.splitlines()] == ["m-acked", "m-dropped"]
    acked = ok(busd("ack", "bob", "m-acked", "--root", str(root), cwd=tmp_path, env=env))
    assert acked.strip() == "acked 1"
    time.sleep(0.6)
    # Both leases are over: only the unacked message is handed out again.
    again = ok(busd(*recv, cwd=tmp_path, env=env))
    assert [json.loads(x)["message_id"] for x in again.splitlines()] == ["m-dropped"]
    ack_json = ("--root", str(root), "ack", "bob", "m-dropped", "m-unknown", "--json")
    assert json.loads(ok(busd(*ack_json, cwd=tmp_path, env=env))) == {
        "acked": 1,
        "not_held": ["m-unknown"],
    }
    assert inbox(root, "bob") == []
    assert os.listdir(root / "locks" / "bob") == []


def test_recv_json_shows_the_receipt_and_ack_receipt_settles_it(root: Path, tmp_path: Path) -> None:
    """recv --json adds the claim's receipt; ack --receipt settles that delivery only.

    The receipt of a delivery whose lease expired and that was claimed again is
    refused (stale_receipt, its exit status) and the newer claim is untouched.
    """
    env = clean_env({"BUSD_LEASE_SECONDS": "0.5"})
    drop(root, message_dict("m-r"))
    recv = ("--root", str(root), "recv", "bob", "--json")
    first = json.loads(ok(busd(*recv, cwd=tmp_path, env=env)))
    r1 = first.pop("receipt")
    assert (
        first
        == json.loads(ok(busd("--root", str(root), "tail", "--json", cwd=tmp_path)))["message"]
    )
    assert os.listdir(root / "locks" / "bob") == [f"{r1}.json"]
    assert re.fullmatch(r"\d{20}-001-m-r", r1)
    time.sleep(0.6)
    second = json.loads(ok(busd(*recv, cwd=tmp_path, env=env)))
    r2 = second["receipt"]
    assert re.fullmatch(r"\d{20}-002-m-r", r2)
    stale = busd("--root", str(root), "ack", "bob", "--receipt", r1, cwd=tmp_path, env=env)
    assert stale.returncode == EXIT_CODES.get("stale_receipt", 1) != 0
    assert stale.stderr.startswith("busd: stale_receipt: ") and r1 in stale.stderr
    assert os.listdir(root / "locks" / "bob") == [f"{r2}.json"]
    assert not (root / "processed" / "bob.jsonl").exists()
    ack = ("--root", str(root), "ack", "bob", "--receipt", r2, "--json")
    assert json.loads(ok(busd(*ack, cwd=tmp_path, env=env))) == {"acked": 1, "not_held": []}
    assert os.listdir(root / "locks" / "bob") == []
    assert json.loads((root / "processed" / "bob.jsonl").read_text())["message_id"] == "m-r"
    usage = busd("--root", str(root), "ack", "bob", cwd=tmp_path, env=env)
    assert usage.returncode == EXIT_CODES["usage"] and "--receipt" in usage.stderr


def test_recv_text_output_has_no_receipt(root: Path, tmp_path: Path) -> None:
    """The Markdown output of recv is unchanged: it still decodes as the message."""
    drop(root, message_dict("m-plain"))
    out = ok(busd("--root", str(root), "recv", "bob", cwd=tmp_path))
    assert "receipt" not in out and decode(out.encode().removesuffix(b"\n")).message_id == "m-plain"


def test_tail_lists_accepted_entries(root: Path, tmp_path: Path) -> None:
    """tail prints one line per journal entry; tail --json one entry object per line."""
    drop(root, message_dict("m-a"), message_dict("m-b"))
    assert route_pending(load_config(root=str(root), env={})) is not None
    text = start("tail", "--root", str(root), cwd=tmp_path)
    as_json = start("--root", str(root), "tail", "--json", cwd=tmp_path)
    out, err = text.communicate(timeout=30)
    assert text.returncode == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == 2
    for line, mid in zip(lines, ("m-a", "m-b"), strict=True):
        assert re.match(rf"^\S+Z accepted {mid} from=alice to=bob$", line), line
    out, err = as_json.communicate(timeout=30)
    assert as_json.returncode == 0, err
    entries = [json.loads(x) for x in out.decode().splitlines()]
    assert [(e["event"], e["message_id"], e["to"]) for e in entries] == [
        ("accepted", "m-a", ["bob"]),
        ("accepted", "m-b", ["bob"]),
    ]
    assert entries[0]["message"]["message_id"] == "m-a"


def test_invalid_message_exits_65_naming_the_field(root: Path, tmp_path: Path) -> None:
    """An invalid message exits 65 with `busd: invalid_message: ...` naming the field path."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"message_type": "status_update", "status": "nope"}, "$.status"),
        ({"workflow_id": None}, "$.workflow_id"),
        ({"to": ["bob", "../evil"]}, "$.to[1]"),
    ]
    procs = []
    for fields, path in cases:
        data = json.dumps(message_dict("m-bad", **fields)).encode()
        argv = ("--root", str(root), "send", "--from", "alice")
        procs.append((path, data, start(*argv, cwd=tmp_path, stdin=data)))
    for path, data, proc in procs:
        out, err = proc.communicate(data, timeout=30)
        assert proc.returncode == 65, err
        assert err.startswith(b"busd: invalid_message: schema: "), err
        assert path.encode() in err, (path, err)
        assert out == b""
    assert list((root / "outbox").rglob("*.json")) == []
    assert list(Journal(root / "journal").read()) == []


def test_error_exit_codes(root: Path, tmp_path: Path) -> None:
    """Other failures: 66 not found, 65 bad data or name, 1 OS error; never a traceback."""
    cases = [
        (["tail", "--since", "never-seen"], None, 66, "busd: not_found: "),
        (["recv", "../evil"], None, 65, "busd: invalid_name: "),
        (["send", "--from", "alice"], b"{nope", 65, "busd: invalid_message: invalid_json"),
        (["send", "--from", "alice", "absent.json"], None, 1, "busd: "),
    ]
    procs = [(c, start("--root", str(root), *c[0], cwd=tmp_path, stdin=c[1])) for c in cases]
    for (argv, stdin, code, prefix), proc in procs:
        out, err = proc.communicate(stdin, timeout=30)
        assert proc.returncode == code, (argv, err)
        assert err.decode().startswith(prefix), (argv, err)
        assert b"Traceback" not in err
        assert out == b""
    assert list(Journal(root / "journal").read()) == []


def test_send_and_recv_offline_end_to_end(root: Path, tmp_path: Path) -> None:
    """With no daemon, send routes in-process and recv hands each recipient that message."""
    sent = message_dict("e2e-1", to=["bob", "carol"], body="payload ✓")
    argv = ("--root", str(root), "send", "--from", "alice", "--json")
    out = json.loads(ok(busd(*argv, cwd=tmp_path, stdin=json.dumps(sent).encode())))
    assert out["routed"] is True
    for agent in ("bob", "carol"):
        (line,) = ok(busd("--root", str(root), "recv", agent, "--json", cwd=tmp_path)).splitlines()
        envelope = json.loads(line)
        assert envelope.pop("receipt").endswith("-001-e2e-1")
        assert decode(json.dumps(envelope).encode()) == decode(json.dumps(sent).encode())
    assert inbox(root, "bob") == inbox(root, "carol") == []
    (entry,) = Journal(root / "journal").read()
    assert (entry.event, entry.message_id, entry.to) == ("accepted", "e2e-1", ["bob", "carol"])


def test_send_while_a_daemon_holds_the_lock_leaves_routing_to_it(
    root: Path, tmp_path: Path
) -> None:
    """With busd.lock held elsewhere, send only publishes (routed: false), recv routes nothing."""
    holder = run_python(_HOLD_LOCK, str(root))
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        data = json.dumps(message_dict("m-wait")).encode()
        out = json.loads(
            ok(
                busd(
                    "--root",
                    str(root),
                    "send",
                    "--from",
                    "alice",
                    "--json",
                    cwd=tmp_path,
                    stdin=data,
                )
            )
        )
        assert out["routed"] is False
        assert Path(out["path"]).read_bytes()
        assert ok(busd("--root", str(root), "recv", "bob", cwd=tmp_path)) == ""
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=10)
    (line,) = ok(busd("--root", str(root), "recv", "bob", "--json", cwd=tmp_path)).splitlines()
    assert json.loads(line)["message_id"] == "m-wait"


def test_every_command_help_contains_an_example(tmp_path: Path) -> None:
    """`busd <command> --help` of every registered command shows an Example."""
    commands = sorted(getattr(typer.main.get_command(app), "commands", {}))
    assert commands
    procs = {name: start(name, "--help", cwd=tmp_path) for name in commands}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (name, err.decode())
        assert "Example" in out.decode(), name
