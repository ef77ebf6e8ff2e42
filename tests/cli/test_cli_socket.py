"""``busd send/recv/ack`` go through the daemon when it runs, with the same output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from busd.store.layout import init_bus
from daemon_harness import BUSD, Daemon, message

pytestmark = pytest.mark.timeout(90)


def _busd(root: Path, *args: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(
        [BUSD, "--root", str(root), *args], input=stdin, capture_output=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _round_trip(root: Path) -> tuple[dict[str, object], dict[str, object], bytes]:
    sent = json.loads(
        _busd(root, "send", "--from", "alice", "--json", "-", stdin=json.dumps(message(1)).encode())
    )
    got = json.loads(_busd(root, "recv", "bob", "--json"))
    assert isinstance(got["receipt"], str) and got["receipt"].endswith("-001-m-000001")
    acked = _busd(root, "ack", "bob", "--receipt", got.pop("receipt"))
    return sent, got, acked


def test_cli_uses_the_socket_when_the_daemon_runs(tmp_path: Path) -> None:
    """With a daemon, send reports via=socket; recv and ack work through it."""
    root = init_bus(tmp_path / "bus").root
    d = Daemon(root).ready()
    try:
        sent, got, acked = _round_trip(root)
        assert sent == {"message_id": "m-000001", "duplicate": False, "via": "socket"}
        assert got["message_id"] == "m-000001" and got["body"] == "hello 1"
        assert acked == b"acked 1\n"
        again = json.loads(
            _busd(
                root,
                "send",
                "--from",
                "alice",
                "--json",
                "-",
                stdin=json.dumps(message(1)).encode(),
            )
        )
        assert again["duplicate"] is True
        assert json.loads(_busd(root, "ack", "bob", "m-000001", "--json")) == {
            "acked": 0,
            "not_held": ["m-000001"],
        }
    finally:
        assert d.stop() == 0


def test_cli_output_is_the_same_without_a_daemon(tmp_path: Path) -> None:
    """Without a daemon the same commands print the same shapes (via=file)."""
    root = init_bus(tmp_path / "bus").root
    sent, got, acked = _round_trip(root)
    assert {k: sent[k] for k in ("message_id", "duplicate", "via")} == {
        "message_id": "m-000001",
        "duplicate": False,
        "via": "file",
    }
    assert got["message_id"] == "m-000001" and got["body"] == "hello 1"
    assert acked == b"acked 1\n"
