"""Pick the executor the config asks for: Podman, the venv fallback, or (auto) Podman when it is
usable and the venv otherwise. The fallback is logged and visible in status as weaker isolation."""

from __future__ import annotations

import logging

from hivemind.config import Config
from hivemind.errors import ExecutorUnavailable
from hivemind.executors.base import Executor, ExecutorStatus


def _podman(cfg: Config, logger: logging.Logger) -> Executor:
    from hivemind.executors.podman import PodmanExecutor

    return PodmanExecutor(cfg.executor.podman, cfg.node_id, cfg.state_dir, logger,
                          prepare_timeout_s=cfg.executor.prepare_timeout_s)


def _venv(cfg: Config, logger: logging.Logger) -> Executor:
    from hivemind.executors.venv import VenvExecutor

    return VenvExecutor(cfg.executor.venv, cfg.state_dir, logger, cfg.node_id,
                        prepare_timeout_s=cfg.executor.prepare_timeout_s)


def select_executor(cfg: Config, logger: logging.Logger) -> tuple[Executor, ExecutorStatus]:
    kind = cfg.executor.kind
    if kind in ("auto", "podman"):
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
