"""Picks the pool protocol adapter named by `pool.protocol`: the choice is made once, at start."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from hivemind.config import PoolConfig
from hivemind.errors import ConfigError
from hivemind.pool.client import GENERATIONS, PoolClient
from hivemind.secrets import Secret


def open_pool_client(cfg: PoolConfig, password: Secret, node_id: str, logger: logging.Logger, *,
                     channel: grpc.Channel | None = None,
                     clock: Callable[[], float] = time.time) -> PoolClient:
    if cfg.protocol == "2026-04":
        from hivemind.pool.v2026_04 import Pool2026

        return Pool2026(cfg, password, node_id, logger, channel=channel, clock=clock)
    if cfg.protocol == "2025-10":
        from hivemind.pool.v2025_10 import Pool2025

        return Pool2025(cfg, password, node_id, logger, channel=channel, clock=clock)
    raise ConfigError([f"pool.protocol: {cfg.protocol!r} is not one of {', '.join(GENERATIONS)}"])
