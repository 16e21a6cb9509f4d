"""The development pool over real gRPC on loopback, against a fake worker servicer on 127.0.0.2.

The fake worker is a test double of the worker's half of WorkerNodeService: it records calls and
answers like a worker would, then uploads output and a result back through the pool. Time-based
pool behaviour (token expiry, heartbeat timeouts) runs on an injected clock.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from hivemind._proto import hivemind_ext_pb2, hivemind_ext_pb2_grpc, nodepool_pb2, nodepool_pb2_grpc
from hivemind.devpool import COMPLETED, FAILED, QUEUED, RUNNING, DevPool, PoolTimings, jwt
from hivemind.devpool.dispatch import execute_deadline_s

# The generated stubs are untyped; typed-as-Any aliases keep strict mypy quiet about them.
_pb_grpc: Any = nodepool_pb2_grpc
_ext_grpc: Any = hivemind_ext_pb2_grpc

WORKER_HOST = "127.0.0.2"
INTERNAL_DETAILS = "Exception deserializing request!"
START = 1_700_000_000.0
TIMINGS = PoolTimings(online_s=180, fail_after_s=60, fail_after_busy_s=120, forget_after_s=900)


class FakeClock:
    def __init__(self, start: float = START) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def wait_for(predicate: Callable[[], bool], what: str, limit_s: float = 15.0) -> None:
    """Poll until `predicate` holds; the limit only bounds a hung test, it asserts no timing."""
    end = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def call_stubs(address: str) -> tuple[grpc.Channel, Any, Any, Any, Any, Any]:
    ch = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 1 << 30),
                                                 ("grpc.max_receive_message_length", 1 << 30)])
    return (ch, _pb_grpc.UserServiceStub(ch), _pb_grpc.NodeManagerServiceStub(ch),
            _pb_grpc.MasterNodeServiceStub(ch), _pb_grpc.WorkerNodeServiceStub(ch),
            _ext_grpc.ResultTransferStub(ch))


def login(users: Any, username: str, password: str) -> str:
    reply = users.Login(nodepool_pb2.LoginRequest(username=username, password=password))
    assert reply.success, reply.message
    return str(reply.token)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@dataclass
class ExecuteCall:
    request: Any
    pool_status_during_call: str


@dataclass
class FakeWorker:
    """Worker half of WorkerNodeService on 127.0.0.2, uploading back like a real worker.

    `answers` are the successive ExecuteTask success values (then True). When `complete` is set,
    after accepting it waits until the pool shows the task RUNNING (so the pool's late RUNNING
    can't overwrite the result), uploads `output`, then `result`.
    """

    pool: DevPool
    username: str = "node1"
    password: str = "node-pw"
    answers: list[bool] = field(default_factory=list)
    complete: bool = True
    output: str = "hello from the fake worker\n"
    result: bytes = b"PK\x05\x06" + b"\0" * 18
    upload_inside_execute: bool = False
    calls: list[ExecuteCall] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    port: int = 0
    errors: list[BaseException] = field(default_factory=list)

    def start(self) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                   options=[("grpc.max_receive_message_length", 1 << 30)])
        _pb_grpc.add_WorkerNodeServiceServicer_to_server(_WorkerServicer(self), self._server)
        self.port = self._server.add_insecure_port(f"{WORKER_HOST}:0")
        self._server.start()
        self._ch, self.users, self.nodes, _, self.worker_stub, _ = call_stubs(self.pool.address)
        self.token = login(self.users, self.username, self.password)
        self._threads: list[threading.Thread] = []

    def stop(self) -> None:
        for t in self._threads:
            t.join(timeout=15)
        self._server.stop(0).wait()
        self._ch.close()

    def register(self, node_id: str = "node1", hostname: str = WORKER_HOST, memory_gb: int = 8,
                 cpu_score: int = 100, status: str = "Idle") -> None:
        reply = self.nodes.RegisterWorkerNode(nodepool_pb2.RegisterWorkerNodeRequest(
            node_id=node_id, hostname=hostname, port=self.port, cpu_cores=2, memory_gb=memory_gb,
            cpu_score=cpu_score, docker_status="podman"), metadata=bearer(self.token))
        assert reply.success, reply.message
        self.heartbeat(node_id, status)

    def heartbeat(self, node_id: str = "node1", status: str = "Idle") -> None:
        reply = self.nodes.ReportStatus(nodepool_pb2.RunningStatusRequest(
            node_id=node_id, status=status, cpu_usage=1.0), metadata=bearer(self.token))
        assert reply.success, reply.message

    def upload(self, task_id: str) -> None:
        md = bearer(self.token)
        if self.output:
            r = self.worker_stub.TaskOutputUpload(nodepool_pb2.TaskOutputUploadRequest(
                task_id=task_id, output=self.output, token=self.token), metadata=md)
            assert r.success, r.message
        r = self.worker_stub.TaskResultUpload(nodepool_pb2.TaskResultUploadRequest(
            task_id=task_id, result_zip=self.result, token=self.token), metadata=md)
        assert r.success, r.message

    def _finish_later(self, task_id: str) -> None:
        def run() -> None:
            try:
                wait_for(lambda: _status(self.pool, task_id) == RUNNING, "RUNNING")
                self.upload(task_id)
            except BaseException as err:  # surfaced by the test through `errors`
                self.errors.append(err)

        t = threading.Thread(target=run)
        self._threads.append(t)
        t.start()


def _status(pool: DevPool, task_id: str) -> str:
    task = pool.task(task_id)
    return task.status if task else ""


class _WorkerServicer(nodepool_pb2_grpc.WorkerNodeServiceServicer):
    def __init__(self, fake: FakeWorker) -> None:
        self._fake = fake

    def ExecuteTask(self, request: Any, context: Any) -> Any:
        fake = self._fake
        fake.calls.append(ExecuteCall(request, _status(fake.pool, request.task_id)))
        ok = fake.answers.pop(0) if fake.answers else True
        if not ok:
            return nodepool_pb2.ExecuteTaskResponse(success=False, message="no free slot")
        if fake.upload_inside_execute:
            fake.upload(request.task_id)
        elif fake.complete:
            fake._finish_later(request.task_id)
        return nodepool_pb2.ExecuteTaskResponse(success=True, message="accepted")

    def StopTaskExecution(self, request: Any, context: Any) -> Any:
        self._fake.stops.append(request.task_id)
        return nodepool_pb2.StopTaskExecutionResponse(success=True, message="stopping")


USERS = {"alice": "alice-pw", "node1": "node-pw"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pool(clock: FakeClock) -> Iterator[DevPool]:
    # The loop never runs on its own here: tests drive rounds with dispatch_once().
    p = DevPool(users=USERS, dispatch_interval_s=3600, clock=clock, timings=TIMINGS)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def live_pool(clock: FakeClock) -> Iterator[DevPool]:
    p = DevPool(users=USERS, dispatch_interval_s=0.1, clock=clock, timings=TIMINGS)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def stubs(pool: DevPool) -> Iterator[tuple[Any, ...]]:
    ch, *rest = call_stubs(pool.address)
    yield tuple(rest)
    ch.close()


def make_worker(pool: DevPool, **kw: Any) -> FakeWorker:
    w = FakeWorker(pool, **kw)
    w.start()
    return w


@pytest.fixture
def worker_factory(pool: DevPool) -> Iterator[Callable[..., FakeWorker]]:
    made: list[FakeWorker] = []

    def make(**kw: Any) -> FakeWorker:
        made.append(make_worker(pool, **kw))
        return made[-1]

    yield make
    for w in made:
        w.stop()


def upload_task(master: Any, token: str, task_id: str, data: bytes = b"PK-zip", memory_gb: int = 1,
                cpu_score: int = 10) -> None:
    r = master.UploadTask(nodepool_pb2.UploadTaskRequest(
        task_id=task_id, task_zip=data, memory_gb=memory_gb, cpu_score=cpu_score, token=token),
        metadata=bearer(token))
    assert r.success, r.message


# -- JWT --------------------------------------------------------------------------------------

def test_jwt_roundtrip_and_rejections() -> None:
    key = b"k" * 32
    token = jwt.encode({"sub": "alice", "exp": START + 10}, key)
    assert jwt.decode(token, key, START)["sub"] == "alice"
    with pytest.raises(jwt.InvalidToken, match="expired"):
        jwt.decode(token, key, START + 10)
    with pytest.raises(jwt.InvalidToken, match="signature"):
        jwt.decode(token, b"other-key", START)
    head, payload, sig = token.split(".")
    forged = jwt.encode({"sub": "mallory", "exp": START + 10}, b"x").split(".")[1]
    with pytest.raises(jwt.InvalidToken, match="signature"):
        jwt.decode(f"{head}.{forged}.{sig}", key, START)
    none_head = jwt._b64encode(b'{"alg":"none","typ":"JWT"}')
    with pytest.raises(jwt.InvalidToken, match="algorithm"):
        jwt.decode(f"{none_head}.{payload}.", key, START)
    for junk in ("", "a.b", "a.b.c", "\u00e9.x.y"):
        with pytest.raises(jwt.InvalidToken):
            jwt.decode(junk, key, START)


# -- auth -------------------------------------------------------------------------------------

def test_login_refresh_and_expiry(pool: DevPool, stubs: tuple[Any, ...], clock: FakeClock) -> None:
    users = stubs[0]
    bad = users.Login(nodepool_pb2.LoginRequest(username="alice", password="wrong"))
    assert not bad.success and not bad.token
    token = login(users, "alice", "alice-pw")
    claims = jwt.unverified_claims(token)
    assert claims["sub"] == "alice" and claims["exp"] == START + 3600
    bal = users.GetBalance(nodepool_pb2.GetBalanceRequest(username="alice", token=token),
                           metadata=bearer(token))
    assert bal.success and bal.balance == 1000

    clock.advance(1800)
    refreshed = users.RefreshToken(nodepool_pb2.RefreshTokenRequest(old_token=token), metadata=bearer(token))
    assert refreshed.success
    assert jwt.unverified_claims(refreshed.new_token)["exp"] == START + 1800 + 3600

    clock.advance(1801)  # the first token is now past its 60 minutes, the refreshed one is not
    with pytest.raises(grpc.RpcError) as err:
        users.GetBalance(nodepool_pb2.GetBalanceRequest(username="alice"), metadata=bearer(token))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == INTERNAL_DETAILS
    ok = users.GetBalance(nodepool_pb2.GetBalanceRequest(username="alice", token=refreshed.new_token),
                          metadata=bearer(refreshed.new_token))
    assert ok.success


def test_calls_without_a_valid_token_get_internal(pool: DevPool, stubs: tuple[Any, ...]) -> None:
    users, nodes, master, worker, ext = stubs
    token = login(users, "alice", "alice-pw")
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    calls: list[Callable[[Any], Any]] = [
        lambda md: users.GetBalance(nodepool_pb2.GetBalanceRequest(username="alice"), metadata=md),
        lambda md: users.RefreshToken(nodepool_pb2.RefreshTokenRequest(old_token=token), metadata=md),
        lambda md: nodes.RegisterWorkerNode(nodepool_pb2.RegisterWorkerNodeRequest(node_id="n"), metadata=md),
        lambda md: nodes.ReportStatus(nodepool_pb2.RunningStatusRequest(node_id="n"), metadata=md),
        lambda md: master.UploadTask(nodepool_pb2.UploadTaskRequest(task_id="t", task_zip=b"z"), metadata=md),
        lambda md: master.GetAllUserTasks(nodepool_pb2.GetAllUserTasksRequest(token=token), metadata=md),
        lambda md: worker.TaskOutputUpload(nodepool_pb2.TaskOutputUploadRequest(task_id="t"), metadata=md),
        lambda md: worker.TaskUsage(nodepool_pb2.TaskUsageRequest(task_id="0", token="n"), metadata=md),
        lambda md: ext.UploadResult(iter([hivemind_ext_pb2.ResultChunk(task_id="t", last=True)]), metadata=md),
    ]
    for md in (None, [("authorization", token)], bearer(forged), bearer("not-a-jwt")):
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call(md)
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert err.value.details() == INTERNAL_DETAILS
    assert pool.nodes() == [] and pool.tasks() == []
    # With the token the same calls go through, so the rejections above came from the missing token.
    assert users.GetBalance(nodepool_pb2.GetBalanceRequest(username="alice"), metadata=bearer(token)).success


def test_worker_half_is_unimplemented_and_token_fields_are_checked(pool: DevPool, stubs: tuple[Any, ...]) -> None:
    users, _, master, worker, _ = stubs
    token = login(users, "alice", "alice-pw")
    calls: list[Callable[[], Any]] = [
        lambda: worker.ExecuteTask(nodepool_pb2.ExecuteTaskRequest(task_id="t"), metadata=bearer(token)),
        lambda: worker.StopTaskExecution(nodepool_pb2.StopTaskExecutionRequest(task_id="t"), metadata=bearer(token))]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    r = master.UploadTask(nodepool_pb2.UploadTaskRequest(task_id="t1", task_zip=b"z", token="garbage"),
                          metadata=bearer(token))
    assert not r.success and "token" in r.message.lower() and "garbage" not in r.message
    assert pool.task("t1") is None
    upload_task(master, token, "t1")
    dup = master.UploadTask(nodepool_pb2.UploadTaskRequest(task_id="t1", task_zip=b"z", token=token),
                            metadata=bearer(token))
    assert not dup.success
    # Another user sees neither the task nor its log.
    other = login(users, "node1", "node-pw")
    assert list(master.GetAllUserTasks(nodepool_pb2.GetAllUserTasksRequest(token=other), metadata=bearer(other)).tasks) == []
    assert not master.GetTasklog(nodepool_pb2.TasklogRequest(task_id="t1", token=other), metadata=bearer(other)).success
    mine = master.GetAllUserTasks(nodepool_pb2.GetAllUserTasksRequest(token=token), metadata=bearer(token)).tasks
    assert [(t.task_id, t.status) for t in mine] == [("t1", QUEUED)]


def test_transfer_moves_balance(pool: DevPool, stubs: tuple[Any, ...]) -> None:
    users = stubs[0]
    token = login(users, "alice", "alice-pw")
    r = users.Transfer(nodepool_pb2.TransferRequest(token=token, receiver_username="node1", amount=250),
                       metadata=bearer(token))
    assert r.success
    too_much = users.Transfer(nodepool_pb2.TransferRequest(token=token, receiver_username="node1", amount=10_000),
                              metadata=bearer(token))
    assert not too_much.success
    assert pool.state.balance("alice") == 750 and pool.state.balance("node1") == 1250


# -- dispatch ---------------------------------------------------------------------------------

def test_dispatch_runs_a_task_end_to_end(live_pool: DevPool) -> None:
    long_output = "".join(f"line {i:05d}\n" for i in range(3000))  # ~33 KiB, more than the tail
    worker = make_worker(live_pool, output=long_output, result=b"RESULT-ZIP-BYTES")
    try:
        worker.register()
        ch, users, _, master, _, _ = call_stubs(live_pool.address)
        token = login(users, "alice", "alice-pw")
        upload_task(master, token, "task-e2e", data=b"Z" * 3000, memory_gb=2, cpu_score=50)
        wait_for(lambda: _status(live_pool, "task-e2e") == COMPLETED, "COMPLETED")
        assert worker.errors == []
        (call,) = worker.calls
        assert call.pool_status_during_call == QUEUED  # RUNNING only after ExecuteTask returned
        req = call.request
        assert (req.task_id, req.task_zip, req.memory_gb, req.cpu_usage) == ("task-e2e", b"Z" * 3000, 2, 50.0)
        task = live_pool.task("task-e2e")
        assert task is not None and task.node_id == "node1" and task.worker_ip == WORKER_HOST
        log = master.GetTasklog(nodepool_pb2.TasklogRequest(task_id="task-e2e", token=token), metadata=bearer(token))
        assert log.success and len(log.log) == 10 * 1024 and long_output.endswith(log.log)
        res = master.GetTaskResult(nodepool_pb2.GetTaskResultRequest(task_id="task-e2e", token=token), metadata=bearer(token))
        assert res.success and res.result_zip == b"RESULT-ZIP-BYTES"
        ch.close()
    finally:
        worker.stop()


def test_declined_task_stays_queued_and_is_retried(pool: DevPool, stubs: tuple[Any, ...],
                                                   worker_factory: Callable[..., FakeWorker]) -> None:
    worker = worker_factory(answers=[False, False], complete=False)
    worker.register()
    users, _, master, _, _ = stubs
    upload_task(master, login(users, "alice", "alice-pw"), "t-retry")
    for expected_calls in (1, 2):
        pool.dispatch_once()
        assert len(worker.calls) == expected_calls
        assert _status(pool, "t-retry") == QUEUED
    pool.dispatch_once()
    assert len(worker.calls) == 3 and _status(pool, "t-retry") == RUNNING
    pool.dispatch_once()  # a RUNNING task is not offered again
    assert len(worker.calls) == 3


def test_ineligible_nodes_are_skipped(pool: DevPool, stubs: tuple[Any, ...], clock: FakeClock,
                                      worker_factory: Callable[..., FakeWorker]) -> None:
    worker = worker_factory(complete=False)
    users, _, master, _, _ = stubs
    upload_task(master, login(users, "alice", "alice-pw"), "t-pick", memory_gb=4, cpu_score=10)
    worker.register("busy", status="Busy")
    worker.register("almost-idle", status="idle")
    worker.register("loopback", hostname="127.0.0.1")
    worker.register("nohost", hostname="")
    worker.register("small", memory_gb=2)
    worker.register("weak", cpu_score=5)
    pool.dispatch_once()
    assert worker.calls == [] and pool.task("t-pick").execute_calls == 0  # type: ignore[union-attr]

    worker.register("stale")
    clock.advance(TIMINGS.online_s)  # "stale" is now exactly 180 s silent: offline
    pool.dispatch_once()
    assert worker.calls == []

    worker.register("good")
    pool.dispatch_once()
    assert len(worker.calls) == 1 and pool.task("t-pick").node_id == "good"  # type: ignore[union-attr]


def test_execute_deadline_follows_the_pool_formula() -> None:
    mb = 1024 * 1024
    assert execute_deadline_s(0) == 40.0
    assert execute_deadline_s(20 * mb) == 70.0
    assert execute_deadline_s(500 * mb) == 120.0


def test_late_running_overwrites_an_early_result(pool: DevPool, stubs: tuple[Any, ...],
                                                 worker_factory: Callable[..., FakeWorker]) -> None:
    # The existing pool's race, kept on purpose: a worker must not upload before ~1 s.
    worker = worker_factory(upload_inside_execute=True)
    worker.register()
    users, _, master, _, _ = stubs
    upload_task(master, login(users, "alice", "alice-pw"), "t-early")
    pool.dispatch_once()
    assert _status(pool, "t-early") == RUNNING


def test_silent_nodes_fail_their_running_tasks(pool: DevPool, stubs: tuple[Any, ...], clock: FakeClock,
                                               worker_factory: Callable[..., FakeWorker]) -> None:
    worker = worker_factory(complete=False)
    users, _, master, worker_stub, _ = stubs
    token = login(users, "alice", "alice-pw")
    worker.register("quiet")
    upload_task(master, token, "t-quiet")
    pool.dispatch_once()
    worker.heartbeat("quiet", status="Busy")
    worker.register("busy-node")
    upload_task(master, token, "t-busy")
    pool.dispatch_once()
    assert _status(pool, "t-quiet") == RUNNING and _status(pool, "t-busy") == RUNNING
    assert pool.task("t-busy").node_id == "busy-node"  # type: ignore[union-attr]
    worker.heartbeat("busy-node", status="Running 1 task")

    clock.advance(45)
    # The task_id="0" ping (token = node id) keeps "quiet" alive without ReportStatus.
    ping = worker_stub.TaskUsage(nodepool_pb2.TaskUsageRequest(task_id="0", token="quiet"), metadata=bearer(worker.token))
    assert ping.success
    clock.advance(45)
    pool.dispatch_once()
    assert _status(pool, "t-quiet") == RUNNING and _status(pool, "t-busy") == RUNNING

    clock.advance(20)  # quiet: 65 s silent; busy-node: 110 s, under its 120 s
    pool.dispatch_once()
    assert _status(pool, "t-quiet") == FAILED and _status(pool, "t-busy") == RUNNING
    clock.advance(11)
    pool.dispatch_once()
    assert _status(pool, "t-busy") == FAILED
    assert {n.node_id for n in pool.nodes()} == {"quiet", "busy-node"}
    clock.advance(TIMINGS.forget_after_s)
    pool.dispatch_once()
    assert pool.nodes() == []


def test_stop_task_calls_the_worker(pool: DevPool, stubs: tuple[Any, ...],
                                    worker_factory: Callable[..., FakeWorker]) -> None:
    worker = worker_factory(complete=False)
    worker.register()
    users, _, master, _, _ = stubs
    token = login(users, "alice", "alice-pw")
    upload_task(master, token, "t-stop")
    pool.dispatch_once()
    assert _status(pool, "t-stop") == RUNNING
    r = master.StopTask(nodepool_pb2.StopTaskRequest(task_id="t-stop", token=token), metadata=bearer(token))
    assert r.success and worker.stops == ["t-stop"]
    worker.upload("t-stop")  # a stopped task still uploads its (partial) result
    assert _status(pool, "t-stop") == COMPLETED

    worker.heartbeat(status="Busy")  # so the next task stays queued
    upload_task(master, token, "t-never")
    pool.dispatch_once()
    r = master.StopTask(nodepool_pb2.StopTaskRequest(task_id="t-never", token=token), metadata=bearer(token))
    assert r.success and _status(pool, "t-never") == FAILED and worker.stops == ["t-stop"]


# -- chunked result upload ----------------------------------------------------------------------

def _chunks(task_id: str, token: str, data: bytes, size: int = 1 << 20, sha: str | None = None,
            total: int | None = None, skip_offset: bool = False) -> Iterator[Any]:
    digest = sha if sha is not None else hashlib.sha256(data).hexdigest()
    offsets = list(range(0, len(data), size)) or [0]
    for i, off in enumerate(offsets):
        last = i == len(offsets) - 1
        yield hivemind_ext_pb2.ResultChunk(
            task_id=task_id if i == 0 else "", token=token if i == 0 else "",
            data=data[off:off + size], offset=off + (7 if skip_offset and i == 1 else 0), last=last,
            total_size=(len(data) if total is None else total) if last else 0,
            sha256=digest if last else "")


def test_chunked_upload_verifies_sha256_and_size(pool: DevPool, stubs: tuple[Any, ...],
                                                 worker_factory: Callable[..., FakeWorker]) -> None:
    worker = worker_factory(complete=False)
    worker.register()
    users, _, master, _, ext = stubs
    token = login(users, "alice", "alice-pw")
    upload_task(master, token, "t-big")
    pool.dispatch_once()
    data = os.urandom(5 * 1024 * 1024 + 123)
    md = bearer(worker.token)
    spool = pool.state.spool_path("x").parent
    before = set(spool.iterdir())

    corrupt = bytearray(data)
    corrupt[4096] ^= 0xFF
    bad = ext.UploadResult(_chunks("t-big", worker.token, bytes(corrupt), sha=hashlib.sha256(data).hexdigest()), metadata=md)
    assert not bad.success and "sha256" in bad.message and bad.received == len(data)
    for kw in ({"total": len(data) + 1}, {"skip_offset": True}):
        rejected = ext.UploadResult(_chunks("t-big", worker.token, data, **kw), metadata=md)
        assert not rejected.success
    assert _status(pool, "t-big") == RUNNING
    assert set(spool.iterdir()) == before  # rejected uploads leave no spool files behind

    ack = ext.UploadResult(_chunks("t-big", worker.token, data), metadata=md)
    assert ack.success and ack.received == len(data)
    task = pool.task("t-big")
    assert task is not None and task.status == COMPLETED and task.result_size == len(data)
    assert task.result_path is not None and task.result_path.read_bytes() == data
    res = master.GetTaskResult(nodepool_pb2.GetTaskResultRequest(task_id="t-big", token=token), metadata=bearer(token))
    assert res.success and res.result_zip == data

    unknown = ext.UploadResult(_chunks("no-such-task", worker.token, b"abc"), metadata=md)
    assert not unknown.success and unknown.message == "Task not found"
