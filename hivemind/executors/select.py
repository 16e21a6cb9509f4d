"""Pick the executor the config asks for: Podman, the venv fallback, or (auto) Podman when it is
usable and the venv otherwise. The fallback is logged and visible in status as weaker isolation."""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from hivemind.config import Config
from hivemind.errors import ExecutorUnavailable
from hivemind.executors.base import Executor, ExecutorStatus

if TYPE_CHECKING:
    from hivemind.executors.podman import PodmanExecutor


def _podman_in(cfg: Config, logger: logging.Logger, mode: str) -> PodmanExecutor:
    from hivemind.executors.podman import PodmanExecutor
    from hivemind.metrics import open_metrics

    pc = dataclasses.replace(cfg.executor.podman, mode=mode)
    metrics = open_metrics(cfg.metrics.backend, cfg.metrics.native_library, logger)
    return PodmanExecutor(pc, cfg.node_id, cfg.state_dir, logger,
                          prepare_timeout_s=cfg.executor.prepare_timeout_s,
                          requirements=cfg.executor.requirements, metrics=metrics)


def _podman(cfg: Config, logger: logging.Logger) -> tuple[Executor, ExecutorStatus]:
    """The Podman executor for the configured mode, probed. `auto` probes rootless first, then
    (worker is root, rootless can't enforce the limits) rootful, and keeps the better one."""
    from hivemind.executors.podman_mode import choose_mode, host_cgroups, worker_is_root

    mode = cfg.executor.podman.mode
    if mode == "auto" and cfg.executor.podman.socket:
        # A given socket is one service: there is no other mode to switch to.
        from hivemind.executors.podman_service import ROOTFUL_SOCKET, _socket_path

        try:
            at_rootful = _socket_path(cfg.executor.podman.socket) == ROOTFUL_SOCKET
        except ExecutorUnavailable:
            at_rootful = False
        mode = "rootful" if at_rootful else "rootless"
    if mode != "auto":
        ex = _podman_in(cfg, logger, mode)
        status = ex.probe()
        if status.usable and status.enforcement and status.enforcement.notes:
            logger.warning("podman %s (forced by executor.podman.mode) does not enforce: %s",
                           mode, "; ".join(status.enforcement.notes),
                           extra={"event": "executor.limits_not_enforced"})
        return ex, status
    rootless = _podman_in(cfg, logger, "rootless")
    rl_status = rootless.probe()
    root = worker_is_root()
    rootful: PodmanExecutor | None = None
    rf_status: ExecutorStatus | None = None
    if root and not _enforces(rl_status):
        rootful = _podman_in(cfg, logger, "rootful")
        rf_status = rootful.probe()
    try:
        uid = rootless.service_uid()
    except ExecutorUnavailable:
        uid = None
    choice = choose_mode(host_cgroups(uid), rl_status, rf_status, root)
    chosen, other = (rootless, rootful) if choice.mode == "rootless" else (rootful, rootless)
    if other is not None:
        other.close()
    assert chosen is not None
    chosen.mode_reason = f"auto: {choice.reason}"
    status = chosen.probe()   # cached enforcement; the reason now carries the choice
    log = logger.info if choice.enforced else logger.warning
    log("podman mode %s: %s", choice.mode, choice.reason, extra={"event": "executor.podman_mode"})
    return chosen, status


def _enforces(status: ExecutorStatus) -> bool:
    from hivemind.executors.podman_mode import enforces_all

    return enforces_all(status)


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
        podman, status = _podman(cfg, logger)
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
    """The executor of that kind ("podman" or "venv"), without any fallback; unprobed except for
    Podman in mode auto, where probing both modes is how the mode is chosen."""
    if kind != "podman":
        return _venv(cfg, logger)
    mode = cfg.executor.podman.mode
    return _podman(cfg, logger)[0] if mode == "auto" else _podman_in(cfg, logger, mode)
