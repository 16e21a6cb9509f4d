"""The Podman API's hot-path HTTP client (hivemind.executors.podman_http) against a small unix
socket server: query encoding, Podman's error bodies, kept-alive connections reused, and a
connection the service dropped while idle retried once on a fresh one (the real Podman paths
are in test_podman_executor.py and test_e2e_podman.py)."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from hivemind.executors.podman_http import HttpError, UnixHttp


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    seen: list[tuple[str, str, bytes]]
    connections: int
    close_after_reply: bool


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, doc: object) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.server.close_after_reply:
            # As a service dropping an idle keep-alive connection: closed without telling.
            self.close_connection = True

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path, body))
        if "/missing/" in self.path:
            self._reply(404, {"cause": "no such container", "message": "no container named missing"})
        else:
            self._reply(200, {"Id": "abc", "path": self.path})

    do_GET = do_POST = do_DELETE = _handle


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[_Server, str]]:
    path = str(tmp_path / "api.sock")
    srv = _Server(path, _Handler)
    srv.seen, srv.connections, srv.close_after_reply = [], 0, False
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, path
    srv.shutdown()
    srv.server_close()


def test_calls_share_one_kept_alive_connection_and_encode_queries(server: tuple[_Server, str]) -> None:
    srv, path = server
    http = UnixHttp(path)
    try:
        r = http.request("DELETE", "/containers/x", {"force": True, "v": False, "timeout": 0})
        assert r.status == 200 and r.json()["Id"] == "abc"
        http.request("POST", "/containers/x/wait", {"condition": ["stopped", "exited"]})
        http.request("POST", "/containers/create", body=b'{"image": "i"}')
    finally:
        http.close()
    assert [p for _, p, _ in srv.seen] == [
        "/v4.0.0/libpod/containers/x?force=true&v=false&timeout=0",
        "/v4.0.0/libpod/containers/x/wait?condition=stopped&condition=exited",
        "/v4.0.0/libpod/containers/create"]
    assert srv.seen[2][2] == b'{"image": "i"}'
    assert srv.connections == 1


def test_podman_error_bodies_become_http_errors_with_their_message(server: tuple[_Server, str]) -> None:
    _, path = server
    http = UnixHttp(path)
    try:
        with pytest.raises(HttpError) as err:
            http.request("GET", "/containers/missing/json")
        assert err.value.status == 404 and err.value.message == "no container named missing"
        # The connection is still good for the next call.
        assert http.request("GET", "/containers/ok/json").status == 200
    finally:
        http.close()


def test_a_connection_dropped_while_idle_is_retried_once_on_a_fresh_one(
        server: tuple[_Server, str]) -> None:
    srv, path = server
    srv.close_after_reply = True
    http = UnixHttp(path)
    try:
        for _ in range(3):
            assert http.request("GET", "/containers/ok/json").status == 200
    finally:
        http.close()
    assert len(srv.seen) == 3            # each call reached the service exactly once
    assert srv.connections == 3


def test_a_fresh_connection_that_fails_is_not_retried(tmp_path: Path) -> None:
    http = UnixHttp(str(tmp_path / "nobody-listens.sock"))
    with pytest.raises(OSError):
        http.request("POST", "/containers/x/start")
