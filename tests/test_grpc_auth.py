"""Each auth mode over real loopback sockets with certificates generated here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemind._proto import nodepool_pb2, nodepool_pb2_grpc
from hivemind.config import ServerAuthConfig, ServerConfig
from hivemind.errors import ConfigError
from hivemind.server import (
    AuthMode,
    Decision,
    ExecuteRequest,
    FailureLimiter,
    RunningServer,
    pool_channel_credentials,
    start_worker_server,
)

from certs import PKI, CertPair, make_pki  # tests/ is not a package; pytest puts it on sys.path

LOG = logging.getLogger("test.grpc_auth")
Serve = Callable[..., RunningServer]
TOKEN = "s3cr3t-token-5d1c8e0b7a"
WRONG_TOKEN = "wrong-token-00000000"


class RecordingAcceptor:
    def __init__(self) -> None:
        self.executed: list[ExecuteRequest] = []

    def execute(self, request: ExecuteRequest) -> Decision:
        self.executed.append(request)
        return Decision(True, "accepted")

    def stop(self, task_id: str, peer: str) -> Decision:
        return Decision(True, "stopping")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def creds_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("credentials")
    (d / "worker-token").write_text(TOKEN + "\n")
    (d / "wrong-token").write_text(WRONG_TOKEN)
    return d


@pytest.fixture
def acceptor() -> RecordingAcceptor:
    return RecordingAcceptor()


@pytest.fixture
def serve(acceptor: RecordingAcceptor) -> Iterator[Serve]:
    started: list[RunningServer] = []

    def _serve(auth: ServerAuthConfig, **kw: Any) -> RunningServer:
        cfg = ServerConfig(listen_host="127.0.0.1", port=0, auth=auth)
        running = start_worker_server(cfg, acceptor, logger=LOG, **kw)
        started.append(running)
        return running

    yield _serve
    for running in started:
        running.stop(None)


def call(port: int, creds: grpc.ChannelCredentials | None, task_id: str = "t1") -> Any:
    target = f"127.0.0.1:{port}"
    channel = (grpc.secure_channel(target, creds) if creds is not None
               else grpc.insecure_channel(target))
    with channel:
        stub = nodepool_pb2_grpc.WorkerNodeServiceStub(channel)  # type: ignore[no-untyped-call]
        return stub.ExecuteTask(
            nodepool_pb2.ExecuteTaskRequest(task_id=task_id, task_zip=b"PK\x05\x06" + bytes(18)),
            timeout=10)


def refused(port: int, creds: grpc.ChannelCredentials | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(port, creds)
    return err.value


def mtls_auth(pki: PKI, **kw: Any) -> ServerAuthConfig:
    return ServerAuthConfig(cert_file=str(pki.server.cert), key_file=str(pki.server.key),
                            client_ca_file=str(pki.ca), **kw)


def client(pki: PKI, pair: CertPair | None = None, **kw: Any) -> grpc.ChannelCredentials:
    pair = pair or pki.client
    return pool_channel_credentials(str(pki.ca), cert_file=str(pair.cert), key_file=str(pair.key),
                                    **kw)


def assert_nothing_secret(pki: PKI, *texts: str) -> None:
    for text in texts:
        assert TOKEN not in text and WRONG_TOKEN not in text
        for key_body in pki.key_texts():
            assert key_body not in text


# --- mtls ---------------------------------------------------------------------------------

def test_auto_picks_mtls_and_admits_the_pool_certificate(pki: PKI, serve: Serve, acceptor: RecordingAcceptor) -> None:
    running = serve(mtls_auth(pki, token_file="unused-but-set"))
    assert running.mode is AuthMode.MTLS and not running.insecure
    assert call(running.port, client(pki)).success
    assert len(acceptor.executed) == 1


def test_mtls_refuses_missing_rogue_and_plaintext_clients(pki: PKI, serve: Serve, acceptor: RecordingAcceptor) -> None:
    running = serve(mtls_auth(pki))
    no_cert = pool_channel_credentials(str(pki.ca))
    assert refused(running.port, no_cert).code() is grpc.StatusCode.UNAVAILABLE
    rogue = client(pki, pki.rogue_client)
    assert refused(running.port, rogue).code() is grpc.StatusCode.UNAVAILABLE
    assert refused(running.port, None).code() is grpc.StatusCode.UNAVAILABLE
    assert acceptor.executed == []
    assert running.healthy()


@pytest.mark.parametrize("name", ["pool.example", "hivemind-pool"])   # a SAN, the CN
def test_mtls_required_name(pki: PKI, serve: Serve, acceptor: RecordingAcceptor, caplog: pytest.LogCaptureFixture, name: str) -> None:
    running = serve(mtls_auth(pki, required_client_name=name))
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        err = refused(running.port, client(pki, pki.other_name_client))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert acceptor.executed == []
    assert "127.0.0.1" in caplog.text and "intruder" in caplog.text
    assert call(running.port, client(pki)).success
    assert_nothing_secret(pki, caplog.text, str(err.details()))


# --- token --------------------------------------------------------------------------------

def token_auth(pki: PKI, token_file: str = "worker-token") -> ServerAuthConfig:
    return ServerAuthConfig(cert_file=str(pki.server.cert), key_file=str(pki.server.key),
                            token_file=token_file)


def test_token_mode(pki: PKI, creds_dir: Path, serve: Serve, acceptor: RecordingAcceptor, caplog: pytest.LogCaptureFixture) -> None:
    env = {"CREDENTIALS_DIRECTORY": str(creds_dir)}
    with caplog.at_level(logging.DEBUG):
        running = serve(token_auth(pki), environ=env)
        assert running.mode is AuthMode.TOKEN and not running.insecure
        errors = [
            refused(running.port, pool_channel_credentials(str(pki.ca))),
            refused(running.port, pool_channel_credentials(str(pki.ca), token_file="wrong-token",
                                                           environ=env)),
        ]
        assert acceptor.executed == []
        assert [e.code() for e in errors] == [grpc.StatusCode.UNAUTHENTICATED] * 2
        assert refused(running.port, None).code() is grpc.StatusCode.UNAVAILABLE
        good = pool_channel_credentials(str(pki.ca), token_file="worker-token", environ=env)
        assert call(running.port, good).success
    assert len(acceptor.executed) == 1
    assert "wrong bearer token" in caplog.text and "127.0.0.1" in caplog.text
    assert_nothing_secret(pki, caplog.text, *(str(e.details()) + str(e) for e in errors))


def test_token_mode_with_raw_metadata(pki: PKI, creds_dir: Path, serve: Serve, acceptor: RecordingAcceptor) -> None:
    """The token as plain metadata, the way a pool without call credentials would send it."""
    running = serve(token_auth(pki, str(creds_dir / "worker-token")))
    with grpc.secure_channel(f"127.0.0.1:{running.port}",
                             pool_channel_credentials(str(pki.ca))) as channel:
        stub = nodepool_pb2_grpc.WorkerNodeServiceStub(channel)  # type: ignore[no-untyped-call]
        req = nodepool_pb2.ExecuteTaskRequest(task_id="t1", task_zip=b"PK")
        assert stub.ExecuteTask(req, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10).success
        with pytest.raises(grpc.RpcError) as err:
            stub.ExecuteTask(req, metadata=[("authorization", f"Basic {TOKEN}")], timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert len(acceptor.executed) == 1


def test_secret_errors_name_the_file_not_its_contents(pki: PKI, serve: Serve) -> None:
    # A certificate where the key belongs, and a private key where the certificate belongs.
    auth = ServerAuthConfig(cert_file=str(pki.server.key), key_file=str(pki.server.key),
                            client_ca_file=str(pki.ca))
    with pytest.raises(ConfigError) as err:
        serve(auth)
    assert str(pki.server.key) in str(err.value)
    assert_nothing_secret(pki, str(err.value))
    with pytest.raises(ConfigError, match="does not exist"):
        serve(token_auth(pki, "/nonexistent/token"))


# --- legacy -------------------------------------------------------------------------------

def test_legacy_allow_list(serve: Serve, acceptor: RecordingAcceptor, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        outside = serve(ServerAuthConfig(legacy_allowed_peers=["127.0.0.9"]))
    assert outside.insecure and outside.mode is AuthMode.LEGACY
    assert "legacy mode" in caplog.text
    assert refused(outside.port, None).code() is grpc.StatusCode.PERMISSION_DENIED
    assert acceptor.executed == []
    inside = serve(ServerAuthConfig(legacy_allowed_peers=["127.0.0.0/29"]))
    assert call(inside.port, None).success
    assert len(acceptor.executed) == 1


# --- rate limiting ------------------------------------------------------------------------

def test_repeated_failures_put_the_peer_in_a_cool_down(pki: PKI, creds_dir: Path, serve: Serve, acceptor: RecordingAcceptor) -> None:
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=3, window_s=60, cooldown_s=30, clock=clock)
    running = serve(token_auth(pki, str(creds_dir / "worker-token")), limiter=limiter)
    wrong = pool_channel_credentials(str(pki.ca), token_file=str(creds_dir / "wrong-token"))
    good = pool_channel_credentials(str(pki.ca), token_file=str(creds_dir / "worker-token"))
    for _ in range(3):
        assert refused(running.port, wrong).code() is grpc.StatusCode.UNAUTHENTICATED
    # Even the right token is refused during the cool-down, and nothing is executed.
    assert refused(running.port, good).code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert acceptor.executed == []
    clock.now += 31
    assert call(running.port, good).success


def test_failure_limiter_window_and_bound() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=3, window_s=10, cooldown_s=5, max_peers=8, clock=clock)
    for _ in range(5):   # spread out: never 3 within 10 s
        assert not limiter.record_failure("a")
        clock.now += 6
    assert not limiter.blocked("a")
    assert not limiter.record_failure("b") and not limiter.record_failure("b")
    assert limiter.record_failure("b") and limiter.blocked("b") and not limiter.blocked("a")
    clock.now += 5
    assert not limiter.blocked("b")
    for i in range(100):
        limiter.record_failure(f"peer-{i}")
    assert len(limiter._failures) <= 9


def test_global_failure_cap_blocks_strangers_but_not_the_pool() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=3, max_global_failures=20, window_s=60, cooldown_s=30,
                             clock=clock)
    limiter.record_success("10.0.0.1")            # the pool authenticated before
    hit = [limiter.record_failure(f"203.0.113.{i}") for i in range(20)]   # one try per address
    assert hit[-1] and not any(hit[:-1])
    assert limiter.blocked("198.51.100.7")        # a new address is refused during the cool-down
    assert not limiter.blocked("10.0.0.1")        # the pool is not
    clock.now += 31
    assert not limiter.blocked("198.51.100.7")


def test_ipv6_peers_are_counted_by_their_64() -> None:
    from ipaddress import ip_address

    from hivemind.server.auth import limiter_key

    a = limiter_key(ip_address("2001:db8:1:2::1"), "")
    b = limiter_key(ip_address("2001:db8:1:2:ffff::9"), "")
    assert a == b == "2001:db8:1:2::/64"
    assert limiter_key(ip_address("192.0.2.1"), "") == "192.0.2.1"
