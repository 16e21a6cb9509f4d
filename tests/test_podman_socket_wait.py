"""executors/select.py waits for a Podman socket that exists but refuses connections (its service
still starting) instead of falling back to venv at once; a missing socket is not waited for.
Real AF_UNIX sockets; the clock and sleep are injected, so nothing depends on wall-clock time."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemind.config import parse_config
from hivemind.executors.base import ExecutorStatus
from hivemind.executors.select import wait_for_socket

LOG = logging.getLogger("test")


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # AF_UNIX paths are short; pytest's tmp_path can exceed 108 bytes.
    path = Path(f"/tmp/hm-wait-{uuid.uuid4().hex[:8]}.sock")
    yield path
    path.unlink(missing_ok=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def test_waits_until_the_service_listens(sock_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))          # exists, but refuses: nobody listens yet
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(ConnectionRefusedError):
        probe.connect(str(sock_path))
    probe.close()
    clock = FakeClock()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.sleeps == 3:
            server.listen(1)              # the service came up while the worker waited

    try:
        wait_for_socket(f"unix://{sock_path}", 60, LOG, clock=clock, sleep=sleep)
        server.settimeout(5)
        conn, _ = server.accept()         # the wait ended with a real connection
        conn.close()
        assert clock.sleeps == 3
    finally:
        server.close()


def test_gives_up_after_the_bound(sock_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    clock = FakeClock()
    try:
        wait_for_socket(f"unix://{sock_path}", 5, LOG, clock=clock, sleep=clock.sleep)
    finally:
        server.close()
    assert 5 <= clock.now < 6 and clock.sleeps == 25


def test_a_missing_socket_is_not_waited_for(sock_path: Path) -> None:
    clock = FakeClock()
    wait_for_socket(f"unix://{sock_path}", 60, LOG, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == 0
    wait_for_socket("tcp://127.0.0.1:1", 60, LOG, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == 0


class _FakePodman:
    name = "podman"

    def probe(self) -> ExecutorStatus:
        return ExecutorStatus("podman", True, "podman 4.3 rootless")


@pytest.mark.parametrize(("socket_uri", "waited"), [("unix:///run/hivemind-podman/podman.sock", True), ("", False)])
def test_select_waits_only_for_a_configured_socket(monkeypatch: pytest.MonkeyPatch, socket_uri: str,
                                                    waited: bool) -> None:
    from hivemind.executors import select

    calls: list[tuple[str, float]] = []
    monkeypatch.setattr(select, "wait_for_socket", lambda uri, timeout, _log: calls.append((uri, timeout)))
    fake = _FakePodman()
    monkeypatch.setattr(select, "_podman", lambda _cfg, _log: (fake, fake.probe()))
    cfg = parse_config({"executor": {"kind": "podman", "podman": {"socket": socket_uri, "socket_wait_s": 42}}})
    executor, status = select.select_executor(cfg, LOG)
    assert status.usable and executor.name == "podman"
    assert calls == ([(socket_uri, 42.0)] if waited else [])
