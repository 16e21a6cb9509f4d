"""sd_notify messages and the watchdog, against a real unix datagram socket as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemind.notify import Heartbeat, Notifier, Watchdog


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)  # a bound on a broken test, never a timing assertion
    yield path, sock
    sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(65536).decode("utf-8")


def pending(sock: socket.socket) -> list[str]:
    out: list[str] = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(65536).decode("utf-8"))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(10)


def test_without_notify_socket_everything_is_a_noop() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready("x") is False
    assert n.status("x") is False
    assert n.watchdog_interval() is None
    assert Watchdog(n, lambda: True).start() is False


def test_messages_reach_the_socket(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier({"NOTIFY_SOCKET": path}, monotonic_usec=lambda: 123456)
    assert n.ready("up; 0/2 slots busy")
    assert recv(sock) == "READY=1\nSTATUS=up; 0/2 slots busy"
    n.status("draining 1 task")
    assert recv(sock) == "STATUS=draining 1 task"
    n.reloading()
    assert recv(sock) == "RELOADING=1\nMONOTONIC_USEC=123456"
    n.stopping()
    assert recv(sock) == "STOPPING=1"
    n.stopping(extend_timeout_s=160)
    assert recv(sock) == "STOPPING=1\nEXTEND_TIMEOUT_USEC=160000000"
    n.watchdog()
    assert recv(sock) == "WATCHDOG=1"
    n.close()


def test_status_is_one_line_and_utf8(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    n.status("tâche 1\nREADY=1")
    # The injected READY=1 must not become a field of its own.
    assert recv(sock) == "STATUS=tâche 1 READY=1"


def test_real_monotonic_usec_is_sent(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    Notifier({"NOTIFY_SOCKET": path}).reloading()
    fields = dict(line.split("=", 1) for line in recv(sock).splitlines())
    assert fields["RELOADING"] == "1"
    assert int(fields["MONOTONIC_USEC"]) > 0


def test_abstract_socket_address() -> None:
    name = f"hivemind-test-{os.getpid()}-{threading.get_ident()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(10)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert recv(sock) == "READY=1"
    finally:
        sock.close()


def test_environment_is_unset_so_tasks_do_not_inherit_it(listener: tuple[str, socket.socket]) -> None:
    path, _ = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1", "PATH": "/bin"}
    n = Notifier(env, getpid=lambda: 1)
    assert env == {"PATH": "/bin"}
    assert n.enabled and n.watchdog_interval() == 15.0
    kept = {"NOTIFY_SOCKET": path}
    Notifier(kept, unset_environment=False)
    assert kept == {"NOTIFY_SOCKET": path}


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [("30000000", None, 15.0), ("30000000", "42", 15.0), ("30000000", "43", None),
     ("0", None, None), ("junk", None, None), (None, None, None), ("30000000", "x", None)],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None) -> None:
    env = {"NOTIFY_SOCKET": "/nonexistent"}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = pid
    assert Notifier(env, getpid=lambda: 42).watchdog_interval() == expected


def test_send_failure_is_swallowed(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    assert n.enabled
    assert n.ready() is False
    assert n.status("still no socket") is False


def test_watchdog_tick_pings_only_while_healthy(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    healthy = [True]

    def check() -> bool:
        if healthy[0] is None:
            raise RuntimeError("probe broke")
        return healthy[0]

    wd = Watchdog(Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}), check)  # type: ignore[arg-type]
    assert wd.interval == 0.5
    assert wd.tick() is True
    assert pending(sock) == ["WATCHDOG=1"]
    healthy[0] = False
    assert wd.tick() is False
    healthy[0] = None  # type: ignore[call-overload]
    assert wd.tick() is False
    assert pending(sock) == []
    healthy[0] = True
    assert wd.tick() is True
    assert pending(sock) == ["WATCHDOG=1"]


def test_watchdog_thread_stops_pinging_when_the_loop_hangs(listener: tuple[str, socket.socket]) -> None:
    """The real thread: pings while healthy; after the check turns false the check keeps being
    called but no ping arrives. Counts events, never measures time."""
    path, sock = listener
    state = {"healthy": True, "calls": 0}
    calls_seen = threading.Condition()

    def check() -> bool:
        with calls_seen:
            state["calls"] += 1
            calls_seen.notify_all()
        return bool(state["healthy"])

    def wait_for_calls(n: int) -> None:
        with calls_seen:
            assert calls_seen.wait_for(lambda: state["calls"] >= n, timeout=10)

    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})  # pings every 10 ms
    wd = Watchdog(notifier, check)
    assert wd.start()
    try:
        for _ in range(3):
            assert recv(sock) == "WATCHDOG=1"
        state["healthy"] = False
        wait_for_calls(int(state["calls"]) + 1)  # a check that may have started while healthy
        pending(sock)
        wait_for_calls(int(state["calls"]) + 3)
        assert pending(sock) == []
        state["healthy"] = True
        assert recv(sock) == "WATCHDOG=1"
    finally:
        wd.stop()
    assert not any(t.name == "sd-watchdog" for t in threading.enumerate())


def test_heartbeat_with_injected_clock() -> None:
    now = [100.0]
    hb = Heartbeat(5.0, clock=lambda: now[0])
    assert hb.fresh()
    now[0] = 105.0
    assert hb.fresh()
    now[0] = 105.1
    assert not hb.fresh()
    hb.beat()
    assert hb.fresh() and hb.age() == 0.0
