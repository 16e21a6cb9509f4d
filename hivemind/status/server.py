"""Serve the status app with waitress in a thread of the daemon.

The listening sockets are bound at start (a taken port fails the start, and connections queue
from then on), but Falcon, the app and waitress are loaded only when the first connection
arrives: a worker whose status API nobody asks keeps ~5.6 MiB less resident for its whole life
(issue 18). The first request waits for that load (~0.1 s); later ones don't.

waitress runs its accept loop in one thread and requests in a pool of its own (one thread: the
answers are small and come from memory; waitress reads and writes the sockets in the loop, so a
slow client holds no request thread), so a slow client or scrape never blocks task handling. Stopping schedules the close inside the loop thread
(waitress' socket map is not thread-safe), then joins it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import select
import socket
import threading
from collections.abc import Callable
from typing import Any


def reads_need_token(host: str) -> bool:
    """True unless `host` is a loopback address: anything reachable from outside needs the token."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name we can't judge: be strict


class StatusServer:
    def __init__(self, app_factory: Callable[[], Any], host: str = "127.0.0.1", port: int = 0, *,
                 logger: logging.Logger, threads: int = 2) -> None:
        # Two request threads: one slow view (a task list while the state lock is busy) must
        # not hold up /healthz (tests/test_status_api.py::test_slow_view_does_not_block_health).
        self._app_factory = app_factory
        self._host = host
        self._requested_port = port
        self._threads = threads
        self._log = logger
        self._sockets: list[socket.socket] = []
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None   # stop() wakes the wait for a first connection
        self._wake_w: socket.socket | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Bind (raises OSError when the address is taken) and serve in a background thread."""
        if self._thread is not None:
            raise RuntimeError("status server already started")
        # What the first connection will load must be there now: a broken install is a start
        # error, not a status API that closes on its first visitor.
        missing = [name for name in ("falcon", "waitress") if importlib.util.find_spec(name) is None]
        if missing:
            raise ImportError(f"{' and '.join(missing)} not installed")
        self._sockets = _bind(self._host, self._requested_port)
        # Made only once bound: a start that fails leaves nothing open to close.
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="status-http", daemon=True)
        self._thread.start()
        self._log.info("status API listening on http://%s:%d/", self.host, self.port)

    def _run(self) -> None:
        waiting = select.poll()   # not select(): a busy worker's descriptors may pass 1024
        assert self._wake_r is not None   # made by start(), before this thread
        for sock in (*self._sockets, self._wake_r):
            waiting.register(sock, select.POLLIN)
        waiting.poll()   # the first connection, or stop()
        with self._lock:
            if self._stopping.is_set():
                return
            try:
                self._server = self._create_server()
            except Exception:
                self._log.exception("status API: could not load the app; it stays closed")
                for sock in self._sockets:
                    sock.close()
                return
        self._server.run()

    def _create_server(self) -> Any:
        from waitress.server import create_server

        return create_server(
            self._app_factory(), sockets=self._sockets, threads=self._threads,
            ident="hivemind-worker",
            # The worker's own log says what it needs; waitress' default would name every
            # client disconnect as an error.
            log_socket_errors=False,
            # Requests are tiny; keep a slow or hostile client from holding buffers.
            max_request_body_size=64 * 1024, max_request_header_size=16 * 1024,
            channel_timeout=30,
            # Every request, response and the stop below wake the loop through waitress' trigger;
            # its timeout only paces the idle-connection sweep, so a long one saves idle wakeups.
            asyncore_loop_timeout=5,
        )

    @property
    def loaded(self) -> bool:
        """Whether a connection has come and the app is loaded."""
        return self._server is not None

    @property
    def host(self) -> str:
        if not self._sockets:
            return self._host
        return str(self._sockets[0].getsockname()[0])

    @property
    def port(self) -> int:
        """The bound port (the free one picked when 0 was asked); valid after start()."""
        if not self._sockets:
            raise RuntimeError("status server not started")
        return int(self._sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and open connections, finish the worker threads. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stopping.set()
            server = self._server
        if server is None:
            with contextlib.suppress(OSError):
                if self._wake_w is not None:
                    self._wake_w.send(b"x")
            thread.join(timeout)
            for sock in self._sockets:
                sock.close()
        else:
            from waitress import wasyncore

            sock_map = server._map
            try:
                server.trigger.pull_trigger(lambda: wasyncore.close_all(sock_map, ignore_all=True))
            except OSError:
                # The loop has ended and closed its trigger already: close what is left from here.
                wasyncore.close_all(sock_map, ignore_all=True)
            thread.join(timeout)
            if thread.is_alive():
                self._log.warning("status API loop did not stop within %.1f s", timeout)
            server.task_dispatcher.shutdown(timeout=timeout)
        for end in (self._wake_r, self._wake_w):
            if end is not None:
                end.close()
        self._wake_r = self._wake_w = None
        self._server = None
        self._thread = None
        self._sockets = []

    def __enter__(self) -> StatusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for host:port, as waitress would bind them (one per address the name
    resolves to, IPv6 ones v6-only); a port of 0 picks one free port, used for every address."""
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP,
                               socket.AI_PASSIVE)
    seen: set[tuple[int, str]] = set()
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in infos:
            key = (int(family), str(addr[0]))
            if key in seen:
                continue
            seen.add(key)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            bind_port = port or (sockets[0].getsockname()[1] if len(sockets) > 1 else 0)
            sock.bind((addr[0], bind_port, *addr[2:]))
            sock.listen(1024)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
