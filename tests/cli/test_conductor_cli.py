"""``busd import conductor`` / ``busd export conductor`` as real processes on tmp_path buses,
with the daemon stopped and running; exports read back by a parser written from
conductor-loop's ReadMessages / PollForNew rules (independent of busd.core.conductor)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from busd.store import dlq
from busd.store.journal import Journal
from busd.store.layout import Layout
from daemon_harness import BUSD, Daemon, clean_env, wait_for

FIXTURES = Path(__file__).parent.parent / "fixtures" / "conductor"
BUS = FIXTURES / "all-types-MESSAGE-BUS.md"
# what conductor reads in the fixture: 6 legacy lines + 15 messages; 3 records it drops
MESSAGES, DROPPED = 21, 3

pytestmark = pytest.mark.timeout(120)


def busd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BUSD, *args], capture_output=True, text=True, cwd=cwd, env=clean_env(), timeout=60,
        check=False,
    )  # fmt: skip


def _import(root: Path, *paths: str, to: str = "ops") -> dict[str, Any]:
    done = busd("import", "conductor", *paths, "--to", to, "--json", "--root", str(root), cwd=root)
    assert done.returncode in (0, 65), done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert (done.returncode == 65) == bool(report["dead_lettered"])
    return report


# ------------------------------------------------- a parser following conductor's rules


def _null(v: Any) -> str:
    return "" if v is None else str(v)


def read_messages(data: bytes, since: str = "") -> list[dict[str, Any]]:
    """conductor-loop's parseMessagesReader + filterSince, from its Go code's behaviour."""
    out: list[dict[str, Any]] = []
    state, header, body = "seek", b"", b""
    current: dict[str, Any] | None = None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    raw_lines = [line + b"\n" for line in lines]
    if data and not data.endswith(b"\n"):
        raw_lines[-1] = raw_lines[-1][:-1]
    for line in raw_lines:
        trimmed = line.rstrip(b"\r\n")
        if state == "seek":
            if trimmed == b"---":
                state, header = "header", b""
        elif state == "header":
            if trimmed == b"---":
                try:
                    doc = yaml.load(header.decode(), Loader=yaml.BaseLoader) or {}
                    assert isinstance(doc, dict)
                except Exception:  # noqa: BLE001 - conductor drops any header it cannot decode
                    header, current = b"", None
                    continue
                current = {k: _null(doc.get(k)) for k in ("msg_id", "ts", "type")}
                assert current is not None
                current.update({k: _null(doc.get(k)) for k in ("project_id", "task_id", "run_id")})
                current["parents"] = doc.get("parents") or []
                current["meta"] = doc.get("meta") or {}
                state, body = "body", b""
            else:
                header += line
        elif trimmed == b"---":
            if current is not None:
                current["body"] = body.decode().removesuffix("\n").removesuffix("\r")
                out.append(current)
            state, header = "header", b""
        else:
            body += line
    if state == "body" and current is not None and body.endswith(b"\n"):
        current["body"] = body.decode().removesuffix("\n").removesuffix("\r")
        out.append(current)
    if since:
        ids = [m["msg_id"] for m in out]
        return out[ids.index(since) + 1 :]
    return out


# ------------------------------------------------- import


def test_import_with_the_daemon_stopped_twice_imports_each_message_once(root: Path) -> None:
    first = _import(root, str(BUS))
    assert first["via"] == "file"
    assert (first["messages"], first["imported"], first["duplicate"]) == (
        MESSAGES + DROPPED,
        MESSAGES,
        0,
    )
    assert first["dead_lettered"] == {"schema": DROPPED}
    again = _import(root, str(FIXTURES))  # the directory: *MESSAGE-BUS.md found in it
    assert (again["imported"], again["duplicate"]) == (0, MESSAGES)
    with Journal(Layout(root).journal) as journal:
        accepted = [e.message_id for e in journal.read(events={"accepted"})]
        dead = [e for e in journal.read(events={"dead_lettered"})]
    assert len(accepted) == len(set(accepted)) == MESSAGES
    assert len(dead) >= DROPPED  # journaled by the import itself
    entries = dlq.list_entries(Layout(root))
    assert len(entries) == DROPPED  # the second import wrote no second entry (dlq.find)
    raws = {e.data() for e in entries}
    assert b"---\nafter the rule\n\n" in raws  # the original bytes
    assert any("at byte" in e.record.detail and str(BUS) in e.record.detail for e in entries)


def test_import_with_the_daemon_running(root: Path) -> None:
    daemon = Daemon(root).ready()
    try:
        report = _import(root, str(BUS))
        assert report["via"] == "socket"
        assert (report["imported"], report["dead_lettered"]) == (MESSAGES, {"schema": DROPPED})
        again = _import(root, str(BUS))
        assert (again["imported"], again["duplicate"]) == (0, MESSAGES)
        # a two-message file dropped into an outbox is refused, never one message
        outbox = root / "outbox" / "alice"
        outbox.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / "two-messages.md", outbox / "two.md")
        entry = wait_for(
            lambda: next(
                (
                    e
                    for e in dlq.list_entries(Layout(root))
                    if e.record.reason == "multiple_messages"
                ),
                None,
            ),
            what="the multiple_messages dead letter",
        )
        assert entry.data() == (FIXTURES / "two-messages.md").read_bytes()
    finally:
        daemon.kill()


# ------------------------------------------------- export


def test_export_is_read_back_by_conductors_rules_and_is_idempotent(root: Path) -> None:
    (root / "busd.toml").write_text('[subscriptions]\ncl = ["watcher"]\n')
    assert _import(root, str(BUS), to="topic:cl")["imported"] == MESSAGES
    native = {
        "schema_version": "1.0", "message_type": "task_assignment", "message_id": "native-1",
        "workflow_id": "wf", "task_id": "t", "agent_id": "Builder Agent", "to": "topic:cl",
        "priority": "medium", "inputs": {"n": 900}, "body": "do it\n",
    }  # fmt: skip
    sent = subprocess.run(
        [BUSD, "send", "--from", "alice", "-", "--root", str(root)],
        input=json.dumps(native).encode(), capture_output=True, env=clean_env(), timeout=60,
        check=False,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    out = root.parent / "EXPORT-MESSAGE-BUS.md"
    done = busd(
        "export", "conductor", str(out), "--topic", "cl", "--json", "--root", str(root), cwd=root
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["appended"] == MESSAGES + 1
    back = read_messages(out.read_bytes())
    assert len(back) == MESSAGES + 1
    original = {m["msg_id"]: m for m in read_messages(BUS.read_bytes())}
    for msg in back[:-1]:
        if msg["msg_id"].startswith("LEGACY-LINE-"):
            continue
        want = original[msg["msg_id"]]
        for key in ("ts", "type", "project_id", "task_id", "run_id", "meta"):
            assert msg[key] == want[key], (msg["msg_id"], key)
        # conductor reads a body followed by another entry with the separator's newline
        assert msg["body"].rstrip("\r\n") == want["body"].rstrip("\r\n")
    last = back[-1]
    assert last["type"] == "TASK_ASSIGNMENT" and last["body"] == "do it"
    assert last["meta"]["busd_message_id"] == "native-1"
    assert last["meta"]["agent_id"] == "Builder Agent"
    assert json.loads(last["meta"]["inputs"]) == {"n": 900}
    assert read_messages(out.read_bytes(), since=back[-2]["msg_id"]) == [last]  # PollForNew
    again = busd(
        "export", "conductor", str(out), "--topic", "cl", "--json", "--root", str(root), cwd=root
    )
    assert json.loads(again.stdout)["appended"] == 0
    assert len(read_messages(out.read_bytes())) == MESSAGES + 1
