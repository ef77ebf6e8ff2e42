"""``busd web`` in process (Starlette's TestClient): every page and action, and its guard.

No token -> 401; a foreign Host or Origin -> 403; a POST without the CSRF token ->
403 and nothing changes; with it, a replay is replayed and journaled (no daemon: the
daemon-less routing pass journals it, as ``busd replay`` does) and a purge purges.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from busd.errors import Reason
from busd.routing.offline import route_pending
from busd.store import dlq
from busd.store.journal import Journal
from busd.web import security, site
from conftest import Bus
from daemon_harness import drop, message

_PORT = 8765
_BASE = f"http://127.0.0.1:{_PORT}"


@pytest.fixture
def token(bus: Bus) -> str:
    return security.load_token(bus.layout)[0]


@pytest.fixture
def anon(bus: Bus, token: str) -> Iterator[TestClient]:
    """A client without credentials."""
    app = site.build(bus.config, token=token, port=_PORT)
    with TestClient(app, base_url=_BASE, follow_redirects=False) as c:
        yield c


@pytest.fixture
def client(anon: TestClient, token: str) -> TestClient:
    """A client that opened the printed URL: it holds the cookie."""
    r = anon.get(f"/?token={token}")
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert f"busd_web_{_PORT}" in r.headers["set-cookie"]
    assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
    anon.cookies.set(f"busd_web_{_PORT}", token)
    return anon


def _csrf(client: TestClient) -> str:
    value = client.get("/api/session").json()["csrf"]
    assert isinstance(value, str)
    return value


def _journal_ids(bus: Bus) -> list[str]:
    with Journal(bus.layout.journal) as j:
        return [e.message_id or "" for e in j.read(events={"accepted"})]


def _publish(bus: Bus, i: int, **fields: Any) -> None:
    drop(bus.root, message(i, **fields), f"m{i}.json")
    route_pending(bus.config)


def _replayable(bus: Bus, mid: str = "fixed-1") -> str:
    """A DLQ entry whose bytes are now valid (as after a schema fix): replay moves it."""
    body = json.dumps(message(0, message_id=mid)).encode()
    return dlq.dead_letter(
        bus.layout, reason=Reason.SCHEMA, detail="was bad", data=body, sender="alice"
    )


# -- the guard --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/static/app.js"),
        ("GET", "/api/status"),
        ("GET", "/api/messages"),
        ("GET", "/api/dlq"),
        ("GET", "/api/events"),
        ("POST", "/api/dlq/replay"),
        ("POST", "/api/dlq/purge"),
    ],
)
def test_no_token_is_refused(anon: TestClient, method: str, path: str) -> None:
    r = anon.request(method, path)
    assert r.status_code == 401
    assert "token" in r.text


def test_a_wrong_token_or_cookie_is_refused(anon: TestClient) -> None:
    assert anon.get("/?token=not-the-token").status_code == 401
    anon.cookies.set(f"busd_web_{_PORT}", "not-the-token")
    assert anon.get("/api/status").status_code == 401
    assert anon.get("/api/status", headers={"authorization": "Bearer nope"}).status_code == 401


def test_the_bearer_header_works_for_scripts(anon: TestClient, token: str) -> None:
    r = anon.get("/api/status", headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["root"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "192.168.1.9:8765"])
def test_a_foreign_host_is_refused_even_with_the_token(client: TestClient, host: str) -> None:
    """DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends Host: evil.example."""
    r = client.get("/api/status", headers={"host": host})
    assert r.status_code == 403 and "Host" in r.text


@pytest.mark.parametrize("host", ["localhost:8765", "127.0.0.1:8765", "[::1]:8765"])
def test_loopback_hosts_are_served(client: TestClient, host: str) -> None:
    assert client.get("/api/status", headers={"host": host}).status_code == 200


def test_a_foreign_origin_is_refused(client: TestClient, token: str) -> None:
    csrf = _csrf(client)
    r = client.post(
        "/api/dlq/purge",
        json={"older_than_s": 0},
        headers={"origin": "http://evil.example", "x-csrf-token": csrf},
    )
    assert r.status_code == 403 and "Origin" in r.text
    r = client.get("/api/status", headers={"origin": "http://evil.example:8765"})
    assert r.status_code == 403
    assert client.get("/api/status", headers={"origin": _BASE}).status_code == 200


def test_the_token_is_created_once_and_private(bus: Bus, token: str) -> None:
    path = bus.layout.web_token_file
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text().strip() == token
    again, created = security.load_token(bus.layout)
    assert (again, created) == (token, False)
    assert len(token) >= 32


def test_the_csrf_token_is_not_the_token(token: str) -> None:
    assert security.csrf_token(token) != token and token not in security.csrf_token(token)


# -- pages ------------------------------------------------------------------------------


def test_the_page_and_its_assets_are_served_by_busd(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for name in ("Overview", "Agents", "Messages", "Workflow", "DLQ"):
        assert name in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "http" not in r.text.replace(_BASE, "")  # no CDN: every asset is /static/...
    for asset, kind in (("app.js", "javascript"), ("style.css", "css")):
        got = client.get(f"/static/{asset}")
        assert got.status_code == 200 and kind in got.headers["content-type"]
    assert client.get("/static/../site.py").status_code == 404
    # Every value reaches the page as text: no innerHTML anywhere in the script.
    assert "innerHTML" not in client.get("/static/app.js").text


def test_overview_says_the_daemon_is_down(client: TestClient, bus: Bus) -> None:
    data = client.get("/api/status").json()
    assert data["daemon"]["running"] is False
    assert "the daemon is not running" in data["attention"]
    assert data["root"] == str(bus.root)


def test_agents_come_from_the_status_report(client: TestClient, bus: Bus) -> None:
    for i in range(3):
        _publish(bus, i)
    agents = client.get("/api/status").json()["agents"]
    assert agents["bob"]["ready"] == 3 and agents["bob"]["served"] == "files"


def test_messages_with_the_filters_of_tail(client: TestClient, bus: Bus) -> None:
    _publish(bus, 1, workflow_id="wa", message_type="fact")
    _publish(bus, 2, workflow_id="wb", message_type="decision", to="carol", body="needle here")
    _publish(bus, 3, workflow_id="wa", message_type="progress")

    def ids(**q: str) -> list[str]:
        entries = client.get("/api/messages", params=q).json()["entries"]
        return [e["message_id"] for e in entries]

    assert ids() == ["m-000001", "m-000002", "m-000003"]
    assert ids(workflow="wa") == ["m-000001", "m-000003"]
    assert ids(type="decision") == ["m-000002"]
    assert ids(agent="carol") == ["m-000002"]
    assert ids(text="NEEDLE") == ["m-000002"]
    assert ids(limit="1") == ["m-000003"]


def test_one_message_body_only_on_request(client: TestClient, bus: Bus) -> None:
    _publish(bus, 7, body="secret body")
    shown = client.get("/api/messages/m-000007").json()
    assert "body" not in shown["envelope"] and shown["envelope"]["body_bytes"] == 11
    assert [h["event"] for h in shown["history"]] == ["accepted"]
    full = client.get("/api/messages/m-000007", params={"body": "1"}).json()
    assert full["envelope"]["body"] == "secret body"
    assert client.get("/api/messages/nope").status_code == 404


def test_workflow_timeline_links_parents(client: TestClient, bus: Bus) -> None:
    _publish(bus, 1, workflow_id="wf")
    _publish(bus, 2, workflow_id="wf", parents=["m-000001", "elsewhere"])
    _publish(bus, 3, workflow_id="other")
    data = client.get("/api/workflows/wf").json()
    rows = data["messages"]
    assert [r["message_id"] for r in rows] == ["m-000001", "m-000002"]
    assert rows[1]["parents"] == ["m-000001", "elsewhere"]
    assert rows[1]["parents_here"] == ["m-000001"]


def test_dlq_lists_and_shows_the_original_bytes(client: TestClient, bus: Bus) -> None:
    hostile = b'{"oops": "<script>alert(1)</script>" \xff'
    drop(bus.root, hostile, "bad.json")
    route_pending(bus.config)
    entries = client.get("/api/dlq").json()["entries"]
    assert len(entries) == 1 and entries[0]["reason"] == "invalid_utf8"
    shown = client.get(f"/api/dlq/{entries[0]['name']}").json()
    # As text (invalid UTF-8 replaced); the page puts it in with textContent, escaped.
    assert shown["data"] == hostile.decode("utf-8", "replace")
    assert shown["record"]["reason"] == "invalid_utf8"
    assert client.get("/api/dlq/no-such-entry").status_code == 404


# -- actions ----------------------------------------------------------------------------


def test_replay_without_csrf_is_refused_and_changes_nothing(client: TestClient, bus: Bus) -> None:
    name = _replayable(bus)
    r = client.post("/api/dlq/replay", json={"names": [name]})
    assert r.status_code == 403 and "CSRF" in r.text
    r = client.post("/api/dlq/replay", json={"names": [name]}, headers={"x-csrf-token": "x"})
    assert r.status_code == 403
    assert [e.name for e in dlq.list_entries(bus.layout)] == [name]
    assert "fixed-1" not in _journal_ids(bus)


def test_replay_with_csrf_is_replayed_and_journaled(client: TestClient, bus: Bus) -> None:
    name = _replayable(bus)
    r = client.post(
        "/api/dlq/replay", json={"names": [name]}, headers={"x-csrf-token": _csrf(client)}
    )
    assert r.status_code == 200
    (result,) = r.json()["results"]
    assert (result["name"], result["status"], result["message_id"]) == (name, "replayed", "fixed-1")
    assert dlq.list_entries(bus.layout) == []
    assert "fixed-1" in _journal_ids(bus)  # routed at once: journaled like `busd replay`
    assert len(list(bus.layout.dlq_replayed.iterdir())) == 1  # its record, kept with history
    again = client.post(
        "/api/dlq/replay", json={"names": [name]}, headers={"x-csrf-token": _csrf(client)}
    )
    assert again.json()["results"][0]["status"] == "not_found"


def test_replay_needs_names(client: TestClient) -> None:
    r = client.post("/api/dlq/replay", json={"names": []}, headers={"x-csrf-token": _csrf(client)})
    assert r.status_code == 400


def test_purge_needs_csrf_and_purges(client: TestClient, bus: Bus) -> None:
    _replayable(bus, "p1")
    assert client.post("/api/dlq/purge", json={"older_than_s": 0}).status_code == 403
    assert len(dlq.list_entries(bus.layout)) == 1
    csrf = {"x-csrf-token": _csrf(client)}
    kept = client.post("/api/dlq/purge", json={"older_than_s": 3600}, headers=csrf).json()
    assert kept["count"] == 0
    r = client.post("/api/dlq/purge", json={"older_than_s": 0}, headers=csrf)
    assert r.status_code == 200 and r.json()["count"] == 1
    assert dlq.list_entries(bus.layout) == []
    bad = client.post("/api/dlq/purge", json={"older_than_s": "soon"}, headers=csrf)
    assert bad.status_code == 400


def test_the_bind_address_is_an_allowed_host(bus: Bus, token: str) -> None:
    app = site.build(bus.config, token=token, port=_PORT, bind="10.1.2.3")
    with TestClient(app, base_url="http://10.1.2.3:8765") as c:
        assert c.get("/api/status", headers={"authorization": f"Bearer {token}"}).status_code == 200
        assert c.get("/api/status").status_code == 401


def test_messages_after_a_position_are_the_new_ones(bus: Bus) -> None:
    """What the event stream sends: entries appended since the last position only."""
    from busd.web import views

    _publish(bus, 1)
    rows, end = views.messages(bus.config, views.Filters())
    assert [r["message_id"] for r in rows] == ["m-000001"]
    assert views.messages(bus.config, views.Filters(), after=end)[0] == []
    _publish(bus, 2)
    rows, end2 = views.messages(bus.config, views.Filters(), after=end)
    assert [r["message_id"] for r in rows] == ["m-000002"] and end2 > end


def test_the_page_data_dir_is_packaged() -> None:
    base = Path(site.__file__).parent / "static"
    assert sorted(p.name for p in base.iterdir()) == sorted(site.STATIC_FILES)
