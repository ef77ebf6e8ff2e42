"""Hypothesis fuzzing of what parses untrusted bytes: the message decoder, the JSON-RPC
request and params parsers, the socket line reader, journal lines, and a live daemon.

Each target has one contract: a given error type, or success; never anything else, and
never a hang. tests/test_codec.py already fuzzes the decoder with generated values; this
file adds byte-level mutation of valid seeds (JSON and Markdown), splices and nesting,
which is where parsers crash. Examples are few in CI (``max_examples``) and many under
``CHAOS_LONG=1``; ``make fuzz`` also runs the coverage-guided atheris harness
(tests/chaos/fuzz_atheris.py). Any crash found becomes an ``@example`` below.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import msgspec
import pytest
from _chaos import LONG, ChaosDaemon
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from _rpc import Rpc
from busd.core.codec import decode, encode_markdown
from busd.errors import InvalidMessage, Reason
from busd.rpc.protocol import (
    AckParams,
    DlqShowParams,
    ExtendParams,
    FetchParams,
    NackParams,
    PublishBatchParams,
    PublishParams,
    ReplayParams,
    RpcError,
    SubscribeParams,
    parse_params,
    parse_request,
)
from busd.rpc.server import _Lines
from busd.store.journal import decode_entry
from busd.store.layout import init_bus
from daemon_harness import message

pytestmark = pytest.mark.timeout(3600 if LONG else 120)

FUZZ = settings(
    max_examples=20_000 if LONG else 300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=not LONG,
)

SEEDS: list[bytes] = [
    json.dumps(message(1)).encode(),
    json.dumps(
        message(
            2,
            message_type="task_assignment",
            to=["bob", "carol"],
            inputs={"a": [1, 2.5, None, True, {"b": "c"}]},
            retry_policy={"max": 3},
            priority="high",
            timeout_seconds=1.5,
            idempotency_key="k-1",
            parents=["p-1"],
            metadata={"deep": {"er": [[["x"]]]}},
        )
    ).encode(),
    b"\xef\xbb\xbf"
    + json.dumps(message(3, message_type="status_update", status="blocked", progress_percent=40))
    .replace(" ", "")
    .encode(),
    json.dumps(
        message(4, message_type="task_complete", status="failed", results={"r": 1})
    ).encode(),
    encode_markdown(decode(json.dumps(message(5, body="line\n---\nmore\n")).encode())),
    b"---\nmsg_id: m-6\nts: 2026-11-21T12:00:00+01:00\ntype: Review\nworkflow_id: w\n"
    b"task_id: t\nagent_id: a\nto: topic:news\nattachment_path: docs/x.md\n---\nbody\r\n",
]
_TOKENS = [
    b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\\u0000", b"\\ud800", b"null", b"true",
    b"1e999", b"-0", b"NaN", b"\x00", b"\xff", b"\xc3", b"\xef\xbb\xbf", b"---\n", b"\n---\n",
    b"&a", b"*a", b"!!python/object:os.system", b"<<: ", b"\r\n", b"\t", b" " * 64,
    b'"schema_version":"2.0"', b'"message_type":"fact"', b'"to":"../x"', b"9" * 5000,
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid seed with a few byte-level mutations: flips, inserts, deletes, splices."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "token", "delete", "splice", "cut", "dup"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(at, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "token":
            data[at:at] = draw(st.sampled_from(_TOKENS))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS))
            start = draw(st.integers(0, len(other)))
            data[at:at] = other[start : start + draw(st.integers(1, 64))]
        elif op == "cut":
            del data[at:]
        elif op == "dup" and data:
            j = draw(st.integers(0, len(data)))
            data[at:at] = data[min(at, j) : max(at, j)][:256]
    return bytes(data)


def _nested(depth: int, kind: str) -> bytes:
    opener, closer = {"list": (b"[", b"]"), "dict": (b'{"a":', b"}")}[kind]
    return opener * depth + b"1" + closer * depth


def _decode_contract(data: bytes, fill_missing: bool) -> None:
    try:
        decode(data, fill_missing=fill_missing, max_bytes=1 << 20)
    except InvalidMessage as err:
        assert isinstance(err.reason, Reason)
        assert err.detail


@FUZZ
@given(mutated(), st.booleans())
@example(_nested(100_000, "list"), False)
@example(b'{"metadata":' + _nested(100_000, "dict") + b"}", True)
@example(b"---\n" + b"- " * 10_000 + b"x\n---\n", False)
@example(b"---\na: " + b"[" * 5_000 + b"\n---\n", False)
@example(b"---\n" + b"a: &a [*a]\n" + b"---\n", False)
def test_fuzz_message_decoder(data: bytes, fill_missing: bool) -> None:
    """Mutated messages decode or raise InvalidMessage with a reason; nothing else."""
    _decode_contract(data, fill_missing)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
_METHODS = st.sampled_from(
    ["ping", "publish", "publish_batch", "fetch", "ack", "nack", "extend", "status",
     "dlq.list", "dlq.show", "replay", "subscribe", "nope", ""]
)  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """Request-shaped JSON with junk anywhere, sometimes mutated at the byte level."""
    req: dict[str, Any] = {}
    if draw(st.booleans()):
        req["jsonrpc"] = draw(st.sampled_from(["2.0", "1.0", 2.0, None]))
    if draw(st.booleans()):
        req["method"] = draw(_METHODS | _JSON)
    if draw(st.booleans()):
        req["id"] = draw(st.integers() | st.text(max_size=10) | _JSON)
    if draw(st.booleans()):
        req["params"] = draw(_JSON | st.dictionaries(st.sampled_from(_PARAM_KEYS), _JSON))
    line = json.dumps(req).encode()
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(line)))
            line = line[:at] + draw(st.sampled_from(_TOKENS) | st.binary(max_size=4)) + line[at:]
    return line.replace(b"\n", b" ")


_PARAM_KEYS = ["message", "messages", "sender", "agent_id", "max", "wait_s", "message_ids",
               "message_id", "delay_s", "lease_s", "topics", "max_in_flight", "name", "names",
               "reason", "all", "to", "dry_run"]  # fmt: skip


@FUZZ
@given(requests() | st.binary(max_size=200))
@example(b'{"jsonrpc":"2.0","id":1,"method":"ping","params":' + _nested(100_000, "list") + b"}")
@example(b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"ping"}')
@example(b'{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}')
def test_fuzz_request_parser(line: bytes) -> None:
    """parse_request returns a Request or raises RpcError with a standard code."""
    try:
        req = parse_request(line)
    except RpcError as err:
        assert err.code in (-32700, -32600)
        assert err.data["reason"]
        return
    assert isinstance(req.method, str)


@pytest.mark.parametrize(
    "line", [b'{"\x80jsonrpc": "2.0"}', b'{"id":5,"\xff":1}'], ids=["key", "unknown key"]
)
def test_request_with_non_utf8_key_is_a_parse_error(line: bytes) -> None:
    """Regression test for a fuzzer find: -32700 invalid_utf8, not an exception."""
    with pytest.raises(RpcError) as info:
        parse_request(line)
    assert info.value.data["reason"] == "invalid_utf8"


_KINDS = [PublishParams, PublishBatchParams, FetchParams, AckParams, NackParams, ExtendParams,
          SubscribeParams, DlqShowParams, ReplayParams]  # fmt: skip


@FUZZ
@given(st.sampled_from(_KINDS), _JSON | st.dictionaries(st.sampled_from(_PARAM_KEYS), _JSON))
def test_fuzz_params_parser(kind: type, value: Any) -> None:
    """parse_params gives the Struct or an RpcError -32602 with a JSON path."""
    try:
        parse_params(msgspec.Raw(msgspec.json.encode(value)), kind)
    except RpcError as err:
        assert err.code == -32602
        assert err.data["path"].startswith("$")


_ROTTEN = b'{"event":"\xff\xff\xff\xffaccepted","at":"2026-11-21T12:00:00Z","message_id":"m"}'


@FUZZ
@given(mutated() | st.binary(max_size=300))
@example(_ROTTEN)
def test_fuzz_journal_line_decoder(line: bytes) -> None:
    """A journal line decodes to an entry or raises InvalidMessage (readers skip it)."""
    try:
        decode_entry(line)
    except InvalidMessage:
        pass


def test_journal_line_with_invalid_utf8_is_skipped() -> None:
    """Regression test for a fuzzer find: InvalidMessage, so readers skip the line."""
    with pytest.raises(InvalidMessage):
        decode_entry(_ROTTEN)


class _Stream:
    """A stand-in for an anyio SocketStream that returns the given chunks, then EOF."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        if not self.chunks:
            raise anyio.EndOfStream
        head = self.chunks.pop(0)
        if len(head) > max_bytes:
            self.chunks.insert(0, head[max_bytes:])
            head = head[:max_bytes]
        return head


@FUZZ
@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=12),
    st.integers(1, 30),
    st.data(),
)
def test_fuzz_socket_line_reader(lines: list[bytes], limit: int, data: st.DataObject) -> None:
    """However the bytes are chunked, the reader yields each line up to ``limit`` bytes,
    TOO_LONG for each longer one (an unterminated tail too, once past the limit), and drops
    a short unterminated tail at EOF."""
    tail = data.draw(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")))
    stream = b"".join(line + b"\n" for line in lines) + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    async def read_all() -> list[bytes]:
        reader = _Lines(_Stream([c for c in chunks if c]), limit)  # type: ignore[arg-type]
        out = []
        while (line := await reader.next()) is not None:
            out.append(line)
        return out

    got = anyio.run(read_all)
    want = [line if len(line) <= limit else _Lines.TOO_LONG for line in lines]
    if len(tail) > limit:
        want.append(_Lines.TOO_LONG)  # answered once past the limit, before any newline
    assert got == want


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rpc, ChaosDaemon]]:
    root = init_bus(tmp_path_factory.mktemp("fuzz") / "bus").root
    d = ChaosDaemon(root, env={"BUSD_MAX_MESSAGE_BYTES": "65536"}).ready()
    try:
        with Rpc(root / "busd.sock", timeout=20) as c:
            yield c, d
    finally:
        d.kill()


@settings(FUZZ, max_examples=5_000 if LONG else 150)
@given(
    requests()
    | mutated().map(
        lambda m: (
            b'{"jsonrpc":"2.0","id":1,"method":"publish",'
            b'"params":{"message":' + m.replace(b"\n", b" ") + b"}}"
        )
    )
)
def test_fuzz_live_daemon_answers_every_line(live: tuple[Rpc, ChaosDaemon], line: bytes) -> None:
    """Fuzzed lines sent to a real daemon: each gets at most one answer (none for a
    notification), an error is never ``internal``, and the daemon keeps serving."""
    c, d = live
    line = line.replace(b"wait_s", b"wait_z")  # a long poll would only make this test wait
    c.send_raw(line + b"\n")
    c.send_raw(b'{"jsonrpc":"2.0","id":"fence","method":"ping"}\n')
    answers = []
    while True:
        obj = c.read()
        if obj.get("id") == "fence" and "result" in obj:
            break
        if "method" not in obj:  # pushes from a fuzzed subscribe are fine
            answers.append(obj)
    assert len(answers) <= 1
    for a in answers:
        if "error" in a:
            assert a["error"]["data"]["reason"] != "internal", (line[:200], a)
    assert d.alive()
