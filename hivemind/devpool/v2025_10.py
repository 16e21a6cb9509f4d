"""The development pool speaking protocol generation 2025-10 (shared/PROTOCOL-2025-10.md): the
same state and dispatch loop as 2026-04, other messages.

Faithful quirks of that generation's pool:
- no authentication interceptor: the worker-side calls are accepted with or without bearer
  metadata; tokens hold only `user_id` and `exp`; there is no RefreshToken;
- liveness is ReportStatus{node_id, status_message}; a node is online for 30 s after a report;
- output arrives by StoreLogs, usage by StoreOutput("RESOURCE_USAGE: {json}"), the result by
  ReturnTaskResult (COMPLETED) and then TaskCompleted{success} ("already completed");
- HealthCheck answers healthy=false, as on the observed pool.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import grpc

from hivemind._proto.v2025_10 import nodepool_pb2 as pb
from hivemind._proto.v2025_10 import nodepool_pb2_grpc as pb_grpc
from hivemind.devpool import jwt
from hivemind.devpool.state import COMPLETED, Node, PoolState, PoolTimings, Task

_grpc: Any = pb_grpc   # untyped generated helpers
USAGE_PREFIX = "RESOURCE_USAGE: "
TIMINGS = PoolTimings(online_s=30.0)


class TokenIssuer2025:
    """HS256 tokens whose payload is only user_id and exp, as this generation's pool issues."""

    def __init__(self, key: bytes, ttl_s: float, clock: Callable[[], float]) -> None:
        self._key = key
        self._ttl = ttl_s
        self._clock = clock

    def issue(self, username: str) -> str:
        return jwt.encode({"user_id": username, "exp": self._clock() + self._ttl}, self._key)

    def username(self, token: str) -> str:
        user = jwt.decode(token, self._key, self._clock()).get("user_id")
        if not isinstance(user, str) or not user:
            raise jwt.InvalidToken("token names no user")
        return user


class Calls2025:
    """The pool's calls to a worker: ExecuteTask{node_id, task_id, task_zip, cpu, gpu, ...}."""

    def execute(self, channel: grpc.Channel, task: Task, node: Node, timeout: float) -> tuple[bool, str]:
        request = pb.ExecuteTaskRequest(
            node_id=node.node_id, task_id=task.task_id, task_zip=task.zip_path.read_bytes(),
            cpu=int(task.cpu_score), gpu=int(task.gpu_score), memory_gb=task.memory_gb,
            gpu_memory_gb=task.gpu_memory_gb)
        reply = _grpc.WorkerNodeServiceStub(channel).ExecuteTask(request, timeout=timeout)
        return bool(reply.success), str(reply.message)

    def stop(self, channel: grpc.Channel, task_id: str, timeout: float) -> tuple[bool, str]:
        reply = _grpc.WorkerNodeServiceStub(channel).StopTaskExecution(
            pb.StopTaskExecutionRequest(task_id=task_id), timeout=timeout)
        return bool(reply.success), str(reply.message)


def _bearer_user(issuer: TokenIssuer2025, context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            try:
                return issuer.username(value[len("Bearer "):].strip())
            except jwt.InvalidToken:
                return ""
    return ""


class UserServicer(pb_grpc.UserServiceServicer):  # type: ignore[misc]
    def __init__(self, state: PoolState, issuer: TokenIssuer2025) -> None:
        self._state = state
        self._issuer = issuer

    def Login(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        if not self._state.check_password(request.username, request.password):
            return pb.LoginResponse(success=False, message="Invalid username or password")
        self._state.count("login")
        return pb.LoginResponse(success=True, message="Login successful",
                                token=self._issuer.issue(request.username))

    def Register(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        if not request.username or self._state.has_user(request.username):
            return pb.RegisterResponse(success=False, message="Username taken or empty")
        self._state.add_user(request.username, request.password, balance=0)
        return pb.RegisterResponse(success=True, message="Registered")

    def GetBalance(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        balance = self._state.balance(request.username)
        if balance is None:
            return pb.GetBalanceResponse(success=False, message="User not found")
        return pb.GetBalanceResponse(success=True, message="OK", balance=balance)

    def Transfer(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            sender = self._issuer.username(request.token)
        except jwt.InvalidToken:
            return pb.TransferResponse(success=False, message="Invalid token")
        problem = self._state.transfer(sender, request.receiver_username, request.amount)
        return pb.TransferResponse(success=not problem, message=problem or "Transfer successful")


class NodeManagerServicer(pb_grpc.NodeManagerServiceServicer):  # type: ignore[misc]
    def __init__(self, state: PoolState, issuer: TokenIssuer2025, log: Any) -> None:
        self._state = state
        self._issuer = issuer
        self._log = log

    def RegisterWorkerNode(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        if not request.node_id:
            return pb.StatusResponse(success=False, message="node_id is required")
        self._state.register_node(Node(
            node_id=request.node_id, owner=_bearer_user(self._issuer, context), hostname=request.hostname,
            port=request.port, cpu_cores=request.cpu_cores, memory_gb=request.memory_gb,
            cpu_score=request.cpu_score, gpu_score=request.gpu_score,
            gpu_memory_gb=request.gpu_memory_gb, location=request.location,
            gpu_name=request.gpu_name, docker_status=request.docker_status))
        self._log.info("node %r registered at %r:%d (2025-10)", request.node_id, request.hostname, request.port)
        return pb.StatusResponse(success=True, message="Node registered")

    def HealthCheck(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb.HealthCheckResponse(healthy=False, message="health check not implemented")

    def ReportStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        ok = self._state.report_status(request.node_id, request.status_message, 0.0, 0.0, 0.0, 0.0, "", 0)
        return pb.StatusResponse(success=ok, message="Status updated" if ok else "Node not registered")

    def GetNodeList(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb.GetNodeListResponse(success=True, message="OK", nodes=[pb.WorkerNodeInfo(
            node_id=n.node_id, hostname=n.hostname, cpu_cores=n.cpu_cores, memory_gb=n.memory_gb,
            status=n.status, last_heartbeat=n.last_heartbeat, cpu_score=n.cpu_score,
            gpu_score=n.gpu_score, gpu_memory_gb=n.gpu_memory_gb, location=n.location,
            port=n.port, gpu_name=n.gpu_name) for n in self._state.nodes()])


class MasterServicer(pb_grpc.MasterNodeServiceServicer):  # type: ignore[misc]
    def __init__(self, state: PoolState, issuer: TokenIssuer2025, dispatcher: Any, log: Any) -> None:
        self._state = state
        self._issuer = issuer
        self._dispatcher = dispatcher
        self._log = log

    def _owned(self, task_id: str, token: str) -> Task | str:
        try:
            user = self._issuer.username(token)
        except jwt.InvalidToken:
            return "Invalid token"
        task = self._state.task(task_id)
        if task is None or task.owner != user:
            return "Task not found"
        return task

    def UploadTask(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        owner = request.user_id or _bearer_user(self._issuer, context)
        if not owner or not self._state.has_user(owner):
            return pb.UploadTaskResponse(success=False, message="Unknown user")
        if not request.task_id or not request.task_zip:
            return pb.UploadTaskResponse(success=False, message="task_id and task_zip are required")
        path = self._state.spool_bytes("task", request.task_zip)
        task = Task(task_id=request.task_id, owner=owner, zip_path=path, zip_size=len(request.task_zip),
                    memory_gb=request.memory_gb, cpu_score=request.cpu_score,
                    gpu_score=request.gpu_score, gpu_memory_gb=request.gpu_memory_gb,
                    location=request.location, gpu_name=request.gpu_name)
        if not self._state.add_task(task):
            path.unlink(missing_ok=True)
            return pb.UploadTaskResponse(success=False, message="Task ID already exists")
        self._log.info("task %r queued by %r (%d bytes, 2025-10)", task.task_id, owner, task.zip_size)
        return pb.UploadTaskResponse(success=True, message="Task uploaded")

    def PollTaskStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        task = self._state.task(request.task_id)
        if task is None:
            return pb.PollTaskStatusResponse(task_id=request.task_id, status="", message="Task not found")
        return pb.PollTaskStatusResponse(task_id=task.task_id, status=task.status,
                                         output=task.output.splitlines(), message=task.message)

    def StoreOutput(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        text = request.output
        if text.startswith(USAGE_PREFIX):
            try:
                u = json.loads(text[len(USAGE_PREFIX):])
                ok = self._state.set_usage(request.task_id, float(u["cpu_percent"]), float(u["memory_mb"]),
                                           float(u["gpu_percent"]), float(u["gpu_memory_mb"]))
            except (ValueError, KeyError, TypeError):
                return pb.StatusResponse(success=False, message="Malformed RESOURCE_USAGE")
        else:
            ok = self._state.append_output(request.task_id, text)
        return pb.StatusResponse(success=ok, message="Stored" if ok else "Task not found")

    def StoreLogs(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        ok = self._state.append_output(request.task_id, request.logs)
        return pb.StatusResponse(success=ok, message="Logs stored" if ok else "Task not found")

    def _store_result(self, task_id: str, data: bytes) -> bool:
        if self._state.task(task_id) is None:
            return False
        path = self._state.spool_bytes("result", data)
        ok = self._state.store_result(task_id, path, len(data))
        if ok:
            self._log.info("task %r completed (%d bytes, 2025-10)", task_id, len(data))
        return ok

    def ReturnTaskResult(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        ok = self._store_result(request.task_id, request.result_zip)
        return pb.ReturnTaskResultResponse(success=ok, message="Result stored" if ok else "Task not found")

    def StoreResult(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        ok = self._store_result(request.task_id, request.result_zip)
        return pb.StatusResponse(success=ok, message="Result stored" if ok else "Task not found")

    def TaskCompleted(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        problem = self._state.task_completed(request.task_id, bool(request.success))
        return pb.StatusResponse(success=not problem, message=problem or "Task completed")

    def GetTaskResult(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        task = self._owned(request.task_id, request.token)
        if isinstance(task, str):
            return pb.GetTaskResultResponse(success=False, message=task)
        if task.status != COMPLETED or task.result_path is None:
            return pb.GetTaskResultResponse(success=False, message=f"Task is {task.status}")
        return pb.GetTaskResultResponse(success=True, message="OK", result_zip=task.result_path.read_bytes())

    def GetTaskLogs(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        task = self._owned(request.task_id, request.token)
        if isinstance(task, str):
            return pb.GetTaskLogsResponse(success=False, message=task)
        return pb.GetTaskLogsResponse(success=True, message="OK", logs=task.output)

    def GetAllTasks(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            user = self._issuer.username(request.token)
        except jwt.InvalidToken:
            return pb.GetAllTasksResponse(success=False, message="Invalid token")
        return pb.GetAllTasksResponse(success=True, message="OK", tasks=[pb.TaskStatus(
            task_id=t.task_id, status=t.status, created_at=_iso(t.created_at), updated_at="",
            assigned_node=t.node_id) for t in self._state.tasks(owner=user)])

    def StopTask(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        task = self._owned(request.task_id, request.token)
        if isinstance(task, str):
            return pb.StopTaskResponse(success=False, message=task)
        ok, message = self._dispatcher.stop_task(task)
        return pb.StopTaskResponse(success=ok, message=message)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def add_servicers(server: grpc.Server, state: PoolState, issuer: TokenIssuer2025, dispatcher: Any,
                  log: Any) -> None:
    _grpc.add_UserServiceServicer_to_server(UserServicer(state, issuer), server)
    _grpc.add_NodeManagerServiceServicer_to_server(NodeManagerServicer(state, issuer, log), server)
    _grpc.add_MasterNodeServiceServicer_to_server(MasterServicer(state, issuer, dispatcher, log), server)
