"""PodmanService's restart and stop paths, against a stand-in `podman system service`.

The stand-in behaves as rootless Podman does where it matters here: the process started is a
parent that runs the real server as a child (Podman re-execs itself into the user namespace) and
forwards SIGTERM to it. A real rootless service is covered by test_podman_executor and the e2e
tests; what they can't do on demand is make the service die or ignore SIGTERM mid-batch.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemind.config import PodmanConfig
from hivemind.executors.podman_service import PodmanService, ping

FAKE_PODMAN = textwrap.dedent('''\
    #!/usr/bin/env python3
    import os, signal, socket, sys
    here = os.path.dirname(os.path.abspath(__file__))
    mode = open(os.path.join(here, "mode")).read().strip()
    path = sys.argv[-1][len("unix://"):]
    with open(os.path.join(here, "starts"), "a") as f:
        f.write(f"{os.getpid()}\\n")
    child = os.fork()
    if child == 0:
        if os.path.exists(path):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.listen(64)
        with open(os.path.join(here, "servers"), "a") as f:
            f.write(f"{os.getpid()}\\n")
        while True:
            c, _ = s.accept()
            c.recv(1024)
            c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nOK")
            c.close()
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGTERM))
    os.waitpid(child, 0)
''')


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pids(d: Path, name: str) -> list[int]:
    f = d / name
    return [int(x) for x in f.read_text().split()] if f.exists() else []


@pytest.fixture
def fake() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("rootful mode needs root")
    d = Path(tempfile.mkdtemp(prefix="hm-svc-"))   # short: a unix socket path has 107 bytes
    (d / "podman").write_text(FAKE_PODMAN)
    (d / "podman").chmod(0o755)
    (d / "mode").write_text("normal")
    yield d
    for pid in _pids(d, "starts") + _pids(d, "servers"):
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(d, ignore_errors=True)


def _service(d: Path, stop_timeout_s: float = 10.0) -> PodmanService:
    return PodmanService(PodmanConfig(mode="rootful"), logging.getLogger("test.podman_service"),
                         podman_bin=str(d / "podman"), rootful_socket=str(d / "run" / "podman.sock"),
                         state_dir=d / "state", start_timeout_s=10.0, stop_timeout_s=stop_timeout_s)


def test_callers_at_once_after_the_service_died_start_one_and_leave_no_orphan(fake: Path) -> None:
    svc = _service(fake)
    try:
        uri = svc.ensure()
        first_parent, first_server = _pids(fake, "starts")[0], _pids(fake, "servers")[0]
        os.kill(first_server, signal.SIGKILL)     # the service dies mid-batch
        deadline = time.monotonic() + 10
        while _alive(first_parent) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        barrier = threading.Barrier(8)
        uris: list[str] = []
        errors: list[BaseException] = []

        def call() -> None:
            barrier.wait()
            try:
                uris.append(svc.ensure())
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        # Past the trust window, so every caller really checks the dead service.
        svc._trusted_until = 0.0
        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert set(uris) == {uri}
        assert len(_pids(fake, "starts")) == 2, "one restart, not one per caller"
        running = [p for p in _pids(fake, "starts") + _pids(fake, "servers") if _alive(p)]
        assert len(running) == 2, f"exactly the new parent and its server run: {running}"
        assert ping(uri[len("unix://"):])
    finally:
        svc.close()
    assert not [p for p in _pids(fake, "starts") + _pids(fake, "servers") if _alive(p)]


def test_a_service_that_ignores_sigterm_is_killed_with_its_child(fake: Path) -> None:
    (fake / "mode").write_text("stubborn")
    svc = _service(fake, stop_timeout_s=0.5)
    svc.ensure()
    parent, server = _pids(fake, "starts")[0], _pids(fake, "servers")[0]
    svc.close()
    deadline = time.monotonic() + 5
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(parent)
    assert not _alive(server), "the re-exec'd child outlived its killed parent"
    assert not (fake / "state" / "podman-service.json").exists()


def test_an_adopted_service_that_ignores_sigterm_is_killed_with_its_child(fake: Path) -> None:
    (fake / "mode").write_text("stubborn")
    first = _service(fake, stop_timeout_s=0.5)
    first.ensure()
    parent, server = _pids(fake, "starts")[0], _pids(fake, "servers")[0]
    # A worker killed -9 leaves its service and the record; the next one adopts it...
    first._proc = None
    second = _service(fake, stop_timeout_s=0.5)
    second.ensure()
    assert len(_pids(fake, "starts")) == 1, "adopted, not started again"
    # ...and stops it on the way out, child and all.
    second.close()
    deadline = time.monotonic() + 5
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(parent)
    assert not _alive(server)
