"""What the worker puts on the wire, decoded with each protocol generation's own bindings.

A recording pool (a real gRPC server on loopback that keeps the raw request bytes of every call)
answers the worker's pool client; each request is then decoded with that generation's messages
and every field the pool reads is checked, with the bearer metadata. In the other direction,
ExecuteTask/StopTaskExecution bytes built with each generation's bindings are sent to the
worker's real gRPC server, and what reached the acceptor is checked. Plus the generation probe
in both directions, against the development pool and with a real worker process.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemind._proto.v2025_10 import nodepool_pb2 as pb25
from hivemind._proto.v2025_10 import nodepool_pb2_grpc as pb25_grpc
from hivemind._proto.v2026_04 import nodepool_pb2 as pb26
from hivemind._proto.v2026_04 import nodepool_pb2_grpc as pb26_grpc
from hivemind.config import parse_config
from hivemind.devpool import jwt
from hivemind.devpool.server import DevPool
from hivemind.pool.client import NodeInfo, NodeStatus, PoolClient, ProtocolMismatch
from hivemind.pool.select import open_pool_client
from hivemind.secrets import Secret
from hivemind.server import Decision, ExecuteRequest, start_worker_server

from e2e import GENERATIONS, WORKER_PASSWORD, make_pool, write_worker_config

LOG = logging.getLogger("test")
NODE = "node-wire"


class RecordingPool(grpc.GenericRpcHandler):
    """Answers the methods in `replies` with fixed serialized responses and records each call's
    raw request bytes and metadata; any other method is UNIMPLEMENTED, as on a real pool."""

    def __init__(self, replies: dict[str, bytes]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []
        self._lock = threading.Lock()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:  # type: ignore[override]
        method: str = details.method  # type: ignore[attr-defined]
        if method not in self.replies:
            return None

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:
                self.calls.append((method, request, {k: str(v) for k, v in context.invocation_metadata()}))
            return self.replies[method]

        return grpc.unary_unary_rpc_method_handler(handle)

    def requests(self, method: str) -> list[tuple[bytes, dict[str, str]]]:
        with self._lock:
            return [(raw, md) for m, raw, md in self.calls if m.endswith("/" + method)]


TOKEN = jwt.encode({"sub": "worker", "iat": time.time(), "exp": time.time() + 3600}, b"w" * 32)


def replies_2026() -> dict[str, bytes]:
    ok = {"success": True, "message": "ok"}
    return {
        "/nodepool.UserService/Login": pb26.LoginResponse(success=True, token=TOKEN).SerializeToString(),
        "/nodepool.NodeManagerService/RegisterWorkerNode": pb26.StatusResponse(**ok).SerializeToString(),
        "/nodepool.NodeManagerService/ReportStatus": pb26.RunningStatusResponse(**ok).SerializeToString(),
        "/nodepool.WorkerNodeService/TaskOutputUpload": pb26.TaskOutputUploadResponse(**ok).SerializeToString(),
        "/nodepool.WorkerNodeService/TaskUsage": pb26.TaskUsageResponse(**ok).SerializeToString(),
        "/nodepool.WorkerNodeService/TaskResultUpload": pb26.TaskResultUploadResponse(**ok).SerializeToString(),
    }


def replies_2025() -> dict[str, bytes]:
    ok = pb25.StatusResponse(success=True, message="ok").SerializeToString()
    return {
        "/nodepool.UserService/Login": pb25.LoginResponse(success=True, token=TOKEN).SerializeToString(),
        "/nodepool.NodeManagerService/HealthCheck": pb25.HealthCheckResponse(healthy=False).SerializeToString(),
        "/nodepool.NodeManagerService/RegisterWorkerNode": ok,
        "/nodepool.NodeManagerService/ReportStatus": ok,
        "/nodepool.MasterNodeService/StoreLogs": ok,
        "/nodepool.MasterNodeService/StoreOutput": ok,
        "/nodepool.MasterNodeService/ReturnTaskResult":
            pb25.ReturnTaskResultResponse(success=True, message="stored").SerializeToString(),
        "/nodepool.MasterNodeService/TaskCompleted":
            pb25.StatusResponse(success=False, message="Task already completed").SerializeToString(),
    }


@pytest.fixture()
def recording(request: pytest.FixtureRequest) -> Iterator[tuple[RecordingPool, str]]:
    generation = request.param
    rec = RecordingPool(replies_2025() if generation == "2025-10" else replies_2026())
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers([rec])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield rec, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def client(address: str, generation: str) -> PoolClient:
    cfg = parse_config({"pool": {"address": address, "username": "worker", "call_timeout_s": 5,
                                 "protocol": generation}}, {})
    return open_pool_client(cfg.pool, Secret(WORKER_PASSWORD), NODE, LOG)


INFO = NodeInfo(NODE, "127.0.0.2", 50123, 4, 15, 4321, 7, 8, "Tesla T4", "lab-3", "podman rootless")


def result_zip(tmp: Path, status: str) -> Path:
    path = tmp / f"result-{status}.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("out.txt", "data")
        zf.writestr("_hivemind/execution.json", json.dumps({"status": status, "exit_code": 0}))
    return path


def drive(c: PoolClient, tmp: Path, status: str = "succeeded") -> None:
    c.probe()
    c.register(INFO)
    assert c.report_status(NodeStatus("Idle", 12.5, 40.0, 0.0, 0.0, "podman rootless", 0))
    assert c.report_status(NodeStatus("Busy", 90.0, 70.0, 0.0, 0.0, "podman rootless", 2))
    c.upload_output("t-1", "line one\nline two\n")
    c.report_usage("t-1", cpu=150.0, memory=256.5, gpu=30.0, gpu_memory=1024.0)
    c.upload_result("t-1", result_zip(tmp, status))


def assert_bearer(md: dict[str, str]) -> None:
    assert md.get("authorization") == f"Bearer {TOKEN}", md


@pytest.mark.parametrize("recording", ["2026-04"], indirect=True)
def test_2026_04_messages_decoded_with_their_own_bindings(recording, tmp_path: Path) -> None:
    rec, address = recording
    c = client(address, "2026-04")
    drive(c, tmp_path)
    c.close()
    (raw, md), = rec.requests("Login")
    login = pb26.LoginRequest.FromString(raw)
    assert (login.username, login.password) == ("worker", WORKER_PASSWORD)
    assert "authorization" not in md
    (raw, md), = rec.requests("RegisterWorkerNode")
    reg = pb26.RegisterWorkerNodeRequest.FromString(raw)
    assert (reg.node_id, reg.hostname, reg.port, reg.cpu_cores, reg.memory_gb, reg.cpu_score, reg.gpu_score,
            reg.gpu_memory_gb, reg.gpu_name, reg.location, reg.docker_status) == (
        NODE, "127.0.0.2", 50123, 4, 15, 4321, 7, 8, "Tesla T4", "lab-3", "podman rootless")
    assert_bearer(md)
    (idle, md1), (busy, md2) = rec.requests("ReportStatus")
    i, b = pb26.RunningStatusRequest.FromString(idle), pb26.RunningStatusRequest.FromString(busy)
    assert (i.node_id, i.status, i.cpu_usage, i.memory_usage, i.running_tasks, i.docker_status) == (
        NODE, "Idle", 12.5, 40.0, 0, "podman rootless")
    assert (b.status, b.running_tasks) == ("Busy", 2)
    assert_bearer(md1)
    assert_bearer(md2)
    (raw, md), = rec.requests("TaskOutputUpload")
    out = pb26.TaskOutputUploadRequest.FromString(raw)
    assert (out.task_id, out.output, out.token) == ("t-1", "line one\nline two\n", TOKEN)
    assert_bearer(md)
    probe, usage = rec.requests("TaskUsage")
    ping = pb26.TaskUsageRequest.FromString(probe[0])
    assert (ping.task_id, ping.token) == ("0", NODE)       # the node-level liveness ping
    u = pb26.TaskUsageRequest.FromString(usage[0])
    assert (u.task_id, u.cpu_usage, u.memory_usage, u.gpu_usage, u.gpu_memory_usage, u.token) == (
        "t-1", 150.0, 256.5, 30.0, 1024.0, TOKEN)
    assert_bearer(usage[1])
    # No ResultTransfer on this pool (UNIMPLEMENTED): one TaskResultUpload with the whole zip.
    (raw, md), = rec.requests("TaskResultUpload")
    res = pb26.TaskResultUploadRequest.FromString(raw)
    assert res.task_id == "t-1" and res.token == TOKEN
    assert res.result_zip == (tmp_path / "result-succeeded.zip").read_bytes()
    assert_bearer(md)
    assert not rec.requests("HealthCheck") and not rec.requests("StoreLogs")


@pytest.mark.parametrize("recording", ["2025-10"], indirect=True)
@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_2025_10_messages_decoded_with_their_own_bindings(recording, tmp_path: Path, status: str) -> None:
    rec, address = recording
    c = client(address, "2025-10")
    before = time.time()
    drive(c, tmp_path, status)
    c.close()
    (raw, md), = rec.requests("Login")
    assert pb25.LoginRequest.FromString(raw).username == "worker" and "authorization" not in md
    (raw, md), = rec.requests("HealthCheck")
    assert raw == b"" and pb25.HealthCheckRequest.FromString(raw) == pb25.HealthCheckRequest()
    assert_bearer(md)
    (raw, md), = rec.requests("RegisterWorkerNode")
    reg = pb25.RegisterWorkerNodeRequest.FromString(raw)
    assert (reg.node_id, reg.hostname, reg.port, reg.cpu_cores, reg.memory_gb, reg.cpu_score, reg.gpu_score,
            reg.gpu_memory_gb, reg.gpu_name, reg.location, reg.docker_status) == (
        NODE, "127.0.0.2", 50123, 4, 15, 4321, 7, 8, "Tesla T4", "lab-3", "podman rootless")
    assert_bearer(md)
    (idle, md1), (busy, _) = rec.requests("ReportStatus")
    i = pb25.ReportStatusRequest.FromString(idle)
    assert (i.node_id, i.status_message) == (NODE, "Idle")
    assert pb25.ReportStatusRequest.FromString(busy).status_message != "Idle"
    assert_bearer(md1)
    # Nothing else rides in the heartbeat: the message has exactly the two fields.
    assert pb25.ReportStatusRequest.FromString(idle).SerializeToString() == idle
    (raw, md), = rec.requests("StoreLogs")
    logs = pb25.StoreLogsRequest.FromString(raw)
    assert (logs.node_id, logs.task_id, logs.logs) == (NODE, "t-1", "line one\nline two\n")
    assert before - 1 <= logs.timestamp <= time.time() + 1
    assert_bearer(md)
    (raw, md), = rec.requests("StoreOutput")
    so = pb25.StoreOutputRequest.FromString(raw)
    assert so.task_id == "t-1" and so.output.startswith("RESOURCE_USAGE: ")
    assert json.loads(so.output[len("RESOURCE_USAGE: "):]) == {
        "cpu_percent": 150.0, "memory_mb": 256.5, "gpu_percent": 30.0, "gpu_memory_mb": 1024.0}
    (raw, md), = rec.requests("ReturnTaskResult")
    ret = pb25.ReturnTaskResultRequest.FromString(raw)
    assert ret.task_id == "t-1" and ret.result_zip == (tmp_path / f"result-{status}.zip").read_bytes()
    assert_bearer(md)
    (raw, md), = rec.requests("TaskCompleted")
    done = pb25.TaskCompletedRequest.FromString(raw)
    assert (done.task_id, done.node_id, done.success) == ("t-1", NODE, status == "succeeded")
    # ReturnTaskResult came first, as the pool expects.
    order = [m.rsplit("/", 1)[1] for m, _, _ in rec.calls]
    assert order.index("ReturnTaskResult") < order.index("TaskCompleted")
    # None of 2026-04's methods was called.
    assert not any(m in order for m in ("TaskUsage", "TaskOutputUpload", "TaskResultUpload", "RefreshToken"))


class Recorder:
    def __init__(self) -> None:
        self.executed: list[ExecuteRequest] = []
        self.stopped: list[str] = []

    def execute(self, request: ExecuteRequest) -> Decision:
        self.executed.append(request)
        return Decision(True, "accepted")

    def stop(self, task_id: str, peer: str) -> Decision:
        self.stopped.append(task_id)
        return Decision(True, "stopping")


@pytest.mark.parametrize("generation", GENERATIONS)
def test_the_worker_reads_execute_task_in_each_generations_messages(generation: str) -> None:
    cfg = parse_config({"server": {"listen_host": "127.0.0.1", "port": 0,
                                   "auth": {"mode": "legacy", "legacy_allowed_peers": ["127.0.0.1"]}}}, {})
    rec = Recorder()
    server = start_worker_server(cfg.server, rec, logger=LOG, generation=generation, node_id=NODE)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            if generation == "2025-10":
                stub: Any = pb25_grpc.WorkerNodeServiceStub(ch)
                reply = stub.ExecuteTask(pb25.ExecuteTaskRequest(
                    node_id=NODE, task_id="t-25", task_zip=b"PKzip", cpu=2500, gpu=40, memory_gb=3,
                    gpu_memory_gb=2), timeout=10)
                stop = stub.StopTaskExecution(pb25.StopTaskExecutionRequest(task_id="t-25"), timeout=10)
                # A task meant for another node is refused (the pool keeps it queued).
                other = stub.ExecuteTask(pb25.ExecuteTaskRequest(
                    node_id="someone-else", task_id="t-26", task_zip=b"PKzip"), timeout=10)
                assert not other.success and "someone-else" in other.message
                with pytest.raises(grpc.RpcError) as exc:
                    stub.ReportOutput(pb25.ReportOutputRequest(task_id="t-25"), timeout=10)
                assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
            else:
                stub = pb26_grpc.WorkerNodeServiceStub(ch)
                reply = stub.ExecuteTask(pb26.ExecuteTaskRequest(
                    task_id="t-25", task_zip=b"PKzip", cpu_usage=2500.0, gpu_usage=40.0, memory_gb=3,
                    gpu_memory_gb=2), timeout=10)
                stop = stub.StopTaskExecution(pb26.StopTaskExecutionRequest(task_id="t-25"), timeout=10)
        assert reply.success and reply.message == "accepted"
        assert stop.success and rec.stopped == ["t-25"]
        (req,) = rec.executed
        assert (req.task_id, req.task_zip, req.cpu_score, req.gpu_score, req.memory_gb, req.gpu_memory_gb) == (
            "t-25", b"PKzip", 2500.0, 40.0, 3, 2)
    finally:
        server.stop(0)


def test_the_other_generations_execute_task_would_be_garbage() -> None:
    # Why the choice must be explicit: 2025-10's ExecuteTask read as 2026-04 moves every field.
    raw = pb25.ExecuteTaskRequest(node_id=NODE, task_id="t-x", task_zip=b"PK", cpu=100).SerializeToString()
    misread = pb26.ExecuteTaskRequest.FromString(raw)
    assert misread.task_id == NODE and misread.task_zip == b"t-x"


# -- the generation probe -------------------------------------------------------------------------

@pytest.mark.parametrize("worker_gen,pool_gen", [("2026-04", "2025-10"), ("2025-10", "2026-04"),
                                                 ("2026-04", "2026-04"), ("2025-10", "2025-10")])
def test_probe_against_the_development_pool(tmp_path: Path, worker_gen: str, pool_gen: str) -> None:
    pool = DevPool(users={"worker": WORKER_PASSWORD}, spool_dir=tmp_path / "s", dispatch_interval_s=3600,
                   protocol=pool_gen)
    pool.start()
    c = client(pool.address, worker_gen)
    try:
        if worker_gen == pool_gen:
            c.probe()
            return
        with pytest.raises(ProtocolMismatch) as exc:
            c.probe()
        message = str(exc.value)
        assert f"pool.protocol is {worker_gen}" in message and f"{pool_gen} pool" in message
        assert "2026-04" in message and "2025-10" in message
    finally:
        c.close()
        pool.stop()


@pytest.mark.parametrize("worker_gen,pool_gen", [("2026-04", "2025-10"), ("2025-10", "2026-04")])
def test_a_worker_started_against_the_other_generation_fails_fast(tmp_path: Path, worker_gen: str,
                                                                  pool_gen: str) -> None:
    pool = make_pool(tmp_path / "spool", protocol=pool_gen)
    w = write_worker_config(tmp_path, pool.address, {"kind": "venv"}, protocol=worker_gen)
    try:
        w.start()
        assert w.proc is not None
        rc = w.proc.wait(60)
        assert rc == 2, w.log()[-2000:]   # a configuration error: pool.protocol is wrong
        log = w.log()
        line = next(x for x in log.splitlines() if "pool.protocol is" in x)
        assert worker_gen in line and pool_gen in line
        assert "pool.registered" not in log
        assert pool.nodes() == [], "the worker registered with a pool of the other generation"
    finally:
        if w.alive():
            w.kill9()
        pool.stop()
        shutil.rmtree(w.state_dir, ignore_errors=True)


# -- the config key ---------------------------------------------------------------------------------

def test_pool_protocol_key_is_validated_and_shown_by_check_config(tmp_path: Path) -> None:
    import subprocess
    import sys

    from hivemind.errors import ConfigError

    assert parse_config({}, {}).pool.protocol == "2026-04"
    with pytest.raises(ConfigError) as exc:
        parse_config({"pool": {"protocol": "2024-01"}}, {})
    text = "\n".join(exc.value.problems)
    assert "pool.protocol" in text and "2026-04" in text and "2025-10" in text
    (tmp_path / "pw").write_text("secret\n")
    cfg = tmp_path / "worker.yaml"
    # Unquoted, as an operator would write it: YAML reads 2025-10 as a string, not a date.
    cfg.write_text(f"pool:\n  protocol: 2025-10\n  password_file: {tmp_path / 'pw'}\n"
                   "server:\n  auth: {legacy_allowed_peers: [192.0.2.10]}\n")
    r = subprocess.run([sys.executable, "-m", "hivemind", "check-config", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "pool protocol 2025-10" in r.stdout
    r = subprocess.run([sys.executable, "-m", "hivemind", "check-config", "--defaults"],
                       capture_output=True, text=True, timeout=60)
    assert "  protocol: 2026-04  # Protocol generation" in r.stdout


# -- authentication of the pool's calls, 2025-10 messages --------------------------------------------

def test_every_auth_mode_guards_the_2025_10_service(tmp_path: Path) -> None:
    """The auth interceptor works on method paths and metadata, which both generations share;
    here each mode is attacked with 2025-10 ExecuteTask calls (test_grpc_auth does 2026-04)."""
    from hivemind.config import ServerAuthConfig, ServerConfig
    from hivemind.server import pool_channel_credentials

    from certs import make_pki

    pki = make_pki(tmp_path / "pki")
    (tmp_path / "token").write_text("tok-2025-10-7c1d\n")
    rec = Recorder()
    request = pb25.ExecuteTaskRequest(node_id=NODE, task_id="t-auth", task_zip=b"PKzip")

    def serve(auth: ServerAuthConfig) -> Any:
        return start_worker_server(ServerConfig(listen_host="127.0.0.1", port=0, auth=auth), rec,
                                   logger=LOG, generation="2025-10")

    def execute(port: int, creds: grpc.ChannelCredentials | None, metadata: Any = None) -> Any:
        target = f"127.0.0.1:{port}"
        with (grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)) as ch:
            return pb25_grpc.WorkerNodeServiceStub(ch).ExecuteTask(request, metadata=metadata, timeout=10)

    def refused(port: int, creds: grpc.ChannelCredentials | None, metadata: Any = None) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as err:
            execute(port, creds, metadata)
        return err.value.code()

    servers = []
    try:
        legacy = serve(ServerAuthConfig(mode="legacy", legacy_allowed_peers=["192.0.2.7"]))
        servers.append(legacy)
        assert refused(legacy.port, None) is grpc.StatusCode.PERMISSION_DENIED   # 127.0.0.1 isn't listed
        token = serve(ServerAuthConfig(cert_file=str(pki.server.cert), key_file=str(pki.server.key),
                                       token_file=str(tmp_path / "token")))
        servers.append(token)
        tls = pool_channel_credentials(str(pki.ca))
        assert refused(token.port, tls) is grpc.StatusCode.UNAUTHENTICATED
        assert refused(token.port, tls, [("authorization", "Bearer wrong")]) is grpc.StatusCode.UNAUTHENTICATED
        assert refused(token.port, None) is grpc.StatusCode.UNAVAILABLE
        assert rec.executed == []
        assert execute(token.port, tls, [("authorization", "Bearer tok-2025-10-7c1d")]).success
        mtls = serve(ServerAuthConfig(cert_file=str(pki.server.cert), key_file=str(pki.server.key),
                                      client_ca_file=str(pki.ca)))
        servers.append(mtls)
        assert refused(mtls.port, tls) is grpc.StatusCode.UNAVAILABLE
        rogue = pool_channel_credentials(str(pki.ca), cert_file=str(pki.rogue_client.cert),
                                         key_file=str(pki.rogue_client.key))
        assert refused(mtls.port, rogue) is grpc.StatusCode.UNAVAILABLE
        assert len(rec.executed) == 1
        good = pool_channel_credentials(str(pki.ca), cert_file=str(pki.client.cert), key_file=str(pki.client.key))
        assert execute(mtls.port, good).success
        assert [r.task_id for r in rec.executed] == ["t-auth", "t-auth"]
    finally:
        for s in servers:
            s.stop(None)
