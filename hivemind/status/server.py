"""Serve the status app with waitress in a thread of the daemon.

waitress runs its accept loop in one thread and requests in a pool of its own (one thread: the
answers are small and come from memory; waitress reads and writes the sockets in the loop, so a
slow client holds no request thread), so a slow client or scrape never blocks task handling. Stopping schedules the close inside the loop thread
(waitress' socket map is not thread-safe), then joins it.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from typing import Any

from waitress import wasyncore
from waitress.server import create_server


def reads_need_token(host: str) -> bool:
    """True unless `host` is a loopback address: anything reachable from outside needs the token."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name we can't judge: be strict


class StatusServer:
    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *,
                 logger: logging.Logger, threads: int = 2) -> None:
        # Two request threads: one slow view (a task list while the state lock is busy) must
        # not hold up /healthz (tests/test_status_api.py::test_slow_view_does_not_block_health).
        self._app = app
        self._host = host
        self._requested_port = port
        self._threads = threads
        self._log = logger
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (raises OSError when the address is taken) and serve in a background thread."""
        if self._server is not None:
            raise RuntimeError("status server already started")
        self._server = create_server(
            self._app, host=self._host, port=self._requested_port, threads=self._threads,
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
        self._thread = threading.Thread(target=self._server.run, name="status-http", daemon=True)
        self._thread.start()
        self._log.info("status API listening on http://%s:%d/", self.host, self.port)

    @property
    def host(self) -> str:
        return str(self._server.effective_host) if self._server else self._host

    @property
    def port(self) -> int:
        """The bound port (the free one picked when 0 was asked); valid after start()."""
        if self._server is None:
            raise RuntimeError("status server not started")
        return int(self._server.effective_port)

    @property
    def url(self) -> str:
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and open connections, finish the worker threads. Idempotent."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
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
        self._server = None
        self._thread = None

    def __enter__(self) -> StatusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
