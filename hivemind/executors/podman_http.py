"""The Podman API over plain HTTP/1.1 on its unix socket, on kept-alive connections.

podman-py sends through requests, which costs ~2 ms of the worker's CPU per call (an inspect:
2.2 ms, against 0.2 ms here; bench/run's throughput row makes ~8 calls per task) and, with
urllib3 and requests, ~10 MiB of the idle daemon's memory.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

API_PREFIX = "/v4.0.0/libpod"
IDLE_CONNECTIONS = 8


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("d", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Response:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class UnixHttp:
    """Requests to one unix socket. Idle connections are kept for the next call (a small pool,
    any thread); a streamed response keeps its own connection until it is closed."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        self.path = path
        self._timeout = timeout
        self._idle: list[_UnixConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self._closed = self._idle, [], True
        for conn in idle:
            conn.close()

    def _take(self) -> tuple[_UnixConnection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return _UnixConnection(self.path, self._timeout), False

    def _give_back(self, conn: _UnixConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def request(self, method: str, path: str, params: Mapping[str, Any] | None = None,
                body: bytes | None = None) -> Response:
        """The whole response; HttpError for a status >= 400 (with Podman's own message)."""
        url = _url(path, params)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (0, 1):
            conn, reused = self._take()
            try:
                conn.request(method, url, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                conn.close()
                # The service closed a kept-alive connection while it was idle: once more on a
                # fresh one. Never for a fresh connection (the call may have been done).
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            if resp.will_close:
                conn.close()
            else:
                self._give_back(conn)
            if resp.status >= 400:
                raise HttpError(resp.status, _message(data))
            return Response(resp.status, data)
        raise AssertionError("unreachable")

    def stream(self, method: str, path: str, params: Mapping[str, Any] | None = None
               ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """A response to read as it comes (logs --follow), on its own connection: the caller
        closes both."""
        conn = _UnixConnection(self.path, None)
        try:
            conn.request(method, _url(path, params))
            resp = conn.getresponse()
            if resp.status >= 400:
                data = resp.read()
                raise HttpError(resp.status, _message(data))
        except BaseException:
            conn.close()
            raise
        return resp, conn


def _url(path: str, params: Mapping[str, Any] | None) -> str:
    url = API_PREFIX + path
    if params:
        pairs: list[tuple[str, str]] = []
        for key, value in params.items():
            for v in value if isinstance(value, (list, tuple)) else [value]:
                pairs.append((key, _param(v)))
        url += "?" + urllib.parse.urlencode(pairs)
    return url


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _message(data: bytes) -> str:
    try:
        doc = json.loads(data)
    except ValueError:
        return data[:300].decode("utf-8", "replace")
    if isinstance(doc, dict):
        return str(doc.get("message") or doc.get("cause") or doc)[:500]
    return str(doc)[:500]
