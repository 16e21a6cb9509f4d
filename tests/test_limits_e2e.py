"""Limits and usage end to end on this host (cgroup v1 hybrid, worker as root): a real development
pool over gRPC, a real worker daemon, real Podman.

- The default configuration (executor auto, podman mode auto) enforces the grant: a task asking
  for 1 GiB that allocates 3 GiB ends out_of_memory, and a process flood stops at the pids limit.
- The pool receives TaskUsage as percentages of the grant, non-zero for a busy task, on every
  executor and mode.
- A rootless-forced task's record says its limits were requested but not applied, still has its
  usage measured (from its /proc tree), and names what ran it (archive sha256, image ID/digest).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from hivemind.devpool.testing import task_zip

from e2e import make_pool, result_of, running_worker, upload, wait_for, write_worker_config

pytestmark = pytest.mark.podman
GIB = 1 << 30
IMAGE = "localhost/hivemind-task:latest"
STATUS_TOKEN = "status-token-limits-4b1e9a"


@pytest.fixture()
def pool(tmp_path: Path):
    p = make_pool(tmp_path / "spool")
    yield p
    p.stop()


def _unique() -> dict[str, str]:
    """A node id and state dir of this test's own, safe from concurrent runs' clean-ups."""
    return {"node_id": f"lim-{uuid.uuid4().hex[:8]}", "state_prefix": "hivemind-limits-"}


def _record(z: Any) -> dict[str, Any]:
    return json.loads(z.read("_hivemind/execution.json"))


def _labelled(task_id: str, user: str | None = None) -> list[str]:
    cmd = ["podman", "ps", "-a", "--filter", f"label=hivemind.task_id={task_id}", "--format", "{{.Names}}"]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/").stdout.split()


ALLOC_3G = """
import sys
chunks = []
for i in range(30):                       # 30 x 100 MiB, each page touched
    chunks.append(bytearray(100 * 1024 * 1024))
    print('allocated', (i + 1) * 100, 'MiB', flush=True)
print('held 3 GiB', flush=True)
"""


def test_default_config_enforces_memory_oom(tmp_path: Path, pool) -> None:
    """No executor keys at all: auto picks rootful here (rootless applies nothing on cgroup v1)."""
    w = write_worker_config(tmp_path, pool.address, {}, **_unique())
    tid = f"oom-{uuid.uuid4().hex[:8]}"
    with running_worker(w, pool):
        assert "podman mode rootful" in w.log(), w.log()[-3000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{w.status_port}/api/v1/status", timeout=10) as r:
            executor = json.loads(r.read())["executor"]
        assert "rootful; auto: rootless Podman applies no" in executor["reason"], executor
        assert executor["enforces"] == {"memory": True, "cpu": True, "pids": True,
                                        "network_isolated": True, "readonly_root": True}, executor
        upload(pool, {"main.py": ALLOC_3G}, tid, memory_gb=1)
        record = _record(result_of(pool, tid, timeout=180))
    assert record["reason"] == "out_of_memory", record
    applied = record["limits"]["applied"]["memory_bytes"]
    assert applied["requested"] == GIB and applied["applied"] == GIB, applied
    assert "memory.limit_in_bytes" in applied["how"]
    assert record["provenance"]["mode"] == "rootful"
    assert record["usage"]["peak_memory_bytes"] >= 0.9 * GIB
    assert _labelled(tid) == []


def test_the_same_allocation_succeeds_where_no_limit_is_applied(tmp_path: Path, pool) -> None:
    """The control for the test above: forced rootless on cgroup v1, the same task holds 3 GiB,
    and its record says the 1 GiB was requested, not applied, and measures the 3 GiB."""
    w = write_worker_config(tmp_path, pool.address, {"kind": "podman", "podman": {"mode": "rootless"}},
                            **_unique())
    tid = f"noom-{uuid.uuid4().hex[:8]}"
    with running_worker(w, pool):
        upload(pool, {"main.py": ALLOC_3G + "import time; time.sleep(2)\n"}, tid, memory_gb=1)
        z = result_of(pool, tid, timeout=180)
    record = _record(z)
    assert record["reason"] == "exited" and record["exit_code"] == 0, (record, z.namelist())
    assert "held 3 GiB" in z.read("_hivemind/output.log").decode()
    applied = record["limits"]["applied"]["memory_bytes"]
    assert applied["requested"] == GIB and applied["applied"] is None, applied
    assert record["usage"]["peak_memory_bytes"] >= 3000 << 20, record["usage"]


FLOOD = """
import os, signal, time
kids = []
try:
    while len(kids) < 5000:               # far above the 256 pids limit
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        kids.append(pid)
    outcome = 'not stopped'
except OSError as exc:
    outcome = 'stopped: ' + exc.__class__.__name__
print('forked', len(kids), outcome, flush=True)
for pid in kids:
    os.kill(pid, signal.SIGKILL)
for pid in kids:
    os.waitpid(pid, 0)
"""


def test_default_config_stops_a_process_flood_at_the_pids_limit(tmp_path: Path, pool) -> None:
    w = write_worker_config(tmp_path, pool.address, {}, **_unique())
    tid = f"flood-{uuid.uuid4().hex[:8]}"
    with running_worker(w, pool):
        upload(pool, {"main.py": FLOOD}, tid)
        z = result_of(pool, tid, timeout=180)
        record = _record(z)
        assert "_hivemind/output.log" in z.namelist(), record
        out = z.read("_hivemind/output.log").decode()
    line = next(ln for ln in out.splitlines() if "forked" in ln)
    forked = int(line.split("forked", 1)[1].split()[0])
    assert "stopped" in line and "not stopped" not in line, out
    # The pids limit (256: catatonit, python and its children), not nproc (1024) nor memory.
    assert 200 <= forked < 256, line
    pids = record["limits"]["applied"]["pids"]
    assert pids["applied"] == 256 and "pids.max" in pids["how"], pids
    assert record["reason"] == "exited" and record["exit_code"] == 0, record


BUSY = """
import time
block = bytearray(200 * 1024 * 1024)       # resident: every page is written
for i in range(0, len(block), 4096):
    block[i] = 1
print('busy', flush=True)
end = time.time() + 12
n = 0
while time.time() < end:
    n += 1
print('done', n > 0, flush=True)
"""


@pytest.mark.parametrize("executor", [{"kind": "venv"},
                                      {"kind": "podman", "podman": {"mode": "rootless"}},
                                      {"kind": "podman", "podman": {"mode": "rootful"}}],
                         ids=["venv", "rootless", "rootful"])
def test_pool_receives_usage_percentages(tmp_path: Path, pool, executor: dict[str, Any]) -> None:
    tok = tmp_path / "status-token"
    tok.write_text(STATUS_TOKEN)
    tok.chmod(0o600)
    w = write_worker_config(tmp_path, pool.address, executor, **_unique(),
                            extra={"status": {"token_file": str(tok)}})
    tid = f"busy-{uuid.uuid4().hex[:8]}"
    seen: list[tuple[float, float]] = []
    views: list[dict[str, Any]] = []

    def sample() -> bool:
        t = pool.task(tid)
        if t is not None and (t.cpu_usage or t.memory_usage):
            seen.append((t.cpu_usage, t.memory_usage))
            if not views:     # the status API's live view of the same task, once
                req = urllib.request.Request(f"http://127.0.0.1:{w.status_port}/api/v1/tasks/{tid}",
                                             headers={"Authorization": f"Bearer {STATUS_TOKEN}"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    views.append(json.loads(r.read()))
        return t is not None and t.status == "COMPLETED"

    with running_worker(w, pool):
        upload(pool, {"main.py": BUSY}, tid, memory_gb=1)
        wait_for(sample, 120, "the task to complete, sampling its usage at the pool")
        record = _record(result_of(pool, tid, timeout=30))
    assert record["exit_code"] == 0, record
    assert seen, "the pool never received a TaskUsage with usage in it"
    cpu = max(c for c, _ in seen)
    mem = max(m for _, m in seen)
    # One core granted (score 0) and a busy loop: well above zero, never above the grant.
    assert 20.0 <= cpu <= 100.0, seen
    # 200 MiB resident of a 1 GiB grant is about 20 %: a percentage, not MiB (200) or bytes.
    assert 10.0 <= mem <= 40.0, seen
    view = views[0]
    assert view["state"] == "running" and 0.0 < view["usage"]["memory_percent"] <= 100.0, view
    assert view["usage"]["cpu_seconds"] is not None and view["usage"]["source"], view
    assert set(view["limits"]) == {"memory_bytes", "cpus", "pids"}, view
    assert len(view["provenance"]["archive_sha256"]) == 64, view


def test_rootless_record_tells_the_truth(tmp_path: Path, pool) -> None:
    w = write_worker_config(tmp_path, pool.address, {"kind": "podman", "podman": {"mode": "rootless"}},
                            **_unique())
    tid = f"rl-{uuid.uuid4().hex[:8]}"
    data = task_zip({"main.py": BUSY.replace("+ 12", "+ 4")})
    with running_worker(w, pool):
        assert "does not enforce" in w.log()
        upload(pool, data, tid, memory_gb=1)
        record = _record(result_of(pool, tid, timeout=180))
    assert record["exit_code"] == 0, record
    lim = record["limits"]
    assert lim["requested"]["memory_bytes"] == GIB and lim["requested"]["pids"] == 256
    for name in ("memory_bytes", "cpus", "pids"):
        a = lim["applied"][name]
        assert a["requested"] is not None and a["applied"] is None, (name, a)
        assert a["how"].startswith("not applied"), a
    usage = record["usage"]
    assert usage["source"] == "proc tree", usage
    assert usage["cpu_seconds"] > 1.0 and usage["peak_memory_bytes"] >= 200 << 20, usage
    assert usage["max_pids"] >= 2, usage                  # catatonit and python
    prov = record["provenance"]
    assert prov["archive_sha256"] == hashlib.sha256(data).hexdigest()
    inspect = subprocess.run(["runuser", "-u", "hivemind", "--", "podman", "image", "inspect", IMAGE,
                              "--format", "{{.Id}} {{.Digest}}"], capture_output=True, text=True,
                             timeout=60, cwd="/", check=True).stdout.split()
    assert [prov["image_id"], prov["image_digest"]] == inspect, prov
    assert prov["mode"] == "rootless" and prov["executor"] == "podman"
    assert prov["node_id"] == w.node_id and prov["auth_mode"] == "legacy" and prov["worker_version"]
    assert _labelled(tid, "hivemind") == []
