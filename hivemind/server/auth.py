"""Who may call the worker: the auth mode chosen from config, and the interceptor enforcing it.

Modes, strongest first:
- mtls:   TLS, the client presents a certificate signed by the pinned client CA (checked in the
          handshake); optionally its CN or a SAN must equal `required_client_name`.
- token:  TLS, and every call carries `authorization: Bearer <token>` metadata.
- legacy: plaintext and no credentials, as the existing pool sends; only allow-listed peer IPs.

`auto` picks the strongest mode the configured files make possible. A half-configured secure
mode is an error, never a silent fallback to legacy.

A refused call never reaches the servicer (so nothing is executed), is logged with the peer
address and the reason, never the credential, and counts toward a per-peer failure limit and a
global one (many addresses guessing together).

Unauthenticated callers cost almost nothing: every handler is served as a request-streaming one,
so the credential check (metadata, peer address, TLS auth context) runs before grpc reads and
deserializes the request body. Until the application asks for the message grpc keeps only what
HTTP/2 flow control lets the caller send ahead (the stream window, kilobytes to a few MiB), and
a refusal resets the stream. In `mtls` mode a caller without a client certificate doesn't get
past the TLS handshake. Calls that carry task archives (ExecuteTask) are admitted against a
`CallBudget`: past it they get RESOURCE_EXHAUSTED at once, before their body is read, so the
memory in-flight archives can hold is bounded by budget x message limit in every mode.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import logging
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from hivemind.config import ServerAuthConfig
from hivemind.errors import ConfigError
from hivemind.secrets import Secret, read_secret
from hivemind.server.tls import read_pem, server_credentials

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AuthMode(enum.StrEnum):
    MTLS = "mtls"
    TOKEN = "token"
    LEGACY = "legacy"


@dataclass(frozen=True)
class ServerAuth:
    """The resolved auth policy: what the listening port uses and what the interceptor checks."""

    mode: AuthMode
    credentials: grpc.ServerCredentials | None      # None: plaintext (legacy)
    token: Secret | None = None
    required_client_name: str = ""
    allowed_networks: tuple[IPNetwork, ...] = ()

    @property
    def insecure(self) -> bool:
        return self.mode is AuthMode.LEGACY


def choose_mode(auth: ServerAuthConfig) -> AuthMode:
    """The effective mode, from the configured mode and which files are set (not read here)."""
    problems: list[str] = []
    has_tls = bool(auth.cert_file and auth.key_file)
    mode = auth.mode
    if mode == "auto":
        if has_tls and auth.client_ca_file:
            return AuthMode.MTLS
        if has_tls and auth.token_file:
            return AuthMode.TOKEN
        partial = [k for k in ("cert_file", "key_file", "client_ca_file", "token_file")
                   if getattr(auth, k)]
        if partial:
            # Someone meant to secure this port; running plaintext instead would hide the mistake.
            raise ConfigError([
                f"server.auth.mode: auto found {', '.join('server.auth.' + k for k in partial)} "
                "but not a complete secure setup (mtls needs cert_file, key_file and "
                "client_ca_file; token needs cert_file, key_file and token_file); complete it, "
                "or set server.auth.mode: legacy explicitly"])
        mode = AuthMode.LEGACY
    if mode == AuthMode.MTLS:
        problems += [f"server.auth.mode: 'mtls' needs server.auth.{k}"
                     for k in ("cert_file", "key_file", "client_ca_file") if not getattr(auth, k)]
    elif mode == AuthMode.TOKEN:
        problems += [f"server.auth.mode: 'token' needs server.auth.{k}"
                     for k in ("cert_file", "key_file", "token_file") if not getattr(auth, k)]
    elif mode == AuthMode.LEGACY:
        if not auth.legacy_allowed_peers:
            problems.append(
                "server.auth: no credentials configured and server.auth.legacy_allowed_peers is "
                "empty; set cert_file and key_file plus client_ca_file (mtls) or token_file "
                "(token), or list the pool's IP addresses in legacy_allowed_peers")
    else:
        problems.append(f"server.auth.mode: {mode!r} is not one of auto, mtls, token, legacy")
    if problems:
        raise ConfigError(problems)
    return AuthMode(mode)


def parse_networks(peers: Iterable[str]) -> tuple[IPNetwork, ...]:
    nets: list[IPNetwork] = []
    problems: list[str] = []
    for i, raw in enumerate(peers):
        try:
            nets.append(ipaddress.ip_network(raw.strip(), strict=False))
        except ValueError:
            problems.append(f"server.auth.legacy_allowed_peers[{i}]: {raw!r} is not an IP "
                            "address or network (host names are not resolved)")
    if problems:
        raise ConfigError(problems)
    return tuple(nets)


def _pem(key: str, ref: str, marker: str, environ: Mapping[str, str] | None) -> bytes:
    data = read_pem(key, ref, environ)
    if marker.encode() not in data:
        # Name the file, never quote it: a misplaced key must not end up in a log.
        raise ConfigError([f"{key}: {ref!r} does not hold a PEM {marker.strip('-').lower()}"])
    return data


def resolve_server_auth(auth: ServerAuthConfig,
                        environ: Mapping[str, str] | None = None) -> ServerAuth:
    """Choose the mode and read its files; raises ConfigError (or SecretError) with a clear fix."""
    mode = choose_mode(auth)
    if mode is AuthMode.LEGACY:
        return ServerAuth(mode, None, allowed_networks=parse_networks(auth.legacy_allowed_peers))
    cert = _pem("server.auth.cert_file", auth.cert_file, "CERTIFICATE-----", environ)
    key = _pem("server.auth.key_file", auth.key_file, "PRIVATE KEY-----", environ)
    if mode is AuthMode.MTLS:
        ca = _pem("server.auth.client_ca_file", auth.client_ca_file, "CERTIFICATE-----", environ)
        return ServerAuth(mode, server_credentials(cert, key, ca),
                          required_client_name=auth.required_client_name)
    token = read_secret("server.auth.token_file", auth.token_file, environ)
    return ServerAuth(mode, server_credentials(cert, key), token=token)


class FailureLimiter:
    """Failed authentications: `max_failures` from one peer within `window_s` block that peer for
    `cooldown_s`; `max_global_failures` from everyone within `window_s` block every peer that
    hasn't authenticated successfully within `trusted_s` (a guesser spread over many addresses
    can't go on, while the pool, which authenticates, keeps working). Thread-safe; memory
    bounded by `max_peers`."""

    def __init__(self, *, max_failures: int = 10, window_s: float = 60.0,
                 cooldown_s: float = 60.0, max_peers: int = 4096,
                 max_global_failures: int = 300, trusted_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_failures
        self._window = window_s
        self._cooldown = cooldown_s
        self._max_peers = max_peers
        self._max_global = max_global_failures
        self._trusted_s = trusted_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}
        self._global: deque[float] = deque()
        self._global_blocked_until = 0.0
        self._trusted: dict[str, float] = {}

    def blocked(self, peer: str) -> bool:
        with self._lock:
            now = self._clock()
            if now < self._global_blocked_until and not self._is_trusted(peer, now):
                return True
            until = self._blocked_until.get(peer)
            if until is None:
                return False
            if now < until:
                return True
            del self._blocked_until[peer]
            return False

    def globally_blocked(self) -> bool:
        with self._lock:
            return self._clock() < self._global_blocked_until

    def _is_trusted(self, peer: str, now: float) -> bool:
        seen = self._trusted.get(peer)
        return seen is not None and now - seen < self._trusted_s

    def record_success(self, peer: str) -> None:
        with self._lock:
            self._trusted[peer] = self._clock()
            if len(self._trusted) > self._max_peers:
                del self._trusted[next(iter(self._trusted))]

    def record_failure(self, peer: str) -> bool:
        """Count one failure; True when this one puts the peer (or everyone) into a cool-down."""
        with self._lock:
            now = self._clock()
            self._global.append(now)
            while self._global and self._global[0] <= now - self._window:
                self._global.popleft()
            if len(self._global) >= self._max_global and now >= self._global_blocked_until:
                self._global_blocked_until = now + self._cooldown
                self._global.clear()
                return True
            times = self._failures.setdefault(peer, deque())
            times.append(now)
            while times and times[0] <= now - self._window:
                times.popleft()
            if len(times) >= self._max:
                self._blocked_until[peer] = now + self._cooldown
                del self._failures[peer]
                return True
            if len(self._failures) > self._max_peers:
                self._prune(now)
            return False

    def _prune(self, now: float) -> None:
        stale = [p for p, t in self._failures.items() if not t or t[-1] <= now - self._window]
        for p in stale:
            del self._failures[p]
        while len(self._failures) > self._max_peers:
            del self._failures[next(iter(self._failures))]   # oldest inserted first
        for p in [p for p, u in self._blocked_until.items() if u <= now]:
            del self._blocked_until[p]


def peer_address(peer: str) -> IPAddress | None:
    """The IP of a grpc peer string (`ipv4:1.2.3.4:5`, `ipv6:[::1]:5`, maybe percent-encoded)."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped   # a dual-stack socket shows IPv4 callers as ::ffff:a.b.c.d
    return ip


def limiter_key(ip: IPAddress | None, peer: str) -> str:
    """What the failure limiter counts by: the address, or its /64 for IPv6 (one host usually
    holds a whole /64, so counting single addresses would let it rotate freely)."""
    if ip is None:
        return peer
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class CallBudget:
    """At most `limit` calls of `methods` in flight (their request bodies are the big ones).
    `try_enter` never waits: a caller past the budget is refused at once."""

    def __init__(self, limit: int, methods: frozenset[str]) -> None:
        self.limit = limit
        self.methods = methods
        self._lock = threading.Lock()
        self._in_flight = 0

    def try_enter(self) -> bool:
        with self._lock:
            if self._in_flight >= self.limit:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, reason: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.reason = reason      # for the log; never holds a credential


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg,misc]
    """Enforces a ServerAuth on every call, before its request body is read. `local_methods`
    (the health check) are allowed without credentials from the worker's own unix socket and
    nowhere else on that socket. `budget` caps the calls of its methods in flight."""

    def __init__(self, auth: ServerAuth, limiter: FailureLimiter, logger: logging.Logger,
                 local_methods: frozenset[str] = frozenset(),
                 budget: CallBudget | None = None) -> None:
        self._auth = auth
        self._limiter = limiter
        self._log = logger
        self._local_methods = local_methods
        self._budget = budget

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        metadata = tuple(handler_call_details.invocation_metadata or ())
        budget = self._budget if self._budget and method in self._budget.methods else None

        def check(context: grpc.ServicerContext) -> None:
            self._check(method, metadata, context)
            if budget is not None and not budget.try_enter():
                self._log.debug("refused %s from %s: %d calls already in flight", method,
                                context.peer(), budget.limit)
                _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"busy: {budget.limit} task uploads already in flight; retry later")

        return _wrap(handler, check, budget.leave if budget is not None else None)

    def _check(self, method: str, metadata: tuple[Any, ...],
               context: grpc.ServicerContext) -> None:
        peer = context.peer()
        if peer.startswith("unix:"):
            if method in self._local_methods:
                return
            _abort(context, grpc.StatusCode.PERMISSION_DENIED, "not allowed on the local socket")
        ip = peer_address(peer)
        key = limiter_key(ip, peer)
        if self._limiter.blocked(key):
            self._log.debug("refused %s from %s: in failure cool-down", method, peer)
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                   "too many failed authentication attempts; retry later")
        try:
            self._verify(ip, metadata, context)
        except _Refused as refusal:
            now_blocked = self._limiter.record_failure(key)
            # During a cool-down refusals are logged at debug: a flood must not flood the log.
            level = logging.WARNING if not self._limiter.globally_blocked() or now_blocked \
                else logging.DEBUG
            self._log.log(level, "refused %s from %s: %s%s", method, peer, refusal.reason,
                          "; failure limit reached, refusing for a cool-down"
                          if now_blocked else "")
            _abort(context, refusal.code, refusal.details)
        self._limiter.record_success(key)

    def _verify(self, ip: IPAddress | None, metadata: tuple[Any, ...],
                context: grpc.ServicerContext) -> None:
        auth = self._auth
        if auth.mode is AuthMode.LEGACY:
            if ip is None or not any(ip in net for net in auth.allowed_networks):
                raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "peer not allowed",
                               "peer address is not in legacy_allowed_peers")
        elif auth.mode is AuthMode.TOKEN:
            assert auth.token is not None
            presented = _bearer(metadata)
            if presented is None:
                raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token",
                               "no bearer token in the authorization metadata")
            if not hmac.compare_digest(presented, auth.token.reveal().encode("utf-8")):
                raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token",
                               "wrong bearer token")
        elif auth.mode is AuthMode.MTLS:
            ctx = context.auth_context()
            names = [*ctx.get("x509_common_name", []),
                     *ctx.get("x509_subject_alternative_name", [])]
            if not ctx.get("x509_pem_cert") and not names:
                raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "client certificate required",
                               "no client certificate")
            want = auth.required_client_name
            if want and want.encode() not in names:
                shown = ", ".join(repr(n.decode("utf-8", "replace")[:64]) for n in names[:4])
                raise _Refused(grpc.StatusCode.PERMISSION_DENIED,
                               "client certificate name not allowed",
                               f"client certificate names [{shown}] lack the required name")


def _bearer(metadata: tuple[Any, ...]) -> bytes | None:
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        raw = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
        scheme, _, token = raw.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    return None


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    context.abort(code, details)
    raise AssertionError("unreachable: context.abort raises")


def _wrap(handler: Any, check: Callable[[grpc.ServicerContext], None],
          release: Callable[[], None] | None) -> Any:
    """The same handler with `check` run before the request is read, for any of the four call
    kinds. Unary-request handlers become request-streaming ones: grpc reads (and deserializes) a
    unary request before calling the behaviour, a streamed one only when the behaviour asks.
    `release` runs when a call that passed `check` ends."""
    def finish() -> None:
        if release is not None:
            release()

    def one(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        for request in requests:
            return request
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "no request message")

    behaviour: Callable[..., Any]
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        def unary_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            check(context)
            try:
                return inner_uu(one(requests, context), context)
            finally:
                finish()
        behaviour, factory = unary_unary, grpc.stream_unary_rpc_method_handler
    elif handler.unary_stream is not None:
        inner_us = handler.unary_stream

        def unary_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            check(context)
            try:
                yield from inner_us(one(requests, context), context)
            finally:
                finish()
        behaviour, factory = unary_stream, grpc.stream_stream_rpc_method_handler
    elif handler.stream_unary is not None:
        inner_su = handler.stream_unary

        def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            check(context)
            try:
                return inner_su(requests, context)
            finally:
                finish()
        behaviour, factory = stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.stream_stream is not None:
        inner_ss = handler.stream_stream

        def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            check(context)
            try:
                yield from inner_ss(requests, context)
            finally:
                finish()
        behaviour, factory = stream_stream, grpc.stream_stream_rpc_method_handler
    else:
        return handler
    return factory(behaviour, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)
