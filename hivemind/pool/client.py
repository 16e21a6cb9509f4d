"""Calls from the worker to the node pool: login and token renewal, registration, heartbeats,
task output, usage and results. Every call has a deadline; failures raise PoolCallFailed, which
callers retry with backoff. Thread-safe: one channel, the token behind a lock.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from hivemind._proto import hivemind_ext_pb2 as ext_pb2
from hivemind._proto import hivemind_ext_pb2_grpc as ext_grpc
from hivemind._proto import nodepool_pb2 as pb2
from hivemind._proto import nodepool_pb2_grpc as pb2_grpc
from hivemind.config import PoolConfig
from hivemind.errors import HivemindError
from hivemind.pool.token import token_expiry
from hivemind.secrets import Secret
from hivemind.server.tls import pool_channel_credentials

CHUNK_BYTES = 1024 * 1024


class PoolCallFailed(HivemindError):
    recoverable = True


class PoolRefused(HivemindError):
    """The pool answered success=false; `message` is the pool's reason."""


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    hostname: str
    port: int
    cpu_cores: int
    memory_gb: int
    cpu_score: int
    gpu_score: int
    gpu_memory_gb: int
    gpu_name: str
    location: str
    docker_status: str


@dataclass(frozen=True)
class NodeStatus:
    status: str             # "Idle" only when a slot and resources are free; the pool dispatches on it
    cpu_usage: float
    memory_usage: float
    gpu_usage: float
    gpu_memory_usage: float
    docker_status: str
    running_tasks: int


def make_channel(cfg: PoolConfig, max_message_bytes: int) -> grpc.Channel:
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    if not cfg.tls.enabled:
        return grpc.insecure_channel(cfg.address, options=options)
    if cfg.tls.server_name:
        options.append(("grpc.ssl_target_name_override", cfg.tls.server_name))
    return grpc.secure_channel(cfg.address, pool_channel_credentials(cfg.tls.ca_file), options=options)


class PoolClient:
    def __init__(self, cfg: PoolConfig, password: Secret, node_id: str, logger: logging.Logger,
                 *, channel: grpc.Channel | None = None, clock: Callable[[], float] = time.time) -> None:
        self._cfg = cfg
        self._password = password
        self._node_id = node_id
        self._log = logger
        self._clock = clock
        max_bytes = cfg.max_result_message_mb * 1024 * 1024 + 1024 * 1024
        self._channel = channel or make_channel(cfg, max_bytes)
        self._users = pb2_grpc.UserServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._nodes = pb2_grpc.NodeManagerServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._worker = pb2_grpc.WorkerNodeServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._results = ext_grpc.ResultTransferStub(self._channel)  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        self._token: str | None = None
        self._token_exp: float | None = None
        self.chunked_upload: bool | None = None  # None: not yet known

    # -- authentication -------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[..., object], request: object, *,
              auth: bool = True, timeout: float | None = None) -> object:
        metadata = self._metadata() if auth else None
        try:
            return fn(request, timeout=timeout or self._cfg.call_timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL) and auth:
                # The existing pool answers a bad token with INTERNAL; log in afresh next time.
                with self._lock:
                    self._token = None
            raise PoolCallFailed(f"{what} failed: {code.name if code else 'error'}") from None

    def _metadata(self) -> list[tuple[str, str]]:
        token = self.token()
        return [("authorization", f"Bearer {token}")]

    def token(self) -> str:
        """A valid token: logs in, or renews one that expires within the configured margin."""
        with self._lock:
            token, exp = self._token, self._token_exp
        now = self._clock()
        if token and (exp is None or exp - now > self._cfg.token_refresh_margin_s):
            return token
        if token:
            try:
                return self._refresh(token)
            except (PoolCallFailed, PoolRefused) as exc:
                self._log.warning("token refresh failed (%s); logging in again", exc,
                                  extra={"event": "pool.token_refresh_failed"})
        return self._login()

    def _login(self) -> str:
        resp = self._call("Login", self._users.Login,
                          pb2.LoginRequest(username=self._cfg.username, password=self._password.reveal()),
                          auth=False)
        assert isinstance(resp, pb2.LoginResponse)
        if not resp.success or not resp.token:
            raise PoolRefused(f"login as {self._cfg.username!r} refused: {resp.message}")
        self._set_token(resp.token)
        self._log.info("logged in to the pool as %s", self._cfg.username, extra={"event": "pool.login"})
        return resp.token

    def _refresh(self, old: str) -> str:
        resp = self._call("RefreshToken", self._users.RefreshToken,
                          pb2.RefreshTokenRequest(old_token=old), auth=False)
        assert isinstance(resp, pb2.RefreshTokenResponse)
        if not resp.success or not resp.new_token:
            raise PoolRefused(f"token refresh refused: {resp.message}")
        self._set_token(resp.new_token)
        self._log.info("pool token renewed", extra={"event": "pool.token_renewed"})
        return resp.new_token

    def _set_token(self, token: str) -> None:
        with self._lock:
            self._token = token
            self._token_exp = token_expiry(token)

    def token_expires_at(self) -> float | None:
        with self._lock:
            return self._token_exp

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
        """True when the pool knows this node; False means it forgot it (register again)."""
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
                     gpu_memory: float = 0.0) -> None:
        self._call("TaskUsage", self._worker.TaskUsage, pb2.TaskUsageRequest(
            task_id=task_id, cpu_usage=cpu, memory_usage=memory, gpu_usage=gpu,
            gpu_memory_usage=gpu_memory, token=self.token()))

    def upload_result(self, task_id: str, path: Path) -> None:
        """Upload a result zip: chunked when the pool offers the extension, else one message
        (the caller keeps results within `max_result_message_mb` for that case)."""
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
                                              metadata=self._metadata())
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise _ChunkedUnsupported() from None
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL):
                with self._lock:
                    self._token = None
            raise PoolCallFailed(f"UploadResult failed: {exc.code().name}") from None
        if not resp.success:
            raise PoolRefused(f"chunked result upload refused: {resp.message}")

    def close(self) -> None:
        self._channel.close()


class _ChunkedUnsupported(Exception):
    pass
