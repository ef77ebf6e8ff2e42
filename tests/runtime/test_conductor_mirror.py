"""``[[conductor.mirror]]``: messages to a topic appended to a conductor-loop bus file.

The file is read back by :func:`read_messages`, written here from conductor-loop's
rules (``parseMessagesReader``): a line state machine (seek a ``---`` line, a YAML
header until ``---``, a body until the next ``---`` line, which opens the next
header; a header that does not decode is dropped; the body loses one trailing
``"\\n"`` then one ``"\\r"``; at the end of the file a body counts only if it ends in
``"\\n"``).
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from busd.core import codec, conductor
from daemon_harness import BUSD, Daemon, clean_env, drop, message, wait_for
from runtime.test_conductor_follow import append, conductor_id, entry

pytestmark = pytest.mark.timeout(90)


def read_messages(data: bytes) -> list[dict[str, Any]]:
    """The messages conductor-loop's reader finds in ``data`` (header fields + body)."""
    seek, header, body = 0, 1, 2
    state = seek
    head: list[str] = []
    text: list[str] = []
    current: dict[str, Any] | None = None
    out: list[dict[str, Any]] = []
    for line in data.decode().splitlines(keepends=True):
        trimmed = line.rstrip("\r\n")
        if state == seek:
            if trimmed == "---":
                state, head = header, []
        elif state == header:
            if trimmed == "---":
                try:
                    raw = yaml.load("".join(head), Loader=yaml.BaseLoader)
                except yaml.YAMLError:
                    head, current = [], None
                    continue
                current = dict(raw) if isinstance(raw, dict) else None
                if current is None:
                    head = []
                    continue
                text, state = [], body
            else:
                head.append(line)
        elif trimmed == "---":
            if current is not None:
                out.append({**current, "body": _finalize("".join(text))})
            head, state = [], header
        else:
            text.append(line)
    rest = "".join(text)
    if state == body and current is not None and rest.endswith("\n"):
        out.append({**current, "body": _finalize(rest)})
    return out


def _finalize(body: str) -> str:
    return body.removesuffix("\n").removesuffix("\r")


def mirror_config(root: Path, path: Path, topic: str = "releases", extra: str = "") -> None:
    (root / "busd.toml").write_text(
        f"rescan_interval_seconds = 0.5\n{extra}"
        f'[[conductor.mirror]]\npath = "{path}"\ntopic = "{topic}"\n'
    )


def mirrored(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [m for m in read_messages(path.read_bytes()) if "busd_message_id" in m.get("meta", {})]


def busd_ids(path: Path) -> list[str]:
    return [m["meta"]["busd_message_id"] for m in mirrored(path)]


def test_topic_messages_appear_once_in_conductor_format(root: Path, tmp_path: Path) -> None:
    """Published to topic:releases, each message is appended once, in order, readable by
    conductor's rules with its fields; what conductor agents wrote stays; created 0600."""
    bus = tmp_path / "out" / "MESSAGE-BUS.md"
    bus.parent.mkdir()
    mirror_config(root, bus)
    d = Daemon(root).ready()
    try:
        for i in range(5):
            drop(root, message(i, to="topic:releases", task_id=f"t{i}"), f"{i}.json")
        wait_for(lambda: len(busd_ids(bus)) == 5, what="5 mirrored messages")
        append(bus, entry(1))  # a conductor agent writes to the same file meanwhile
        for i in range(5, 8):
            drop(root, message(i, to="topic:releases"), f"{i}.json")
        wait_for(lambda: len(busd_ids(bus)) == 8, what="3 more")
    finally:
        assert d.stop() == 0
    assert busd_ids(bus) == [f"m-{i:06d}" for i in range(8)]
    everything = read_messages(bus.read_bytes())
    assert [m["msg_id"] for m in everything].count(conductor_id(1)) == 1
    assert len(everything) == 9
    first = mirrored(bus)[0]
    assert first["msg_id"].startswith("MSG-")
    assert first["type"] == "FACT"
    assert first["task_id"] == "t0"
    # conductor's reader keeps the separator's line break in every body but the last.
    assert first["body"] == "hello 0\n"
    assert mirrored(bus)[-1]["body"] == "hello 7"
    assert first["meta"]["agent_id"] == "alice"
    assert oct(bus.stat().st_mode & 0o777) == "0o600"
    assert not any((root / "inbox").glob("conductor-mirror.*/*.json"))  # all acked


def test_mirror_survives_a_restart_and_an_unwritable_file(root: Path, tmp_path: Path) -> None:
    """Messages published while the daemon is down, or while the file's directory is
    missing, wait in the mirror's queue and are appended once when they can be."""
    out = tmp_path / "later"
    bus = out / "MESSAGE-BUS.md"
    mirror_config(root, bus)
    d = Daemon(root).ready()
    try:
        for i in range(3):
            drop(root, message(i, to="topic:releases"), f"{i}.json")
        d.wait_event("conductor_mirror_failed")
        out.mkdir()
        wait_for(lambda: len(busd_ids(bus)) == 3, what="the 3 once the directory exists")
        status = subprocess.run(
            [BUSD, "status", "--root", str(root), "--json"],
            capture_output=True,
            env=clean_env(),
            timeout=30,
            check=True,
        )
        agents = json.loads(status.stdout)["agents"]
        assert any(a.startswith("conductor-mirror.") for a in agents), agents
    finally:
        assert d.stop() == 0
    for i in range(3, 6):
        drop(root, message(i, to="topic:releases"), f"{i}.json")
    d = Daemon(root).ready()
    try:
        wait_for(lambda: len(busd_ids(bus)) == 6, what="the 3 published while down")
    finally:
        assert d.stop() == 0
    assert busd_ids(bus) == [f"m-{i:06d}" for i in range(6)]


def test_message_already_in_the_file_is_not_appended_again(root: Path, tmp_path: Path) -> None:
    """A crash after the append and before the ack: the file already holds the entry
    (the same conductor id) when the message is handed out again; it is acked, not
    appended a second time."""
    bus = tmp_path / "MESSAGE-BUS.md"
    mirror_config(root, bus)
    raw = json.dumps(message(1, to="topic:releases")).encode()
    append(bus, conductor.from_message(codec.decode(raw)))
    drop(root, raw, "1.json")
    drop(root, message(2, to="topic:releases"), "2.json")
    d = Daemon(root).ready()
    try:
        wait_for(lambda: len(busd_ids(bus)) == 2, what="message 2 mirrored")
        time.sleep(0.3)
    finally:
        assert d.stop() == 0
    assert busd_ids(bus) == ["m-000001", "m-000002"]
    assert not any((root / "inbox").glob("conductor-mirror.*/*.json"))  # both acked


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_between_append_and_ack_writes_nothing_twice(root: Path, tmp_path: Path) -> None:
    """SIGKILL in a loop while messages keep coming and are mirrored: each is in the file
    once (a kill between the append and the ack is skipped by id after the restart)."""
    bus = tmp_path / "MESSAGE-BUS.md"
    mirror_config(root, bus, extra="lease_seconds = 1\n")
    rng = random.Random(7)
    n = 0
    for kill in range(12):
        for _ in range(12):
            drop(root, message(n, to="topic:releases"), f"{n:04d}.json")
            n += 1
        d = Daemon(root)
        if kill % 2:
            with contextlib.suppress(AssertionError):
                d.ready()
        time.sleep(rng.uniform(0.02, 0.4))
        d.kill()
    d = Daemon(root).ready()
    try:
        wait_for(lambda: len(busd_ids(bus)) >= n, timeout=30, what="every message mirrored")
        time.sleep(0.5)
    finally:
        assert d.stop() == 0
    got = busd_ids(bus)
    assert len(got) == len(set(got)) == n, f"{len(got)} entries for {len(set(got))} ids"
    assert sorted(got) == [f"m-{i:06d}" for i in range(n)]


def test_daemon_less_routing_fills_the_mirror_queue(tmp_path: Path) -> None:
    """A routing pass without a daemon routes topic messages to the mirror's queue too, so a
    mirror misses nothing sent while the daemon was down (Rules apply with_mirrors)."""
    from busd.config import load_config, mirror_agent
    from busd.routing.offline import route_pending
    from busd.store.layout import init_bus

    root = tmp_path / "bus"
    init_bus(root)
    mirror_config(root, tmp_path / "BUS.md", topic="releases")
    drop(root, message(1, to="topic:releases"), "m1.json")
    cfg = load_config(root=str(root), env={})
    assert route_pending(cfg) is not None
    agent = mirror_agent(cfg, cfg.conductor.mirror[0])
    (delivered,) = (root / "inbox" / agent).iterdir()
    assert codec.decode(delivered.read_bytes()).to == "topic:releases"
