"""The status API of a running daemon (with the dev pool), over real HTTP, during a running task;
and the monitor page in headless Chromium showing that task."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from browser import dump_dom, find_chromium, screenshot, with_token
from e2e import make_pool, running_worker, upload, wait_for, write_worker_config

TOKEN = "status-token-e2e-0c5d7e"


def http(method: str, url: str, token: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.fixture()
def daemon(tmp_path: Path):
    pool = make_pool(tmp_path / "spool")
    tok = tmp_path / "status-token"
    tok.write_text(TOKEN)
    w = write_worker_config(tmp_path, pool.address, {"kind": "venv"},
                            extra={"status": {"token_file": str(tok)}})
    with running_worker(w, pool):
        yield pool, w
    pool.stop()


def test_every_endpoint_of_a_running_daemon(daemon: Any, tmp_path: Path) -> None:
    pool, w = daemon
    base = f"http://127.0.0.1:{w.status_port}"
    upload(pool, {"main.py": "import time\nfor i in range(600):\n    print('tick', i, flush=True)\n    time.sleep(0.2)\n"},
           "status-run-1")
    wait_for(lambda: json.loads(http("GET", f"{base}/api/v1/tasks/status-run-1", token=TOKEN)[1]).get("state") == "running",
             60, "the task to run")
    assert http("GET", f"{base}/healthz")[0] == 200
    code, body, _ = http("GET", f"{base}/readyz")
    assert code == 200, body
    code, body, _ = http("GET", f"{base}/api/v1/status")
    st = json.loads(body)
    assert code == 200 and st["node_id"] == "e2e-node" and st["pool"]["state"] == "registered"
    assert st["executor"]["name"] == "venv" and st["executor"]["isolation"] == "process"
    assert st["security"]["insecure"] is True and st["slots"]["used"] == 1
    assert st["metrics_backend"] in ("native", "psutil")
    tasks = json.loads(http("GET", f"{base}/api/v1/tasks", token=TOKEN)[1])["tasks"]
    assert [t["task_id"] for t in tasks] == ["status-run-1"]
    one = wait_for(lambda: (t := json.loads(http("GET", f"{base}/api/v1/tasks/status-run-1", token=TOKEN)[1]))
                   and any("tick" in line for line in t["output_tail"]) and t, 30, "output in the task's tail")
    assert one["requested"]["memory_bytes"] == 1024 ** 3
    assert http("GET", f"{base}/api/v1/tasks/nope", token=TOKEN)[0] == 404
    assert http("GET", f"{base}/no/such/route")[0] == 404
    assert http("GET", f"{base}/api/v1/drain")[0] == 405
    assert http("POST", f"{base}/api/v1/drain")[0] == 401
    assert http("POST", f"{base}/api/v1/drain", token="wrong")[0] == 401
    def scrape() -> dict:
        code, body, _ = http("GET", f"{base}/metrics")
        assert code == 200
        return {f.name: f for f in text_string_to_metric_families(body.decode())}

    def running_gauge() -> float:
        return sum(s.value for s in scrape()["hivemind_tasks"].samples if s.labels.get("state") == "running")

    # Listeners update the gauge right after the transition the API already shows.
    wait_for(lambda: running_gauge() == 1, 10, "the running gauge")
    families = scrape()
    assert "hivemind_task_start_latency_seconds" in families
    spec = json.loads(http("GET", f"{base}/api/v1/openapi.json")[1])
    assert "/api/v1/tasks/{task_id}" in spec["paths"]
    # The monitor page shows the running task and its charts.
    if find_chromium() is not None:
        dom = dump_dom(with_token(base + "/", TOKEN), tmp_path)
        assert re.search(r'data-task-id="status-run-1"[^>]*data-state="running"', dom), dom[:3000]
        assert re.search(r'id="cpu-chart"[^>]*data-drawn="1"', dom) or 'data-drawn="1"' in dom
        png = screenshot(with_token(base + "/", TOKEN), tmp_path / "monitor.png", tmp_path)
        assert png.stat().st_size > 10_000
        if os.environ.get("HIVEMIND_TEST_ARTIFACTS"):
            keep = Path(os.environ["HIVEMIND_TEST_ARTIFACTS"])
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, keep / "monitor-daemon.png")
    # Operator actions with the token: stop the task, then drain.
    code, _, _ = http("POST", f"{base}/api/v1/tasks/status-run-1/stop", token=TOKEN)
    assert code == 202
    wait_for(lambda: json.loads(http("GET", f"{base}/api/v1/tasks/status-run-1", token=TOKEN)[1])["state"] in
             ("uploading", "stopped"), 30, "the task to stop")
    ended = wait_for(lambda: (t := json.loads(http("GET", f"{base}/api/v1/tasks/status-run-1", token=TOKEN)[1]))
                     and t["state"] == "stopped" and t, 30, "the stopped result delivered")
    assert ended["exit_reason"] == "stopped" and any("tick" in line for line in ended["output_tail"])
    assert http("POST", f"{base}/api/v1/drain", token=TOKEN)[0] == 202
    st = json.loads(http("GET", f"{base}/api/v1/status")[1])
    assert st["draining"] is True
    code, body, _ = http("GET", f"{base}/readyz")
    all_bodies = b"".join(http("GET", f"{base}{p}", token=TOKEN)[1] for p in ("/api/v1/status", "/api/v1/tasks", "/metrics"))
    assert TOKEN.encode() not in all_bodies and b"worker-pw-e2e" not in all_bodies
    assert TOKEN not in w.log() and "worker-pw-e2e" not in w.log()


def test_readyz_is_503_with_the_reason_while_the_pool_is_unreachable(tmp_path: Path) -> None:
    from e2e import free_port

    w = write_worker_config(tmp_path, f"127.0.0.1:{free_port()}", {"kind": "venv"})
    w.start()
    try:
        base = f"http://127.0.0.1:{w.status_port}"
        wait_for(lambda: _get_or_none(f"{base}/healthz") == 200, 60, "the status API")
        code, body, _ = http("GET", f"{base}/readyz")
        assert code == 503
        doc = json.loads(body)
        assert doc["ready"] is False and "pool" in doc["reason"]
        st = json.loads(http("GET", f"{base}/api/v1/status")[1])
        assert st["pool"]["state"] in ("connecting", "disconnected")
    finally:
        assert w.terminate() == 0, w.log()[-3000:]
        shutil.rmtree(w.state_dir, ignore_errors=True)


def _get_or_none(url: str) -> int | None:
    try:
        return http("GET", url)[0]
    except OSError:
        return None
