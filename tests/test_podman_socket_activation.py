"""The shipped hivemind-podman.service command line serves a socket it is handed by socket
activation (LISTEN_FDS), as hivemind-podman.socket hands it: real Podman, started the way systemd
starts it (systemd-socket-activate passes the listening fd the same way), answering the API's
_ping through that socket. Rootful here (the test runs as root); the unit runs it as hivemind."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from unitfile import parse_unit

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.podman


def _ping(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)   # bounds a broken run; the first call waits for Podman to start
        s.connect(path)
        s.sendall(b"GET /_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode(errors="replace")


@pytest.mark.skipif(not shutil.which("podman") or not shutil.which("systemd-socket-activate"),
                    reason="needs podman and systemd-socket-activate")
def test_shipped_exec_start_serves_the_activated_socket() -> None:
    unit = parse_unit((REPO / "units/hivemind-podman.service").read_text())
    (exec_start,) = unit["Service"]["ExecStart"]
    argv = exec_start.split()
    assert argv[:3] == ["/usr/bin/podman", "system", "service"] and not any("://" in a for a in argv)
    path = f"/tmp/hm-podman-{uuid.uuid4().hex[:8]}.sock"
    # systemd-socket-activate binds and listens, then (on the first connection, which waits in the
    # backlog meanwhile) execs the command with LISTEN_FDS=1, as systemd does for the socket unit.
    proc = subprocess.Popen(["systemd-socket-activate", "-l", path, "--", shutil.which("podman") or argv[0],
                             *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not Path(path).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.05)
        reply = _ping(path)
        assert reply.startswith("HTTP/1.1 200") and reply.rstrip().endswith("OK"), reply
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        Path(path).unlink(missing_ok=True)
