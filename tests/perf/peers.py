"""The peers' servers: Redis (Unix socket) and NATS (loopback), each in a temp dir.

Both run in their durable modes: Redis with ``appendonly yes`` and ``appendfsync
always``; NATS JetStream with a file store and ``sync_interval: always`` when the
server knows the option (added in nats-server 2.10.0).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

# tests/ is on sys.path (bench.py puts it there, as pytest does): the one NatsServer.
from nats_harness import NatsServer as _HarnessNats

VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def _stop(proc: subprocess.Popen[bytes] | None, directory: Path) -> None:
    """Terminate a peer server (kill it after 20 s) and remove its directory."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(directory, ignore_errors=True)


class RedisServer:
    """``redis-server`` on a Unix socket with AOF ``appendfsync always``; no RDB snapshots."""

    def __init__(self, workdir: Path, binary: str = "redis-server") -> None:
        self.dir = workdir
        self.binary = binary
        self.socket = workdir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def version(binary: str = "redis-server") -> str:
        return _version([binary, "--version"])

    def start(self) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "port 0",
                    f"unixsocket {self.socket}",
                    "unixsocketperm 700",
                    f"dir {self.dir}",
                    "appendonly yes",
                    "appendfsync always",
                    'save ""',
                    "daemonize no",
                    f"logfile {self.dir / 'redis.log'}",
                    "",
                ]
            )
        )
        self.proc = subprocess.Popen([self.binary, str(conf)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(str(self.socket))
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: see {self.dir / 'redis.log'}")
            time.sleep(0.05)

    def config(self, key: str) -> str:
        import redis

        r = redis.Redis(unix_socket_path=str(self.socket))
        value = r.config_get(key)[key]
        r.close()
        return str(value)

    def flush(self) -> None:
        import redis

        r = redis.Redis(unix_socket_path=str(self.socket))
        r.flushall()
        r.close()

    def stop(self) -> None:
        _stop(self.proc, self.dir)


def nats_supports_sync_always(binary: str) -> bool:
    """Whether ``binary`` accepts ``jetstream { sync_interval: always }`` (``-t`` test run)."""
    probe = Path("/tmp") / f"busd-bench-nats-probe-{time.time_ns()}.conf"
    probe.write_text('jetstream {\n  store_dir: "/tmp/nats-probe"\n  sync_interval: always\n}\n')
    try:
        out = subprocess.run([binary, "-c", str(probe), "-t"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        probe.unlink()
    return out.returncode == 0


class NatsServer(_HarnessNats):
    """``nats-server -js`` on 127.0.0.1, file store in the temp dir (tests/nats_harness.py);
    :meth:`stop` also removes the store, as the other peers do."""

    def __init__(self, workdir: Path, binary: str, sync_always: bool) -> None:
        super().__init__(workdir, binary, sync_always)

    def start(self) -> NatsServer:
        super().start()
        return self

    def stop(self) -> None:
        self.close()


async def nats_reset_stream(url: str, stream: str, subject: str) -> None:
    """(Re)create the file-backed stream ``stream`` on ``subject``."""
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await js.delete_stream(stream)
    except Exception:  # noqa: BLE001 - not there yet
        pass
    await js.add_stream(StreamConfig(name=stream, subjects=[subject], storage=StorageType.FILE))
    await nc.close()


async def nats_add_consumer(url: str, stream: str, durable: str) -> None:
    """A durable pull consumer with explicit acks."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_consumer(
        stream,
        ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
    )
    await nc.close()
