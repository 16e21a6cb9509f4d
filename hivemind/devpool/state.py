"""The development pool's in-memory records (users, nodes, tasks) and its on-disk spool.

Task archives and result archives live as files in a spool directory, never whole in this
process's records, so a 1 GiB result costs disk, not memory. Every method takes the one lock;
readers get copies (`dataclasses.replace`), so a caller never sees a record change under it.

Task states, as the existing pool uses them:

    QUEUED --ExecuteTask returned success--> RUNNING --TaskResultUpload--> COMPLETED
       |  \\--success=false or call failed: stays QUEUED, retried next round
       |                                      RUNNING --node silent too long--> FAILED
       \\--StopTask before dispatch--> FAILED
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

QUEUED = "QUEUED"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"

# The existing pool keeps only the last ~10 KiB of a task's output.
OUTPUT_TAIL_CHARS = 10 * 1024
DEFAULT_BALANCE = 1000


@dataclass(frozen=True)
class PoolTimings:
    """Liveness thresholds of the existing pool, in seconds; tests shrink them."""

    online_s: float = 180.0
    fail_after_s: float = 60.0
    fail_after_busy_s: float = 120.0
    forget_after_s: float = 900.0


@dataclass
class User:
    password: str = field(repr=False)
    balance: int = DEFAULT_BALANCE


@dataclass
class Node:
    node_id: str
    owner: str
    hostname: str
    port: int
    cpu_cores: int = 0
    memory_gb: int = 0
    cpu_score: int = 0
    gpu_score: int = 0
    gpu_memory_gb: int = 0
    location: str = ""
    gpu_name: str = ""
    docker_status: str = ""
    # A node is dispatchable from registration on, as long as it reports "Idle" afterwards.
    status: str = "Idle"
    cpu_usage: float = 0.0
    memory_usage: float = 0.0
    gpu_usage: float = 0.0
    gpu_memory_usage: float = 0.0
    running_tasks: int = 0
    registered_at: float = 0.0
    last_heartbeat: float = 0.0

    @property
    def address(self) -> str:
        return f"{self.hostname}:{self.port}"


@dataclass
class Task:
    task_id: str
    owner: str
    zip_path: Path
    zip_size: int
    memory_gb: int = 0
    cpu_score: int = 0
    gpu_score: int = 0
    gpu_memory_gb: int = 0
    location: str = ""
    gpu_name: str = ""
    host_count: int = 0
    status: str = QUEUED
    message: str = ""
    created_at: float = 0.0
    node_id: str = ""
    worker_ip: str = ""
    output: str = ""
    result_path: Path | None = None
    result_size: int = 0
    cpu_usage: float = 0.0
    memory_usage: float = 0.0
    gpu_usage: float = 0.0
    gpu_memory_usage: float = 0.0
    execute_calls: int = 0
    stop_calls: int = 0
    result_uploads: int = 0         # results stored (a resend after a worker crash counts again)
    output_chunks: int = 0          # TaskOutputUpload calls accepted
    completed_success: bool | None = None   # 2025-10's TaskCompleted{success}
    usage_reports: int = 0


class PoolState:
    """Users, nodes and tasks behind one lock, plus the spool directory they point into."""

    def __init__(self, spool_dir: Path, clock: Callable[[], float]) -> None:
        self._spool = spool_dir
        self._clock = clock
        self._lock = threading.Lock()
        self._users: dict[str, User] = {}
        self._nodes: dict[str, Node] = {}
        self._tasks: dict[str, Task] = {}
        # Calls by kind ("login", "refresh", "refresh_rejected"), and tokens already renewed.
        self.counters: collections.Counter[str] = collections.Counter()
        self._renewed: set[str] = set()

    # -- counters --------------------------------------------------------------------------

    def count(self, what: str) -> None:
        with self._lock:
            self.counters[what] += 1

    def renewed(self, token: str) -> bool:
        """Record that `token` was renewed; True if it had been renewed before."""
        with self._lock:
            again = token in self._renewed
            self._renewed.add(token)
            if again:
                self.counters["renewed_twice"] += 1
            return again

    def task_completed(self, task_id: str, success: bool) -> str:
        """2025-10's TaskCompleted: "" when it completed the task, else why not."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return "Task not found"
            already = task.status == COMPLETED
            task.completed_success = success
            if not already:
                task.status = COMPLETED if success else FAILED
            return "Task already completed" if already else ""

    # -- spool -----------------------------------------------------------------------------

    def spool_path(self, kind: str) -> Path:
        """A fresh, unused file name in the spool; named by uuid, never by a client's task id."""
        return self._spool / f"{kind}-{uuid.uuid4().hex}"

    def spool_bytes(self, kind: str, data: bytes) -> Path:
        path = self.spool_path(kind)
        path.write_bytes(data)
        return path

    # -- users -----------------------------------------------------------------------------

    def add_user(self, username: str, password: str, balance: int = DEFAULT_BALANCE) -> None:
        with self._lock:
            self._users[username] = User(password=password, balance=balance)

    def check_password(self, username: str, password: str) -> bool:
        with self._lock:
            user = self._users.get(username)
        # Compare even for unknown users so the answer time doesn't reveal which names exist.
        expected = user.password if user else "\0" * max(len(password), 1)
        return hmac.compare_digest(expected.encode(), password.encode()) and user is not None

    def has_user(self, username: str) -> bool:
        with self._lock:
            return username in self._users

    def balance(self, username: str) -> int | None:
        with self._lock:
            user = self._users.get(username)
            return None if user is None else user.balance

    def transfer(self, sender: str, receiver: str, amount: int) -> str:
        """Move `amount` between accounts; returns "" on success, else the reason."""
        with self._lock:
            src, dst = self._users.get(sender), self._users.get(receiver)
            if src is None or dst is None:
                return "User not found"
            if amount <= 0:
                return "Amount must be positive"
            if src.balance < amount:
                return "Insufficient balance"
            src.balance -= amount
            dst.balance += amount
            return ""

    # -- nodes -----------------------------------------------------------------------------

    def register_node(self, node: Node) -> None:
        now = self._clock()
        with self._lock:
            old = self._nodes.get(node.node_id)
            node.registered_at = old.registered_at if old else now
            node.last_heartbeat = now
            self._nodes[node.node_id] = node

    def report_status(self, node_id: str, status: str, cpu: float, mem: float, gpu: float,
                      gpu_mem: float, docker_status: str, running_tasks: int) -> bool:
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                return False
            node.status = status
            node.cpu_usage, node.memory_usage = cpu, mem
            node.gpu_usage, node.gpu_memory_usage = gpu, gpu_mem
            if docker_status:
                node.docker_status = docker_status
            node.running_tasks = running_tasks
            node.last_heartbeat = self._clock()
            return True

    def ping(self, node_id: str) -> bool:
        """The TaskUsage task_id="0" liveness ping: refresh the heartbeat only."""
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                return False
            node.last_heartbeat = self._clock()
            return True

    def node(self, node_id: str) -> Node | None:
        with self._lock:
            node = self._nodes.get(node_id)
            return dataclasses.replace(node) if node else None

    def nodes(self) -> list[Node]:
        with self._lock:
            return [dataclasses.replace(n) for n in self._nodes.values()]

    # -- tasks -----------------------------------------------------------------------------

    def add_task(self, task: Task) -> bool:
        """False when the id is taken (the caller then removes the task's spooled archive)."""
        with self._lock:
            if task.task_id in self._tasks:
                return False
            task.created_at = self._clock()
            self._tasks[task.task_id] = task
            return True

    def task(self, task_id: str) -> Task | None:
        with self._lock:
            task = self._tasks.get(task_id)
            return dataclasses.replace(task) if task else None

    def tasks(self, owner: str | None = None) -> list[Task]:
        with self._lock:
            return [dataclasses.replace(t) for t in self._tasks.values()
                    if owner is None or t.owner == owner]

    def queued(self) -> list[Task]:
        with self._lock:
            return [dataclasses.replace(t) for t in self._tasks.values() if t.status == QUEUED]

    def count_execute_call(self, task_id: str) -> None:
        with self._lock:
            if task_id in self._tasks:
                self._tasks[task_id].execute_calls += 1

    def count_stop_call(self, task_id: str) -> None:
        with self._lock:
            if task_id in self._tasks:
                self._tasks[task_id].stop_calls += 1

    def mark_running(self, task_id: str, node: Node, *, overwrite: bool) -> None:
        """Record a successful ExecuteTask. With `overwrite` (the existing pool's behaviour) this
        replaces whatever state the task reached meanwhile, COMPLETED included."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or (not overwrite and task.status != QUEUED):
                return
            task.status, task.message = RUNNING, ""
            task.node_id, task.worker_ip = node.node_id, node.hostname

    def fail(self, task_id: str, message: str) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                task.status, task.message = FAILED, message

    def append_output(self, task_id: str, text: str) -> bool:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return False
            task.output = (task.output + text)[-OUTPUT_TAIL_CHARS:]
            task.output_chunks += 1
            return True

    def set_usage(self, task_id: str, cpu: float, mem: float, gpu: float, gpu_mem: float) -> bool:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return False
            task.cpu_usage, task.memory_usage = cpu, mem
            task.gpu_usage, task.gpu_memory_usage = gpu, gpu_mem
            task.usage_reports += 1
            return True

    def store_result(self, task_id: str, spooled: Path, size: int) -> bool:
        """Adopt an already spooled result file and mark the task COMPLETED."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                spooled.unlink(missing_ok=True)
                return False
            old = task.result_path
            task.result_path, task.result_size = spooled, size
            task.status, task.message = COMPLETED, ""
            task.result_uploads += 1
        if old is not None and old != spooled:
            old.unlink(missing_ok=True)
        return True

    def expire(self, timings: PoolTimings) -> list[str]:
        """Fail RUNNING tasks of silent nodes and forget long-silent nodes; returns failed ids."""
        now = self._clock()
        failed: list[str] = []
        with self._lock:
            for task in self._tasks.values():
                if task.status != RUNNING:
                    continue
                node = self._nodes.get(task.node_id)
                if node is None:
                    limit = 0.0
                    silent = float("inf")
                else:
                    busy = "Running" in node.status or "Executing" in node.status
                    limit = timings.fail_after_busy_s if busy else timings.fail_after_s
                    silent = now - node.last_heartbeat
                if silent > limit:
                    task.status, task.message = FAILED, "Worker node stopped responding"
                    failed.append(task.task_id)
            for node_id in [n.node_id for n in self._nodes.values()
                            if now - n.last_heartbeat > timings.forget_after_s]:
                del self._nodes[node_id]
        return failed

    def close(self) -> None:
        shutil.rmtree(self._spool, ignore_errors=True)
