"""A local unprivileged user going after task data of a running worker: its state dir, task
dirs, output log, workspace and result, and the status API's task list without the token."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from sandboxes import IS_ROOT

from e2e import make_pool, running_worker, status_get, upload, wait_for, write_worker_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not IS_ROOT, reason="needs root: users other than the worker's")]
LOCAL_USERS = (1000, 65534)                    # a person's account, nobody


def _as_uid(uid: int, script: str, *args: str) -> list[str]:
    out = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                          "--inh-caps=-all", "--bounding-set=-all", "--", "sh", "-c", script,
                          "probe", *args], capture_output=True, text=True, timeout=30)
    return out.stdout.split()


# Every way a local user might read task data off the disk; prints what worked.
READ_ATTACK = ('ls "$1" >/dev/null 2>&1 && echo listed-state-dir; '
               'ls "$1/tasks" >/dev/null 2>&1 && echo listed-tasks; '
               'ls "$2" >/dev/null 2>&1 && echo listed-task-dir; '
               'cat "$2/output.log" >/dev/null 2>&1 && echo read-output; '
               'ls "$2/workspace" >/dev/null 2>&1 && echo listed-workspace; '
               'cat "$2/workspace/main.py" >/dev/null 2>&1 && echo read-workspace; '
               'cat "$1/status-token" >/dev/null 2>&1 && echo read-token; true')


def _http(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def worker_with_a_task(tmp_path: Path):  # type: ignore[no-untyped-def]
    pool = make_pool(tmp_path / "spool")
    w = write_worker_config(tmp_path, pool.address, {"kind": "venv"})
    with running_worker(w, pool):
        upload(pool, {"main.py": "import time\nprint('private-output-7731', flush=True)\n"
                                 "time.sleep(300)\n"}, "privacy-1")
        task_dir = w.state_dir / "tasks" / "privacy-1"
        wait_for(lambda: b"private-output-7731" in (task_dir / "output.log").read_bytes()
                 if (task_dir / "output.log").exists() else False, 60, "the task's first line")
        yield w, task_dir
    pool.stop()


def test_local_user_reads_task_dirs(worker_with_a_task) -> None:  # type: ignore[no-untyped-def]
    """a local unprivileged user reading the state dir, task dirs, output log and workspace of a running task"""
    w, task_dir = worker_with_a_task
    # The probe works: root sees all of it.
    root = subprocess.run(["sh", "-c", READ_ATTACK, "probe", str(w.state_dir), str(task_dir)],
                          capture_output=True, text=True).stdout.split()
    assert root == ["listed-state-dir", "listed-tasks", "listed-task-dir", "read-output",
                    "listed-workspace", "read-workspace", "read-token"]
    for uid in LOCAL_USERS:
        assert _as_uid(uid, READ_ATTACK, str(w.state_dir), str(task_dir)) == [], uid
    assert (task_dir / "output.log").stat().st_mode & 0o077 == 0


def test_task_list_over_http_without_the_token(worker_with_a_task) -> None:  # type: ignore[no-untyped-def]
    """a local user reading the task list and output tails from the status API without the token"""
    w, _ = worker_with_a_task
    base = f"http://127.0.0.1:{w.status_port}"
    # The probe works: with the token the task and its output are there.
    listed = json.loads(status_get(w, "/api/v1/tasks"))
    assert "privacy-1" in [t["task_id"] for t in listed["tasks"]]
    assert "private-output-7731" in json.dumps(json.loads(status_get(w, "/api/v1/tasks/privacy-1")))
    for path in ("/api/v1/tasks", "/api/v1/tasks/privacy-1"):
        code, body = _http(base + path)
        assert code == 401 and b"privacy-1" not in body and b"private-output" not in body, path
    for path in ("/healthz", "/metrics", "/api/v1/status"):      # still open on loopback
        assert _http(base + path)[0] == 200, path
