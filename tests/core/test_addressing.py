"""``agent@bus`` recipients: the model's widened ``to`` rule, and intake's resolve on each bus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from busd.config import load_config
from busd.core import codec
from busd.errors import InvalidMessage, Unroutable
from busd.routing.intake import BRIDGE_AGENT, Origin, Parcel, Rules, resolve
from busd.store.layout import init_bus

NAME = st.from_regex(r"\A[a-z0-9_][a-z0-9_-]{0,20}\Z")


def message(to: Any, **extra: Any) -> bytes:
    data = {
        "schema_version": "1.0",
        "message_id": "m-1",
        "message_type": "fact",
        "created_at": "2026-12-01T12:00:00Z",
        "workflow_id": "w",
        "task_id": "t",
        "agent_id": "alice",
        "to": to,
        "body": "hi",
        **extra,
    }
    return msgspec.json.encode(data)


@pytest.mark.parametrize("to", ["bob@busb", ["bob@busb", "carol"], "bob.x@host-1.lab"])
def test_agent_at_bus_is_a_valid_recipient(to: Any) -> None:
    assert codec.decode(message(to)).to == to


@pytest.mark.parametrize(
    "to",
    [
        "bob@",
        "@busb",
        "bob@busb@busc",
        "topic:news@busb",
        "bob@bus/b",
        "bob@CON",
        "bob@busb.",
        "CON@busb",
        ["bob@busb@x"],
        ["topic:news"],
        "bob@" + "b" * 65,
    ],
)
def test_malformed_addresses_are_refused(to: Any) -> None:
    with pytest.raises(InvalidMessage) as err:
        codec.decode(message(to))
    assert err.value.reason.value == "schema"


@given(agent=NAME, bus=NAME)
def test_every_agent_at_bus_of_valid_names_decodes_and_round_trips(agent: str, bus: str) -> None:
    msg = codec.decode(message(f"{agent}@{bus}"))
    assert codec.decode(codec.encode_json(msg)).to == f"{agent}@{bus}"


def rules(tmp_path: Path, name: str, **extra: Any) -> Rules:
    root = init_bus(tmp_path / name).root
    lines = [f'bus_name = "{name}"', "[bridge]", 'topics = ["news"]', "[subscriptions]"]
    lines.append('news = ["alice"]')
    lines.append('local = ["carol"]')
    (root / "busd.toml").write_text("\n".join(lines) + "\n")
    return Rules(load_config(root=str(root), env={}, **extra))


def recipients(r: Rules, data: bytes, sender: str | None = None) -> list[str]:
    p = Parcel(Origin.socket(sender), data, codec.decode(data))
    out = resolve(r, p).recipients
    assert out is not None
    return out


def test_own_bus_address_is_the_plain_agent(tmp_path: Path) -> None:
    r = rules(tmp_path, "busa")
    assert recipients(r, message("bob@busa")) == ["bob"]
    assert recipients(r, message(["bob@busa", "bob"])) == ["bob"]


def test_other_buses_and_shared_topics_go_to_the_bridge_queue_once(tmp_path: Path) -> None:
    r = rules(tmp_path, "busa")
    assert recipients(r, message("bob@busb")) == [BRIDGE_AGENT]
    assert recipients(r, message(["bob@busb", "eve@busc", "dave"])) == [BRIDGE_AGENT, "dave"]
    assert recipients(r, message("topic:news")) == ["alice", BRIDGE_AGENT]
    assert recipients(r, message("topic:local")) == ["carol"]  # not shared


def test_a_bridged_message_is_delivered_on_this_bus_only(tmp_path: Path) -> None:
    r = rules(tmp_path, "busb")
    bridged = BRIDGE_AGENT
    # busa's plain names and other buses were busa's to serve: never looped back out.
    to = ["bob@busb", "dave", "eve@busc"]
    assert recipients(r, message(to), sender=bridged) == ["bob"]
    assert recipients(r, message("topic:news"), sender=bridged) == ["alice"]
    with pytest.raises(Unroutable):
        recipients(r, message(["dave", "eve@busc"]), sender=bridged)


def test_unknown_recipient_dlq_does_not_refuse_the_bridge_queue(tmp_path: Path) -> None:
    r = rules(tmp_path, "busa", unknown_recipient="dlq")
    assert recipients(r, message("bob@busb")) == [BRIDGE_AGENT]
    with pytest.raises(Unroutable):
        recipients(r, message("bob@busa"))
