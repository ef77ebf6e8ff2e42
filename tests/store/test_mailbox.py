"""Tests for busd.store.mailbox: publishing into outboxes and delivering into inboxes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from busd.core.codec import decode
from busd.errors import InvalidName
from busd.store import mailbox as delivery
from busd.store.layout import delivery_name, parse_delivery_name
from conftest import Bus, message_bytes, run_python

_OUTBOX_RE = re.compile(r"^\d{20}-(.+)\.json$")

_PRODUCER = """
import sys
from busd.core.codec import decode
from busd.config import load_config
from busd.store.mailbox import publish
from conftest import message_bytes
cfg = load_config(root=sys.argv[1], env={})
for i in range(int(sys.argv[3])):
    publish(cfg.layout, decode(message_bytes(f"p{sys.argv[2]}-{i:03d}")), fsync=cfg.fsync)
"""


def test_publish_writes_a_valid_file_in_the_senders_outbox(bus: Bus) -> None:
    """publish() leaves one decodable file named <arrival>-<message_id>.json, no temp files."""
    msg = decode(message_bytes("m-7"))
    path = delivery.publish(bus.layout, msg)
    assert path.parent == bus.layout.outbox_dir("alice")
    m = _OUTBOX_RE.match(path.name)
    assert m is not None and m.group(1) == "m-7"
    assert decode(path.read_bytes()) == msg
    assert os.listdir(bus.layout.tmp) == []


def test_publish_sender_override_and_no_fsync(bus: Bus) -> None:
    """An explicit sender picks the outbox; fsync=False still publishes a complete file."""
    msg = decode(message_bytes("m-8"))
    path = delivery.publish(bus.layout, msg, sender="carol", fsync=False)
    assert path.parent == bus.layout.outbox_dir("carol")
    assert decode(path.read_bytes()) == msg


def test_publish_bytes_rejects_an_unsafe_sender(bus: Bus) -> None:
    """A sender that is not a safe path component raises InvalidName and writes nothing."""
    with pytest.raises(InvalidName):
        delivery.publish_bytes(bus.layout, "../evil", b"{}", "m-1")
    assert os.listdir(bus.layout.outbox) == []


def test_deliver_names_and_creates_agent_dirs(bus: Bus) -> None:
    """deliver() creates inbox/ and locks/ and writes <arrival>-<count>-<id>.json."""
    path = delivery.deliver(bus.layout, "bob", b"payload", "m-1", deliveries=3)
    parsed = parse_delivery_name(path.name)
    assert parsed is not None and parsed.deliveries == 3 and parsed.message_id == "m-1"
    assert path.read_bytes() == b"payload"
    assert bus.layout.locks_dir("bob").is_dir()


def test_deliver_never_replaces_on_an_arrival_clash(bus: Bus) -> None:
    """A reused arrival key draws a new one: both files survive intact."""
    arrival = f"{1:020d}"
    first = delivery.deliver(bus.layout, "bob", b"one", "m-1", arrival=arrival)
    second = delivery.deliver(bus.layout, "bob", b"two", "m-1", arrival=arrival, fsync=True)
    assert first.name == delivery_name(arrival, 0, "m-1")
    assert second != first
    assert (first.read_bytes(), second.read_bytes()) == (b"one", b"two")


def test_deliver_rejects_an_unsafe_agent(bus: Bus) -> None:
    """An agent name with a slash is refused before anything is created."""
    with pytest.raises(InvalidName):
        delivery.deliver(bus.layout, "a/b", b"x", "m-1")


def test_deliveries_are_capped_at_three_digits(bus: Bus) -> None:
    """A delivery count above 999 keeps the fixed-width name (capped at 999)."""
    path = delivery.deliver(bus.layout, "bob", b"x", "m-1", deliveries=5000)
    parsed = parse_delivery_name(path.name)
    assert parsed is not None and parsed.deliveries == 999


def test_sync_dirs_accepts_files_in_several_directories(bus: Bus) -> None:
    """sync_dirs() fsyncs each file and each distinct directory without error."""
    paths = [delivery.deliver(bus.layout, a, b"x", f"m-{a}") for a in ("bob", "carol", "bob")]
    delivery.sync_dirs(paths)


_SYNC_SCRIPT = """
import sys
from pathlib import Path
from busd.store import mailbox as delivery
from busd.store.layout import Layout
layout, n = Layout(Path(sys.argv[1])), int(sys.argv[2])
paths = [delivery.deliver(layout, "bob", b"x", f"m-{i}") for i in range(n)]
print("SYNC-START", flush=True)
delivery.sync_dirs(paths)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="syncfs is Linux only")
@pytest.mark.parametrize(("files", "fsyncs", "syncfs"), [(3, 4, 0), (40, 0, 1)])
def test_sync_dirs_uses_one_syncfs_for_many_files(
    bus: Bus, files: int, fsyncs: int, syncfs: int
) -> None:
    """Under strace: a few files get an fsync each (and their directory); many, one syncfs."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    log = bus.root / "strace.log"
    argv = [strace, "-f", "-o", str(log), "-e", "trace=fsync,syncfs,write", sys.executable]
    subprocess.run(
        [*argv, "-c", _SYNC_SCRIPT, str(bus.root), str(files)],
        check=True,
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    lines = log.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "SYNC-START" in line)
    after = lines[start + 1 :]
    assert sum(" fsync(" in f" {line}" for line in after) == fsyncs
    assert sum(" syncfs(" in f" {line}" for line in after) == syncfs


def test_arrival_keys_sort_in_delivery_order(bus: Bus) -> None:
    """Listing an inbox by name gives the order in which messages were delivered."""
    ids = [f"z-{i}" for i in range(5)] + ["a-0", "m-0"]
    for mid in ids:
        delivery.deliver(bus.layout, "bob", b"x", mid)
    names = sorted(os.listdir(bus.layout.inbox_dir("bob")))
    assert [parse_delivery_name(n).message_id for n in names] == ids  # type: ignore[union-attr]


def test_concurrent_producers_never_lose_or_clash(bus: Bus) -> None:
    """4 processes x 50 publish() calls: 200 complete, valid files with unique names."""
    here = os.path.dirname(os.path.dirname(__file__))  # tests/, for conftest
    code = f"import sys; sys.path.insert(0, {here!r})\n" + _PRODUCER
    procs = [run_python(code, str(bus.root), str(p), "50") for p in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    outbox = bus.layout.outbox_dir("alice")
    names = os.listdir(outbox)
    assert len(names) == 200
    ids = sorted(decode((outbox / n).read_bytes()).message_id for n in names)
    assert ids == sorted(f"p{p}-{i:03d}" for p in range(4) for i in range(50))
    assert os.listdir(bus.layout.tmp) == []
