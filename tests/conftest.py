"""Shared fixtures: a fresh bus in tmp_path and builders of valid messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from busd.config import Config, load_config
from busd.store.layout import Layout, init_bus
from daemon_harness import Daemon


@pytest.fixture(autouse=True)
def _structlog_config() -> Iterator[None]:
    """Give every test back the logging set-up it started with: a command run in process
    (typer's CliRunner) points structlog at a stream it closes afterwards, and a later test
    would log into the closed file ("I/O operation on closed file")."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@dataclass(frozen=True)
class Bus:
    """A bus root made by ``init_bus``, its layout, and a Config loaded with ``env={}``."""

    root: Path
    layout: Layout
    config: Config

    def with_config(self, **overrides: Any) -> Config:
        """A Config for the same root with some keys set as if by command-line flags."""
        return load_config(root=str(self.root), env={}, **overrides)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fresh, initialised bus root."""
    return init_bus(tmp_path / "bus").root


@pytest.fixture
def daemon(root: Path) -> Iterator[Daemon]:
    """A running ``busd run`` on ``root`` (default config), killed at the end of the test."""
    d = Daemon(root).ready()
    yield d
    d.kill()


@pytest.fixture
def bus(tmp_path: Path) -> Bus:
    """A fresh, initialised bus under ``tmp_path/bus``."""
    root = tmp_path / "bus"
    layout = init_bus(root)
    return Bus(layout.root, layout, load_config(root=str(layout.root), env={}))


def message_dict(
    message_id: str = "m-1", *, agent_id: str = "alice", to: Any = "bob", **extra: Any
) -> dict[str, Any]:
    """A valid ``fact`` message as a JSON-ready dict; ``extra`` adds or replaces fields."""
    data: dict[str, Any] = {
        "message_type": "fact",
        "schema_version": "1.0",
        "message_id": message_id,
        "created_at": "2024-05-01T12:00:00Z",
        "workflow_id": "wf",
        "task_id": "t1",
        "agent_id": agent_id,
        "body": "hello",
    }
    if to is not None:
        data["to"] = to
    data.update(extra)
    return {k: v for k, v in data.items() if v is not None}


def message_bytes(message_id: str = "m-1", **kwargs: Any) -> bytes:
    """:func:`message_dict` encoded as JSON bytes."""
    return json.dumps(message_dict(message_id, **kwargs)).encode()


def run_python(code: str, *args: str) -> subprocess.Popen[bytes]:
    """Start ``python -c code args...`` with this interpreter; the caller waits on it."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
