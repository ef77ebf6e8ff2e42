"""Security: who may reach the bus, file modes, no path escape, safe parsing, size limits.

The threat model: message contents, file names in outboxes and socket requests are
untrusted; the bus directory tree itself belongs to its owner (anyone who can write
``inbox/`` or ``dlq/`` directly is that user). See docs/guarantees.md.
Peer credentials (SO_PEERCRED) for a second uid are tested in
tests/test_server.py::test_peer_with_another_uid_is_refused.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _chaos import ChaosDaemon, report, rss_kb

from _rpc import Rpc
from busd.store.layout import init_bus
from daemon_harness import BUSD, drop, files, message, wait_for

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
_needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")

_OTHER_UID_CONNECT = r"""
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print("connected")
except PermissionError:
    print("EACCES")
"""


@_needs_root
def test_other_uid_cannot_even_reach_the_socket(tmp_path: Path) -> None:
    """With the default 0700 root, another uid gets EACCES before any byte is exchanged
    (the SO_PEERCRED check behind it is tested in tests/test_server.py)."""
    os.chmod(tmp_path, 0o755)
    root = init_bus(tmp_path / "bus").root
    d = ChaosDaemon(root).ready()
    try:
        out = subprocess.run(
            [sys.executable, "-c", _OTHER_UID_CONNECT, str(root / "busd.sock")],
            capture_output=True,
            timeout=20,
            check=True,
        )
        assert out.stdout.decode().strip() == "EACCES"
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(root / "busd.sock").st_mode) == 0o600
    finally:
        d.kill()


def _umask(mask: int) -> Callable[[], None]:
    def set_umask() -> None:
        os.umask(mask)

    return set_umask


def _wide(root: Path) -> list[str]:
    """Everything under ``root`` that group or others may read, write or search."""
    out = []
    for dirpath, dirnames, names in os.walk(root):
        for n in (*dirnames, *names):
            p = Path(dirpath) / n
            mode = stat.S_IMODE(os.lstat(p).st_mode)
            if not stat.S_ISLNK(os.lstat(p).st_mode) and mode & 0o077:
                out.append(f"{oct(mode)} {p.relative_to(root)}")
    return out


def test_everything_busd_creates_is_private_even_under_umask_000(tmp_path: Path) -> None:
    """``busd init`` and a daemon started with umask 000: every directory is 0700 and every
    file busd writes (deliveries, journal, checkpoint, ledger, DLQ entries and records,
    locks, socket) is private to the owner."""
    root = tmp_path / "bus"
    subprocess.run([BUSD, "init", str(root)], check=True, capture_output=True, preexec_fn=_umask(0))
    proc = subprocess.Popen(
        [BUSD, "run", "--root", str(root), "--log-format", "json"],
        stderr=subprocess.DEVNULL,
        preexec_fn=_umask(0),
    )
    try:
        wait_for(lambda: (root / "busd.sock").exists(), what="the socket")
        time.sleep(0.3)
        with Rpc(root / "busd.sock") as c:
            c("publish", {"message": message(1)})
            c("publish", {"message": message(2, to="carol")})
            assert "error" in c.call("publish", {"message": {"not": "valid"}})
            msgs = c("fetch", {"agent_id": "bob", "max": 5})["messages"]
            c("ack", {"agent_id": "bob", "message_ids": [m["message"]["message_id"] for m in msgs]})
            c("subscribe", {"agent_id": "dave", "topics": ["news"]})
        time.sleep(1.5)  # a checkpoint
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    made = {p.relative_to(root).as_posix() for p in root.rglob("*")}
    assert {
        "journal/checkpoint",
        "processed/bob.jsonl",
        "inbox/carol",
        "subscriptions.json",
    } <= made
    assert any(n.startswith("dlq/") and n.endswith(".reason.json") for n in made)
    assert _wide(root) == []


def test_dead_lettered_producer_file_is_not_world_readable(tmp_path: Path) -> None:
    """A producer wrote its (invalid) file 0644; once dead-lettered it is 0600."""
    root = init_bus(tmp_path / "bus").root
    d = ChaosDaemon(root).ready()
    try:
        path = drop(root, b"not json", "bad.json")
        os.chmod(path, 0o644)
        wait_for(lambda: list((root / "dlq").glob("*.reason.json")), what="the DLQ entry")
        assert _wide(root / "dlq") == []
    finally:
        d.kill()


# -- no path from a message leads outside the root ----------------------------------------

_HOSTILE = [
    "../../escape",
    "../../../../../../tmp/busd-escape",
    "/tmp/busd-escape",
    "..",
    "a/../../b",
    "a\\..\\..\\b",
    "C:\\busd-escape",
    "a\x00b",
    ".hidden",
    "con",
    "x" * 300,
]
_FIELDS = ("message_id", "agent_id", "to", "attachment_path", "idempotency_key", "workflow_id")


def _hostile_messages() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for field in _FIELDS:
        for value in _HOSTILE:
            out.append(message(len(out), **{field: value}))
    out.append(message(len(out), to=["bob", "../../escape"]))
    out.append(message(len(out), parents=["../../escape"]))
    out.append(message(len(out), to="topic:../../escape"))
    out.append(
        message(len(out), message_type="task_assignment", to=None, assigned_to="../../escape")
    )
    return out


_PATH_CALLS = {
    "openat": 1, "open": 0, "creat": 0, "mkdir": 0, "mkdirat": 1, "rename": 0,
    "renameat": 1, "renameat2": 1, "link": 0, "linkat": 1, "symlink": 1, "symlinkat": 2,
    "unlink": 0, "unlinkat": 1, "rmdir": 0, "chmod": 0, "fchmodat": 1, "chown": 0,
    "fchownat": 1, "truncate": 0, "utimensat": 1, "newfstatat": 1, "readlink": 0,
    "readlinkat": 1, "access": 0, "faccessat2": 1, "statx": 1,
}  # fmt: skip
_MUTATING = {
    "creat", "mkdir", "mkdirat", "rename", "renameat", "renameat2", "link", "linkat",
    "symlink", "symlinkat", "unlink", "unlinkat", "rmdir", "chmod", "fchmodat", "chown",
    "fchownat", "truncate", "utimensat",
}  # fmt: skip
# tempfile.gettempdir() probes its directory with a random 8-character file at import
# (portalocker imports it); nothing a message controls.
_PROBE = re.compile(re.escape(tempfile.gettempdir()) + r"/[a-z0-9_]{8}\Z|/dev/")
_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')
_DIRFD = re.compile(r"(AT_FDCWD|\d+)<([^>]*)>")


def _paths(call: str, args: str) -> list[str]:
    """Absolute paths named by one strace line's arguments (dirfd-relative ones resolved)."""
    strings = [s.encode().decode("unicode_escape") for s in _STR.findall(args)]
    dirfds = [m.group(2) for m in _DIRFD.finditer(args)]
    out = []
    for i, s in enumerate(strings):
        if s.startswith("/"):
            out.append(os.path.normpath(s))
        elif dirfds:
            base = dirfds[min(i, len(dirfds) - 1)]
            out.append(os.path.normpath(os.path.join(base, s)))
    return out


def test_no_path_from_a_message_or_request_leaves_the_bus_root(tmp_path: Path) -> None:
    """Hostile values in every name-like field, by socket and by file, and hostile names
    in every request that takes one: under strace, every file busd creates, changes or
    removes is inside the bus root, and it never opens the planted secret."""
    root = init_bus(tmp_path / "bus").root
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    trace = tmp_path / "trace.out"
    prefix = ["strace", "-f", "-y", "-s", "4096", "-o", str(trace), "-e",
              "trace=" + ",".join(_PATH_CALLS)]  # fmt: skip
    if not os.path.exists("/usr/bin/strace"):
        pytest.skip("needs strace")
    d = ChaosDaemon(root, prefix=prefix).ready(timeout=60)
    msgs = _hostile_messages()
    pid = 0
    try:
        with Rpc(root / "busd.sock", timeout=30) as c:
            pid = c("ping")["pid"]
            for m in msgs:
                c.call("publish", {"message": m})
            for i, m in enumerate(msgs):
                drop(root, m, f"hostile-{i:03d}.json")
            front = "---\nmsg_id: fm-1\nts: 2026-11-21T12:00:00Z\ntype: fact\nworkflow_id: w\n"
            drop(root, (front + "task_id: t\nagent_id: ../../escape\n---\nx").encode(), "fm.md")
            for name in ("../../secret.txt", str(secret), "../secret.txt", "..", "x/../../y"):
                c.call("dlq.show", {"name": name})
                c.call("replay", {"names": [name], "to": "bob"})
                c.call("fetch", {"agent_id": name})
                c.call("ack", {"agent_id": "bob", "message_ids": [name]})
                c.call("nack", {"agent_id": "bob", "message_id": name})
                c.call("extend", {"agent_id": "bob", "message_id": name, "lease_s": 1})
                c.call("publish", {"message": message(0), "sender": name})
            c.call("replay", {"all": True, "to": "../../escape"})
            wait_for(lambda: not files(root / "outbox" / "alice"), what="all files handled")
            assert "pid" in c("ping")
        os.kill(pid, signal.SIGTERM)
        assert d.proc.wait(30) == 0
    finally:
        if pid and d.alive():
            os.kill(pid, signal.SIGKILL)
        d.kill()
    inside = os.path.realpath(root) + os.sep
    escaped: list[str] = []
    touched_secret: list[str] = []
    checked = 0
    for raw in trace.read_text(errors="replace").splitlines():
        line = re.match(r"^\d+\s+(\w+)\((.*)$", raw)
        if line is None or line.group(1) not in _PATH_CALLS:
            continue
        call, args = line.group(1), line.group(2)
        writes = call in _MUTATING or (
            call in ("openat", "open") and re.search(r"O_CREAT|O_WRONLY|O_RDWR|O_TRUNC", args)
        )
        for p in _paths(call, args):
            checked += 1
            if p == str(secret) or p.endswith("/etc/passwd"):
                touched_secret.append(raw[:200])
            if writes and not (p + os.sep).startswith(inside) and not _PROBE.match(p):
                escaped.append(raw[:200])
    report("path escape (strace)", hostile_messages=len(msgs) * 2 + 1, paths_checked=checked)
    assert checked > 500
    assert not escaped, escaped[:10]
    assert not touched_secret, touched_secret[:10]
    assert not list(tmp_path.glob("**/busd-escape")) and not Path("/tmp/busd-escape").exists()


# -- safe parsing -----------------------------------------------------------------------------

_FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
_FORBIDDEN_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle"}
_UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
_UNSAFE_YAML_CLASSES = {"Loader", "UnsafeLoader", "FullLoader", "UnsafeConstructor"}


def _sources() -> list[Path]:
    return sorted([*(REPO / "broker" / "busd").rglob("*.py"), *(REPO / "clients").rglob("*.py")])


def test_no_eval_no_pickle_only_safe_yaml_in_the_code() -> None:
    """The broker and its clients never eval/exec, never unpickle, and read YAML only
    through a SafeLoader (the Markdown decoder's own, which also refuses tags and aliases)."""
    problems = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            call = isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            if call and node.func.id in _FORBIDDEN_CALLS:  # type: ignore[attr-defined]
                problems.append(f"{where} calls {node.func.id}")  # type: ignore[attr-defined]
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names]
                mod = node.module if isinstance(node, ast.ImportFrom) else None
                for n in [mod, *names]:
                    if n and n.split(".")[0] in _FORBIDDEN_MODULES:
                        problems.append(f"{where} imports {n}")
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "yaml"
                and node.attr in _UNSAFE_YAML | _UNSAFE_YAML_CLASSES
            ):
                problems.append(f"{where} uses yaml.{node.attr}")
    assert problems == []
    codec = (REPO / "broker" / "busd" / "core" / "codec.py").read_text()
    assert "class _FrontMatterLoader(yaml.SafeLoader)" in codec


# -- size limits ---------------------------------------------------------------------------------


def test_dlq_record_reads_are_bounded(tmp_path: Path) -> None:
    """A huge DLQ reason record is skipped or refused without being read whole."""
    root = init_bus(tmp_path / "bus").root
    (root / "dlq" / "00000000000000000001-huge").write_bytes(b"x")
    with open(root / "dlq" / "00000000000000000001-huge.reason.json", "wb") as f:
        f.write(b'{"reason": "schema", "detail": "')
        f.truncate(1 << 30)
    d = ChaosDaemon(root).ready()
    try:
        base = rss_kb(d.proc.pid)
        peak = base

        def sample() -> None:
            nonlocal peak
            peak = max(peak, rss_kb(d.proc.pid))

        with Rpc(root / "busd.sock", timeout=60) as c:
            c.send("dlq.list", {})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                sample()
                try:
                    c.read(timeout=0.05)
                    break
                except TimeoutError:
                    continue
        sample()
        assert peak - base < 64 * 1024, f"RSS peaked {(peak - base) >> 10} MiB higher"
    finally:
        d.kill()
