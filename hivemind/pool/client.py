"""Calls from the worker to the node pool: the one interface the rest of the worker uses, whatever
protocol generation the pool speaks.

`PoolClient` is that interface (login and renewal, register, heartbeat, output, usage, result,
and a start-up probe of the pool's generation) plus what every generation shares: the channel,
deadlines, and the token (renewed once per lifetime, at the smaller of the configured margin and
half the token's lifetime before expiry, one renewal at a time). Each generation is an adapter
with its own generated bindings (`hivemind/pool/v2026_04.py`, `v2025_10.py`); `select.py` picks
one from `pool.protocol`. Nothing outside those adapters knows which generation runs.

Every call has a deadline; failures raise PoolCallFailed, which callers retry with backoff.
Thread-safe: one channel, the token behind a lock.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import grpc

from hivemind.config import PoolConfig
from hivemind.errors import HivemindError
from hivemind.pool.token import token_expiry, token_issued_at
from hivemind.secrets import Secret
from hivemind.server.tls import pool_channel_credentials

GENERATIONS = ("2026-04", "2025-10")


class PoolCallFailed(HivemindError):
    recoverable = True


class PoolRefused(HivemindError):
    """The pool answered success=false; `message` is the pool's reason."""


class ProtocolMismatch(HivemindError):
    """The pool speaks another protocol generation than `pool.protocol` names; fatal at start."""


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


def mismatch(configured: str, what: str) -> ProtocolMismatch:
    other = next(g for g in GENERATIONS if g != configured)
    return ProtocolMismatch(
        f"pool.protocol is {configured}, but the pool does not answer {what} as a {configured} "
        f"pool does; it looks like a {other} pool. Set pool.protocol: {other} if it is one "
        f"(supported generations: {', '.join(GENERATIONS)})")


class PoolClient(abc.ABC):
    """The worker's side of one pool protocol generation."""

    generation: ClassVar[str]

    def __init__(self, cfg: PoolConfig, password: Secret, node_id: str, logger: logging.Logger,
                 *, channel: grpc.Channel | None = None, clock: Callable[[], float] = time.time) -> None:
        self._cfg = cfg
        self._password = password
        self._node_id = node_id
        self._log = logger
        self._clock = clock
        max_bytes = cfg.max_result_message_mb * 1024 * 1024 + 1024 * 1024
        self._channel = channel or make_channel(cfg, max_bytes)
        self._lock = threading.Lock()
        # Held while logging in or renewing: threads needing a token at once share one renewal.
        self._renew_lock = threading.Lock()
        self._token: str | None = None
        self._token_exp: float | None = None
        self._renew_at: float | None = None
        self.logins = 0
        self.renewals = 0

    # -- the interface ----------------------------------------------------------------------------
    def limitations(self) -> tuple[str, ...]:
        """What the pool's generation lacks and how the worker makes up for it (for status)."""
        return ()

    @abc.abstractmethod
    def probe(self) -> None:
        """One call that only a pool of this generation answers correctly. Raises
        ProtocolMismatch when the pool speaks the other generation, PoolCallFailed when it
        can't be reached (try again later)."""

    @abc.abstractmethod
    def register(self, info: NodeInfo) -> None: ...

    @abc.abstractmethod
    def report_status(self, st: NodeStatus) -> bool:
        """True when the pool knows this node; False means it forgot it (register again)."""

    @abc.abstractmethod
    def upload_output(self, task_id: str, text: str) -> None: ...

    @abc.abstractmethod
    def report_usage(self, task_id: str, cpu: float, memory: float, gpu: float = 0.0,
                     gpu_memory: float = 0.0, *, cpu_grant_cores: float = 0.0,
                     memory_grant_mib: float = 0.0) -> None:
        """cpu and gpu in percent (100 = one core / one GPU), memory and gpu_memory in MiB; the
        grant lets a generation that reports shares of it (2026-04) convert."""

    @abc.abstractmethod
    def upload_result(self, task_id: str, path: Path) -> None:
        """Deliver a result zip; returns once the pool holds it (raises otherwise)."""

    @abc.abstractmethod
    def _login_rpc(self, username: str, password: str) -> tuple[bool, str, str]:
        """Login: (success, message, token)."""

    @abc.abstractmethod
    def _renew(self, old: str) -> str:
        """A new token in place of `old` (still valid), or PoolCallFailed/PoolRefused."""

    # -- calls ------------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[..., object], request: object, *,
              auth: bool = True, metadata: list[tuple[str, str]] | None = None,
              timeout: float | None = None) -> object:
        if metadata is None and auth:
            metadata = self._metadata()
        try:
            return fn(request, timeout=timeout or self._cfg.call_timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL) and auth:
                # The existing pool answers a bad token with INTERNAL; log in afresh next time.
                self.forget_token()
            raise PoolCallFailed(f"{what} failed: {code.name if code else 'error'}") from None

    def _rpc_code(self, what: str, fn: Callable[..., object], request: object) -> tuple[object | None, grpc.StatusCode]:
        """A call whose gRPC status is the answer (the probe): (response or None, status code)."""
        try:
            return fn(request, timeout=self._cfg.call_timeout_s, metadata=self._metadata()), grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code is None:
                raise PoolCallFailed(f"{what} failed") from None
            return None, code

    def _metadata(self) -> list[tuple[str, str]]:
        return bearer(self.token())

    # -- the token --------------------------------------------------------------------------------
    def token(self) -> str:
        """A valid token: logs in, or renews one that is due (see the module doc)."""
        with self._lock:
            token, renew_at = self._token, self._renew_at
        if token and (renew_at is None or self._clock() < renew_at):
            return token
        with self._renew_lock:
            with self._lock:
                if self._token != token and self._token:
                    return self._token     # another thread renewed it meanwhile
            if token:
                try:
                    return self._renew(token)
                except (PoolCallFailed, PoolRefused) as exc:
                    self._log.warning("token renewal failed (%s); logging in again", exc,
                                      extra={"event": "pool.token_refresh_failed"})
            token = self._login()
            self.logins += 1
            self._log.info("logged in to the pool as %s", self._cfg.username, extra={"event": "pool.login"})
            return token

    def _login(self) -> str:
        """Login with the password; the new token is adopted and returned."""
        ok, message, token = self._login_rpc(self._cfg.username, self._password.reveal())
        if not ok or not token:
            raise PoolRefused(f"login as {self._cfg.username!r} refused: {message}")
        self._set_token(token)
        return token

    def _set_token(self, token: str) -> None:
        now = self._clock()
        exp = token_expiry(token)
        renew_at = None
        if exp is not None:
            issued = token_issued_at(token)
            # exp - iat is the lifetime on the pool's own clock, so skew between the clocks
            # doesn't shorten or stretch it; without iat, only exp - now is left.
            lifetime = max(0.0, exp - issued) if issued is not None and issued <= exp else max(0.0, exp - now)
            margin = min(self._cfg.token_refresh_margin_s, lifetime / 2)
            renew_at = now + lifetime - margin
        with self._lock:
            self._token = token
            self._token_exp = exp
            self._renew_at = renew_at

    def forget_token(self) -> None:
        with self._lock:
            self._token = None
            self._renew_at = None

    def token_expires_at(self) -> float | None:
        with self._lock:
            return self._token_exp

    def close(self) -> None:
        self._channel.close()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]
