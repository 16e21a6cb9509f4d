"""Harness for end-to-end tests: a real development pool on loopback and a real worker daemon
process (`python -m hivemind run`), talking gRPC over real sockets, in either pool protocol
generation (the pool's `protocol` decides; the worker's config follows it)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hivemind.devpool.server import DevPool
from hivemind.devpool.testing import free_port, task_zip, wait_for
from hivemind.devpool.userclient import user_client

from statedir import state_root

GENERATIONS = ("2026-04", "2025-10")

WORKER_HOST = "127.0.0.2"   # the pool skips nodes that advertise exactly 127.0.0.1
WORKER_PASSWORD = "worker-pw-e2e-7f3a9c"
DEV_PASSWORD = "dev-pw-e2e-51b2"


# Every state directory write_worker_config made in this process (conftest removes them).
STATE_DIRS: list[Path] = []


def make_pool(spool: Path, port: int = 0, protocol: str = "2026-04", **kw: Any) -> DevPool:
    pool = DevPool("127.0.0.1", port, users={"dev": DEV_PASSWORD, "worker": WORKER_PASSWORD},
                   dispatch_interval_s=0.2, spool_dir=spool, protocol=protocol, **kw)
    pool.start()
    return pool


@dataclass
class WorkerProc:
    state_dir: Path
    config_path: Path
    grpc_port: int
    status_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    node_id: str = "e2e-node"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "hivemind", "run", "--config", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("worker did not stop on SIGTERM") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def write_worker_config(tmp: Path, pool_address: str, executor: dict[str, Any], *,
                        extra: dict[str, Any] | None = None, node_id: str = "e2e-node",
                        state_prefix: str = "hivemind-e2e-", protocol: str = "2026-04") -> WorkerProc:
    """`node_id`: a unique one keeps other test runs on this machine (which clean up the
    containers labelled with their node) away from this worker's containers."""
    # The venv executor runs tasks as `nobody`, which must be able to reach the state directory;
    # pytest's tmp_path lives under a 0700 directory, so the state goes under /var/tmp.
    state = Path(tempfile.mkdtemp(prefix=state_prefix, dir=state_root()))
    STATE_DIRS.append(state)
    state.chmod(0o711)
    (tmp / "state-dir").write_text(str(state))
    pw = tmp / "pool-password"
    pw.write_text(WORKER_PASSWORD + "\n")
    pw.chmod(0o600)
    grpc_port = free_port(WORKER_HOST)
    status_port = free_port()
    cfg: dict[str, Any] = {
        "node": {"id": node_id, "state_dir": str(state)},
        "pool": {"address": pool_address, "username": "worker", "password_file": str(pw),
                 "heartbeat_interval_s": 0.5, "call_timeout_s": 5, "protocol": protocol},
        "server": {"listen_host": WORKER_HOST, "port": grpc_port, "advertise_host": WORKER_HOST,
                   "auth": {"mode": "legacy", "legacy_allowed_peers": ["127.0.0.0/8"]}},
        "executor": {"slots": 2, "stop_grace_s": 2, **executor},
        "resources": {"reserve_cpus": 0, "reserve_memory_gb": 0.5},
        "status": {"port": status_port},
        "logging": {"target": "stderr", "level": "debug"},
        "shutdown": {"policy": "drain", "drain_timeout_s": 20},
    }
    for key, value in (extra or {}).items():
        cfg.setdefault(key, {}).update(value)
    path = tmp / "worker.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return WorkerProc(state, path, grpc_port, status_port, tmp / "worker.log", node_id=node_id)


@contextlib.contextmanager
def running_worker(w: WorkerProc, pool: DevPool) -> Iterator[WorkerProc]:
    w.start()
    try:
        wait_for(lambda: any(n.node_id == w.node_id and n.status == "Idle" for n in pool.nodes()) or
                 (not w.alive() and _raise(w)), 60, "the worker to register as Idle")
        yield w
    finally:
        rc = w.terminate()
        shutil.rmtree(w.state_dir, ignore_errors=True)
        assert rc == 0, f"worker exited with {rc}:\n{w.log()[-3000:]}"


def _raise(w: WorkerProc) -> bool:
    raise AssertionError(f"worker died:\n{w.log()[-4000:]}")


def upload(pool: DevPool, files: dict[str, str] | bytes, task_id: str, memory_gb: int = 1,
           cpu_score: int = 0) -> None:
    """Queue a task in the pool through its real gRPC API, as a user would."""
    data = files if isinstance(files, bytes) else task_zip(files)
    with user_client(pool.protocol, pool.address, "dev", DEV_PASSWORD) as c:
        ok, message = c.upload(task_id, data, memory_gb=memory_gb, cpu_score=cpu_score)
        assert ok, message


@dataclass(frozen=True)
class Reply:
    success: bool
    message: str


def stop_via_pool(pool: DevPool, task_id: str) -> Reply:
    with user_client(pool.protocol, pool.address, "dev", DEV_PASSWORD) as c:
        return Reply(*c.stop(task_id))


def result_of(pool: DevPool, task_id: str, timeout: float = 120) -> zipfile.ZipFile:
    """The result the worker delivered. Waits for COMPLETED: a pool that was away marks a silent
    node's tasks FAILED first, and a result uploaded later still completes them."""
    try:
        t = wait_for(lambda: (x := pool.task(task_id)) is not None and x.status == "COMPLETED" and x,
                     timeout, f"task {task_id} to complete")
    except TimeoutError:
        t = pool.task(task_id)
        raise AssertionError(f"task {task_id}: {t.status if t else 'unknown'}: {t.message if t else ''}") from None
    assert t.result_path is not None
    return zipfile.ZipFile(io.BytesIO(t.result_path.read_bytes()))


def status_get(w: WorkerProc, path: str) -> bytes:
    """GET from the worker's status API with its token (generated in the state dir when the
    config names none: task data always needs it)."""
    import urllib.request

    token = (w.state_dir / "status-token").read_text().strip()
    req = urllib.request.Request(f"http://127.0.0.1:{w.status_port}{path}",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return bytes(r.read())
