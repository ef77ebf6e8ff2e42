"""Coverage-guided fuzzing of busd's parsers with atheris (``make fuzz``; not collected).

Targets, chosen by the first byte: the message decoder (JSON and Markdown + YAML), the
JSON-RPC request parser, and the journal line decoder. Each may only succeed or raise its
documented error. A crash is written by libFuzzer as ``crash-<sha1>``; turn it into an
``@example`` in tests/chaos/test_fuzz.py and a regression test (strict xfail until fixed).
Its first find, invalid UTF-8 inside a journal string, is
test_fuzz.py::test_journal_line_with_invalid_utf8_is_skipped.

    python tests/chaos/fuzz_atheris.py -max_total_time=300 [corpus_dir]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from busd.core.codec import decode
    from busd.errors import InvalidMessage
    from busd.rpc.protocol import RpcError, parse_request
    from busd.store.journal import decode_entry

_SEEDS = [
    json.dumps(
        {
            "schema_version": "1.0",
            "message_type": "task_assignment",
            "message_id": "m-1",
            "created_at": "2026-11-21T12:00:00Z",
            "workflow_id": "w",
            "task_id": "t",
            "agent_id": "alice",
            "to": ["bob"],
            "inputs": {"a": [1, None, {"b": 2.5}]},
            "metadata": {"x": [[["y"]]]},
        }
    ).encode(),
    b"---\nmsg_id: m-2\nts: 2026-11-21T12:00:00Z\ntype: FACT\nworkflow_id: w\ntask_id: t\n"
    b"agent_id: a\nto: topic:news\n---\nbody\n---\nmore\n",
    b'{"jsonrpc":"2.0","id":1,"method":"publish","params":{"message":{"body":"x"}}}',
    b'{"event":"accepted","at":"2026-11-21T12:00:00Z","message_id":"m","to":["b"],'
    b'"message":{"a":1}}',
]


def one_input(data: bytes) -> None:
    if not data:
        return
    target, body = data[0] % 4, data[1:]
    if target in (0, 1):
        try:
            decode(body, fill_missing=target == 1, max_bytes=1 << 20)
        except InvalidMessage:
            pass
    elif target == 2:
        try:
            parse_request(body)
        except RpcError:
            pass
    else:
        try:
            decode_entry(body)
        except InvalidMessage:
            pass


def main() -> None:
    args = sys.argv[1:]
    if not any(not a.startswith("-") for a in args):
        corpus = tempfile.mkdtemp(prefix="busd-fuzz-")
        for i, seed in enumerate(_SEEDS):
            for t in range(4):
                with open(os.path.join(corpus, f"seed-{i}-{t}"), "wb") as f:
                    f.write(bytes([t]) + seed)
        args.append(corpus)
    atheris.Setup([sys.argv[0], *args], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
