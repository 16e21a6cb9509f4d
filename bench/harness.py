"""A real development pool and a real worker daemon process for the benchmarks, with the pool
instrumented where the benchmarks need exact times: when a task's first output reaches it, and
whether a result came through the chunked upload.

The benchmarks drive ExecuteTask themselves, as the pool's dispatcher does (plaintext channel, no
credentials, the pool's deadline), so that the measured interval starts at the call; the pool's own
dispatch loop is parked (an hour between rounds) and never competes. Tasks are entered into the
pool's state like UploadTask does, so the worker's output and result calls are accepted.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from hivemind._proto import nodepool_pb2, nodepool_pb2_grpc
from hivemind.devpool.dispatch import MAX_MESSAGE, execute_deadline_s
from hivemind.devpool.server import DevPool
from hivemind.devpool.state import Node, Task
from hivemind.devpool.testing import free_port, wait_for

_nodepool_grpc: Any = nodepool_pb2_grpc

WORKER_HOST = "127.0.0.2"   # the pool skips nodes that advertise exactly 127.0.0.1
NODE_ID = "bench-node"
WORKER_USER = "worker"
PARKED_DISPATCH_S = 3600.0


class _ChunkedUploads(logging.Handler):
    """Collects the task ids the pool logs as completed by the chunked upload."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.task_ids: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if record.msg.startswith("task %r completed by chunked upload") and isinstance(args, tuple) and args:
            self.task_ids.add(str(args[0]))


class BenchPool:
    """A DevPool whose first-output times are recorded (monotonic clock) per task."""

    def __init__(self, spool: Path, worker_password: str) -> None:
        self.chunked = _ChunkedUploads()
        log = logging.getLogger(f"bench.devpool.{id(self)}")
        log.setLevel(logging.INFO)
        log.propagate = False
        log.addHandler(self.chunked)
        self.pool = DevPool("127.0.0.1", 0, users={WORKER_USER: worker_password, "bench": "bench-pw"},
                            dispatch_interval_s=PARKED_DISPATCH_S, spool_dir=spool, logger=log)
        self.first_output: dict[str, float] = {}
        self._lock = threading.Lock()
        original = self.pool.state.append_output

        def append_output(task_id: str, text: str) -> bool:
            now = time.monotonic()
            ok = original(task_id, text)
            if ok:
                with self._lock:
                    self.first_output.setdefault(task_id, now)
            return ok

        # The servicer calls state.append_output for every TaskOutputUpload; wrapping it on the
        # instance times the moment the pool has the text, after gRPC and auth.
        self.pool.state.append_output = append_output  # type: ignore[method-assign]
        self._channel: grpc.Channel | None = None
        self._seq = 0

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self.pool.stop()

    @property
    def address(self) -> str:
        return self.pool.address

    def node(self) -> Node | None:
        return next((n for n in self.pool.nodes() if n.node_id == NODE_ID), None)

    def add_task(self, task_id: str, data: bytes, memory_gb: int = 1) -> Task:
        path = self.pool.state.spool_bytes("task", data)
        task = Task(task_id=task_id, owner="bench", zip_path=path, zip_size=len(data), memory_gb=memory_gb)
        if not self.pool.state.add_task(task):
            raise ValueError(f"task {task_id} exists")
        return task

    def execute(self, task: Task, data: bytes, *, fresh_channel: bool = True) -> tuple[bool, str]:
        """ExecuteTask on the worker as the pool's dispatcher makes it; on success, RUNNING.

        fresh_channel: a new channel per call like the dev pool's dialer (the latency runs);
        False reuses one (the throughput driver, which would otherwise measure connection setup)."""
        node = self.node()
        assert node is not None, "the worker is not registered"
        request = nodepool_pb2.ExecuteTaskRequest(task_id=task.task_id, task_zip=data, cpu_usage=0.0,
                                                  gpu_usage=0.0, memory_gb=task.memory_gb)
        opts = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
        if fresh_channel:
            with grpc.insecure_channel(node.address, options=opts) as ch:
                reply = _nodepool_grpc.WorkerNodeServiceStub(ch).ExecuteTask(
                    request, timeout=execute_deadline_s(task.zip_size))
        else:
            if self._channel is None:
                self._channel = grpc.insecure_channel(node.address, options=opts)
            reply = _nodepool_grpc.WorkerNodeServiceStub(self._channel).ExecuteTask(
                request, timeout=execute_deadline_s(task.zip_size))
        if reply.success:
            self.pool.state.mark_running(task.task_id, node, overwrite=True)
        return bool(reply.success), str(reply.message)

    def status(self, task_id: str) -> str:
        t = self.pool.task(task_id)
        return t.status if t is not None else ""


@dataclass
class WorkerDaemon:
    """`python -m hivemind run` with a generated config; its state lives under /var/tmp (the venv
    executor's `nobody` must reach it)."""

    state_dir: Path
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "hivemind", "run", "--config", str(self.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.extra_env})

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def make_worker(work: Path, pool_address: str, password: str, executor: dict[str, Any], *,
                pool_overrides: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> WorkerDaemon:
    state = Path(tempfile.mkdtemp(prefix="hivemind-bench-", dir="/var/tmp"))
    state.chmod(0o711)
    pw = work / "pool-password"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    cfg: dict[str, Any] = {
        "node": {"id": NODE_ID, "state_dir": str(state)},
        "pool": {"address": pool_address, "username": WORKER_USER, "password_file": str(pw),
                 **(pool_overrides or {})},
        "server": {"listen_host": WORKER_HOST, "port": free_port(WORKER_HOST), "advertise_host": WORKER_HOST,
                   "auth": {"mode": "legacy", "legacy_allowed_peers": ["127.0.0.0/8"]}},
        "executor": {"slots": os.cpu_count() or 2, "stop_grace_s": 2, **executor},
        "resources": {"reserve_cpus": 0, "reserve_memory_gb": 0.5},
        "status": {"enabled": False},
        "logging": {"target": "stderr", "level": "info"},
        "shutdown": {"policy": "drain", "drain_timeout_s": 30},
    }
    for key, value in (extra or {}).items():
        cfg.setdefault(key, {}).update(value)
    path = work / "worker.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return WorkerDaemon(state, path, work / "worker.log")


class Setup:
    """A pool and a registered worker in a scratch directory; `close()` removes everything."""

    def __init__(self, executor: dict[str, Any], *, pool_overrides: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="hm-bench-"))
        password = "bench-worker-pw-" + os.urandom(6).hex()
        self.pool = BenchPool(self.work / "spool", password)
        self.pool.start()
        self.worker = make_worker(self.work, self.pool.address, password, executor,
                                  pool_overrides=pool_overrides, extra=extra)
        try:
            self.worker.start()
            wait_for(lambda: (n := self.pool.node()) is not None and n.status == "Idle" or self._dead(),
                     90, "the worker to register as Idle", interval=0.05)
        except BaseException:
            self.close()
            raise

    def _dead(self) -> bool:
        if not self.worker.alive():
            raise RuntimeError(f"worker died:\n{self.worker.log_tail()}")
        return False

    def close(self) -> None:
        try:
            rc = self.worker.stop()
            if rc != 0:
                print(f"warning: worker exited with {rc}:\n{self.worker.log_tail()}", file=sys.stderr)
        finally:
            self.pool.stop()
            shutil.rmtree(self.worker.state_dir, ignore_errors=True)
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> Setup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
