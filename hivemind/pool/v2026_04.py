"""The worker's side of pool protocol generation 2026-04 (shared/PROTOCOL.md, proto/v2026_04/).

Token renewal through RefreshToken, carrying the still-valid token as bearer metadata like every
other call; heartbeats are ReportStatus with usage fields; output is TaskOutputUpload, usage
TaskUsage, results the chunked `hivemind.ext.ResultTransfer` when the pool offers it, else one
TaskResultUpload. The probe is TaskUsage's node-level liveness ping (task_id "0"): a 2025-10
pool serves no WorkerNodeService and answers UNIMPLEMENTED.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import grpc

from hivemind._proto import hivemind_ext_pb2 as ext_pb2
from hivemind._proto import hivemind_ext_pb2_grpc as ext_grpc
from hivemind._proto.v2026_04 import nodepool_pb2 as pb2
from hivemind._proto.v2026_04 import nodepool_pb2_grpc as pb2_grpc
from hivemind.config import PoolConfig
from hivemind.pool.client import (
    NodeInfo,
    NodeStatus,
    PoolCallFailed,
    PoolClient,
    PoolRefused,
    bearer,
    mismatch,
)
from hivemind.secrets import Secret
from hivemind.tasks.usage import percent_of_grant

CHUNK_BYTES = 1024 * 1024


class Pool2026(PoolClient):
    generation: ClassVar[str] = "2026-04"

    def __init__(self, cfg: PoolConfig, password: Secret, node_id: str, logger: logging.Logger,
                 *, channel: grpc.Channel | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(cfg, password, node_id, logger, channel=channel, clock=clock)
        self._users = pb2_grpc.UserServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._nodes = pb2_grpc.NodeManagerServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._worker = pb2_grpc.WorkerNodeServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._results = ext_grpc.ResultTransferStub(self._channel)  # type: ignore[no-untyped-call]
        self.chunked_upload: bool | None = None  # None: not yet known

    def limitations(self) -> tuple[str, ...]:
        if self.chunked_upload is False:
            return ("results in one TaskResultUpload message (this pool has no chunked upload; "
                    "bounded by pool.max_result_message_mb)",)
        return ()

    # -- authentication -------------------------------------------------------------------------
    def _login_rpc(self, username: str, password: str) -> tuple[bool, str, str]:
        resp = self._call("Login", self._users.Login,
                          pb2.LoginRequest(username=username, password=password), auth=False)
        assert isinstance(resp, pb2.LoginResponse)
        return bool(resp.success), str(resp.message), str(resp.token)

    def _renew(self, old: str) -> str:
        # The pool checks the bearer metadata of RefreshToken like any other call (issue 15).
        resp = self._call("RefreshToken", self._users.RefreshToken,
                          pb2.RefreshTokenRequest(old_token=old), auth=False, metadata=bearer(old))
        assert isinstance(resp, pb2.RefreshTokenResponse)
        if not resp.success or not resp.new_token:
            raise PoolRefused(f"token refresh refused: {resp.message}")
        self._set_token(resp.new_token)
        self.renewals += 1
        self._log.info("pool token renewed", extra={"event": "pool.token_renewed"})
        return str(resp.new_token)

    def probe(self) -> None:
        resp, code = self._rpc_code("TaskUsage", self._worker.TaskUsage,
                                    pb2.TaskUsageRequest(task_id="0", token=self._node_id))
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise mismatch(self.generation, "WorkerNodeService.TaskUsage")
        if code != grpc.StatusCode.OK:
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL):
                self.forget_token()
            raise PoolCallFailed(f"TaskUsage (protocol probe) failed: {code.name}")

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
        req = pb2.RunningStatusRequest(
            node_id=self._node_id, status=st.status, cpu_usage=st.cpu_usage,
            memory_usage=st.memory_usage, gpu_usage=st.gpu_usage,
            gpu_memory_usage=st.gpu_memory_usage, docker_status=st.docker_status,
            running_tasks=st.running_tasks)
        resp = self._call("ReportStatus", self._nodes.ReportStatus, req)
        assert isinstance(resp, pb2.RunningStatusResponse)
        return bool(resp.success)

    # -- tasks ----------------------------------------------------------------------------------
    def upload_output(self, task_id: str, text: str) -> None:
        resp = self._call("TaskOutputUpload", self._worker.TaskOutputUpload,
                          pb2.TaskOutputUploadRequest(task_id=task_id, output=text, token=self.token()))
        assert isinstance(resp, pb2.TaskOutputUploadResponse)
        if not resp.success:
            raise PoolRefused(f"output upload refused: {resp.message}")

    def report_usage(self, task_id: str, cpu: float, memory: float, gpu: float = 0.0,
                     gpu_memory: float = 0.0, *, cpu_grant_cores: float = 0.0,
                     memory_grant_mib: float = 0.0) -> None:
        # This generation's pool reads cpu_usage and memory_usage as percent (0–100) of what the
        # task was granted, as the original worker sent them.
        if cpu_grant_cores > 0:
            cpu = percent_of_grant(cpu, 100.0 * cpu_grant_cores)
        if memory_grant_mib > 0:
            memory = percent_of_grant(memory, memory_grant_mib)
        self._call("TaskUsage", self._worker.TaskUsage, pb2.TaskUsageRequest(
            task_id=task_id, cpu_usage=cpu, memory_usage=memory, gpu_usage=gpu,
            gpu_memory_usage=gpu_memory, token=self.token()))

    def upload_result(self, task_id: str, path: Path) -> None:
        """Chunked when the pool offers the extension, else one message (the caller keeps
        results within `max_result_message_mb` for that case)."""
        if self.chunked_upload is not False:
            try:
                self._upload_chunked(task_id, path)
                self.chunked_upload = True
                return
            except _ChunkedUnsupported:
                self.chunked_upload = False
                self._log.info("pool has no chunked result upload; using single messages",
                               extra={"event": "pool.no_chunked_upload"})
        size = path.stat().st_size
        if size > self._cfg.max_result_message_mb * 1024 * 1024:
            raise PoolRefused(f"result of {size} bytes exceeds pool.max_result_message_mb")
        data = path.read_bytes()
        timeout = max(self._cfg.call_timeout_s, 30 + 2 * size / 1e6)
        resp = self._call("TaskResultUpload", self._worker.TaskResultUpload,
                          pb2.TaskResultUploadRequest(task_id=task_id, result_zip=data, token=self.token()),
                          timeout=min(timeout, 600))
        assert isinstance(resp, pb2.TaskResultUploadResponse)
        if not resp.success:
            raise PoolRefused(f"result upload refused: {resp.message}")

    def _upload_chunked(self, task_id: str, path: Path) -> None:
        token = self.token()
        size = path.stat().st_size

        def chunks() -> Iterator[ext_pb2.ResultChunk]:
            digest = hashlib.sha256()
            offset = 0
            with path.open("rb") as fh:
                while True:
                    data = fh.read(CHUNK_BYTES)
                    digest.update(data)
                    last = offset + len(data) >= size
                    yield ext_pb2.ResultChunk(task_id=task_id, token=token, data=data, offset=offset,
                                              last=last, total_size=size,
                                              sha256=digest.hexdigest() if last else "")
                    offset += len(data)
                    if last:
                        return

        try:
            resp = self._results.UploadResult(chunks(), timeout=max(60.0, size / 5e6),
                                              metadata=bearer(token))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise _ChunkedUnsupported() from None
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL):
                self.forget_token()
            raise PoolCallFailed(f"UploadResult failed: {exc.code().name}") from None
        if not resp.success:
            raise PoolRefused(f"chunked result upload refused: {resp.message}")


class _ChunkedUnsupported(Exception):
    pass
