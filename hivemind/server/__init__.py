"""The worker's gRPC service (pool -> worker) and its authenticated control plane."""

from hivemind.server.auth import AuthMode, FailureLimiter, ServerAuth, resolve_server_auth
from hivemind.server.grpc_server import RunningServer, ServerStartError, start_worker_server
from hivemind.server.service import Decision, ExecuteRequest, TaskAcceptor
from hivemind.server.tls import pool_channel_credentials

__all__ = ["AuthMode", "Decision", "ExecuteRequest", "FailureLimiter", "RunningServer",
           "ServerAuth", "ServerStartError", "TaskAcceptor", "pool_channel_credentials",
           "resolve_server_auth", "start_worker_server"]
