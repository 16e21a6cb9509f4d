"""The development node pool: the POOL side of proto/v2026_04/nodepool.proto, on the wire like the
existing pool (shared/PROTOCOL.md), plus the chunked result upload of proto/hivemind_ext.proto;
or, with `protocol="2025-10"`, the pool of that generation (`v2025_10.py`).

Faithful quirks of 2026-04, kept on purpose because the worker is developed against this pool:
- every call but Login needs metadata `authorization: Bearer <JWT>`; without a valid one the call
  fails INTERNAL "Exception deserializing request!" (the existing pool's answer);
- a `token` request field, when not empty, must hold a valid token too (it names the caller);
- ExecuteTask and StopTaskExecution answer UNIMPLEMENTED here (the worker's half);
- RUNNING is recorded after ExecuteTask returned and overwrites a result uploaded meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import grpc

from hivemind._proto import hivemind_ext_pb2, hivemind_ext_pb2_grpc
from hivemind._proto.v2026_04 import nodepool_pb2, nodepool_pb2_grpc
from hivemind.devpool import jwt, v2025_10
from hivemind.devpool.dispatch import (
    MAX_MESSAGE,
    CredentialsFactory,
    Dispatcher,
    WorkerCalls,
    WorkerDialer,
)
from hivemind.devpool.state import COMPLETED, Node, PoolState, PoolTimings, Task

# The generated registration helpers are untyped; one typed-as-Any alias each keeps mypy strict.
_nodepool_grpc: Any = nodepool_pb2_grpc
_ext_grpc: Any = hivemind_ext_pb2_grpc

LOGIN_METHOD = "/nodepool.UserService/Login"
# What the existing pool answers (with StatusCode.INTERNAL) to a call without a valid token.
REJECTED_DETAILS = "Exception deserializing request!"


class TokenIssuer:
    """Issues and verifies the pool's HS256 login tokens (claims: sub, iat, exp)."""

    def __init__(self, key: bytes, ttl_s: float, clock: Callable[[], float]) -> None:
        self._key = key
        self._ttl = ttl_s
        self._clock = clock

    def issue(self, username: str) -> str:
        now = self._clock()
        return jwt.encode({"sub": username, "iat": int(now), "exp": now + self._ttl}, self._key)

    def username(self, token: str) -> str:
        """The token's user, or InvalidToken when it is malformed, forged or expired."""
        sub = jwt.decode(token, self._key, self._clock()).get("sub")
        if not isinstance(sub, str) or not sub:
            raise jwt.InvalidToken("token names no user")
        return sub


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return ""


def _rejecting(handler: Any) -> Any:
    """`handler` with its behaviour replaced by the existing pool's answer to a missing token.

    Aborting (rather than making the deserializer raise, which gRPC answers the same way) keeps
    the server's logs quiet and avoids a gRPC bug: a failed deserialization of a streamed request
    leaves the call pending in the core, and server.stop() then never completes.
    """

    def reject(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.INTERNAL, REJECTED_DETAILS)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(reject, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class BearerAuthInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg,misc]
    """Every method except Login needs a valid bearer token, checked before the servicer runs."""

    def __init__(self, issuer: TokenIssuer) -> None:
        self._issuer = issuer

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method == LOGIN_METHOD:
            return handler
        try:
            self._issuer.username(_bearer(handler_call_details.invocation_metadata))
        except jwt.InvalidToken:
            return cast("grpc.RpcMethodHandler[Any, Any]", _rejecting(handler))
        return handler


class _Calls:
    """What every servicer needs: the state, the token issuer and the caller's identity."""

    def __init__(self, state: PoolState, issuer: TokenIssuer, logger: logging.Logger) -> None:
        self.state = state
        self.issuer = issuer
        self.log = logger

    def caller(self, context: grpc.ServicerContext) -> str:
        """The metadata token's user; "" only if it expired since the interceptor checked it."""
        try:
            return self.issuer.username(_bearer(context.invocation_metadata()))
        except jwt.InvalidToken:
            return ""

    def field_user(self, token_field: str, context: grpc.ServicerContext) -> str | None:
        """The user named by a request's `token` field (empty: the metadata's); None if invalid."""
        if not token_field:
            return self.caller(context) or None
        try:
            return self.issuer.username(token_field)
        except jwt.InvalidToken:
            return None


class UserServicer(nodepool_pb2_grpc.UserServiceServicer):
    def __init__(self, calls: _Calls) -> None:
        self._c = calls

    def Login(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not self._c.state.check_password(request.username, request.password):
            return nodepool_pb2.LoginResponse(success=False, message="Invalid username or password")
        self._c.state.count("login")
        return nodepool_pb2.LoginResponse(success=True, message="Login successful",
                                          token=self._c.issuer.issue(request.username))

    def RefreshToken(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            user = self._c.issuer.username(request.old_token)
        except jwt.InvalidToken as err:
            self._c.state.count("refresh_rejected")
            return nodepool_pb2.RefreshTokenResponse(success=False, message=str(err))
        self._c.state.count("refresh")
        self._c.state.renewed(request.old_token)
        return nodepool_pb2.RefreshTokenResponse(success=True, message="Token refreshed",
                                                 new_token=self._c.issuer.issue(user))

    def GetBalance(self, request: Any, context: grpc.ServicerContext) -> Any:
        user = self._c.field_user(request.token, context)
        if user is None:
            return nodepool_pb2.GetBalanceResponse(success=False, message="Invalid token")
        balance = self._c.state.balance(request.username or user)
        if balance is None:
            return nodepool_pb2.GetBalanceResponse(success=False, message="User not found")
        return nodepool_pb2.GetBalanceResponse(success=True, message="OK", balance=balance)

    def Transfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        user = self._c.field_user(request.token, context)
        if user is None:
            return nodepool_pb2.TransferResponse(success=False, message="Invalid token")
        problem = self._c.state.transfer(user, request.receiver_username, request.amount)
        return nodepool_pb2.TransferResponse(success=not problem, message=problem or "Transfer successful")


class NodeManagerServicer(nodepool_pb2_grpc.NodeManagerServiceServicer):
    def __init__(self, calls: _Calls) -> None:
        self._c = calls

    def RegisterWorkerNode(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not request.node_id:
            return nodepool_pb2.StatusResponse(success=False, message="node_id is required")
        self._c.state.register_node(Node(
            node_id=request.node_id, owner=self._c.caller(context), hostname=request.hostname,
            port=request.port, cpu_cores=request.cpu_cores, memory_gb=request.memory_gb,
            cpu_score=request.cpu_score, gpu_score=request.gpu_score,
            gpu_memory_gb=request.gpu_memory_gb, location=request.location,
            gpu_name=request.gpu_name, docker_status=request.docker_status))
        self._c.log.info("node %r registered at %r:%d", request.node_id, request.hostname, request.port)
        return nodepool_pb2.StatusResponse(success=True, message="Node registered")

    def ReportStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        ok = self._c.state.report_status(
            request.node_id, request.status, request.cpu_usage, request.memory_usage,
            request.gpu_usage, request.gpu_memory_usage, request.docker_status, request.running_tasks)
        return nodepool_pb2.RunningStatusResponse(
            success=ok, message="Status updated" if ok else "Node not registered")


class MasterServicer(nodepool_pb2_grpc.MasterNodeServiceServicer):
    def __init__(self, calls: _Calls, dispatcher: Dispatcher) -> None:
        self._c = calls
        self._dispatcher = dispatcher

    def _own_task(self, task_id: str, token_field: str, context: grpc.ServicerContext) -> Task | str:
        user = self._c.field_user(token_field, context)
        if user is None:
            return "Invalid token"
        task = self._c.state.task(task_id)
        if task is None or task.owner != user:
            return "Task not found"
        return task

    def UploadTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        user = self._c.field_user(request.token, context)
        if user is None:
            return nodepool_pb2.UploadTaskResponse(success=False, message="Invalid token")
        if not request.task_id or not request.task_zip:
            return nodepool_pb2.UploadTaskResponse(success=False, message="task_id and task_zip are required")
        path = self._c.state.spool_bytes("task", request.task_zip)
        task = Task(task_id=request.task_id, owner=user, zip_path=path, zip_size=len(request.task_zip),
                    memory_gb=request.memory_gb, cpu_score=request.cpu_score,
                    gpu_score=request.gpu_score, gpu_memory_gb=request.gpu_memory_gb,
                    location=request.location, gpu_name=request.gpu_name,
                    host_count=request.host_count)
        if not self._c.state.add_task(task):
            path.unlink(missing_ok=True)
            return nodepool_pb2.UploadTaskResponse(success=False, message="Task ID already exists")
        self._c.log.info("task %r queued by %r (%d bytes)", task.task_id, user, task.zip_size)
        return nodepool_pb2.UploadTaskResponse(success=True, message="Task uploaded")

    def GetTaskResult(self, request: Any, context: grpc.ServicerContext) -> Any:
        task = self._own_task(request.task_id, request.token, context)
        if isinstance(task, str):
            return nodepool_pb2.GetTaskResultResponse(success=False, message=task)
        if task.status != COMPLETED or task.result_path is None:
            return nodepool_pb2.GetTaskResultResponse(success=False, message=f"Task is {task.status}")
        return nodepool_pb2.GetTaskResultResponse(success=True, message="OK",
                                                  result_zip=task.result_path.read_bytes())

    def GetAllUserTasks(self, request: Any, context: grpc.ServicerContext) -> Any:
        user = self._c.field_user(request.token, context)
        tasks = self._c.state.tasks(owner=user) if user is not None else []
        return nodepool_pb2.GetAllTasksResponse(tasks=[nodepool_pb2.TaskInfo(
            task_id=t.task_id, status=t.status, message=t.message, cpu_usage=t.cpu_usage,
            memory_usage=t.memory_usage, gpu_usage=t.gpu_usage,
            gpu_memory_usage=t.gpu_memory_usage, worker_ip=t.worker_ip) for t in tasks])

    def StopTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        task = self._own_task(request.task_id, request.token, context)
        if isinstance(task, str):
            return nodepool_pb2.StopTaskResponse(success=False, message=task)
        ok, message = self._dispatcher.stop_task(task)
        return nodepool_pb2.StopTaskResponse(success=ok, message=message)

    def GetTasklog(self, request: Any, context: grpc.ServicerContext) -> Any:
        task = self._own_task(request.task_id, request.token, context)
        if isinstance(task, str):
            return nodepool_pb2.TasklogResponse(success=False, log="")
        return nodepool_pb2.TasklogResponse(success=True, log=task.output)


class WorkerSideServicer(nodepool_pb2_grpc.WorkerNodeServiceServicer):
    """The pool's half; ExecuteTask and StopTaskExecution stay the generated UNIMPLEMENTED."""

    def __init__(self, calls: _Calls) -> None:
        self._c = calls

    def _append(self, task_id: str, output: str, token: str, context: grpc.ServicerContext) -> tuple[bool, str]:
        if self._c.field_user(token, context) is None:
            return False, "Invalid token"
        if not self._c.state.append_output(task_id, output):
            return False, "Task not found"
        return True, "Output received"

    def TaskOutputUpload(self, request: Any, context: grpc.ServicerContext) -> Any:
        ok, msg = self._append(request.task_id, request.output, request.token, context)
        return nodepool_pb2.TaskOutputUploadResponse(success=ok, message=msg)

    def TaskOutput(self, request: Any, context: grpc.ServicerContext) -> Any:
        ok, msg = self._append(request.task_id, request.output, request.token, context)
        return nodepool_pb2.TaskOutputResponse(success=ok, message=msg)

    def TaskResultUpload(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self._c.field_user(request.token, context) is None:
            return nodepool_pb2.TaskResultUploadResponse(success=False, message="Invalid token")
        if self._c.state.task(request.task_id) is None:
            return nodepool_pb2.TaskResultUploadResponse(success=False, message="Task not found")
        path = self._c.state.spool_bytes("result", request.result_zip)
        ok = self._c.state.store_result(request.task_id, path, len(request.result_zip))
        if ok:
            self._c.log.info("task %r completed (%d bytes)", request.task_id, len(request.result_zip))
        return nodepool_pb2.TaskResultUploadResponse(
            success=ok, message="Result received" if ok else "Task not found")

    def TaskUsage(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.task_id == "0":
            # The node-level liveness ping: `token` carries the node id, not a token.
            ok = self._c.state.ping(request.token)
            return nodepool_pb2.TaskUsageResponse(success=ok, message="OK" if ok else "Node not registered")
        if self._c.field_user(request.token, context) is None:
            return nodepool_pb2.TaskUsageResponse(success=False, message="Invalid token")
        ok = self._c.state.set_usage(request.task_id, request.cpu_usage, request.memory_usage,
                                     request.gpu_usage, request.gpu_memory_usage)
        return nodepool_pb2.TaskUsageResponse(success=ok, message="OK" if ok else "Task not found")


class ResultTransferServicer(hivemind_ext_pb2_grpc.ResultTransferServicer):
    """Chunked result upload, spooled to a file and verified (offsets, size, sha256) before it
    replaces the task's result; a rejected upload leaves the task as it was."""

    def __init__(self, calls: _Calls, max_result_bytes: int) -> None:
        self._c = calls
        self._max = max_result_bytes

    def UploadResult(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        spooled = self._c.state.spool_path("upload")
        adopted = False
        try:
            with spooled.open("wb") as out:
                up = self._receive(request_iterator, context, out)
            problem = up.problem
            if not problem and up.total_size != up.received:
                problem = f"size mismatch: received {up.received} bytes, total_size says {up.total_size}"
            elif not problem and up.sha256.lower() != up.digest:
                problem = "sha256 mismatch"
            if problem:
                return hivemind_ext_pb2.ResultAck(success=False, message=problem, received=up.received)
            adopted = self._c.state.store_result(up.task_id, spooled, up.received)
            if not adopted:
                return hivemind_ext_pb2.ResultAck(success=False, message="Task not found", received=up.received)
            self._c.log.info("task %r completed by chunked upload (%d bytes)", up.task_id, up.received)
            return hivemind_ext_pb2.ResultAck(success=True, message="Result received", received=up.received)
        finally:
            if not adopted:
                spooled.unlink(missing_ok=True)

    def _receive(self, chunks: Iterator[Any], context: grpc.ServicerContext, out: BinaryIO) -> _Upload:
        """Write chunks in order, hashing as they come; stops at the first problem."""
        up = _Upload()
        digest = hashlib.sha256()
        for chunk in chunks:
            if not up.task_id:
                up.task_id = chunk.task_id
                if not up.task_id:
                    up.problem = "first chunk carries no task_id"
                elif self._c.field_user(chunk.token, context) is None:
                    up.problem = "Invalid token"
                elif self._c.state.task(up.task_id) is None:
                    up.problem = "Task not found"
            elif chunk.task_id and chunk.task_id != up.task_id:
                up.problem = "chunks name different tasks"
            if not up.problem and chunk.offset != up.received:
                up.problem = f"chunk at offset {chunk.offset}, expected {up.received}"
            if not up.problem and up.received + len(chunk.data) > self._max:
                up.problem = f"result exceeds {self._max} bytes"
            if up.problem:
                return up
            out.write(chunk.data)
            digest.update(chunk.data)
            up.received += len(chunk.data)
            if chunk.last:
                up.total_size, up.sha256, up.digest = chunk.total_size, chunk.sha256, digest.hexdigest()
                return up
        up.problem = "stream ended before the last chunk"
        return up


@dataclass
class _Upload:
    task_id: str = ""
    received: int = 0
    problem: str = ""
    total_size: int = 0
    sha256: str = ""
    digest: str = ""


class DevPool:
    """An in-process node pool on loopback for development and tests.

    `start()` binds and starts serving and dispatching; `stop()` ends both and deletes the spool.
    Inspection helpers (`nodes`, `task`, `tasks`) return copies.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 users: Mapping[str, str] | None = None, dispatch_interval_s: float = 10.0,
                 token_ttl_s: float = 3600, clock: Callable[[], float] = time.time,
                 logger: logging.Logger | None = None, *,
                 timings: PoolTimings | None = None,
                 channel_credentials: CredentialsFactory | None = None,
                 channel_options: Sequence[tuple[str, Any]] = (),
                 server_credentials: grpc.ServerCredentials | None = None,
                 spool_dir: Path | None = None, jwt_key: bytes | None = None,
                 max_result_bytes: int = 4 * 1024 ** 3,
                 overwrite_late_running: bool = True, protocol: str = "2026-04") -> None:
        if protocol not in ("2026-04", "2025-10"):
            raise ValueError(f"protocol must be 2026-04 or 2025-10, not {protocol!r}")
        self.protocol = protocol
        self._host = host
        self._port = port
        self._log = logger or logging.getLogger("hivemind.devpool")
        self._server_credentials = server_credentials
        self._own_spool = spool_dir is None
        spool = spool_dir or Path(tempfile.mkdtemp(prefix="hivemind-devpool-"))
        spool.mkdir(parents=True, exist_ok=True)
        self.state = PoolState(spool, clock)
        for name, password in (users or {}).items():
            self.state.add_user(name, password)
        key = jwt_key or secrets.token_bytes(32)
        self.issuer = TokenIssuer(key, token_ttl_s, clock)
        self.issuer_2025 = v2025_10.TokenIssuer2025(key, token_ttl_s, clock)
        calls: WorkerCalls | None = v2025_10.Calls2025() if protocol == "2025-10" else None
        default_timings = v2025_10.TIMINGS if protocol == "2025-10" else PoolTimings()
        self.dispatcher = Dispatcher(
            self.state, WorkerDialer(channel_credentials, channel_options),
            interval_s=dispatch_interval_s, timings=timings or default_timings, clock=clock,
            logger=self._log, overwrite_late_running=overwrite_late_running, worker_calls=calls)
        self._max_result = max_result_bytes
        self._server: grpc.Server | None = None
        self._bound = 0

    def start(self) -> int:
        """Bind and serve; returns the bound port."""
        old = self.protocol == "2025-10"
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="devpool-rpc"),
            # The 2025-10 pool has no authentication interceptor.
            interceptors=[] if old else [BearerAuthInterceptor(self.issuer)],
            options=[("grpc.max_send_message_length", MAX_MESSAGE),
                     ("grpc.max_receive_message_length", MAX_MESSAGE)])
        if old:
            v2025_10.add_servicers(server, self.state, self.issuer_2025, self.dispatcher, self._log)
        else:
            calls = _Calls(self.state, self.issuer, self._log)
            _nodepool_grpc.add_UserServiceServicer_to_server(UserServicer(calls), server)
            _nodepool_grpc.add_NodeManagerServiceServicer_to_server(NodeManagerServicer(calls), server)
            _nodepool_grpc.add_MasterNodeServiceServicer_to_server(MasterServicer(calls, self.dispatcher), server)
            _nodepool_grpc.add_WorkerNodeServiceServicer_to_server(WorkerSideServicer(calls), server)
            _ext_grpc.add_ResultTransferServicer_to_server(
                ResultTransferServicer(calls, self._max_result), server)
        target = f"{self._host}:{self._port}"
        if self._server_credentials is None:
            self._bound = server.add_insecure_port(target)
        else:
            self._bound = server.add_secure_port(target, self._server_credentials)
        server.start()
        self._server = server
        self.dispatcher.start()
        self._log.info("development pool (protocol %s) listening on %s", self.protocol, self.address)
        return self._bound

    @property
    def address(self) -> str:
        return f"{self._host}:{self._bound}"

    def stop(self, grace_s: float = 1.0) -> None:
        self.dispatcher.stop()
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        if self._own_spool:
            self.state.close()

    def __enter__(self) -> DevPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_user(self, username: str, password: str) -> None:
        self.state.add_user(username, password)

    def nodes(self) -> list[Node]:
        return self.state.nodes()

    def task(self, task_id: str) -> Task | None:
        return self.state.task(task_id)

    def tasks(self) -> list[Task]:
        return self.state.tasks()

    def dispatch_once(self) -> None:
        """One dispatch round now (expiry included), serialised with the loop's rounds."""
        self.dispatcher.run_once()
