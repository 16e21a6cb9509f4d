"""`hivemind-worker dev`: a development node pool on loopback and a worker registered with it,
in one process; and `hivemind-worker submit`, the client that uploads a task and follows it."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
import threading
from pathlib import Path
from typing import Any

from hivemind.config import Config, load_config, parse_config, to_dict
from hivemind.errors import ConfigError, StartupError

DEV_USER = "dev"
DEV_PASSWORD = "dev"           # the dev pool's task-author account; loopback only
WORKER_USER = "worker"


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    os.chmod(path, 0o600)


def dev_config(args: argparse.Namespace, state_dir: Path, password_file: Path) -> Config:
    base: dict[str, Any] = to_dict(load_config(args.config)) if args.config else {}
    base.setdefault("node", {})
    base["node"].update({"id": base["node"].get("id") or "dev-worker", "state_dir": str(state_dir)})
    base.setdefault("pool", {})
    base["pool"].update({"address": args.pool_listen, "username": WORKER_USER,
                         "password_file": str(password_file), "heartbeat_interval_s": 2.0,
                         "protocol": getattr(args, "protocol", "2026-04")})
    base.setdefault("server", {})
    base["server"].update({"listen_host": args.worker_host, "port": args.worker_port,
                           "advertise_host": args.worker_host})
    base["server"]["auth"] = {"mode": "legacy", "legacy_allowed_peers": ["127.0.0.0/8"]}
    base.setdefault("executor", {})
    base["executor"]["kind"] = args.executor
    base.setdefault("status", {})
    base["status"].update({"listen_host": "127.0.0.1", "port": args.status_port})
    base.setdefault("logging", {})
    base["logging"].setdefault("target", "stderr")
    return parse_config(base)


def default_dev_state_dir() -> Path:
    """Outside the checkout: as root, tasks run as other users, who must reach the workspace
    (a checkout under /root would be out of their reach)."""
    if os.geteuid() == 0:
        return Path("/var/lib/hivemind-worker-dev")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hivemind-worker-dev"


def run_dev(args: argparse.Namespace) -> int:
    from hivemind.daemon import Daemon
    from hivemind.devpool.server import DevPool
    from hivemind.logging_setup import setup_logging

    state_dir = Path(args.state_dir).resolve() if args.state_dir else default_dev_state_dir()
    host, _, port = args.pool_listen.rpartition(":")
    worker_password = secrets.token_urlsafe(16)
    password_file = state_dir / "pool-password"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            state_dir.chmod(0o711)  # task users (nobody, hivemind) must traverse it
        _write_secret(password_file, worker_password)
    except OSError as exc:
        raise StartupError(f"--state-dir: can't use {state_dir}: {exc.strerror or exc}") from None
    setup_logging("info", "stderr", "dev-worker")
    log = logging.getLogger("hivemind")
    pool = DevPool(host=host, port=int(port), users={DEV_USER: DEV_PASSWORD, WORKER_USER: worker_password},
                   dispatch_interval_s=1.0, logger=logging.getLogger("hivemind.devpool"),
                   protocol=getattr(args, "protocol", "2026-04"), token_ttl_s=getattr(args, "token_ttl", 3600.0))
    try:
        pool.start()
    except (OSError, RuntimeError) as exc:
        raise StartupError(f"--pool-listen: the development pool can't listen on {args.pool_listen}: {exc}") from None
    log.info("development pool (protocol %s) on %s (task author: user %r, password %r)", pool.protocol,
             pool.address, DEV_USER, DEV_PASSWORD)
    if args.pool_only:
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
        pool.stop()
        return 0
    cfg = dev_config(args, state_dir, password_file)
    daemon = Daemon(cfg, config_path=None, logger=log)
    rc = 0
    try:
        daemon.build()
        daemon.start()
        if daemon.status_server is not None:
            log.info("monitor: http://127.0.0.1:%d/ (the task list asks for the token in %s)",
                     daemon.status_server.port,
                     cfg.status.token_file or cfg.state_dir / "status-token")
        if args.demo:
            # The demo prints the task's output itself; the journal copy would show every line twice.
            logging.getLogger("hivemind.task").setLevel(logging.WARNING)
            threading.Thread(target=_demo, args=(daemon, pool.address, pool.protocol), daemon=True).start()
        daemon.loop()
        rc = getattr(daemon, "demo_rc", 0)
    except ConfigError:
        raise
    finally:
        daemon.shutdown()
        pool.stop()
    return rc


def _demo(daemon: Any, pool_address: str, protocol: str) -> None:
    from hivemind.devpool.submit import submit_task
    from hivemind.samples import sample

    out = Path(daemon.cfg.state_dir) / "demo-result.zip"
    try:
        res = submit_task(pool_address, sample("hello"), DEV_USER, DEV_PASSWORD, out_path=out,
                          timeout_s=300, protocol=protocol, on_output=lambda text: print(text, end="" if text.endswith("\n") else "\n", flush=True))
        print(f"demo task {res.task_id}: {res.status}; result saved to {res.result_path}", flush=True)
        daemon.demo_rc = 0 if res.status == "COMPLETED" else 1
    except Exception as exc:
        print(f"demo task failed: {exc}", file=sys.stderr, flush=True)
        daemon.demo_rc = 1
    daemon.signals.stop.set()


def run_submit(args: argparse.Namespace) -> int:
    from hivemind.devpool.submit import submit_task
    from hivemind.secrets import read_secret

    password = read_secret("--password-file", args.password_file).reveal() if args.password_file else DEV_PASSWORD
    res = submit_task(args.pool, args.path, args.user, password, memory_gb=args.memory_gb,
                      cpu_score=args.cpu_score, out_path=args.out, timeout_s=args.timeout,
                      protocol=args.protocol,
                      on_output=lambda text: print(text, end="" if text.endswith("\n") else "\n", flush=True))
    print(f"task {res.task_id}: {res.status}" + (f"; result saved to {res.result_path}" if res.result_path else ""))
    return 0 if res.status == "COMPLETED" else 1
