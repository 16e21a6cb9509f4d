"""End to end: a real development pool, a real worker daemon process, real gRPC sockets.

submit → dispatch → run → output streams while the task runs → result; a failing task; ten tasks
at once; a large result; stop mid-task; kill -9 and restart; the pool away while tasks finish;
garbage from the pool. Every test runs once per pool protocol generation (2026-04, 2025-10):
the development pool speaks it, the worker is configured for it."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import grpc
import psutil
import pytest

from hivemind.faults import ENV as FAULTS_ENV

from e2e import (
    GENERATIONS,
    WORKER_HOST,
    free_port,
    make_pool,
    result_of,
    running_worker,
    status_get,
    stop_via_pool,
    task_zip,
    upload,
    wait_for,
    write_worker_config,
)

VENV = {"kind": "venv"}

STREAMING_TASK = {
    "main.py": (
        "import time\n"
        "print('first line', flush=True)\n"
        "time.sleep(2.5)\n"
        "open('out.txt', 'w').write('made by the task\\n')\n"
        "print('last line', flush=True)\n"
    ),
}


def task_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture(params=GENERATIONS)
def generation(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture()
def pool(tmp_path: Path, generation: str):
    p = make_pool(tmp_path / "spool", protocol=generation)
    yield p
    p.stop()


def bindings(generation: str):
    if generation == "2025-10":
        from hivemind._proto.v2025_10 import nodepool_pb2, nodepool_pb2_grpc
    else:
        from hivemind._proto.v2026_04 import nodepool_pb2, nodepool_pb2_grpc
    return nodepool_pb2, nodepool_pb2_grpc


def execute_request(generation: str, **kw):
    """An ExecuteTaskRequest in the generation's own messages (2025-10: int32 cpu/gpu, node_id)."""
    pb, _ = bindings(generation)
    if generation == "2025-10":
        kw = {{"cpu_usage": "cpu", "gpu_usage": "gpu"}.get(k, k): v for k, v in kw.items()}
        kw.setdefault("node_id", "e2e-node")
    return pb.ExecuteTaskRequest(**kw)


def test_task_output_streams_while_running_and_result_returns(tmp_path: Path, pool) -> None:
    w = write_worker_config(tmp_path, pool.address, VENV, protocol=pool.protocol)
    with running_worker(w, pool):
        upload(pool, STREAMING_TASK, "stream-1")
        # The first line reaches the pool while the task still runs (before its last line).
        t = wait_for(lambda: (x := pool.task("stream-1")) and "first line" in x.output and x, 60,
                     "the first output line at the pool")
        assert "last line" not in t.output
        assert t.status == "RUNNING"
        z = result_of(pool, "stream-1")
        assert z.read("out.txt") == b"made by the task\n"
        record = json.loads(z.read("_hivemind/execution.json"))
        assert record["exit_code"] == 0 and record["reason"] == "exited" and record["status"] == "succeeded"
        assert record["node_id"] == "e2e-node"
        assert "last line" in z.read("_hivemind/output.log").decode()
        # Status API shows the task as done once the pool acknowledged the result.

        body = json.loads(status_get(w, "/api/v1/tasks/stream-1"))
        wait_for(lambda: json.loads(status_get(w, "/api/v1/tasks/stream-1"))["state"] == "done", 10,
                 "state done in the status API")
        assert body["task_id"] == "stream-1"
        status = json.loads(status_get(w, "/api/v1/status"))
        assert status["pool"]["protocol"] == pool.protocol
        if pool.protocol == "2025-10":
            limits = " ".join(status["pool"]["protocol_limitations"])
            assert "RefreshToken" in limits and "chunked" in limits
            # TaskCompleted told the pool the task succeeded, after ReturnTaskResult.
            assert pool.task("stream-1").completed_success is True
        else:
            assert status["pool"]["protocol_limitations"] == []   # this pool offers chunked upload
        # DONE is recorded just before the task's files are removed: give the removal a moment.
        wait_for(lambda: not list((w.state_dir / "tasks").iterdir()), 10,
                 "the task files removed after the result was delivered")


def test_stop_mid_task_returns_a_partial_result(tmp_path: Path, pool) -> None:
    w = write_worker_config(tmp_path, pool.address, VENV, protocol=pool.protocol)
    marker = "hm-stop-marker-8812"
    files = {"run.sh": f"echo partial; echo kept > partial.txt; sleep 300 & sleep 301 # {marker}\nwait\n"}
    with running_worker(w, pool):
        upload(pool, files, "stop-1")
        wait_for(lambda: (x := pool.task("stop-1")) and "partial" in x.output, 60, "the task to run")
        resp = stop_via_pool(pool, "stop-1")
        assert resp.success, resp.message
        z = result_of(pool, "stop-1")
        record = json.loads(z.read("_hivemind/execution.json"))
        assert record["reason"] == "stopped" and record["status"] == "stopped"
        assert z.read("partial.txt") == b"kept\n"
        wait_for(lambda: not task_processes(marker), 10, "the task's processes to be gone")


def test_kill9_mid_task_then_restart_delivers_the_result(tmp_path: Path, pool) -> None:
    w = write_worker_config(tmp_path, pool.address, VENV, protocol=pool.protocol)
    marker = "hm-kill9-marker-3391"
    files = {"run.sh": f"echo started\nsleep 4 # {marker}\necho finished > done.txt\necho end\n"}
    w.start()
    try:
        wait_for(lambda: any(n.status == "Idle" for n in pool.nodes()), 60, "registration")
        upload(pool, files, "k9-1")
        wait_for(lambda: (x := pool.task("k9-1")) and "started" in x.output, 60, "the task to run")
        w.kill9()
    finally:
        if w.alive():
            w.kill9()
    # A new daemon on the same state directory finds the task and delivers its result.
    with running_worker(w, pool):
        z = result_of(pool, "k9-1", timeout=120)
        record = json.loads(z.read("_hivemind/execution.json"))
        assert record["reason"] in ("exited", "lost"), record
        if record["reason"] == "exited":
            assert z.read("done.txt") == b"finished\n"
        assert pool.task("k9-1").execute_calls == 1, "the task must not run twice"
        wait_for(lambda: not task_processes(marker), 20, "no leaked task process")
    assert "reattach" in w.log() or "restarted" in w.log()


def test_results_survive_the_pool_being_away(tmp_path: Path, generation: str) -> None:
    # A fixed port, so the pool comes back where the worker looks for it (same object, same state).
    pool = make_pool(tmp_path / "spool", port=free_port(), protocol=generation)
    w = write_worker_config(tmp_path, pool.address, VENV, protocol=pool.protocol)
    away_s = float(os.environ.get("HIVEMIND_POOL_AWAY_S", "60"))
    try:
        with running_worker(w, pool):
            ids = ["away-1", "away-2"]
            for tid in ids:
                upload(pool, {"main.py": f"import time; print('{tid}', flush=True); time.sleep(1.5); print('ok')"}, tid)
            wait_for(lambda: all((x := pool.task(t)) and x.status == "RUNNING" for t in ids), 60, "both running")
            pool.stop()
            time.sleep(away_s)       # the tasks finish while the pool is away
            assert w.alive()
            pool.start()
            for tid in ids:
                z = result_of(pool, tid, timeout=90)
                assert json.loads(z.read("_hivemind/execution.json"))["exit_code"] == 0
    finally:
        pool.stop()


def worker_stub(w, generation: str):
    ch = grpc.insecure_channel(f"{WORKER_HOST}:{w.grpc_port}",
                               options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    return bindings(generation)[1].WorkerNodeServiceStub(ch)


def test_garbage_from_the_pool_gets_clear_refusals_and_the_worker_keeps_serving(tmp_path: Path, pool) -> None:
    w = write_worker_config(tmp_path, pool.address, VENV, extra={"server": {"max_message_mb": 2}},
                            protocol=pool.protocol)
    with running_worker(w, pool):
        stub = worker_stub(w, pool.protocol)
        pb, _ = bindings(pool.protocol)

        def ex(**kw):
            return stub.ExecuteTask(execute_request(pool.protocol, **kw), timeout=10)

        good = task_zip({"main.py": "print('fine')"})
        r = ex(task_id="g1", task_zip=b"this is not a zip")
        assert not r.success and "archive" in r.message.lower()
        r = ex(task_id="g2", task_zip=task_zip({"../escape.py": "x"}))
        assert not r.success and ".." in r.message
        r = ex(task_id="g3", task_zip=good, memory_gb=1_000_000)
        assert not r.success and "memory" in r.message.lower()
        # 2025-10's scores are int32: no NaN on the wire there, but a negative score is possible.
        r = ex(task_id="g4", task_zip=good, cpu_usage=math.nan if pool.protocol == "2026-04" else -5)
        assert not r.success and "score" in r.message
        r = ex(task_id="../../etc/passwd", task_zip=good)
        assert not r.success and "task id" in r.message.lower()
        r = ex(task_id="g5", task_zip=b"")
        assert not r.success
        s = stub.StopTaskExecution(pb.StopTaskExecutionRequest(task_id="never-seen"), timeout=10)
        assert not s.success and "unknown" in s.message.lower()
        with pytest.raises(grpc.RpcError) as exc:
            ex(task_id="g6", task_zip=os.urandom(3 * 1024 * 1024))
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Still serving: a valid task runs, and the same id sent twice runs once.
        r = ex(task_id="g7", task_zip=good)
        assert r.success, r.message
        r2 = ex(task_id="g7", task_zip=good)
        assert "already" in r2.message
        assert w.alive()


def test_known_secrets_reach_no_log_status_error_or_result(tmp_path: Path, pool) -> None:
    from e2e import WORKER_PASSWORD

    w = write_worker_config(tmp_path, pool.address, VENV, protocol=pool.protocol)
    pw_file = tmp_path / "pool-password"
    probe = {
        "main.py": (
            "import os, sys\n"
            "print('ENV', sorted(os.environ.items()), flush=True)\n"
            f"p = {str(pw_file)!r}\n"
            "try:\n"
            "    print('READ', open(p).read(), flush=True)\n"
            "except OSError as e:\n"
            "    print('DENIED', type(e).__name__, flush=True)\n"
            "sys.exit(3)\n"
        ),
    }
    w.env = {"HIVEMIND_TEST_SECRET_ENV": WORKER_PASSWORD}  # a secret in the worker's own environment
    with running_worker(w, pool):
        upload(pool, probe, "secret-1")
        z = result_of(pool, "secret-1")
        record = json.loads(z.read("_hivemind/execution.json"))
        assert record["exit_code"] == 3
        out = z.read("_hivemind/output.log").decode()
        assert "ENV" in out and ("DENIED" in out or "READ" not in out)

        status_bodies = b"".join(
            status_get(w, p)
            for p in ("/api/v1/status", "/api/v1/tasks", "/api/v1/tasks/secret-1", "/metrics"))
        # A refusal (error message) after a run with secrets set.
        stub = worker_stub(w, pool.protocol)
        refusal = stub.ExecuteTask(execute_request(pool.protocol, task_id="bad id!", task_zip=b"x"), timeout=10)
        assert not refusal.success
        result_bytes = b"".join(z.read(n) for n in z.namelist())
        # Files the worker wrote with secrets in them would have to be 0600; it writes none.
        for f in w.state_dir.rglob("*"):
            if f.is_file() and WORKER_PASSWORD.encode() in f.read_bytes():
                assert (f.stat().st_mode & 0o077) == 0, f"{f} holds a secret and is readable by others"
    secret = WORKER_PASSWORD.encode()
    assert secret not in result_bytes, "the pool password reached a result archive"
    assert secret not in status_bodies, "the pool password reached the status API"
    assert WORKER_PASSWORD not in refusal.message
    assert WORKER_PASSWORD not in w.log(), "the pool password reached the log"


def test_sighup_reloads_valid_config_and_refuses_an_invalid_one(tmp_path: Path, pool) -> None:
    import signal

    import yaml

    w = write_worker_config(tmp_path, pool.address, VENV, protocol=pool.protocol)
    with running_worker(w, pool):
        cfg = yaml.safe_load(w.config_path.read_text())
        cfg["executor"]["task_timeout_s"] = 123
        cfg["executor"]["slots"] = 7
        w.config_path.write_text(yaml.safe_dump(cfg))
        assert w.proc is not None
        w.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in w.log(), 20, "the reload")
        line = next(x for x in w.log().splitlines() if "config reloaded" in x)
        assert "applied: executor.task_timeout_s" in line and "need a restart: executor.slots" in line
        w.config_path.write_text("executor: {kind: nonsense}\n")
        w.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in w.log(), 20, "the refusal")
        assert "executor.kind" in w.log()
        upload(pool, {"main.py": "print('still serving')"}, "after-reload")
        z = result_of(pool, "after-reload")
        assert json.loads(z.read("_hivemind/execution.json"))["exit_code"] == 0


def test_a_failing_task_reports_its_exit_code(tmp_path: Path, pool) -> None:
    w = write_worker_config(tmp_path, pool.address, VENV, protocol=pool.protocol)
    with running_worker(w, pool):
        upload(pool, {"main.py": "import sys\nprint('about to fail', flush=True)\nsys.exit(7)\n"}, "fail-1")
        z = result_of(pool, "fail-1")
        record = json.loads(z.read("_hivemind/execution.json"))
        assert record["exit_code"] == 7 and record["status"] == "failed", record
        assert "about to fail" in pool.task("fail-1").output
        if pool.protocol == "2025-10":
            # ReturnTaskResult completed the task; TaskCompleted then told the pool it failed.
            wait_for(lambda: pool.task("fail-1").completed_success is False, 10, "TaskCompleted(success=false)")


def test_ten_tasks_at_once_each_run_once(tmp_path: Path, pool) -> None:
    w = write_worker_config(tmp_path, pool.address, VENV, protocol=pool.protocol)
    ids = [f"many-{i}" for i in range(10)]
    with running_worker(w, pool):
        for tid in ids:
            upload(pool, {"main.py": f"print('hello from {tid}')\nopen('id.txt', 'w').write('{tid}')\n"}, tid)
        for tid in ids:
            z = result_of(pool, tid, timeout=180)
            assert z.read("id.txt") == tid.encode()
            assert json.loads(z.read("_hivemind/execution.json"))["exit_code"] == 0
            t = pool.task(tid)
            assert f"hello from {tid}" in t.output
            assert t.execute_calls >= 1
        if pool.protocol == "2025-10":
            wait_for(lambda: all(pool.task(t).completed_success is True for t in ids), 10, "TaskCompleted for all")


def test_a_large_result_arrives_whole(tmp_path: Path, pool) -> None:
    w = write_worker_config(tmp_path, pool.address, VENV, protocol=pool.protocol)
    size = 24 * 1024 * 1024
    task = {"main.py": f"import os\nwith open('big.bin', 'wb') as f:\n    f.write(os.urandom({size}))\n"
                       "import hashlib\nprint(hashlib.sha256(open('big.bin', 'rb').read()).hexdigest())\n"}
    with running_worker(w, pool):
        upload(pool, task, "large-1")
        z = result_of(pool, "large-1", timeout=180)
        data = z.read("big.bin")
        assert len(data) == size
        import hashlib

        assert hashlib.sha256(data).hexdigest() in pool.task("large-1").output


def test_usage_reaches_the_pool_while_the_task_runs(tmp_path: Path, pool) -> None:
    w = write_worker_config(tmp_path, pool.address, VENV, protocol=pool.protocol)
    # Written, not just allocated: a zeroed bytearray is calloc'd and takes no resident memory.
    task = {"main.py": "import time\nblob = bytearray(b'x' * (64 * 1024 * 1024))\nprint('holding', flush=True)\n"
                       "time.sleep(8)\nprint(len(blob))\n"}
    # 2025-10 reports MiB (the task holds 64); 2026-04 a percentage of the 1 GiB grant (~6).
    floor = 32 if pool.protocol == "2025-10" else 0
    with running_worker(w, pool):
        upload(pool, task, "usage-1")
        t = wait_for(lambda: (x := pool.task("usage-1")) and x.usage_reports > 0 and x.memory_usage > floor and x,
                     60, "a usage report at the pool")
        if pool.protocol == "2025-10":
            # RESOURCE_USAGE's memory_mb: the task holds 64 MiB.
            assert 32 < t.memory_usage < 4096, t.memory_usage
        result_of(pool, "usage-1")


def _sigterm_mid_task(tmp_path: Path, pool, task_id: str, script: str,
                      env: dict[str, str] | None = None) -> str:
    """Start a venv worker, run `script` as `task_id`, SIGTERM the worker once the task has
    printed "begun"; asserts a clean exit and returns the worker's log."""
    w = write_worker_config(tmp_path, pool.address, VENV, protocol=pool.protocol)
    w.env = env or {}
    w.start()
    try:
        wait_for(lambda: any(n.node_id == "e2e-node" and n.status == "Idle" for n in pool.nodes()), 60,
                 "registration")
        upload(pool, {"run.sh": script}, task_id)
        wait_for(lambda: (x := pool.task(task_id)) and "begun" in x.output, 60, "the task to run")
        assert w.terminate(timeout=60) == 0, w.log()[-3000:]
        return w.log()
    finally:
        if w.alive():
            w.kill9()


def test_sigterm_drains_the_running_task_and_leaves_the_node_not_idle(tmp_path: Path, pool) -> None:
    _sigterm_mid_task(tmp_path, pool, "drain-1", "echo begun\nsleep 3\necho drained > drained.txt\necho done\n")
    # The task finished during the drain and its result went out before the worker exited.
    z = result_of(pool, "drain-1", timeout=5)
    assert z.read("drained.txt") == b"drained\n"
    node = next(n for n in pool.nodes() if n.node_id == "e2e-node")
    assert node.status != "Idle", "a stopped worker must not be left Idle at the pool"


def test_a_drain_waits_for_a_result_still_behind_its_output(tmp_path: Path, pool) -> None:
    """The runner is done before its result reaches the uploader (the streamer sends the last
    output first); the fault point holds that window open for 2 s, and the result must still be at
    the pool when the worker exits. (The old uploader-only check lost this only by a race that
    shutdown's final flush usually wins; test_worker_recovery pins the count itself.)"""
    log = _sigterm_mid_task(tmp_path, pool, "handoff-1", "echo begun\nsleep 2\necho made > made.txt\n",
                            env={FAULTS_ENV: "result_handoff@handoff-1=sleep:2"})
    assert "FAULT result_handoff task=handoff-1 sleep" in log
    z = result_of(pool, "handoff-1", timeout=1)
    assert z.read("made.txt") == b"made\n"
