"""The development pool's dispatch loop and its calls to workers, as the existing pool makes them.

Each round (every `interval_s`): expire silent nodes, then for each QUEUED task pick an eligible
node and call its ExecuteTask. The round is serial, like the existing pool's, so one task is never
in two ExecuteTask calls at once. Calls to workers are plaintext and carry no credentials unless a
`credentials` factory is given (our TLS/token modes in dev and tests).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc

from hivemind._proto.v2026_04 import nodepool_pb2, nodepool_pb2_grpc
from hivemind.devpool.state import Node, PoolState, PoolTimings, Task

# The generated stubs are untyped; a typed-as-Any alias keeps mypy strict elsewhere.
_nodepool_grpc: Any = nodepool_pb2_grpc

MAX_MESSAGE = 1024 * 1024 * 1024
STOP_DEADLINE_S = 50.0

CredentialsFactory = Callable[[str], grpc.ChannelCredentials]


def execute_deadline_s(zip_size: int) -> float:
    """The existing pool's ExecuteTask deadline: min(30 + max(2 × size in MB, 10), 120)."""
    size_mb = zip_size / (1024 * 1024)
    return min(30.0 + max(2.0 * size_mb, 10.0), 120.0)


def is_eligible(node: Node, task: Task, now: float, timings: PoolTimings) -> bool:
    """Online, exactly "Idle", dialable, and TOTAL resources cover the request."""
    return (now - node.last_heartbeat < timings.online_s
            and node.status == "Idle"
            and node.hostname not in ("", "127.0.0.1")
            and node.port > 0
            and node.memory_gb >= task.memory_gb
            and node.cpu_score >= task.cpu_score
            and node.gpu_score >= task.gpu_score
            and node.gpu_memory_gb >= task.gpu_memory_gb)


def pick_node(nodes: Sequence[Node], task: Task, now: float, timings: PoolTimings) -> Node | None:
    """The eligible node heard from most recently (ties: registration order)."""
    eligible = [n for n in nodes if is_eligible(n, task, now, timings)]
    return max(eligible, key=lambda n: n.last_heartbeat, default=None)


class WorkerCalls(Protocol):
    """The pool's two calls to a worker, in one protocol generation's messages."""

    def execute(self, channel: grpc.Channel, task: Task, node: Node, timeout: float) -> tuple[bool, str]: ...

    def stop(self, channel: grpc.Channel, task_id: str, timeout: float) -> tuple[bool, str]: ...


class Calls2026:
    """ExecuteTask{task_id, task_zip, cpu_usage, gpu_usage, memory_gb, gpu_memory_gb} (2026-04)."""

    def execute(self, channel: grpc.Channel, task: Task, node: Node, timeout: float) -> tuple[bool, str]:
        request = nodepool_pb2.ExecuteTaskRequest(
            task_id=task.task_id, task_zip=task.zip_path.read_bytes(),
            cpu_usage=float(task.cpu_score), gpu_usage=float(task.gpu_score),
            memory_gb=task.memory_gb, gpu_memory_gb=task.gpu_memory_gb)
        reply = _nodepool_grpc.WorkerNodeServiceStub(channel).ExecuteTask(request, timeout=timeout)
        return bool(reply.success), str(reply.message)

    def stop(self, channel: grpc.Channel, task_id: str, timeout: float) -> tuple[bool, str]:
        reply = _nodepool_grpc.WorkerNodeServiceStub(channel).StopTaskExecution(
            nodepool_pb2.StopTaskExecutionRequest(task_id=task_id), timeout=timeout)
        return bool(reply.success), str(reply.message)


class WorkerDialer:
    """Opens a channel to a worker for one call, plaintext unless credentials are configured."""

    def __init__(self, credentials: CredentialsFactory | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self._credentials = credentials
        self._options = [("grpc.max_send_message_length", MAX_MESSAGE),
                         ("grpc.max_receive_message_length", MAX_MESSAGE), *options]

    def channel(self, address: str) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(address, options=self._options)
        return grpc.secure_channel(address, self._credentials(address), options=self._options)


class Dispatcher:
    """Runs dispatch rounds on a thread; `run_once` and `stop_task` are callable directly."""

    def __init__(self, state: PoolState, dialer: WorkerDialer, *, interval_s: float,
                 timings: PoolTimings, clock: Callable[[], float], logger: logging.Logger,
                 overwrite_late_running: bool = True, worker_calls: WorkerCalls | None = None) -> None:
        self._state = state
        self._dialer = dialer
        self._interval = interval_s
        self._timings = timings
        self._clock = clock
        self._log = logger
        self._overwrite = overwrite_late_running
        self._calls: WorkerCalls = worker_calls or Calls2026()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Rounds from the loop and from tests must not interleave (one task, one call at a time).
        self._round_lock = threading.Lock()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="devpool-dispatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.run_once()
            except Exception:
                # A bad round must not end dispatching for the pool's lifetime.
                self._log.exception("dispatch round failed")

    def run_once(self) -> None:
        """One round: expire silent nodes, then offer every QUEUED task to one eligible node."""
        with self._round_lock:
            for task_id in self._state.expire(self._timings):
                self._log.info("task %s failed: its node stopped heartbeating", task_id)
            for task in self._state.queued():
                if self._stop.is_set():
                    return
                node = pick_node(self._state.nodes(), task, self._clock(), self._timings)
                if node is not None:
                    self._execute(task, node)

    def _execute(self, task: Task, node: Node) -> None:
        self._state.count_execute_call(task.task_id)
        try:
            with self._dialer.channel(node.address) as channel:
                success, message = self._calls.execute(channel, task, node, execute_deadline_s(task.zip_size))
        except grpc.RpcError as err:
            self._log.warning("ExecuteTask %s on node %s failed: %s", task.task_id, node.node_id,
                              err.code())
            return
        if not success:
            self._log.info("node %s declined task %s: %s", node.node_id, task.task_id,
                           message[:200])
            return
        # Only now, after ExecuteTask returned, like the existing pool (whose late RUNNING can
        # overwrite a result uploaded meanwhile).
        self._state.mark_running(task.task_id, node, overwrite=self._overwrite)
        self._log.info("task %s running on node %s", task.task_id, node.node_id)

    def stop_task(self, task: Task) -> tuple[bool, str]:
        """StopTask: a queued task fails at once; a running one is stopped on its worker."""
        if task.status == "QUEUED":
            self._state.fail(task.task_id, "Stopped by user")
            return True, "Task stopped"
        node = self._state.node(task.node_id)
        if task.status != "RUNNING" or node is None:
            return False, f"Task is {task.status}, not running"
        self._state.count_stop_call(task.task_id)
        try:
            with self._dialer.channel(node.address) as channel:
                return self._calls.stop(channel, task.task_id, STOP_DEADLINE_S)
        except grpc.RpcError as err:
            return False, f"Worker unreachable: {err.code().name}"
