"""Start the worker's gRPC server: the servicer behind the auth interceptor, on one TCP port,
plus a private unix socket that only answers the health check.

`RunningServer.healthy()` makes a real call over that socket through the same thread pool and
completion queue as the pool's calls, so a hung poller or a thread pool full of stuck handlers
reads as unhealthy (for the systemd watchdog).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from hivemind.config import ServerConfig
from hivemind.errors import StartupError
from hivemind.server.auth import (
    AuthInterceptor,
    AuthMode,
    CallBudget,
    FailureLimiter,
    resolve_server_auth,
)
from hivemind.server.service import ServedCalls, TaskAcceptor, add_worker_service

HEALTH_SERVICE = "hivemind.worker.Health"
HEALTH_METHOD = f"/{HEALTH_SERVICE}/Check"
_HEALTH_REPLY = b"ok"
EXECUTE_METHOD = "/nodepool.WorkerNodeService/ExecuteTask"
# An ExecuteTaskRequest is the archive plus a task id and a few numbers; protobuf and gRPC
# framing add bytes, never megabytes.
FRAMING_BYTES = 64 * 1024


class ServerStartError(StartupError):
    """The server could not listen (address in use, bad address); the message says which."""


class RunningServer:
    """A started server. `port` is the bound TCP port; `mode` the effective auth mode."""

    def __init__(self, server: grpc.Server, port: int, mode: AuthMode, health_dir: Path,
                 logger: logging.Logger) -> None:
        self._server = server
        self.port = port
        self.mode = mode
        self._health_dir = health_dir
        self._log = logger
        self._lock = threading.Lock()
        self._stopped = False
        self._health_channel = grpc.insecure_channel(f"unix:{health_dir / 'health.sock'}")
        self._health = self._health_channel.unary_unary(HEALTH_METHOD, None, None)

    @property
    def insecure(self) -> bool:
        return self.mode is AuthMode.LEGACY

    def healthy(self, timeout: float = 2.0) -> bool:
        """True when the server answers a real call within `timeout` seconds."""
        with self._lock:
            if self._stopped:
                return False
        try:
            return bool(self._health(b"", timeout=timeout) == _HEALTH_REPLY)
        except grpc.RpcError:
            return False

    def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new calls, let running ones finish for `grace` seconds, then cancel them."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        # Our own health connection goes first, so grpc doesn't log its GOAWAY as noise.
        self._health_channel.close()
        self._server.stop(grace).wait()
        shutil.rmtree(self._health_dir, ignore_errors=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops; True if it did within `timeout`."""
        return bool(self._server.wait_for_termination(timeout))


def _health_check(request: bytes, context: grpc.ServicerContext) -> bytes:
    return _HEALTH_REPLY


def _tcp_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def start_worker_server(cfg: ServerConfig, acceptor: TaskAcceptor, *, logger: logging.Logger,
                        environ: Mapping[str, str] | None = None,
                        limiter: FailureLimiter | None = None,
                        clock: Callable[[], float] = time.monotonic,
                        max_workers: int = 8,
                        runtime_dir: str | None = None,
                        max_archive_mb: int | None = None,
                        generation: str = "2026-04", node_id: str = "") -> RunningServer:
    """Resolve auth, bind `cfg.listen_host:cfg.port`, start serving.

    Raises ConfigError/SecretError (auth setup) or ServerStartError (binding), never starting a
    weaker mode than configured. `runtime_dir` holds the private health socket (default: a
    fresh 0700 temp dir). `max_archive_mb` (archive.max_archive_mb) lowers the message limit to
    one archive plus framing: a bigger message would be refused after it was read anyway.
    `generation` is the pool protocol generation (pool.protocol) whose WorkerNodeService messages
    are served; `node_id` is this node's id (2025-10's ExecuteTask names the node it is meant for).
    """
    auth = resolve_server_auth(cfg.auth, environ)
    limit = message_limit(cfg, max_archive_mb)
    budget = CallBudget(cfg.max_inflight_uploads, frozenset({EXECUTE_METHOD}))
    interceptor = AuthInterceptor(
        auth, limiter or FailureLimiter(max_global_failures=cfg.max_failed_auth_per_minute,
                                        clock=clock),
        logger, local_methods=frozenset({HEALTH_METHOD}), budget=budget)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-worker"),
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # grpc enables SO_REUSEPORT by default: a second worker would share the port silently.
            ("grpc.so_reuseport", 0),
            # A fixed per-stream receive window bounds what an unauthenticated caller can make
            # grpc buffer before the interceptor refuses it. With BDP probing the window grows
            # to tens of MiB on a fast link, and a 10-call flood cost the server up to 100 MiB.
            # 4 MiB still gives ~48 MiB/s uploads at 50 ms RTT (measured through a delaying proxy).
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
        ],
    )
    add_worker_service(server, generation, ServedCalls(acceptor, logger=logger, clock=clock, node_id=node_id))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        HEALTH_SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(_health_check)})])

    address = _tcp_address(cfg.listen_host, cfg.port)
    health_dir = Path(tempfile.mkdtemp(prefix="hivemind-grpc-", dir=runtime_dir))
    try:
        port = _bind(server, address, auth.credentials)
        _bind(server, f"unix:{health_dir / 'health.sock'}", None)
        server.start()
    except BaseException:
        server.stop(None)
        shutil.rmtree(health_dir, ignore_errors=True)
        raise
    if auth.insecure:
        logger.warning("gRPC server on %s uses legacy mode: plaintext, no credentials, callers "
                       "checked by IP only (%s); configure mtls or token where the pool "
                       "supports it", _tcp_address(cfg.listen_host, port),
                       ", ".join(str(n) for n in auth.allowed_networks))
    else:
        logger.info("gRPC server on %s, auth mode %s", _tcp_address(cfg.listen_host, port),
                    auth.mode.value)
    logger.info("gRPC messages up to %d MiB, %d task uploads in flight at most (archive memory "
                "budget %d MiB)", limit // MIB, budget.limit, budget.limit * limit // MIB)
    return RunningServer(server, port, auth.mode, health_dir, logger)


MIB = 1024 * 1024
STREAM_WINDOW_BYTES = 4 * MIB


def message_limit(cfg: ServerConfig, max_archive_mb: int | None) -> int:
    """The largest gRPC message accepted, in bytes."""
    limit = cfg.max_message_mb * MIB
    if max_archive_mb is not None:
        limit = min(limit, max_archive_mb * MIB + FRAMING_BYTES)
    return limit


def _bind(server: grpc.Server, address: str, creds: grpc.ServerCredentials | None) -> int:
    try:
        port: Any = (server.add_secure_port(address, creds) if creds is not None
                     else server.add_insecure_port(address))
    except RuntimeError as exc:   # newer grpc raises; older returns 0
        raise ServerStartError(f"server.listen_host/port: can't listen on {address} "
                               "(address in use or not local)") from exc
    if not port:
        raise ServerStartError(f"server.listen_host/port: can't listen on {address} "
                               "(address in use or not local)")
    return int(port)
