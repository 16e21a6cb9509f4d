"""The worker's gRPC service over a real loopback socket (legacy mode, 127.0.0.1 allowed)."""

from __future__ import annotations

import logging
import math
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemind._proto import nodepool_pb2, nodepool_pb2_grpc
from hivemind.config import ServerAuthConfig, ServerConfig
from hivemind.errors import ConfigError
from hivemind.server import (
    Decision,
    ExecuteRequest,
    RunningServer,
    ServerStartError,
    start_worker_server,
)
from hivemind.server.auth import AuthMode, choose_mode, peer_address
from hivemind.server.service import MAX_GB, MAX_SCORE

LOG = logging.getLogger("test.grpc_service")


class RecordingAcceptor:
    def __init__(self) -> None:
        self.executed: list[ExecuteRequest] = []
        self.stopped: list[tuple[str, str]] = []
        self.fail_with: Exception | None = None
        self.block: threading.Event | None = None
        self.arrived = threading.Semaphore(0)

    def execute(self, request: ExecuteRequest) -> Decision:
        if self.block is not None:
            self.arrived.release()
            self.block.wait(30)
        if self.fail_with is not None:
            raise self.fail_with
        self.executed.append(request)
        return Decision(True, f"accepted {request.task_id}")

    def stop(self, task_id: str, peer: str) -> Decision:
        self.stopped.append((task_id, peer))
        return Decision(True, "stopping")


def legacy_cfg(**kw: object) -> ServerConfig:
    auth = ServerAuthConfig(mode="legacy", legacy_allowed_peers=["127.0.0.1"])
    fields: dict[str, object] = {"listen_host": "127.0.0.1", "port": 0, "auth": auth, **kw}
    return ServerConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture
def acceptor() -> RecordingAcceptor:
    return RecordingAcceptor()


@pytest.fixture
def server(acceptor: RecordingAcceptor) -> Iterator[RunningServer]:
    running = start_worker_server(legacy_cfg(max_message_mb=1), acceptor, logger=LOG,
                                  max_workers=2)
    yield running
    if acceptor.block is not None:
        acceptor.block.set()
    running.stop(None)


@pytest.fixture
def stub(server: RunningServer) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield nodepool_pb2_grpc.WorkerNodeServiceStub(channel)  # type: ignore[no-untyped-call]


def execute(stub: Any, task_id: str = "task-1", task_zip: bytes = b"PK\x05\x06" + bytes(18),
            **kw: Any) -> Any:
    req = nodepool_pb2.ExecuteTaskRequest(task_id=task_id, task_zip=task_zip, **kw)
    return stub.ExecuteTask(req, timeout=10)


def test_execute_reaches_acceptor_with_typed_fields(server: RunningServer, stub: Any, acceptor: RecordingAcceptor) -> None:
    resp = execute(stub, cpu_usage=1500.5, gpu_usage=0.0, memory_gb=2, gpu_memory_gb=0)
    assert resp.success and resp.message == "accepted task-1"
    (req,) = acceptor.executed
    assert (req.task_id, req.cpu_score, req.memory_gb) == ("task-1", 1500.5, 2)
    assert req.peer.startswith("ipv4:127.0.0.1:")
    assert "bytes>" in repr(req)   # an archive never lands in a log line whole
    assert server.mode is AuthMode.LEGACY and server.insecure


@pytest.mark.parametrize("fields, needle", [
    ({"task_id": "../etc"}, "invalid task id"),
    ({"task_id": "a/b"}, "invalid task id"),
    ({"task_id": "a\x00b"}, "invalid task id"),
    ({"task_id": "x" * 10_000}, "invalid task id"),
    ({"task_id": ""}, "invalid task id"),
    ({"task_zip": b""}, "empty task archive"),
    ({"cpu_usage": math.nan}, "finite"),
    ({"gpu_usage": math.inf}, "finite"),
    ({"cpu_usage": -1.0}, "between 0"),
    ({"cpu_usage": MAX_SCORE * 10}, "between 0"),
    ({"memory_gb": -5}, "memory_gb"),
    ({"gpu_memory_gb": MAX_GB + 1}, "gpu_memory_gb"),
])
def test_bad_requests_refused_before_the_acceptor(stub: Any, acceptor: RecordingAcceptor, fields: dict[str, Any], needle: str) -> None:
    resp = execute(stub, **fields)
    assert not resp.success
    assert needle in resp.message
    assert len(resp.message) < 200   # a 10 kB id is not echoed back
    assert acceptor.executed == []


def test_acceptor_exception_is_internal_error_and_server_keeps_serving(stub: Any, acceptor: RecordingAcceptor, caplog: pytest.LogCaptureFixture) -> None:
    acceptor.fail_with = RuntimeError("boom")
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        resp = execute(stub)
    assert (resp.success, resp.message) == (False, "internal error")
    assert "acceptor failed" in caplog.text
    acceptor.fail_with = None
    assert execute(stub, task_id="task-2").success


def test_stop_task_execution(stub: Any, acceptor: RecordingAcceptor) -> None:
    resp = stub.StopTaskExecution(nodepool_pb2.StopTaskExecutionRequest(task_id="t9"), timeout=10)
    assert resp.success and acceptor.stopped[0][0] == "t9"
    bad = stub.StopTaskExecution(nodepool_pb2.StopTaskExecutionRequest(task_id="../x"), timeout=10)
    assert not bad.success and len(acceptor.stopped) == 1


@pytest.mark.parametrize("method, request_type", [
    ("TaskOutputUpload", nodepool_pb2.TaskOutputUploadRequest),
    ("TaskResultUpload", nodepool_pb2.TaskResultUploadRequest),
    ("TaskOutput", nodepool_pb2.TaskOutputRequest),
    ("TaskUsage", nodepool_pb2.TaskUsageRequest),
])
def test_pool_side_methods_unimplemented(stub: Any, method: str, request_type: Any) -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request_type(task_id="t"), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_oversized_request_refused_by_grpc(stub: Any, acceptor: RecordingAcceptor) -> None:
    with pytest.raises(grpc.RpcError) as err:
        execute(stub, task_zip=b"x" * (2 * 1024 * 1024))   # server limit: 1 MiB
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert acceptor.executed == []
    assert execute(stub).success


def test_healthy_detects_hung_handlers_and_stop(server: RunningServer, stub: Any, acceptor: RecordingAcceptor) -> None:
    assert server.healthy()
    acceptor.block = threading.Event()
    # Both of the server's 2 threads get stuck in the acceptor: no call can be answered.
    with futures.ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(execute, stub, f"hung-{i}") for i in range(2)]
        try:
            assert acceptor.arrived.acquire(timeout=10) and acceptor.arrived.acquire(timeout=10)
            assert not server.healthy(timeout=0.5)
        finally:
            acceptor.block.set()
        assert all(c.result().success for c in calls)
    assert server.healthy()
    server.stop(None)
    assert not server.healthy()


def test_health_socket_answers_nothing_else(server: RunningServer) -> None:
    channel = grpc.insecure_channel(f"unix:{server._health_dir / 'health.sock'}")
    with channel:
        stub = nodepool_pb2_grpc.WorkerNodeServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            execute(stub)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_port_in_use_is_a_clear_error(acceptor: RecordingAcceptor) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        cfg = legacy_cfg(port=port)
        with pytest.raises(ServerStartError, match=f"127.0.0.1:{port}"):
            start_worker_server(cfg, acceptor, logger=LOG)


def test_auto_mode_choice(tmp_path: Path) -> None:
    assert choose_mode(ServerAuthConfig(cert_file="c", key_file="k", client_ca_file="ca",
                                        token_file="t")) is AuthMode.MTLS
    assert choose_mode(ServerAuthConfig(cert_file="c", key_file="k", token_file="t")) is AuthMode.TOKEN
    assert choose_mode(ServerAuthConfig(legacy_allowed_peers=["10.0.0.1"])) is AuthMode.LEGACY
    with pytest.raises(ConfigError, match="legacy_allowed_peers"):
        choose_mode(ServerAuthConfig())
    # Half a secure setup never degrades to plaintext, even with an allow-list.
    with pytest.raises(ConfigError, match="not a complete secure setup"):
        choose_mode(ServerAuthConfig(cert_file="c", key_file="k", legacy_allowed_peers=["10.0.0.1"]))
    with pytest.raises(ConfigError, match="client_ca_file"):
        choose_mode(ServerAuthConfig(mode="mtls", cert_file="c", key_file="k"))
    with pytest.raises(ConfigError, match="token_file"):
        choose_mode(ServerAuthConfig(mode="token", cert_file="c", key_file="k"))


def test_bad_allow_list_entry_refuses_start(acceptor: RecordingAcceptor) -> None:
    cfg = ServerConfig(listen_host="127.0.0.1", port=0,
                       auth=ServerAuthConfig(legacy_allowed_peers=["pool.example"]))
    with pytest.raises(ConfigError, match="not an IP"):
        start_worker_server(cfg, acceptor, logger=LOG)


@pytest.mark.parametrize("peer, ip", [
    ("ipv4:127.0.0.1:5000", "127.0.0.1"),
    ("ipv6:[::1]:5000", "::1"),
    ("ipv6:%5B::1%5D:5000", "::1"),
    ("ipv6:[::ffff:10.1.2.3]:5000", "10.1.2.3"),
    ("unix:/run/x.sock", None),
    ("garbage", None),
])
def test_peer_address(peer: str, ip: str | None) -> None:
    got = peer_address(peer)
    assert (str(got) if got is not None else None) == ip
