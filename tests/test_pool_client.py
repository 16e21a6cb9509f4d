"""The worker's pool client and session against the real development pool over loopback gRPC."""

from __future__ import annotations

import logging
import time
import zipfile
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from hivemind._proto import nodepool_pb2 as pb
from hivemind._proto import nodepool_pb2_grpc as pbg
from hivemind.config import parse_config
from hivemind.pool.backoff import Backoff
from hivemind.pool.client import NodeInfo, NodeStatus, PoolCallFailed, PoolRefused
from hivemind.pool.session import PoolSession
from hivemind.pool.token import token_expiry
from hivemind.pool.v2026_04 import Pool2026 as PoolClient
from hivemind.secrets import Secret

from e2e import WORKER_PASSWORD, free_port, make_pool, upload, wait_for

LOG = logging.getLogger("test")


def client_for(address: str, password: str = WORKER_PASSWORD, **pool: object) -> PoolClient:
    cfg = parse_config({"pool": {"address": address, "username": "worker", "call_timeout_s": 3, **pool}}, {})
    return PoolClient(cfg.pool, Secret(password), "node-a", LOG)


def info(port: int = 50052) -> NodeInfo:
    return NodeInfo("node-a", "127.0.0.2", port, 2, 8, 2000, 0, 0, "", "lab", "podman rootless")


def idle() -> NodeStatus:
    return NodeStatus("Idle", 1.0, 2.0, 0.0, 0.0, "podman rootless", 0)


@pytest.fixture()
def pool(tmp_path: Path):
    p = make_pool(tmp_path / "spool")
    yield p
    p.stop()


def test_login_register_heartbeat(pool) -> None:
    c = client_for(pool.address)
    c.register(info())
    assert c.report_status(idle()) is True
    (node,) = pool.nodes()
    assert (node.node_id, node.hostname, node.port, node.status) == ("node-a", "127.0.0.2", 50052, "Idle")
    exp = c.token_expires_at()
    assert exp is not None and exp > time.time() + 600
    c.close()


def test_wrong_password_is_refused_without_echoing_it(pool) -> None:
    c = client_for(pool.address, password="not-the-password-123")
    with pytest.raises(PoolRefused) as exc:
        c.register(info())
    assert "not-the-password-123" not in str(exc.value)
    c.close()


def test_token_renewed_before_expiry(tmp_path: Path) -> None:
    from hivemind.devpool.server import DevPool

    p = DevPool("127.0.0.1", 0, users={"worker": WORKER_PASSWORD}, token_ttl_s=30, spool_dir=tmp_path / "s")
    p.start()
    try:
        # The margin is capped at half the token's life (15 s here), so renewal waits for it.
        c = client_for(p.address, token_refresh_margin_s=60)
        first = c.token()
        assert c.token() == first
        c._renew_at = time.time() - 1   # due now
        time.sleep(1.1)  # JWT exp has one-second resolution
        second = c.token()
        assert first != second
        assert (token_expiry(second) or 0) > (token_expiry(first) or 0)
        c.register(info())
        c.close()
    finally:
        p.stop()


def test_chunked_result_upload(pool, tmp_path: Path) -> None:
    upload(pool, {"main.py": "print(1)"}, "t-chunk")
    c = client_for(pool.address)
    result = tmp_path / "r.zip"
    with zipfile.ZipFile(result, "w") as zf:
        zf.writestr("big.bin", b"x" * (3 * 1024 * 1024 + 17))
    c.upload_result("t-chunk", result)
    assert c.chunked_upload is True
    t = pool.task("t-chunk")
    assert t.status == "COMPLETED" and t.result_path.read_bytes() == result.read_bytes()
    c.close()


class _OldPool(pbg.WorkerNodeServiceServicer):
    """A pool of the existing generation: single-message results, no extension service."""

    def __init__(self) -> None:
        self.results: dict[str, bytes] = {}

    def TaskResultUpload(self, request, context):  # noqa: N802
        self.results[request.task_id] = request.result_zip
        return pb.TaskResultUploadResponse(success=True, message="stored")


def test_falls_back_to_single_message_when_pool_has_no_extension(tmp_path: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    old = _OldPool()
    pbg.add_WorkerNodeServiceServicer_to_server(old, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        c = client_for(f"127.0.0.1:{port}", max_result_message_mb=1)
        c._set_token("header.eyJleHAiOiA5OTk5OTk5OTk5fQ.sig")  # skip Login: this pool has no UserService
        small = tmp_path / "small.zip"
        small.write_bytes(b"PK-small")
        c.upload_result("t1", small)
        assert c.chunked_upload is False and old.results["t1"] == b"PK-small"
        big = tmp_path / "big.zip"
        big.write_bytes(b"x" * (2 * 1024 * 1024))
        with pytest.raises(PoolRefused, match="max_result_message_mb"):
            c.upload_result("t2", big)
        c.close()
    finally:
        server.stop(0)


def test_session_reconnects_after_the_pool_comes_back(tmp_path: Path) -> None:
    port = free_port()
    p = make_pool(tmp_path / "spool", port=port)
    c = client_for(p.address)
    s = PoolSession(c, info, idle, list, heartbeat_interval_s=0.2, register_interval_s=300, logger=LOG)
    s.start()
    try:
        wait_for(lambda: s.state.connected and s.state.registered, 10, "first registration")
        p.stop()
        wait_for(lambda: not s.state.connected, 10, "the session to notice the pool is gone")
        assert s.state.heartbeat_failures >= 1
        p2 = make_pool(tmp_path / "spool2", port=port)  # a restarted pool that forgot everything
        try:
            wait_for(lambda: s.state.connected and any(n.node_id == "node-a" for n in p2.nodes()), 40,
                     "re-registration with the restarted pool")
        finally:
            p2.stop()
    finally:
        s.stop()
        c.close()


def test_backoff_grows_with_jitter_and_caps() -> None:
    b = Backoff(initial=1, maximum=8, rand=lambda: 1.0)
    assert [b.next_delay() for _ in range(5)] == [1, 2, 4, 8, 8]
    b = Backoff(initial=1, maximum=8, rand=lambda: 0.0)
    assert [b.next_delay() for _ in range(3)] == [0.5, 1, 2]
    b.reset()
    assert b.attempts == 0


def test_tls_to_the_pool_with_a_pinned_ca(tmp_path: Path) -> None:
    from hivemind.devpool.server import DevPool

    from certs import make_pki

    pki = make_pki(tmp_path / "pki")
    creds = grpc.ssl_server_credentials([(pki.server.key.read_bytes(), pki.server.cert.read_bytes())])
    p = DevPool("127.0.0.1", 0, users={"worker": WORKER_PASSWORD}, server_credentials=creds,
                spool_dir=tmp_path / "s")
    port = p.start()
    try:
        good = client_for(f"127.0.0.1:{port}", tls={"enabled": True, "ca_file": str(pki.ca),
                                                    "server_name": "localhost"})
        good.register(info())
        assert pool_node_ids(p) == ["node-a"]
        good.close()
        rogue = client_for(f"127.0.0.1:{port}", tls={"enabled": True, "ca_file": str(pki.rogue_ca),
                                                     "server_name": "localhost"})
        with pytest.raises(PoolCallFailed):
            rogue.register(info())
        rogue.close()
        plain = client_for(f"127.0.0.1:{port}")
        with pytest.raises(PoolCallFailed):
            plain.register(info())
        plain.close()
    finally:
        p.stop()


def pool_node_ids(p) -> list[str]:
    return [n.node_id for n in p.nodes()]
