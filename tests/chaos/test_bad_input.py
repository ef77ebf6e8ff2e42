"""Bad input never takes the broker down: each is answered by a clear error or a DLQ entry
with a reason, and the daemon stays up and keeps serving.

Files: one table (``FILE_CASES``) dropped into a running daemon's outbox at once; each
row names the outcome: a DLQ entry with its reason (and a ``dead_lettered`` journal
line), or acceptance. Socket: lines that never end, a 100 MiB line, 10,000 idle
connections, clients that never read, and malformed JSON-RPC beyond test_server.py.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _chaos import ChaosDaemon, dlq_records, journal_entries, report, rss_kb, scale

from _rpc import Rpc
from busd.store.layout import init_bus, parse_delivery_name
from daemon_harness import files, message, wait_for

pytestmark = pytest.mark.timeout(180)

SECRET = b"TOP-SECRET-7f3a9c do not leak"


def _json(**fields: Any) -> bytes:
    return json.dumps(message(0, **fields)).encode()


def _without(*names: str) -> bytes:
    m = message(0)
    for n in names:
        m.pop(n)
    return json.dumps(m).encode()


def _front(header: str, body: str = "hello\n") -> bytes:
    return f"---\n{header}---\n{body}".encode()


_HEADER = (
    "msg_id: {mid}\nts: 2026-11-21T12:00:00Z\ntype: FACT\nworkflow_id: w1\n"
    "task_id: t1\nagent_id: alice\nto: bob\n"
)
_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


@dataclass(frozen=True)
class Case:
    """One bad (or tricky) input: ``make(path)`` creates it at ``path`` in an outbox."""

    make: Callable[[Path], None]
    outcome: str  # a DLQ reason, or "accepted"


def _tmp(path: Path) -> Path:
    return path.parent.parent.parent / "tmp" / f"case-{abs(hash(path.name))}"


def _bytes(data: bytes) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        tmp = _tmp(path)
        tmp.write_bytes(data)
        os.rename(tmp, path)

    return make


def _sparse(size: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        tmp = _tmp(path)
        with open(tmp, "wb") as f:
            f.write(_json(message_id="sparse")[:-1])
            f.truncate(size)
        os.rename(tmp, path)

    return make


def _symlink_to_secret(path: Path) -> None:
    secret = path.parent.parent.parent.parent / "secret.txt"
    secret.write_bytes(SECRET)
    os.symlink(secret, path)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "inner.json").write_bytes(_json(message_id="inside-a-dir"))


def _other_owner(path: Path) -> None:
    _bytes(_json(message_id="other-owner"))(path)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)


_PYTHON_TAG = "!!python/object/apply:os.system ['touch {marker}']"

FILE_CASES: dict[str, Case] = {
    # -- not a message at all
    "empty file": Case(_bytes(b""), "invalid_json"),
    "only whitespace": Case(_bytes(b" \n\t\n"), "invalid_json"),
    "invalid json": Case(_bytes(b'{"schema_version": "1.0", '), "invalid_json"),
    "single quotes": Case(_bytes(b"{'a': 1}"), "invalid_json"),
    "NaN": Case(_bytes(b'{"a": NaN}'), "invalid_json"),
    "NUL byte between tokens": Case(_bytes(b'{"a":\x00 1}'), "invalid_json"),
    "trailing garbage": Case(_bytes(_json() + b"}x"), "invalid_json"),
    "invalid utf-8": Case(_bytes(b'{"body": "caf\xe9"}'), "invalid_utf8"),
    "invalid utf-8 in a valid message": Case(
        _bytes(_json(body="BODY").replace(b"BODY", b"\xff\xfe")), "invalid_utf8"
    ),
    "utf-16": Case(_bytes(_json().decode().encode("utf-16")), "invalid_utf8"),
    "json array": Case(_bytes(b"[1, 2, 3]"), "schema"),
    "json string": Case(_bytes(b'"a message"'), "schema"),
    "json number": Case(_bytes(b"42"), "schema"),
    "json null": Case(_bytes(b"null"), "schema"),
    "100,000 nested arrays": Case(_bytes(b"[" * 100_000 + b"]" * 100_000), "invalid_json"),
    "100,000 nested objects in metadata": Case(
        _bytes(_json()[:-1] + b', "metadata": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001),
        "invalid_json",
    ),
    "65 levels in metadata": Case(
        _bytes(_json()[:-1] + b', "metadata": ' + b'{"a":' * 65 + b"1" + b"}" * 66), "schema"
    ),
    "1 GiB sparse file": Case(_sparse(1 << 30), "too_large"),
    "one byte over the limit": Case(_sparse(1_048_577), "too_large"),
    "5000-digit number": Case(
        _bytes(_json()[:-1] + b', "metadata": {"n": ' + b"9" * 5000 + b"}}"), "schema"
    ),
    # -- a message that breaks the contract
    "wrong type (task_id: 5)": Case(_bytes(_json(task_id=5)), "schema"),
    "wrong type (to: {})": Case(_bytes(_json(to={})), "schema"),
    "required field null": Case(
        _bytes(_json(workflow_id=None)[:-1] + b', "workflow_id": null}'), "schema"
    ),
    "missing workflow_id": Case(_bytes(_without("workflow_id")), "schema"),
    "missing message_id": Case(_bytes(_without("message_id")), "schema"),
    "missing everything": Case(_bytes(b"{}"), "schema"),
    "unknown field": Case(_bytes(_json(colour="blue")), "schema"),
    "unknown message_type": Case(_bytes(_json(message_type="gossip")), "schema"),
    "message_type upper case": Case(_bytes(_json(message_type="FACT")), "schema"),
    "schema_version 2.0": Case(_bytes(_json(schema_version="2.0")), "unsupported_schema_version"),
    "schema_version 1.0.1": Case(_bytes(_json(schema_version="1.0.1")), "schema"),
    "schema_version number": Case(_bytes(_json(schema_version=1.0)), "schema"),
    "created_at without offset": Case(_bytes(_json(created_at="2026-11-21T12:00:00")), "schema"),
    # -- names that could become paths
    "message_id with /": Case(_bytes(_json(message_id="a/b")), "schema"),
    "message_id ..": Case(_bytes(_json(message_id="..")), "schema"),
    "message_id ../../etc/passwd": Case(_bytes(_json(message_id="../../etc/passwd")), "schema"),
    "message_id with backslash": Case(_bytes(_json(message_id="a\\b")), "schema"),
    "message_id with NUL": Case(_bytes(_json(message_id="a\x00b")), "schema"),
    "message_id with colon": Case(_bytes(_json(message_id="c:x")), "schema"),
    "message_id leading dot": Case(_bytes(_json(message_id=".hidden")), "schema"),
    "message_id with newline": Case(_bytes(_json(message_id="a\n")), "schema"),
    "message_id 10,000 chars": Case(_bytes(_json(message_id="m" * 10_000)), "schema"),
    "message_id CON (safe: never a bare name)": Case(_bytes(_json(message_id="CON")), "accepted"),
    "agent_id with / (free text: never a directory)": Case(
        _bytes(_json(message_id="free-1", agent_id="a/b")), "accepted"
    ),
    "to with /": Case(_bytes(_json(to="a/b")), "schema"),
    "agent_id .. (free text: never a directory)": Case(
        _bytes(_json(message_id="free-2", agent_id="..")), "accepted"
    ),
    "to ..": Case(_bytes(_json(to="..")), "schema"),
    "agent_id with backslash (free text: never a directory)": Case(
        _bytes(_json(message_id="free-3", agent_id="a\\b")), "accepted"
    ),
    "to with backslash": Case(_bytes(_json(to="a\\b")), "schema"),
    "agent_id with NUL": Case(_bytes(_json(agent_id="a\x00")), "schema"),
    "agent_id with colon (free text: never a directory)": Case(
        _bytes(_json(message_id="free-4", agent_id="a:b")), "accepted"
    ),
    "to with colon": Case(_bytes(_json(to="a:b")), "schema"),
    "agent_id leading dot (free text: never a directory)": Case(
        _bytes(_json(message_id="free-5", agent_id=".alice")), "accepted"
    ),
    "to leading dot": Case(_bytes(_json(to=".alice")), "schema"),
    "agent_id CON (free text: never a directory)": Case(
        _bytes(_json(message_id="free-6", agent_id="CON")), "accepted"
    ),
    "to CON": Case(_bytes(_json(to="CON")), "schema"),
    "agent_id nul.txt (free text: never a directory)": Case(
        _bytes(_json(message_id="free-7", agent_id="nul.txt")), "accepted"
    ),
    "to nul.txt": Case(_bytes(_json(to="nul.txt")), "schema"),
    "agent_id com3.x (free text: never a directory)": Case(
        _bytes(_json(message_id="free-8", agent_id="com3.x")), "accepted"
    ),
    "to com3.x": Case(_bytes(_json(to="com3.x")), "schema"),
    "agent_id LPT9 (free text: never a directory)": Case(
        _bytes(_json(message_id="free-9", agent_id="LPT9")), "accepted"
    ),
    "to LPT9": Case(_bytes(_json(to="LPT9")), "schema"),
    "agent_id 10,000 chars": Case(_bytes(_json(agent_id="a" * 10_000)), "schema"),
    "to ../../tmp/x": Case(_bytes(_json(to="../../tmp/x")), "schema"),
    "to /etc": Case(_bytes(_json(to="/etc")), "schema"),
    "to topic:../x": Case(_bytes(_json(to="topic:../x")), "schema"),
    "to [.., bob]": Case(_bytes(_json(to=["..", "bob"])), "schema"),
    "to aux": Case(_bytes(_json(to="aux")), "schema"),
    "assigned_to ../x": Case(
        _bytes(_json(message_type="task_assignment", to=None, assigned_to="../x")), "schema"
    ),
    "attachment_path ../../etc/passwd": Case(
        _bytes(_json(attachment_path="../../etc/passwd")), "schema"
    ),
    "attachment_path /etc/passwd": Case(_bytes(_json(attachment_path="/etc/passwd")), "schema"),
    "attachment_path C:\\x": Case(_bytes(_json(attachment_path="C:\\x")), "schema"),
    "attachment_path with NUL": Case(_bytes(_json(attachment_path="a\x00b")), "schema"),
    "parents with ../": Case(_bytes(_json(parents=["../x"])), "schema"),
    # -- not a regular file
    "symlink to a secret file": Case(_symlink_to_secret, "not_a_regular_file"),
    "FIFO": Case(_fifo, "not_a_regular_file"),
    "directory": Case(_directory, "not_a_regular_file"),
    "file owned by another user": Case(_other_owner, "accepted"),
    # -- YAML front matter
    "yaml alias bomb": Case(_bytes(_front(_HEADER.format(mid="bomb") + _BOMB)), "schema"),
    "yaml python tag": Case(_bytes(_front(_HEADER.format(mid="tag") + "x: {tag}\n")), "schema"),
    "yaml !!binary tag": Case(
        _bytes(_front(_HEADER.format(mid="bin") + "x: !!binary aGVsbG8=\n")), "schema"
    ),
    "yaml anchor only": Case(_bytes(_front(_HEADER.format(mid="anc") + "x: &a 1\n")), "schema"),
    "yaml merge key": Case(_bytes(_front(_HEADER.format(mid="merge") + "<<: {a: 1}\n")), "schema"),
    "yaml not a mapping": Case(_bytes(_front("- a\n- b\n")), "schema"),
    "yaml unclosed": Case(_bytes(b"---\nmsg_id: x\nbody text with no closing line\n"), "schema"),
    "yaml header over 64 KiB": Case(
        _bytes(_front(_HEADER.format(mid="big") + "pad: '" + "p" * 70_000 + "'\n")), "too_large"
    ),
    "markdown body with --- lines": Case(
        _bytes(_front(_HEADER.format(mid="dashes"), "first\n---\nmiddle\n---\n")), "accepted"
    ),
    # -- names of the files themselves
    "file name with a newline": Case(_bytes(_json(message_id="newline-name")), "accepted"),
    "file name of 255 bytes": Case(_bytes(b"not json"), "invalid_json"),
}
_NAMES = {
    "file name with a newline": "a\nb.json",
    "file name of 255 bytes": "n" * 250 + ".json",
}


def _name(case: str, i: int) -> str:
    return _NAMES.get(case, f"case-{i:03d}.json")


@pytest.fixture(scope="module")
def dropped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every FILE_CASES row dropped into one running daemon; what became of each."""
    base = tmp_path_factory.mktemp("bad")
    root = init_bus(base / "bus").root
    marker = base / "yaml-tag-ran"
    d = ChaosDaemon(root).ready()
    try:
        rss_before = rss_kb(d.proc.pid)
        outbox = root / "outbox" / "alice"
        outbox.mkdir()
        for i, (case, spec) in enumerate(FILE_CASES.items()):
            if case == "yaml python tag":
                data = _front(
                    _HEADER.format(mid="tag") + f"x: {_PYTHON_TAG.format(marker=marker)}\n"
                )
                _bytes(data)(outbox / _name(case, i))
            else:
                spec.make(outbox / _name(case, i))
        wait_for(lambda: not os.listdir(outbox), timeout=60, what="every bad input handled")
        with Rpc(root / "busd.sock") as c:
            assert c("ping")["pid"] == d.proc.pid
        alive = d.alive()
        rss_after = rss_kb(d.proc.pid)
        assert d.stop() == 0
    finally:
        d.kill()
    report("bad files", cases=len(FILE_CASES), rss_growth_kib=rss_after - rss_before)
    return {"root": root, "alive": alive, "marker": marker, "log": d.log}


def _outcome(root: Path, name: str) -> tuple[str, dict[str, Any] | None]:
    rel = f"outbox/alice/{name}"
    for rec in dlq_records(root):
        if rec["original_path"] == rel:
            return rec["reason"], rec
    entries, _ = journal_entries(root)
    for e in entries:
        if e.source == rel and e.event == "accepted":
            return "accepted", None
    return "nothing", None


@pytest.mark.parametrize("case", list(FILE_CASES), ids=list(FILE_CASES))
def test_bad_file_is_dead_lettered_with_its_reason(dropped: dict[str, Any], case: str) -> None:
    """Each input gets its outcome; a DLQ entry has a detail, a journal line, its bytes."""
    root: Path = dropped["root"]
    assert dropped["alive"]
    i = list(FILE_CASES).index(case)
    outcome, rec = _outcome(root, _name(case, i))
    assert outcome == FILE_CASES[case].outcome
    if rec is not None:
        assert rec["detail"]
        dead = [e for e in journal_entries(root)[0] if e.event == "dead_lettered"]
        assert any(e.to == [rec["name"]] and e.reason == rec["reason"] for e in dead)
        assert (root / "dlq" / rec["name"]).exists() or os.path.islink(root / "dlq" / rec["name"])


def test_no_bad_input_was_followed_read_or_executed(dropped: dict[str, Any]) -> None:
    """The symlink was moved as itself, its target never copied; the YAML tag never ran;
    the FIFO and the directory were moved without being opened."""
    root: Path = dropped["root"]
    assert not dropped["marker"].exists(), "a YAML tag constructed an object"
    link = [r for r in dlq_records(root) if "symlink" in r["detail"] or "link" in r["detail"]]
    assert link and os.path.islink(root / "dlq" / link[0]["name"])
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                assert SECRET not in p.read_bytes(), f"the secret leaked into {p}"
    fifo = [r for r in dlq_records(root) if "FIFO" in r["detail"]]
    assert fifo and fifo[0]["size"] == 0 and fifo[0]["sha256"] is None


def test_markdown_body_dashes_survive_byte_exact(dropped: dict[str, Any]) -> None:
    """A body line ``---`` in the Markdown encoding is body, not a new header."""
    root: Path = dropped["root"]
    inbox = {_mid(p.name): p for p in files(root / "inbox" / "bob")}
    body = json.loads(inbox["dashes"].read_bytes())["body"]
    assert body == "first\n---\nmiddle\n---\n"
    assert "CON" in inbox and "other-owner" in inbox and "newline-name" in inbox


def _mid(name: str) -> str:
    parsed = parse_delivery_name(name)
    assert parsed is not None, name
    return parsed.message_id


def test_oversized_file_is_not_read_past_the_limit(tmp_path: Path) -> None:
    """A 256 MiB sparse file in an outbox: the daemon reads less than 16 MiB of it."""
    root = init_bus(tmp_path / "bus").root
    d = ChaosDaemon(root).ready()
    try:
        io = Path(f"/proc/{d.proc.pid}/io")

        def rchar() -> int:
            return int(next(ln for ln in io.read_text().splitlines() if ln.startswith("rchar"))[7:])

        before = rchar()
        (root / "outbox" / "alice").mkdir()
        _sparse(256 << 20)(root / "outbox" / "alice" / "big.json")
        wait_for(lambda: dlq_records(root), timeout=30, what="the DLQ record")
        read = rchar() - before
        assert dlq_records(root)[0]["reason"] == "too_large"
        assert read < 16 << 20, f"read {read >> 20} MiB of a file over the limit"
    finally:
        d.kill()


def test_file_name_that_is_not_utf8_is_handled(tmp_path: Path) -> None:
    """A message in ``outbox/alice/\\xff\\xfe.json``: routed or dead-lettered, daemon alive."""
    root = init_bus(tmp_path / "bus").root
    d = ChaosDaemon(root).ready()
    try:
        outbox = root / "outbox" / "alice"
        outbox.mkdir()
        raw = os.path.join(os.fsencode(outbox), b"\xff\xfe-name.json")
        with open(raw, "wb") as f:
            f.write(_json(message_id="latin1-name"))
        wait_for(lambda: not os.listdir(outbox) or not d.alive(), timeout=15, what="routing")
        time.sleep(0.5)
        assert d.alive(), d.stderr_text()[-800:]
        assert not os.listdir(outbox)
    finally:
        d.kill()


# -- the socket --------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return init_bus(tmp_path / "bus").root


def _ping_ok(root: Path) -> bool:
    with Rpc(root / "busd.sock", timeout=10) as c:
        return "pid" in c("ping")


def test_line_that_never_ends_holds_bounded_memory(root: Path) -> None:
    """32 MiB with no newline, connection left open: memory stays bounded, others are served,
    and the unterminated request is never executed."""
    d = ChaosDaemon(root).ready()
    try:
        base = rss_kb(d.proc.pid)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(root / "busd.sock"))
        head = b'{"jsonrpc":"2.0","id":1,"method":"publish","params":{"message":{"body":"'
        s.sendall(head)
        chunk = b"x" * (1 << 20)
        # The daemon answers too_large once the limit is passed and closes: the rest of
        # the 32 MiB is refused by a closed socket, never held.
        with suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(32):
                s.sendall(chunk)
        assert _ping_ok(root)
        growth = rss_kb(d.proc.pid) - base
        s.close()
        time.sleep(0.3)
        assert _ping_ok(root)
        assert growth < 24 * 1024, f"RSS grew {growth} KiB holding an endless line"
        assert not files(root / "inbox") and dlq_records(root) == []
        report("endless line", sent_mib=32, rss_growth_kib=growth)
    finally:
        d.kill()


def test_100_mib_line_is_refused_and_the_next_connection_served(root: Path) -> None:
    """A 100 MiB request line is answered too_large once the limit is passed (never held
    whole), the connection closed; a new connection then works."""
    d = ChaosDaemon(root).ready()
    try:
        base = rss_kb(d.proc.pid)
        with Rpc(root / "busd.sock", timeout=60) as c:
            c.send_raw(b'{"jsonrpc":"2.0","id":7,"method":"publish","params":{"message":"')
            chunk = b"y" * (4 << 20)
            with suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(25):
                    c.send_raw(chunk)
                c.send_raw(b'"}}\n')
            err = c.read(timeout=60)["error"]
            assert err["code"] == -32600 and err["data"]["reason"] == "too_large"
        assert _ping_ok(root)
        growth = rss_kb(d.proc.pid) - base
        assert growth < 24 * 1024, f"RSS grew {growth} KiB for a 100 MiB line"
        report("100 MiB line", rss_growth_kib=growth)
    finally:
        d.kill()


def _raise_nofile(n: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else n, n)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_10000_idle_connections_are_bounded_and_refused_clearly(root: Path) -> None:
    """10,000 connections opened and left idle: the first max_connections are held, every
    other one is told ``overloaded`` and closed; memory stays bounded; once they go, the
    daemon serves again."""
    n = 10_000
    limit = _raise_nofile(n + 200)
    if limit < n + 100:
        pytest.skip(f"RLIMIT_NOFILE {limit} is too low for {n} client sockets")
    d = ChaosDaemon(root, nofile=4096).ready()
    socks: list[socket.socket] = []
    try:
        base = rss_kb(d.proc.pid)
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(root / "busd.sock"))
            socks.append(s)
        time.sleep(1.0)
        assert d.alive()
        refused = 0
        for s in socks[-200:]:
            s.settimeout(5)
            data = s.recv(4096)
            obj = json.loads(data.split(b"\n")[0])
            assert obj["error"]["data"]["reason"] == "overloaded", obj
            refused += 1
        growth = rss_kb(d.proc.pid) - base
        with Rpc(root / "busd.sock") as late:  # every slot is taken: a clear refusal
            assert late.read()["error"]["data"]["reason"] == "overloaded"
    finally:
        for s in socks:
            s.close()
    try:
        wait_for(lambda: _try_ping(root), timeout=20, what="service after the flood")
        assert growth < 64 * 1024, f"RSS grew {growth} KiB for {n} idle connections"
        report("10,000 idle connections", rss_growth_kib=growth, refusals_checked=refused)
    finally:
        d.kill()


def _try_ping(root: Path) -> bool:
    try:
        return _ping_ok(root)
    except (OSError, EOFError, KeyError):
        return False


def test_running_out_of_file_descriptors_refuses_instead_of_dying(root: Path) -> None:
    """With RLIMIT_NOFILE 256 (< max_connections), 400 connections: the daemon survives."""
    d = ChaosDaemon(root, nofile=256).ready()
    socks = []
    try:
        for _ in range(400):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(root / "busd.sock"))
            socks.append(s)
        time.sleep(1.0)
        for s in socks:
            s.close()
        # A dying daemon is gone within the watcher thread's 5 s timeout.
        time.sleep(0.5)
        deadline = time.monotonic() + 6
        while d.alive() and time.monotonic() < deadline and not d.stderr_text():
            time.sleep(0.1)
        assert not d.stderr_text(), d.stderr_text()[-600:]
        assert _try_ping(root)
    finally:
        for s in socks:
            s.close()
        d.kill()


def test_client_that_never_reads_only_stalls_itself(root: Path) -> None:
    """A client pipelines requests and never reads the answers: the daemon stops reading
    from it once its answers fill the socket, memory stays bounded, others are served."""
    d = ChaosDaemon(root).ready()
    try:
        base = rss_kb(d.proc.pid)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(root / "busd.sock"))
        s.setblocking(False)
        req = b'{"jsonrpc":"2.0","id":1,"method":"status"}\n' * 1000
        sent, stalled_since = 0, None
        while sent < (256 << 20):
            try:
                sent += s.send(req)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.5:
                    break  # the daemon stopped reading from us: that is the point
                time.sleep(0.01)
        assert stalled_since is not None, "the daemon kept reading without answers being read"
        assert _ping_ok(root)
        growth = rss_kb(d.proc.pid) - base
        s.close()
        assert growth < 48 * 1024, f"RSS grew {growth} KiB for a client that never reads"
        assert _ping_ok(root)
        report("client never reads", bytes_accepted_before_stall=sent, rss_growth_kib=growth)
    finally:
        d.kill()


def test_subscriber_that_never_reads_stalls_only_itself(root: Path) -> None:
    """A subscriber that never reads its pushes: the rest of the bus goes on, memory stays
    bounded, and when it disconnects its claims come back after the lease."""
    n = scale(400, 3000)
    d = ChaosDaemon(root, env={"BUSD_LEASE_SECONDS": "1"}).ready()
    try:
        base = rss_kb(d.proc.pid)
        sub = socket.socket(socket.AF_UNIX)
        sub.connect(str(root / "busd.sock"))
        sub.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sub.sendall(
            b'{"jsonrpc":"2.0","id":1,"method":"subscribe",'
            b'"params":{"agent_id":"bob","max_in_flight":10000}}\n'
        )
        body = "p" * 10_000
        with Rpc(root / "busd.sock") as c:
            for i in range(0, n, 100):
                batch = [message(j, body=body) for j in range(i, i + 100)]
                c("publish_batch", {"messages": batch})
            assert "pid" in c("ping")
        growth = rss_kb(d.proc.pid) - base
        sub.close()
        got: set[str] = set()
        with Rpc(root / "busd.sock") as c:
            deadline = time.monotonic() + 30
            while len(got) < n and time.monotonic() < deadline:
                msgs = c("fetch", {"agent_id": "bob", "max": 500, "wait_s": 0.5})["messages"]
                ids = [m["message"]["message_id"] for m in msgs]
                got |= set(ids)
                if ids:
                    c("ack", {"agent_id": "bob", "message_ids": ids})
        assert len(got) == n
        assert growth < 64 * 1024, f"RSS grew {growth} KiB behind a stalled subscriber"
        report("subscriber never reads", messages=n, rss_growth_kib=growth)
    finally:
        d.kill()


# -- malformed JSON-RPC beyond tests/test_server.py -----------------------------------------

RPC_CASES: dict[str, tuple[bytes, str]] = {
    "empty object": (b"{}", "invalid_request"),
    "NUL bytes": (b"\x00\x00\x00", "parse_error"),
    "NUL inside the envelope": (b'{"jsonrpc":"2.0","id":1,"method":"pi\x00ng"}', "parse_error"),
    "1 MiB id": (
        b'{"jsonrpc":"2.0","id":"' + b"i" * (1 << 20) + b'","method":"nope"}',
        "method_not_found",
    ),
    "float id": (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', "invalid_request"),
    "method with a path": (b'{"jsonrpc":"2.0","id":1,"method":"../../ping"}', "method_not_found"),
    "params 100,000 deep": (
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":'
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}",
        "",
    ),
    "publish a list": (
        b'{"jsonrpc":"2.0","id":1,"method":"publish","params":{"message":[1]}}',
        "schema",
    ),
    "publish sender ../x": (
        b'{"jsonrpc":"2.0","id":1,"method":"publish","params":{"message":{},"sender":"../x"}}',
        "invalid_name",
    ),
    "fetch agent ../../etc": (
        b'{"jsonrpc":"2.0","id":1,"method":"fetch","params":{"agent_id":"../../etc"}}',
        "invalid_name",
    ),
    "subscribe topic ..": (
        b'{"jsonrpc":"2.0","id":1,"method":"subscribe","params":{"agent_id":"bob","topics":[".."]}}',
        "invalid_name",
    ),
    "dlq.show ../../etc/passwd": (
        b'{"jsonrpc":"2.0","id":1,"method":"dlq.show","params":{"name":"../../etc/passwd"}}',
        "not_found",
    ),
    "dlq.show ..": (
        b'{"jsonrpc":"2.0","id":1,"method":"dlq.show","params":{"name":".."}}',
        "not_found",
    ),
    "dlq.show /etc/passwd": (
        b'{"jsonrpc":"2.0","id":1,"method":"dlq.show","params":{"name":"/etc/passwd"}}',
        "not_found",
    ),
}


SharedConn = tuple[Rpc, ChaosDaemon, Path]


@pytest.fixture(scope="module")
def shared_conn(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SharedConn]:
    root = init_bus(tmp_path_factory.mktemp("rpc") / "bus").root
    d = ChaosDaemon(root).ready()
    try:
        with Rpc(root / "busd.sock", timeout=20) as c:
            yield c, d, root
    finally:
        d.kill()


@pytest.mark.parametrize("case", list(RPC_CASES), ids=list(RPC_CASES))
def test_malformed_request_gets_a_clear_error(shared_conn: SharedConn, case: str) -> None:
    """Each line gets an error answer with a reason (never ``internal``); then a ping."""
    c, d, root = shared_conn
    line, reason = RPC_CASES[case]
    c.send_raw(line + b"\n")
    obj = c.read()
    assert "error" in obj, obj
    got = obj["error"]["data"]["reason"]
    assert got != "internal"
    if reason:
        assert got == reason, obj["error"]
    assert "pid" in c("ping")
    assert d.alive()
    assert not (root.parent.parent / "x").exists()


@pytest.mark.parametrize("name", ["a\x00b", "n" * 5000], ids=["NUL", "5000 chars"])
def test_dlq_names_from_a_client_are_not_found_not_internal(
    shared_conn: SharedConn, name: str
) -> None:
    """``dlq.show`` and ``replay`` of an impossible entry name answer not_found."""
    c, _, _ = shared_conn
    for method, params in (("dlq.show", {"name": name}), ("replay", {"names": [name]})):
        obj = c.call(method, params)
        if method == "replay":
            assert obj["result"]["replayed"][0]["status"] == "not_found"
        else:
            assert obj["error"]["data"]["reason"] == "not_found", obj


@pytest.mark.parametrize("value", [1e18, 1e300], ids=["1e18", "1e300"])
def test_absurd_lease_or_delay_is_invalid_params(shared_conn: SharedConn, value: float) -> None:
    """``extend``/``nack`` with an absurd duration: -32602, and the claim is unchanged."""
    c, _, _ = shared_conn
    c("publish", {"message": message(0, message_id=f"lease-{len(repr(value))}")})
    held = c("fetch", {"agent_id": "bob", "max": 100})["messages"]
    mid = held[0]["message"]["message_id"]
    try:
        for method, params in (
            ("extend", {"agent_id": "bob", "message_id": mid, "lease_s": value}),
            ("nack", {"agent_id": "bob", "message_id": mid, "delay_s": value}),
        ):
            err = c.call(method, params)["error"]
            assert err["data"]["reason"] == "invalid_params", err
    finally:
        ids = [m["message"]["message_id"] for m in held]
        c("ack", {"agent_id": "bob", "message_ids": ids})


def test_router_handles_a_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    """Daemon-less routing pass over an outbox holding a non-UTF-8 name and a normal file."""
    from busd.config import load_config
    from busd.routing.router import Router

    root = init_bus(tmp_path / "bus").root
    outbox = root / "outbox" / "alice"
    outbox.mkdir()
    with open(os.path.join(os.fsencode(outbox), b"\xff-bad-name.json"), "wb") as f:
        f.write(_json(message_id="odd-name"))
    (outbox / "normal.json").write_bytes(_json(message_id="normal"))
    with Router(load_config(root=str(root), env={})) as router:
        router.route_all()
    assert not os.listdir(outbox)
    assert {_mid(p.name) for p in files(root / "inbox" / "bob")} >= {"normal"}


def test_journal_with_a_rotten_byte_still_starts(tmp_path: Path) -> None:
    """A journal line whose string holds invalid UTF-8 is skipped; the daemon starts."""
    root = init_bus(tmp_path / "bus").root
    d = ChaosDaemon(root).ready()
    with Rpc(root / "busd.sock") as c:
        c("publish", {"message": message(1)})
        c("publish", {"message": message(2)})
    assert d.stop() == 0
    segment = sorted((root / "journal").glob("*.ndjson"))[0]
    data = segment.read_bytes()
    at = data.index(b"m-000001")
    segment.write_bytes(data[:at] + b"\xff" + data[at + 1 :])
    d = ChaosDaemon(root)
    try:
        d.ready(timeout=10)
        with Rpc(root / "busd.sock") as c:
            assert "pid" in c("ping")
    finally:
        d.kill()
