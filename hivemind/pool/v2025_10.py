"""The worker's side of pool protocol generation 2025-10 (shared/PROTOCOL-2025-10.md,
proto/v2025_10/).

What differs from 2026-04, and what the worker does about it:
- no RefreshToken: the token is renewed by logging in again, at the same point of its lifetime;
- liveness is ReportStatus{node_id, status_message} ("Idle" or anything else for busy);
- output goes to StoreLogs{node_id, task_id, logs, timestamp}; usage to StoreOutput with
  `RESOURCE_USAGE: {"cpu_percent", "memory_mb", "gpu_percent", "gpu_memory_mb"}`;
- no chunked upload: a result is one ReturnTaskResult message (bounded by
  pool.max_result_message_mb), then TaskCompleted{success} says whether the task succeeded;
- no authentication interceptor on the pool, but every call carries the bearer token anyway.
The probe is NodeManagerService.HealthCheck, which a 2026-04 pool doesn't have (UNIMPLEMENTED);
its `healthy` field is not looked at (observed pools answer false).
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import grpc

from hivemind._proto.v2025_10 import nodepool_pb2 as pb2
from hivemind._proto.v2025_10 import nodepool_pb2_grpc as pb2_grpc
from hivemind.config import PoolConfig
from hivemind.pool.client import (
    NodeInfo,
    NodeStatus,
    PoolCallFailed,
    PoolClient,
    PoolRefused,
    mismatch,
)
from hivemind.secrets import Secret

USAGE_PREFIX = "RESOURCE_USAGE: "
RECORD_NAME = "_hivemind/execution.json"


def usage_text(cpu_percent: float, memory_mb: float, gpu_percent: float, gpu_memory_mb: float) -> str:
    """The StoreOutput text the original worker sent for a task's usage."""
    return USAGE_PREFIX + json.dumps({"cpu_percent": float(cpu_percent), "memory_mb": float(memory_mb),
                                      "gpu_percent": float(gpu_percent), "gpu_memory_mb": float(gpu_memory_mb)})


def task_succeeded(result: Path) -> bool:
    """Whether the result archive's execution record says the task succeeded."""
    try:
        with zipfile.ZipFile(result) as zf:
            record = json.loads(zf.read(RECORD_NAME))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    return isinstance(record, dict) and record.get("status") == "succeeded"


class Pool2025(PoolClient):
    generation: ClassVar[str] = "2025-10"

    def __init__(self, cfg: PoolConfig, password: Secret, node_id: str, logger: logging.Logger,
                 *, channel: grpc.Channel | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(cfg, password, node_id, logger, channel=channel, clock=clock)
        self._users = pb2_grpc.UserServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._nodes = pb2_grpc.NodeManagerServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._master = pb2_grpc.MasterNodeServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def limitations(self) -> tuple[str, ...]:
        return ("no RefreshToken: the token is renewed by logging in again before it expires",
                "no chunked upload: results travel in one ReturnTaskResult message "
                "(bounded by pool.max_result_message_mb)")

    # -- authentication -------------------------------------------------------------------------
    def _login_rpc(self, username: str, password: str) -> tuple[bool, str, str]:
        resp = self._call("Login", self._users.Login,
                          pb2.LoginRequest(username=username, password=password), auth=False)
        assert isinstance(resp, pb2.LoginResponse)
        return bool(resp.success), str(resp.message), str(resp.token)

    def _renew(self, old: str) -> str:
        token = self._login()
        self.renewals += 1
        self._log.info("pool token renewed by a new login (this generation has no RefreshToken)",
                       extra={"event": "pool.token_renewed"})
        return token

    def probe(self) -> None:
        resp, code = self._rpc_code("HealthCheck", self._nodes.HealthCheck, pb2.HealthCheckRequest())
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise mismatch(self.generation, "NodeManagerService.HealthCheck")
        if code != grpc.StatusCode.OK:
            raise PoolCallFailed(f"HealthCheck (protocol probe) failed: {code.name}")

    # -- node -----------------------------------------------------------------------------------
    def register(self, info: NodeInfo) -> None:
        req = pb2.RegisterWorkerNodeRequest(
            node_id=info.node_id, hostname=info.hostname, cpu_cores=info.cpu_cores,
            memory_gb=info.memory_gb, cpu_score=info.cpu_score, gpu_score=info.gpu_score,
            gpu_memory_gb=info.gpu_memory_gb, location=info.location, port=info.port,
            gpu_name=info.gpu_name, docker_status=info.docker_status)
        resp = self._call("RegisterWorkerNode", self._nodes.RegisterWorkerNode, req)
        assert isinstance(resp, pb2.StatusResponse)
        if not resp.success:
            raise PoolRefused(f"registration refused: {resp.message}")

    def report_status(self, st: NodeStatus) -> bool:
        # This generation carries no usage or task count in the heartbeat: only the word.
        resp = self._call("ReportStatus", self._nodes.ReportStatus,
                          pb2.ReportStatusRequest(node_id=self._node_id, status_message=st.status))
        assert isinstance(resp, pb2.StatusResponse)
        return bool(resp.success)

    # -- tasks ----------------------------------------------------------------------------------
    def upload_output(self, task_id: str, text: str) -> None:
        resp = self._call("StoreLogs", self._master.StoreLogs, pb2.StoreLogsRequest(
            node_id=self._node_id, task_id=task_id, logs=text, timestamp=int(self._clock())))
        assert isinstance(resp, pb2.StatusResponse)
        if not resp.success:
            raise PoolRefused(f"output upload refused: {resp.message}")

    def report_usage(self, task_id: str, cpu: float, memory: float, gpu: float = 0.0,
                     gpu_memory: float = 0.0, *, cpu_grant_cores: float = 0.0,
                     memory_grant_mib: float = 0.0) -> None:
        # RESOURCE_USAGE carries raw figures (cpu_percent of a core, memory_mb): no grant needed.
        self._call("StoreOutput", self._master.StoreOutput, pb2.StoreOutputRequest(
            task_id=task_id, output=usage_text(cpu, memory, gpu, gpu_memory)))

    def upload_result(self, task_id: str, path: Path) -> None:
        size = path.stat().st_size
        if size > self._cfg.max_result_message_mb * 1024 * 1024:
            raise PoolRefused(f"result of {size} bytes exceeds pool.max_result_message_mb "
                              "(the 2025-10 pool has no chunked upload)")
        data = path.read_bytes()
        timeout = min(max(self._cfg.call_timeout_s, 30 + 2 * size / 1e6), 600)
        resp = self._call("ReturnTaskResult", self._master.ReturnTaskResult,
                          pb2.ReturnTaskResultRequest(task_id=task_id, result_zip=data), timeout=timeout)
        assert isinstance(resp, pb2.ReturnTaskResultResponse)
        if not resp.success:
            raise PoolRefused(f"result upload refused: {resp.message}")
        success = task_succeeded(path)
        try:
            done = self._call("TaskCompleted", self._master.TaskCompleted, pb2.TaskCompletedRequest(
                task_id=task_id, node_id=self._node_id, success=success))
        except PoolCallFailed as exc:
            # The pool holds the result and marked the task COMPLETED already; sending the
            # archive again for this notice would deliver the result twice.
            self._log.warning("TaskCompleted for %s not delivered (%s); the pool has the result",
                              task_id, exc, extra={"task_id": task_id, "event": "pool.task_completed_failed"})
            return
        assert isinstance(done, pb2.StatusResponse)
        if not done.success:
            # Normal: ReturnTaskResult completed the task, and the pool says so ("already completed").
            self._log.debug("TaskCompleted %s: %s", task_id, done.message, extra={"task_id": task_id})
