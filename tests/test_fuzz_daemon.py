"""The ExecuteTask fuzz property aimed at a real worker daemon (venv executor) over a real socket:
every generated request gets a clear refusal or a run, the worker stays up, and afterwards nothing
is left: no task process, no reservation, no task files (results the pool refuses are given up).
HIVEMIND_FUZZ_EXAMPLES=N runs more cases (default 60 here, since accepted cases really run)."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import grpc
import psutil

from e2e import WORKER_HOST, make_pool, running_worker, wait_for, write_worker_config
from test_fuzz_execute import FuzzTarget, check_execute_fuzz

EXAMPLES = int(os.environ.get("HIVEMIND_FUZZ_EXAMPLES", "60"))


def test_fuzz_execute_against_the_real_daemon(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "spool")
    w = write_worker_config(tmp_path, pool.address, {"kind": "venv", "task_timeout_s": 20},
                            extra={"pool": {"result_min_delay_s": 0}})
    try:
        with running_worker(w, pool):
            channel = grpc.insecure_channel(f"{WORKER_HOST}:{w.grpc_port}",
                                            options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])

            def status() -> dict:
                with urllib.request.urlopen(f"http://127.0.0.1:{w.status_port}/api/v1/status", timeout=5) as r:
                    return json.loads(r.read())

            def leak_check() -> None:
                assert w.alive(), "the worker died"
                wait_for(lambda: status()["slots"]["used"] == 0, 60, "all reservations released")
                tasks_dir = w.state_dir / "tasks"
                wait_for(lambda: not tasks_dir.exists() or not any(tasks_dir.iterdir()), 90,
                         "task files removed (refused results given up)")
                assert w.proc is not None
                wait_for(lambda: not psutil.Process(w.proc.pid).children(recursive=True), 30,
                         "no task process left")

            outcomes = check_execute_fuzz(FuzzTarget(channel, leak_check), EXAMPLES)
            assert outcomes["refused"] > 0
            channel.close()
    finally:
        pool.stop()
