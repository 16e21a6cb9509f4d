"""Unauthenticated callers cost the worker almost nothing (issue 14), over real gRPC sockets.

The server runs in its own process so its memory is measured apart from the client's, which
holds the large messages. Each attack sends 10 concurrent 200 MiB ExecuteTask calls: before the
fix (credentials checked after the body was read and parsed) each cost the server about twice
its size, so the growth asserted below (< 64 MiB, against ~4 GiB) can't be met by a worker that
reads bodies before checking the caller.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemind._proto import nodepool_pb2, nodepool_pb2_grpc
from hivemind.config import ServerAuthConfig, ServerConfig
from hivemind.server import Decision, ExecuteRequest, pool_channel_credentials, start_worker_server

from certs import PKI, make_pki

LOG = logging.getLogger("test.grpc_abuse")
MiB = 1024 * 1024
BIG = 200 * MiB
CALLS = 10
RSS_GROWTH_LIMIT = 64 * MiB
TOKEN = "abuse-token-7f1e2d3c4b5a"
SERVER_SCRIPT = Path(__file__).with_name("abuse_server.py")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def big_request() -> nodepool_pb2.ExecuteTaskRequest:
    return nodepool_pb2.ExecuteTaskRequest(task_id="abuse-big", task_zip=b"\0" * BIG)


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{key} missing from /proc/{pid}/status")


class ServerProcess:
    def __init__(self, tmp: Path, conf: dict[str, Any]) -> None:
        path = tmp / "server.json"
        path.write_text(json.dumps(conf))
        # This checkout's package, whichever checkout the interpreter's editable install names.
        env = {**os.environ, "PYTHONPATH": str(SERVER_SCRIPT.parent.parent)}
        self.proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), str(path)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), f"server did not start: {line!r}"
        self.port = int(line)

    def rss(self) -> int:
        return _status_kib(self.proc.pid, "VmRSS")

    def peak(self) -> int:
        return _status_kib(self.proc.pid, "VmHWM")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], ServerProcess]]:
    started: list[ServerProcess] = []

    def start(conf: dict[str, Any]) -> ServerProcess:
        s = ServerProcess(tmp_path, conf)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def flood(port: int, creds: grpc.ChannelCredentials | None,
          request: nodepool_pb2.ExecuteTaskRequest, metadata: tuple[tuple[str, str], ...] = (),
          calls: int = CALLS) -> list[grpc.StatusCode]:
    """`calls` concurrent ExecuteTask calls, each on its own connection; their status codes."""
    def one(_: int) -> grpc.StatusCode:
        target = f"127.0.0.1:{port}"
        opts = [("grpc.max_send_message_length", 1024 * MiB)]
        channel = (grpc.secure_channel(target, creds, options=opts) if creds is not None
                   else grpc.insecure_channel(target, options=opts))
        with channel:
            stub = nodepool_pb2_grpc.WorkerNodeServiceStub(channel)  # type: ignore[no-untyped-call]
            try:
                stub.ExecuteTask(request, metadata=metadata, timeout=120)
                return grpc.StatusCode.OK
            except grpc.RpcError as err:
                return err.code()  # type: ignore[no-any-return]

    with futures.ThreadPoolExecutor(calls) as pool:
        return list(pool.map(one, range(calls)))


def token_conf(pki: PKI, tmp: Path) -> dict[str, Any]:
    (tmp / "token").write_text(TOKEN)
    return {"auth": {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key),
                     "token_file": str(tmp / "token")}, "server": {"max_message_mb": 1024}}


def assert_bounded(server: ServerProcess, before: int, what: str) -> None:
    growth = server.peak() - before
    LOG.warning("%s: server peak RSS grew %.1f MiB", what, growth / MiB)
    assert growth < RSS_GROWTH_LIMIT, f"{what}: server RSS grew {growth / MiB:.0f} MiB"


def test_wrong_token_floods_cost_the_server_almost_nothing(
        pki: PKI, tmp_path: Path, server: Callable[[dict[str, Any]], ServerProcess],
        big_request: nodepool_pb2.ExecuteTaskRequest) -> None:
    s = server(token_conf(pki, tmp_path))
    before = s.peak()
    codes = flood(s.port, pool_channel_credentials(str(pki.ca)), big_request,
                  metadata=(("authorization", "Bearer not-the-token"),))
    # The per-address limiter (10 failures a minute) may turn the last ones into a cool-down.
    assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) >= 1
    assert_bounded(s, before, "token mode, wrong token")


def test_mtls_without_certificate_is_refused_in_the_handshake(
        pki: PKI, server: Callable[[dict[str, Any]], ServerProcess],
        big_request: nodepool_pb2.ExecuteTaskRequest) -> None:
    s = server({"auth": {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key),
                         "client_ca_file": str(pki.ca)}, "server": {"max_message_mb": 1024}})
    before = s.peak()
    codes = flood(s.port, pool_channel_credentials(str(pki.ca)), big_request)
    assert codes == [grpc.StatusCode.UNAVAILABLE] * CALLS
    assert_bounded(s, before, "mtls, no client certificate")


def test_legacy_unlisted_peer_flood_costs_the_server_almost_nothing(
        server: Callable[[dict[str, Any]], ServerProcess],
        big_request: nodepool_pb2.ExecuteTaskRequest) -> None:
    # The client connects from 127.0.0.1; only 127.0.0.9 is allowed.
    s = server({"auth": {"legacy_allowed_peers": ["127.0.0.9"]},
                "server": {"max_message_mb": 1024}})
    before = s.peak()
    codes = flood(s.port, None, big_request)
    assert set(codes) <= {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.PERMISSION_DENIED) >= 1
    assert_bounded(s, before, "legacy, unlisted peer")


def test_message_limit_follows_the_archive_limit(
        server: Callable[[dict[str, Any]], ServerProcess],
        big_request: nodepool_pb2.ExecuteTaskRequest) -> None:
    """An allowed caller's message over archive.max_archive_mb is refused by grpc itself."""
    s = server({"auth": {"legacy_allowed_peers": ["127.0.0.1"]},
                "server": {"max_message_mb": 1024}, "max_archive_mb": 16})
    small = nodepool_pb2.ExecuteTaskRequest(task_id="abuse-small", task_zip=b"\0" * (8 * MiB))
    assert flood(s.port, None, small, calls=1) == [grpc.StatusCode.OK]
    assert flood(s.port, None, big_request, calls=1) == [grpc.StatusCode.RESOURCE_EXHAUSTED]


# -- the in-flight budget (in-process server: the acceptor holds calls in flight) ----------

class HoldingAcceptor:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.executed: list[str] = []

    def execute(self, request: ExecuteRequest) -> Decision:
        self.entered.release()
        self.release.wait(30)
        self.executed.append(request.task_id)
        return Decision(True, "accepted")

    def stop(self, task_id: str, peer: str) -> Decision:
        return Decision(True, "stopping")


def test_uploads_past_the_budget_get_resource_exhausted_at_once() -> None:
    acceptor = HoldingAcceptor()
    cfg = ServerConfig(listen_host="127.0.0.1", port=0, max_inflight_uploads=2,
                       auth=ServerAuthConfig(legacy_allowed_peers=["127.0.0.1"]))
    running = start_worker_server(cfg, acceptor, logger=LOG, max_archive_mb=4)
    request = nodepool_pb2.ExecuteTaskRequest(task_id="abuse-held", task_zip=b"PK")
    try:
        with futures.ThreadPoolExecutor(2) as pool:
            held = [pool.submit(flood, running.port, None, request, calls=1) for _ in range(2)]
            for _ in range(2):
                assert acceptor.entered.acquire(timeout=10)
            # Both budget slots are taken: a third upload is refused without waiting for them.
            assert flood(running.port, None, request, calls=1) == \
                [grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert running.healthy()
            acceptor.release.set()
            assert [f.result()[0] for f in held] == [grpc.StatusCode.OK] * 2
        # The slots came back.
        assert flood(running.port, None, request, calls=1) == [grpc.StatusCode.OK]
        assert len(acceptor.executed) == 3
    finally:
        acceptor.release.set()
        running.stop(None)
