"""Tell systemd how the worker is doing (sd_notify), and keep its watchdog fed only while healthy.

Without NOTIFY_SOCKET every call is a no-op, so the daemon calls these unconditionally.

The daemon's order (what systemd expects of a Type=notify service):
    notifier = Notifier()                     # reads and, by default, unsets NOTIFY_SOCKET & co.
    ... signal handlers installed, gRPC server listening ...
    notifier.ready("Registered with pool at ...; 0/4 slots busy")
    Watchdog(notifier, health_check).start()  # no thread when the unit sets no WatchdogSec=
    on SIGHUP:  notifier.reloading(); reload config; notifier.ready(status)
    on SIGTERM: notifier.stopping(); drain; exit

The datagrams are sent with the standard library, not systemd-python's `systemd.daemon.notify`
(libsystemd's sd_pid_notify), although that library is a dependency already (the journal
handler): sd_notify reads $NOTIFY_SOCKET from the process environment on every call, so the
variable would have to stay set for the daemon's whole life and every child the worker spawns
(setpriv, pip, podman, the Podman API service it may start) would inherit it. This module reads
the socket address once, unsets the variables before any child exists, and takes an injectable
environment for tests. The protocol is one AF_UNIX datagram of KEY=value lines (abstract
addresses start with "@"), which is all sd_notify does for these messages.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, MutableMapping

# Variables a child must not inherit: with them a task could pose as the worker to systemd
# (NotifyAccess=main ignores it, but a venv task running as the same user shouldn't even try).
_NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify messages to $NOTIFY_SOCKET; every method is a no-op when it is unset.

    Thread-safe: the watchdog thread and the main loop may call it at the same time.
    """

    def __init__(
        self,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = True,
        monotonic_usec: Callable[[], int] = _monotonic_usec,
        getpid: Callable[[], int] = os.getpid,
        logger: logging.Logger | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET", "")
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        if unset_environment:
            for name in _NOTIFY_VARIABLES:
                env.pop(name, None)
        self._monotonic_usec = monotonic_usec
        self._getpid = getpid
        self._log = logger or logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failed_once = False

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram; True if it was sent. Never raises."""
        if not self._address:
            return False
        payload = "\n".join(assignments).encode("utf-8")
        addr = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(payload, addr)
                return True
            except OSError as exc:
                # Log once: if systemd's socket is gone, every later call would fail the same way.
                if not self._failed_once:
                    self._failed_once = True
                    self._log.warning("sd_notify to %s failed: %s", self._address, exc)
                return False

    def ready(self, status: str | None = None) -> bool:
        """The service is up (or a reload finished); systemd marks it active (running)."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(_status_field(status))
        return self.notify(*fields)

    def status(self, line: str) -> bool:
        """One human-readable line, shown by `systemctl status`."""
        return self.notify(_status_field(line))

    def reloading(self) -> bool:
        """A reload began; call ready() when it is done. MONOTONIC_USEC is what systemd >= 253
        uses to tell this reload from an older one (Type=notify-reload); older versions ignore it."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={self._monotonic_usec()}")

    def stopping(self, extend_timeout_s: float | None = None) -> bool:
        """Shutdown began. `extend_timeout_s`: the stop may take this long (a drain), so systemd
        must not kill the worker before then even when the unit's TimeoutStopSec is shorter."""
        fields = ["STOPPING=1"]
        if extend_timeout_s is not None and extend_timeout_s > 0:
            fields.append(f"EXTEND_TIMEOUT_USEC={int(extend_timeout_s * 1_000_000)}")
        return self.notify(*fields)

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when systemd runs
        no watchdog for this process."""
        if not self._address:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != self._getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status_field(line: str) -> str:
    # A newline would end the STATUS assignment and let the rest pose as another field.
    return "STATUS=" + " ".join(line.splitlines())


class Watchdog:
    """Sends WATCHDOG=1 every `interval` seconds while `health_check()` returns True.

    When the check fails (or raises) the ping is skipped, so systemd kills and restarts a worker
    whose main loop hangs. The check must be quick and must not block on the main loop itself
    (read a timestamp the loop writes; probe the gRPC server with a short deadline).
    """

    def __init__(
        self,
        notifier: Notifier,
        health_check: Callable[[], bool],
        *,
        interval: float | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._notifier = notifier
        self._health_check = health_check
        self._interval = interval if interval is not None else notifier.watchdog_interval()
        self._log = logger or logging.getLogger(__name__)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._healthy = True

    @property
    def interval(self) -> float | None:
        return self._interval

    def tick(self) -> bool:
        """One check and, if healthy, one ping; returns whether it pinged."""
        try:
            healthy = bool(self._health_check())
        except Exception:
            self._log.exception("watchdog health check raised; treating the worker as unhealthy")
            healthy = False
        if healthy != self._healthy:
            self._healthy = healthy
            if healthy:
                self._log.info("health check passes again; watchdog pings resumed",
                               extra={"event": "watchdog.healthy"})
            else:
                self._log.error("health check failed; withholding watchdog pings so systemd "
                                "restarts the worker if it does not recover",
                                extra={"event": "watchdog.unhealthy"})
        if healthy:
            return self._notifier.watchdog()
        return False

    def start(self) -> bool:
        """Start the thread; False (and no thread) when systemd runs no watchdog for us."""
        if self._interval is None or self._thread is not None:
            return False
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        assert self._interval is not None
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self._interval)


class Heartbeat:
    """What a health check reads to know the main loop still turns: the loop calls beat() each
    iteration; fresh() is True while the last beat is at most `max_age` seconds old."""

    def __init__(self, max_age: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_age = max_age
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def age(self) -> float:
        return self._clock() - self._last

    def fresh(self) -> bool:
        return self.age() <= self._max_age
