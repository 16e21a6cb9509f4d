"""Pick the executor the config asks for: Podman, the venv fallback, or (auto) Podman when it is
usable and the venv otherwise. The fallback is logged and visible in status as weaker isolation."""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable

from hivemind.config import Config
from hivemind.errors import ExecutorUnavailable
from hivemind.executors.base import Executor, ExecutorStatus


def _podman(cfg: Config, logger: logging.Logger) -> Executor:
    from hivemind.executors.podman import PodmanExecutor

    return PodmanExecutor(cfg.executor.podman, cfg.node_id, cfg.state_dir, logger,
                          prepare_timeout_s=cfg.executor.prepare_timeout_s,
                          requirements=cfg.executor.requirements)


def _venv(cfg: Config, logger: logging.Logger) -> Executor:
    from hivemind.executors.venv import VenvExecutor

    return VenvExecutor(cfg.executor.venv, cfg.state_dir, logger, cfg.node_id,
                        prepare_timeout_s=cfg.executor.prepare_timeout_s,
                        requirements=cfg.executor.requirements)


def wait_for_socket(uri: str, timeout_s: float, logger: logging.Logger, *,
                    clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> None:
    """Wait while the configured Podman socket exists but refuses connections: its service is
    still coming up (or restarting), so probing now would fall back to venv for the worker's
    whole life. A missing socket (no Podman on this host) or one that accepts returns at once."""
    if not uri.startswith("unix://"):
        return
    path = uri.removeprefix("unix://")
    deadline = clock() + timeout_s
    logged = False
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(path)
                return
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.EAGAIN) or clock() >= deadline:
                    return
        if not logged:
            logged = True
            logger.info("Podman socket %s refuses connections; waiting up to %g s for its service",
                        path, timeout_s, extra={"event": "executor.podman_wait"})
        sleep(0.2)


def select_executor(cfg: Config, logger: logging.Logger) -> tuple[Executor, ExecutorStatus]:
    kind = cfg.executor.kind
    if kind in ("auto", "podman"):
        if cfg.executor.podman.socket:
            wait_for_socket(cfg.executor.podman.socket, cfg.executor.podman.socket_wait_s, logger)
        podman = _podman(cfg, logger)
        status = podman.probe()
        if status.usable:
            logger.info("executor: podman (%s)", status.reason, extra={"event": "executor.selected"})
            return podman, status
        close = getattr(podman, "close", None)
        if close is not None:
            close()
        if kind == "podman":
            raise ExecutorUnavailable(f"Podman is unusable: {status.reason}")
        logger.warning("Podman is unusable (%s); falling back to the venv executor: weaker isolation",
                       status.reason, extra={"event": "executor.fallback"})
    venv = _venv(cfg, logger)
    status = venv.probe()
    if not status.usable:
        raise ExecutorUnavailable(f"no executor is usable: venv: {status.reason}")
    logger.info("executor: venv (%s)", status.reason, extra={"event": "executor.selected"})
    return venv, status


def executor_for(kind: str, cfg: Config, logger: logging.Logger) -> Executor:
    """The executor of that kind ("podman" or "venv"), unprobed and without any fallback."""
    return _podman(cfg, logger) if kind == "podman" else _venv(cfg, logger)
