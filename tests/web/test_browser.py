"""``busd web`` as a real process, seen by curl-like requests and a real headless Chromium.

The browser is driven over the Chrome DevTools protocol on a pipe
(``--remote-debugging-pipe``: NUL-separated JSON on fds 3 and 4, no websocket
client needed). It loads the printed URL against a running daemon, a message is
published on the socket, and it appears on the page without a reload (the
Server-Sent Events stream). The screenshot lands in tmp_path, and in
``$WEB_SCREENSHOT_TO`` when set (how docs/web-dashboard.png is made).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _rpc import Rpc
from daemon_harness import BUSD, Daemon, message

_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1200,760",
    "--remote-debugging-pipe",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Web:
    """``busd web`` on a free port; ``url`` is the line it printed (with the token)."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [BUSD, "web", "--root", str(root), "--port", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().decode().strip()
        if not self.url.startswith(f"http://127.0.0.1:{self.port}/?token="):
            self.proc.kill()
            raise AssertionError(f"busd web printed {self.url!r}: {self.proc.communicate()[1]!r}")
        self.token = self.url.split("token=", 1)[1]
        deadline = time.monotonic() + 15
        while True:
            try:
                self.get("/api/session", token=True)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "busd web did not start"
                time.sleep(0.1)

    def get(self, path: str, *, token: bool = False, **headers: str) -> tuple[int, bytes]:
        if token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def daemon_and_web(root: Path) -> Iterator[tuple[Daemon, _Web]]:
    d = Daemon(root).ready()
    web = _Web(root)
    try:
        yield d, web
    finally:
        web.stop()
        d.kill()


def test_the_process_refuses_what_it_must(daemon_and_web: tuple[Daemon, _Web]) -> None:
    """The real server: no token 401, foreign Host 403, token 200, URL 0600 token file."""
    d, web = daemon_and_web
    assert web.get("/")[0] == 401
    assert web.get("/api/status", token=True, Host="evil.example")[0] == 403
    assert web.get("/api/status", token=True, Origin="http://evil.example")[0] == 403
    status, body = web.get("/api/status", token=True)
    assert status == 200 and json.loads(body)["daemon"]["running"] is True
    assert (d.root / "web-token").read_text().strip() == web.token
    assert (os.stat(d.root / "web-token").st_mode & 0o777) == 0o600


def test_the_event_stream_sends_status_and_new_entries(
    daemon_and_web: tuple[Daemon, _Web],
) -> None:
    d, web = daemon_and_web
    req = urllib.request.Request(
        f"http://127.0.0.1:{web.port}/api/events?agent=bob",
        headers={"Authorization": f"Bearer {web.token}"},
    )
    with urllib.request.urlopen(req, timeout=10) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.readline().startswith(b"retry:")
        with Rpc(d.root / "busd.sock") as c:
            c("publish", {"message": message(1, message_id="sse-1")})
            c("publish", {"message": message(2, message_id="sse-carol", to="carol")})
        events: list[tuple[str, Any]] = []
        kind = ""
        deadline = time.monotonic() + 10
        while not any(k == "entry" for k, _ in events) and time.monotonic() < deadline:
            line = stream.readline().decode().strip()
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
        kinds = {k for k, _ in events}
        assert "status" in kinds
        entries = [e["message_id"] for k, e in events if k == "entry"]
        assert entries == ["sse-1"]  # the filter of the stream: to or from bob only


class _Chrome:
    """A headless Chromium and one page session over the DevTools pipe."""

    def __init__(self, url: str, profile: Path) -> None:
        assert _CHROMIUM is not None
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def fds() -> None:
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)

        self.proc = subprocess.Popen(
            [_CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=fds,  # the DevTools pipe must be fds 3 and 4
            pass_fds=(3, 4),  # kept open after preexec_fn (close_fds runs after it)
        )
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._ids = 0
        self.session = self._attach()

    def send(self, method: str, params: dict[str, Any] | None = None, **extra: Any) -> Any:
        self._ids += 1
        mid = self._ids
        msg = {"id": mid, "method": method, "params": params or {}, **extra}
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            while b"\0" not in self._buf:
                chunk = os.read(self._from_r, 1 << 16)
                assert chunk, "chromium closed the DevTools pipe"
                self._buf += chunk
            raw, _, self._buf = self._buf.partition(b"\0")
            got = json.loads(raw)
            if got.get("id") == mid:
                assert "error" not in got, got
                return got.get("result", {})
        raise TimeoutError(method)

    def _attach(self) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pages = [
                t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page"
            ]
            if pages:
                got = self.send(
                    "Target.attachToTarget", {"targetId": pages[0]["targetId"], "flatten": True}
                )
                session: str = got["sessionId"]
                return session
            time.sleep(0.2)
        raise TimeoutError("no page target")

    def js(self, expression: str) -> Any:
        got = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True},
            sessionId=self.session,
        )
        return got["result"].get("value")

    def wait(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"never true in the page: {expression}")

    def screenshot(self) -> bytes:
        got = self.send("Page.captureScreenshot", {"format": "png"}, sessionId=self.session)
        return base64.b64decode(got["data"])

    def close(self) -> None:
        os.close(self._to_w)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self._from_r)


@pytest.mark.timeout(90)
@pytest.mark.skipif(_CHROMIUM is None, reason="no chromium (apt-get install chromium)")
def test_chromium_sees_a_published_message_without_a_reload(
    daemon_and_web: tuple[Daemon, _Web], tmp_path: Path
) -> None:
    d, web = daemon_and_web
    with Rpc(d.root / "busd.sock") as c:
        for i in range(3):
            c("publish", {"message": message(i, workflow_id="demo", to=f"agent-{i % 2}")})
    chrome = _Chrome(web.url, tmp_path / "profile")
    try:
        # The printed URL set the cookie and redirected to / (the token left the URL).
        chrome.wait("document.querySelector('#live').textContent === 'live'")
        assert chrome.js("location.search") == ""
        assert chrome.wait("document.querySelector('#daemon').textContent").startswith(
            "daemon running"
        )
        chrome.js("window.__loadedOnce = performance.timeOrigin")
        with Rpc(d.root / "busd.sock") as c:
            c("publish", {"message": message(99, message_id="seen-live-99", body="hi <b>x</b>")})
        chrome.wait(
            "document.querySelector('#message-table tbody').textContent.includes('seen-live-99')"
        )
        # The same document: nothing reloaded the page.
        assert chrome.js("window.__loadedOnce === performance.timeOrigin") is True
        chrome.wait("document.querySelector('#agent-table tbody').children.length >= 2")
        chrome.js("location.hash = 'messages'")
        chrome.wait("!document.querySelector('#messages').hidden")
        png = chrome.screenshot()
    finally:
        chrome.close()
    assert png.startswith(b"\x89PNG")
    (tmp_path / "dashboard.png").write_bytes(png)
    if target := os.environ.get("WEB_SCREENSHOT_TO"):
        Path(target).write_bytes(png)
