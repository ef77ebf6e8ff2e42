"""Tests of busd.routing.intake: the one door every file and socket publish passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from busd.core.codec import decode, encode_json, encode_markdown
from busd.errors import InvalidMessage, Reason, Unroutable
from busd.routing import intake
from busd.routing.intake import Admitted, Origin, Parcel, Refused, Rules
from busd.routing.router import Incoming, Router
from busd.store import dlq
from conftest import Bus, message_bytes, message_dict


def _drop(bus: Bus, name: str, data: bytes, agent: str = "alice") -> Path:
    directory = bus.layout.outbox_dir(agent)
    directory.mkdir(exist_ok=True)
    (directory / name).write_bytes(data)
    return directory / name


def _file(bus: Bus, rules: Rules, path: Path) -> Admitted | Refused:
    return intake.admit(rules, Parcel(Origin.file(bus.layout, path)), intake.FILE)


def _socket(rules: Rules, data: bytes, sender: str | None = "alice") -> Admitted | Refused:
    return intake.admit(rules, Parcel(Origin.socket(sender), data=data), intake.SOCKET)


def test_the_chains_are_the_documented_stages_in_order() -> None:
    """The data path reads as its stages: files are named and read first, then shared stages."""
    assert (
        intake.check_name,
        intake.read,
        intake.decode,
        intake.check_size,
        intake.resolve,
    ) == intake.FILE
    assert (intake.decode_filling, intake.check_size, intake.resolve) == intake.SOCKET
    assert (intake.read, intake.decode) == intake.CLAIM


def test_a_file_and_a_publish_of_the_same_bytes_are_admitted_alike(bus: Bus) -> None:
    """Same door: the same bytes give the same message, canonical body and recipients."""
    data = message_bytes("m-1", to=["bob", "carol", "bob"])
    rules = Rules(bus.config)
    by_file = _file(bus, rules, _drop(bus, "m1.json", data))
    by_socket = _socket(rules, data)
    assert isinstance(by_file, Admitted) and isinstance(by_socket, Admitted)
    assert by_file.body == by_socket.body == encode_json(decode(data))
    assert by_file.recipients == by_socket.recipients == ["bob", "carol"]
    assert by_file.origin.rel == "outbox/alice/m1.json"
    assert by_file.origin.sender == "alice"
    assert by_socket.origin.original_path == "socket"
    assert by_socket.origin.journal_source is None


def test_only_the_socket_fills_a_missing_message_id(bus: Bus) -> None:
    """decode_filling gives a publish without message_id one; a file without it is refused."""
    fields = message_dict()
    del fields["message_id"]
    data = json.dumps(fields).encode()
    rules = Rules(bus.config)
    published = _socket(rules, data)
    assert isinstance(published, Admitted)
    assert published.message.message_id
    dropped = _file(bus, rules, _drop(bus, "nomid.json", data))
    assert isinstance(dropped, Refused)
    assert isinstance(dropped.error, InvalidMessage)
    assert dropped.error.reason is Reason.SCHEMA
    assert dropped.data == data  # read before it was refused: the refusal keeps the bytes


def test_a_markdown_publish_that_grows_past_the_limit_as_json_is_too_large(bus: Bus) -> None:
    """check_size runs for publishes too: the inbox holds JSON, which must fit the limit."""
    config = bus.with_config(max_message_bytes=2000)
    grows = encode_markdown(decode(message_bytes("m-grows", body="\x01" * 400)))
    assert len(grows) < 2000 < len(encode_json(decode(grows)))
    refused = _socket(Rules(config), grows)
    assert isinstance(refused, Refused)
    assert isinstance(refused.error, InvalidMessage)
    assert refused.error.reason is Reason.TOO_LARGE
    assert refused.message is not None and refused.message.message_id == "m-grows"


def test_a_markdown_publish_too_large_as_json_is_refused_at_commit_not_at_claim(bus: Bus) -> None:
    """Through the router: refused at intake (too_large), never delivered to fail at claim."""
    config = bus.with_config(max_message_bytes=2000)
    grows = encode_markdown(decode(message_bytes("m-grows", body="\x01" * 400)))
    item = Incoming(raw=grows, sender="alice")
    with Router(config) as router:
        report = router.route([], [item])
    assert isinstance(item.outcome, InvalidMessage)
    assert item.outcome.reason is Reason.TOO_LARGE
    assert (report.accepted, report.dead_lettered) == (0, 1)
    assert not bus.layout.inbox_dir("bob").exists() or not any(
        bus.layout.inbox_dir("bob").iterdir()
    )
    (entry,) = dlq.list_entries(bus.layout)
    assert (entry.record.reason, entry.record.original_path) == ("too_large", "socket")


def test_resolve_expands_topics_and_refuses_a_topic_nobody_follows(bus: Bus) -> None:
    """Topics come from the rules' map; an empty topic is unroutable."""
    rules = Rules(bus.config, {"news": ["bob", "carol"]})
    ok = _socket(rules, message_bytes("m-1", to="topic:news"))
    assert isinstance(ok, Admitted)
    assert ok.recipients == ["bob", "carol"]
    nobody = _socket(rules, message_bytes("m-2", to="topic:quiet"))
    assert isinstance(nobody, Refused)
    assert isinstance(nobody.error, Unroutable)
    assert nobody.message is not None and nobody.message.message_id == "m-2"


def test_unknown_recipient_dlq_refuses_an_agent_without_an_inbox(bus: Bus) -> None:
    """With unknown_recipient = "dlq", only agents with an inbox directory are routable."""
    rules = Rules(bus.with_config(unknown_recipient="dlq"))
    bus.layout.inbox_dir("bob").mkdir(parents=True, exist_ok=True)
    assert isinstance(_socket(rules, message_bytes("m-1", to="bob")), Admitted)
    refused = _socket(rules, message_bytes("m-2", to=["bob", "ghost"]))
    assert isinstance(refused, Refused)
    assert "ghost" in str(refused.error)


def test_a_foreign_inbox_file_goes_to_the_inbox_it_sits_in(bus: Bus) -> None:
    """A file dropped into inbox/carol/ is for carol whatever its `to` says."""
    inbox = bus.layout.inbox_dir("carol")
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "dropped.json").write_bytes(message_bytes("m-1", to="topic:nobody"))
    result = _file(bus, Rules(bus.config), inbox / "dropped.json")
    assert isinstance(result, Admitted)
    assert result.recipients == ["carol"]
    assert result.origin.in_inbox
    assert result.origin.sender is None


def test_a_vanished_file_is_neither_admitted_nor_refused(bus: Bus) -> None:
    """FileNotFoundError leaves admit: the caller skips a file someone else took."""
    origin = Origin.file(bus.layout, bus.layout.outbox_dir("alice") / "gone.json")
    with pytest.raises(FileNotFoundError):
        intake.admit(Rules(bus.config), Parcel(origin), intake.FILE)


def test_rules_are_a_snapshot_of_the_topic_map(bus: Bus) -> None:
    """Changing the dict a Rules was built from changes nothing: reconfigure swaps Rules."""
    topics = {"news": ["bob"]}
    rules = Rules(bus.config, topics)
    topics["news"].append("carol")
    topics["other"] = ["dave"]
    assert dict(rules.subscriptions) == {"news": ("bob",)}
    with pytest.raises(TypeError):
        rules.subscriptions["x"] = ("y",)  # type: ignore[index]


def test_claim_chain_reads_and_decodes_keeping_the_bytes(bus: Bus) -> None:
    """The consumer's chain: the bytes read are the body; the claiming agent the recipient."""
    locks = bus.layout.locks_dir("bob")
    locks.mkdir(parents=True, exist_ok=True)
    data = message_bytes("m-1")
    (locks / "claimed.json").write_bytes(data)
    origin = Origin.claim(bus.layout, "bob", locks / "claimed.json")
    result = intake.admit(Rules(bus.config), Parcel(origin), intake.CLAIM)
    assert isinstance(result, Admitted)
    assert (result.body, result.recipients, result.message.message_id) == (data, ["bob"], "m-1")
    assert origin.rel == "locks/bob/claimed.json"
