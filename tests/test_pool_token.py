"""Token renewal against the real development pool over loopback gRPC, in both protocol
generations: RefreshToken with the bearer metadata (2026-04) or a new Login (2025-10), once per
token lifetime, login only when renewal fails.

Ten minutes of 2-minute tokens run on a clock shared by the pool and the client (the gRPC calls
are real, only time is simulated); a shorter real-time run drives a real worker process."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hivemind.config import parse_config
from hivemind.devpool import jwt
from hivemind.devpool.server import DevPool
from hivemind.pool.client import NodeInfo, NodeStatus, PoolClient
from hivemind.pool.select import open_pool_client
from hivemind.secrets import Secret

from e2e import (
    GENERATIONS,
    WORKER_PASSWORD,
    make_pool,
    running_worker,
    wait_for,
    write_worker_config,
)

LOG = logging.getLogger("test")


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def client(address: str, generation: str, clock: Clock, **pool: object) -> PoolClient:
    cfg = parse_config({"pool": {"address": address, "username": "worker", "call_timeout_s": 5,
                                 "protocol": generation, **pool}}, {})
    return open_pool_client(cfg.pool, Secret(WORKER_PASSWORD), "node-a", LOG, clock=clock)


def info() -> NodeInfo:
    return NodeInfo("node-a", "127.0.0.2", 50052, 2, 8, 2000, 0, 0, "", "lab", "podman rootless")


IDLE = NodeStatus("Idle", 1.0, 2.0, 0.0, 0.0, "podman rootless", 0)


@pytest.fixture(params=GENERATIONS)
def generation(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_two_minute_tokens_for_ten_minutes_renew_once_per_lifetime(tmp_path: Path, generation: str) -> None:
    clock = Clock()
    pool = DevPool(users={"worker": WORKER_PASSWORD}, token_ttl_s=120, clock=clock, spool_dir=tmp_path / "s",
                   dispatch_interval_s=3600, protocol=generation)
    pool.start()
    # The default margin (600 s) is longer than the whole lifetime: renewal must still wait for
    # the middle of it, not happen on every call (126 refreshes in 6 minutes before the fix).
    clients: list[PoolClient] = []
    try:
        for _run in range(2):            # a worker restart half-way: the new process logs in once
            c = client(pool.address, generation, clock)
            clients.append(c)
            c.probe()
            c.register(info())
            for _ in range(300 // 5):
                clock.advance(5)
                assert c.report_status(IDLE)   # an expired token would fail the call
            c.close()
        counters = pool.state.counters
        assert [c.logins for c in clients] == [1, 1], "logged in again although renewal works"
        renewals = sum(c.renewals for c in clients)
        # Every token is renewed once, in the middle of its life: 2 × 300 s / 60 s.
        assert 8 <= renewals <= 10, renewals
        if generation == "2026-04":
            assert counters["login"] == 2
            assert counters["refresh"] == renewals
            assert counters["refresh_rejected"] == 0
            assert counters["renewed_twice"] == 0, "one token was renewed twice"
        else:
            # No RefreshToken in this generation: each renewal is a Login.
            assert counters["login"] == 2 + renewals
            assert counters["refresh"] == 0
    finally:
        for c in clients:
            c.close()
        pool.stop()


def test_margin_is_the_configured_one_when_shorter_than_half_the_lifetime(tmp_path: Path, generation: str) -> None:
    clock = Clock()
    pool = DevPool(users={"worker": WORKER_PASSWORD}, token_ttl_s=3600, clock=clock, spool_dir=tmp_path / "s",
                   dispatch_interval_s=3600, protocol=generation)
    pool.start()
    c = client(pool.address, generation, clock, token_refresh_margin_s=600)
    try:
        first = c.token()
        clock.advance(3000 - 1)
        assert c.token() == first and c.renewals == 0
        clock.advance(2)
        assert c.token() != first and c.renewals == 1 and c.logins == 1
    finally:
        c.close()
        pool.stop()


def test_login_only_when_refresh_fails(tmp_path: Path) -> None:
    clock = Clock()
    pool = DevPool(users={"worker": WORKER_PASSWORD}, token_ttl_s=120, clock=clock, spool_dir=tmp_path / "s",
                   dispatch_interval_s=3600, protocol="2026-04")
    pool.start()
    c = client(pool.address, "2026-04", clock)
    try:
        c.token()
        # A token the pool never issued (another key), due for renewal: RefreshToken is refused,
        # and only then does the client log in with its password.
        c._set_token(jwt.encode({"sub": "worker", "iat": clock(), "exp": clock() + 120}, b"k" * 32))
        clock.advance(61)
        c.token()
        assert c.logins == 2 and c.renewals == 0
        assert pool.state.counters["login"] == 2
        c.register(info())
    finally:
        c.close()
        pool.stop()


def test_a_worker_renews_short_tokens_without_logging_in_again(tmp_path: Path, generation: str) -> None:
    # Real time: 4-second tokens renew every 2 s; 12 s of a running worker.
    pool = make_pool(tmp_path / "spool", protocol=generation, token_ttl_s=4)
    w = write_worker_config(tmp_path, pool.address, {"kind": "venv"}, protocol=generation)
    try:
        with running_worker(w, pool):
            c = pool.state.counters
            # 2026-04 renews by RefreshToken, 2025-10 by a new Login (the first Login is not one).
            wait_for(lambda: c["refresh"] + c["login"] - 1 >= 5, 40, "five renewals")
            node = next(n for n in pool.nodes() if n.node_id == "e2e-node")
            assert node.status == "Idle"
        if generation == "2026-04":
            assert c["login"] == 1, c
            assert c["refresh_rejected"] == 0
        assert c["renewed_twice"] == 0
        assert "token renewal failed" not in w.log()
    finally:
        pool.stop()
