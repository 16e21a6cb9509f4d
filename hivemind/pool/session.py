"""Keeps the node known to the pool: login, register, heartbeat, periodic re-registration, and
per-task usage reports. Runs in its own thread; a down, slow or restarting pool only delays it
(exponential backoff with jitter), never the tasks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hivemind.pool.backoff import Backoff
from hivemind.pool.client import (
    NodeInfo,
    NodeStatus,
    PoolCallFailed,
    PoolClient,
    PoolRefused,
    ProtocolMismatch,
)


@dataclass
class SessionState:
    connected: bool = False
    registered: bool = False
    last_heartbeat: float | None = None
    last_error: str = ""
    heartbeat_failures: int = 0
    registrations: int = 0
    protocol_checked: bool = False   # the pool answered the generation probe as expected


@dataclass(frozen=True)
class TaskUsageReport:
    task_id: str
    cpu: float
    memory: float
    gpu: float = 0.0
    gpu_memory: float = 0.0
    # What the task was granted: a generation that reports shares of the grant (2026-04) turns
    # cpu (percent of one core) and memory (MiB) into them; one that reports raw figures doesn't.
    cpu_grant_cores: float = 0.0
    memory_grant_mib: float = 0.0


class PoolSession:
    def __init__(self, client: PoolClient, node_info: Callable[[], NodeInfo],
                 node_status: Callable[[], NodeStatus], task_usage: Callable[[], list[TaskUsageReport]],
                 *, heartbeat_interval_s: float, register_interval_s: float, logger: logging.Logger,
                 on_heartbeat_failure: Callable[[], None] = lambda: None,
                 on_fatal: Callable[[str], None] = lambda message: None,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._node_info = node_info
        self._node_status = node_status
        self._task_usage = task_usage
        self._interval = heartbeat_interval_s
        self._register_interval = register_interval_s
        self._log = logger
        self._on_failure = on_heartbeat_failure
        self._on_fatal = on_fatal
        self._clock = clock
        self.state = SessionState()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pool-session", daemon=True)
        self._last_register = 0.0
        self.loop_ticks = 0

    def start(self) -> None:
        self._thread.start()

    def set_intervals(self, heartbeat_interval_s: float, register_interval_s: float) -> None:
        self._interval = heartbeat_interval_s
        self._register_interval = register_interval_s
        self._wake.set()

    def poke(self) -> None:
        """Send a heartbeat now (e.g. when the node turned Busy or Idle)."""
        self._wake.set()

    def _loop(self) -> None:
        backoff = Backoff(initial=0.5, maximum=min(30.0, 6 * self._interval))
        while not self._stop.is_set():
            self.loop_ticks += 1
            try:
                self._once()
                backoff.reset()
                delay = self._interval
            except ProtocolMismatch as exc:
                # Registering anyway would have each side misread the other's messages.
                self._failed(str(exc))
                self._log.error("%s", exc, extra={"event": "pool.protocol_mismatch"})
                self._on_fatal(str(exc))
                return
            except (PoolCallFailed, PoolRefused) as exc:
                delay = backoff.next_delay()
                self._failed(str(exc))
            except Exception as exc:  # never let the session thread die
                delay = backoff.next_delay()
                self._failed(f"unexpected {type(exc).__name__}: {exc}")
                self._log.exception("pool session error", extra={"event": "pool.session_error"})
            self._wake.wait(delay)
            self._wake.clear()

    def _failed(self, msg: str) -> None:
        st = self.state
        first = st.connected or not st.last_error
        st.connected = False
        st.last_error = msg
        st.heartbeat_failures += 1
        self._on_failure()
        level = logging.WARNING if first else logging.DEBUG
        self._log.log(level, "pool unreachable or refusing: %s", msg, extra={"event": "pool.unavailable"})

    def _once(self) -> None:
        now = self._clock()
        st = self.state
        if not st.protocol_checked:
            self._client.probe()
            st.protocol_checked = True
            self._log.info("the pool speaks protocol generation %s", self._client.generation,
                           extra={"event": "pool.protocol"})
        if not st.registered or now - self._last_register >= self._register_interval:
            info = self._node_info()
            self._client.register(info)
            self._last_register = now
            if not st.registered:
                self._log.info("registered with the pool as %s at %s:%d", info.node_id, info.hostname,
                               info.port, extra={"event": "pool.registered"})
            st.registered = True
            st.registrations += 1
        known = self._client.report_status(self._node_status())
        if not known:
            self._log.warning("the pool forgot this node; registering again", extra={"event": "pool.reregister"})
            st.registered = False
            self._client.register(self._node_info())
            self._last_register = now
            st.registered = True
            st.registrations += 1
        for usage in self._task_usage():
            try:
                self._client.report_usage(usage.task_id, usage.cpu, usage.memory, usage.gpu, usage.gpu_memory,
                                          cpu_grant_cores=usage.cpu_grant_cores,
                                          memory_grant_mib=usage.memory_grant_mib)
            except PoolCallFailed:
                break
        if not st.connected:
            self._log.info("pool connection up", extra={"event": "pool.connected"})
        st.connected = True
        st.last_heartbeat = self._clock()
        st.last_error = ""

    def send_not_idle(self, status: NodeStatus) -> None:
        """One best-effort heartbeat (used at shutdown to report the node as not Idle)."""
        try:
            self._client.report_status(status)
        except (PoolCallFailed, PoolRefused) as exc:
            self._log.info("final status report failed: %s", exc, extra={"event": "pool.final_status_failed"})

    def healthy(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
