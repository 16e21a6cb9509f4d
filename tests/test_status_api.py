"""The status API over real HTTP: waitress on a free port, a fake StatusView behind it."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hivemind.secrets import Secret
from hivemind.status import StatusServer, WorkerMetrics, create_app, reads_need_token
from hivemind.status.openapi import openapi_document
from hivemind.status.view import TASK_STATES, StatusDict, TaskDict, security_info

TOKEN = "s3cret-T0ken-value-9f8e7d"
LOG = "hivemind.test.status"


def make_task(task_id: str, state: str = "running", now: float = 1_700_000_000.0) -> TaskDict:
    return TaskDict(
        task_id=task_id, state=state, created_at=now - 30, started_at=now - 28,
        finished_at=None if state == "running" else now - 1,
        requested={"cpus": 1.5, "memory_bytes": 2 << 30, "gpus": 0, "timeout_s": 3600.0},
        usage={"cpu_cores": 0.8, "memory_bytes": 300 << 20, "peak_memory_bytes": 400 << 20},
        exit_code=None if state == "running" else 0,
        exit_reason=None if state == "running" else "exited",
        message="", output_tail=["step 1", "step 2"], limits=None, provenance=None)


class FakeView:
    """A StatusView with fixed data that records the operator actions it receives."""

    def __init__(self, *, ready: tuple[bool, str] = (True, ""), now: float | None = None) -> None:
        self.now = time.time() if now is None else now
        self.ready_answer = ready
        self.drained = 0
        self.stopped: list[str] = []
        self.fail_status = False
        self.task_list = [make_task("task-run-1", "running", self.now),
                          make_task("task-done-0", "done", self.now)]

    def status(self) -> StatusDict:
        if self.fail_status:
            raise RuntimeError(f"boom with {TOKEN}")
        return StatusDict(
            node_id="node-a", version="0.1.0", started_at=self.now - 100,
            pool={"address": "pool:50051", "state": "registered", "reported_status": "Running",
                  "last_heartbeat": self.now - 2, "heartbeat_failures": 0},
            executor={"name": "podman", "usable": True, "reason": "rootless podman 4.3",
                      "isolation": "container",
                      "enforces": {"memory": False, "cpu": False, "pids": False,
                                   "network_isolated": True, "readonly_root": True},
                      "notes": ["cgroup v1 rootless: no memory/cpu/pids limits"]},
            security=security_info("legacy", False),
            metrics_backend="psutil",
            resources={"cpu": {"total": 2.0, "reserved": 0.5, "allocated": 1.5, "free": 0.0,
                               "usage_percent": 42.0},
                       "memory": {"total_bytes": 8 << 30, "reserved_bytes": 1 << 30,
                                  "allocated_bytes": 2 << 30, "free_bytes": 5 << 30,
                                  "used_bytes": 3 << 30},
                       "gpus": 0},
            slots={"total": 2, "used": 1}, draining=self.drained > 0,
            warnings=[{"ts": self.now - 5, "level": "warning",
                       "message": "rootless podman on cgroup v1 applies no memory limit"}])

    def tasks(self) -> list[TaskDict]:
        return [dict(t, output_tail=[]) for t in self.task_list]  # type: ignore[misc]

    def task(self, task_id: str) -> TaskDict | None:
        return next((t for t in self.task_list if t["task_id"] == task_id), None)

    def ready(self) -> tuple[bool, str]:
        return self.ready_answer

    def drain(self) -> None:
        self.drained += 1

    def stop_task(self, task_id: str) -> bool:
        if self.task(task_id) is None:
            return False
        self.stopped.append(task_id)
        return True


def start_status_server(view: Any, *, token: str | None = TOKEN, remote: bool = False,
                        metrics: WorkerMetrics | None = None) -> StatusServer:
    """A started StatusServer on 127.0.0.1:0; `remote` applies the non-loopback rules."""
    log = logging.getLogger(LOG)
    app = create_app(view, metrics=metrics or WorkerMetrics("0.1.0", "node-a"),
                     token=Secret(token) if token else None, reads_need_token=remote, logger=log)
    server = StatusServer(lambda: app, "127.0.0.1", 0, logger=log)
    server.start()
    return server


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    def call(self, method: str, path: str, token: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            hdrs = dict(headers or {})
            if token is not None:
                hdrs["Authorization"] = f"Bearer {token}"
            conn.request(method, path, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, token: str | None = None) -> tuple[int, Any]:
        status, headers, body = self.call(method, path, token)
        assert headers["content-type"].startswith("application/json"), (path, headers)
        return status, json.loads(body)


@pytest.fixture
def view() -> FakeView:
    return FakeView()


@pytest.fixture
def local(view: FakeView) -> Iterator[Client]:
    server = start_status_server(view)
    try:
        yield Client(server.port)
    finally:
        server.stop()


@pytest.fixture
def remote(view: FakeView) -> Iterator[Client]:
    server = start_status_server(view, remote=True)
    try:
        yield Client(server.port)
    finally:
        server.stop()


def test_healthz_and_readyz(local: Client, view: FakeView) -> None:
    assert local.json("GET", "/healthz") == (200, {"alive": True})
    assert local.json("GET", "/readyz") == (200, {"ready": True})
    view.ready_answer = (False, "not registered with the pool yet")
    assert local.json("GET", "/readyz") == (503, {"ready": False, "reason": "not registered with the pool yet"})


def test_status_carries_documented_keys(local: Client) -> None:
    status, body = local.json("GET", "/api/v1/status")
    assert status == 200
    assert set(body) == set(StatusDict.__annotations__)
    assert body["pool"]["state"] == "registered"
    assert body["security"] == {"grpc_auth_mode": "legacy", "pool_tls": False, "insecure": True,
                                "insecure_reasons": body["security"]["insecure_reasons"]}
    assert any("legacy" in r for r in body["security"]["insecure_reasons"])
    assert body["slots"] == {"total": 2, "used": 1}


def test_tasks_list_and_one(local: Client) -> None:
    status, body = local.json("GET", "/api/v1/tasks", token=TOKEN)
    assert status == 200
    assert [t["task_id"] for t in body["tasks"]] == ["task-run-1", "task-done-0"]
    status, one = local.json("GET", "/api/v1/tasks/task-done-0", token=TOKEN)
    assert status == 200
    assert one["exit_code"] == 0 and one["output_tail"] == ["step 1", "step 2"]
    assert set(one) == set(TaskDict.__annotations__)


@pytest.mark.parametrize("path", ["/api/v1/tasks/nope", "/api/v1/tasks/..%2F..%2Fetc",
                                  "/no/such/route", "/static/../app.py", "/static/monitor.html"])
def test_unknown_is_404_json(local: Client, path: str) -> None:
    status, body = local.json("GET", path, token=TOKEN)
    assert status == 404
    assert body["status"] == 404 and body["error"]


def test_wrong_method_is_405_and_get_changes_nothing(local: Client, view: FakeView) -> None:
    for method, path in [("GET", "/api/v1/drain"), ("GET", "/api/v1/tasks/task-run-1/stop"),
                         ("POST", "/api/v1/status"), ("DELETE", "/api/v1/tasks/task-run-1"),
                         ("PUT", "/healthz")]:
        status, body = local.json(method, path, token=TOKEN)
        assert (status, body["status"]) == (405, 405), (method, path)
    assert view.drained == 0 and view.stopped == []


def test_task_data_needs_token_even_on_loopback(local: Client, view: FakeView) -> None:
    """Any local user can reach a loopback port: task lists and output tails need the token;
    health, readiness, metrics and the node's status stay open there."""
    for path in ("/api/v1/tasks", "/api/v1/tasks/task-done-0"):
        for token in (None, "", "wrong", TOKEN[:-1]):
            status, body = local.json("GET", path, token=token)
            assert status == 401, (path, token)
            assert "task-done-0" not in json.dumps(body) and "step 1" not in json.dumps(body)
    for path in ("/healthz", "/readyz", "/metrics", "/api/v1/status"):
        assert local.call("GET", path)[0] == 200, path
    no_token = start_status_server(view, token=None)
    try:
        assert Client(no_token.port).call("GET", "/api/v1/tasks")[0] == 403
        assert Client(no_token.port).call("GET", "/api/v1/status")[0] == 200
    finally:
        no_token.stop()


def test_writes_need_token_even_on_loopback(local: Client, view: FakeView) -> None:
    assert local.json("POST", "/api/v1/drain")[0] == 401
    assert local.json("POST", "/api/v1/drain", token="wrong")[0] == 401
    assert local.json("POST", "/api/v1/tasks/task-run-1/stop", token="")[0] == 401
    assert view.drained == 0 and view.stopped == []
    assert local.json("POST", "/api/v1/drain", token=TOKEN) == (202, {"draining": True})
    assert view.drained == 1
    assert local.json("POST", "/api/v1/tasks/task-run-1/stop", token=TOKEN) == (
        202, {"task_id": "task-run-1", "stopping": True})
    assert view.stopped == ["task-run-1"]
    assert local.json("POST", "/api/v1/tasks/ghost/stop", token=TOKEN)[0] == 404


def test_writes_refused_without_configured_token(view: FakeView) -> None:
    server = start_status_server(view, token=None)
    try:
        status, body = Client(server.port).json("POST", "/api/v1/drain", token="anything")
        assert status == 403 and body["error"] == "no token configured"
        assert Client(server.port).json("GET", "/api/v1/status")[0] == 200
        assert view.drained == 0
    finally:
        server.stop()


def test_remote_bind_needs_token_for_reads(remote: Client) -> None:
    for path in ["/readyz", "/api/v1/status", "/api/v1/tasks", "/api/v1/tasks/task-run-1",
                 "/metrics", "/api/v1/openapi.json"]:
        status, headers, body = remote.call("GET", path)
        assert status == 401, path
        assert headers["www-authenticate"] == "Bearer"
        assert json.loads(body)["status"] == 401
        assert remote.call("GET", path, token="nope")[0] == 401
    assert remote.call("GET", "/healthz")[0] == 200
    assert remote.call("GET", "/api/v1/status", token=TOKEN)[0] == 200
    assert remote.call("GET", "/metrics", token=TOKEN)[0] == 200
    assert remote.call("GET", "/api/v1/status", headers={"Authorization": f"Basic {TOKEN}"})[0] == 401


def test_remote_bind_without_token_is_refused() -> None:
    with pytest.raises(ValueError, match="token"):
        create_app(FakeView(), metrics=WorkerMetrics("0"), token=None, reads_need_token=True,
                   logger=logging.getLogger(LOG))


def test_token_never_in_responses_or_logs(remote: Client, view: FakeView,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bodies = [remote.call("GET", "/api/v1/status", token=TOKEN[:-1] + "x")[2],
              remote.call("POST", "/api/v1/drain", token=TOKEN + "x")[2],
              remote.call("GET", "/api/v1/status", token=TOKEN)[2],
              remote.call("GET", "/", token=TOKEN)[2]]
    view.fail_status = True  # its exception text quotes the token
    status, _, body = remote.call("GET", "/api/v1/status", token=TOKEN)
    assert status == 500 and json.loads(body)["error"] == "internal error"
    bodies.append(body)
    assert all(TOKEN.encode() not in b for b in bodies)
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 2
    assert all("127.0.0.1" in r.getMessage() for r in refusals)
    assert TOKEN not in caplog.text and TOKEN[:-1] not in caplog.text


def test_body_holding_the_token_is_withheld(local: Client, view: FakeView,
                                            caplog: pytest.LogCaptureFixture) -> None:
    view.task_list[0]["message"] = f"oops {TOKEN}"
    status, body = local.json("GET", "/api/v1/tasks", token=TOKEN)
    assert status == 500 and body["error"] == "response withheld"
    assert TOKEN not in caplog.text


def test_metrics_scrape_parses(view: FakeView) -> None:
    metrics = WorkerMetrics("0.1.0", "node-a")
    metrics.task_state({"running": 2, "done": 5})
    metrics.observe_task_duration(42.0)
    metrics.observe_task_duration(3.0, "timed_out")
    metrics.observe_start_latency(0.3)
    metrics.results_pending(1)
    metrics.heartbeat_failed()
    metrics.heartbeat_failed()
    metrics.upload_failed()
    metrics.resources(total_cpus=2, reserved_cpus=0.5, allocated_cpus=1, total_mem=8 << 30,
                      reserved_mem=1 << 30, allocated_mem=2 << 30, used_mem=3 << 30, cpu_usage=0.25)
    server = start_status_server(view, metrics=metrics)
    try:
        status, headers, body = Client(server.port).call("GET", "/metrics")
    finally:
        server.stop()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}

    def val(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert val("hivemind_tasks", state="running") == 2
    assert val("hivemind_tasks", state="failed") == 0  # every state is present
    assert {s for (n, lab) in samples if n == "hivemind_tasks" for _, s in lab} == set(TASK_STATES)
    assert val("hivemind_task_duration_seconds_count", outcome="exited") == 1
    assert val("hivemind_task_duration_seconds_bucket", outcome="exited", le="60.0") == 1
    assert val("hivemind_task_duration_seconds_bucket", outcome="exited", le="30.0") == 0
    assert val("hivemind_task_start_latency_seconds_sum") == pytest.approx(0.3)
    assert val("hivemind_results_pending") == 1
    assert val("hivemind_heartbeat_failures_total") == 2
    assert val("hivemind_upload_failures_total") == 1
    assert val("hivemind_cpu_cores", kind="free") == 0.5
    assert val("hivemind_memory_bytes", kind="free") == 5 << 30
    assert val("hivemind_cpu_usage_ratio") == 0.25
    assert val("hivemind_build_info", version="0.1.0", node_id="node-a") == 1


def test_metrics_registries_are_separate() -> None:
    a, b = WorkerMetrics("1"), WorkerMetrics("2")
    a.heartbeat_failed()
    assert b"hivemind_heartbeat_failures_total 1.0" in a.render()
    assert b"hivemind_heartbeat_failures_total 0.0" in b.render()


def _app_routes(app: Any) -> dict[str, set[str]]:
    """Walk Falcon's compiled router: template -> methods that have a responder."""
    found: dict[str, set[str]] = {}

    def walk(nodes: list[Any]) -> None:
        for node in nodes:
            if node.resource is not None:
                found[node.uri_template] = {m.lower() for m in ("GET", "POST", "PUT", "DELETE", "PATCH")
                                            if hasattr(node.resource, "on_" + m.lower())}
            walk(node.children)

    walk(app._router._roots)
    return found


def test_openapi_matches_routes(local: Client) -> None:
    app = create_app(FakeView(), metrics=WorkerMetrics("0"), token=None, reads_need_token=False,
                     logger=logging.getLogger(LOG))
    routes = _app_routes(app)
    status, doc = local.json("GET", "/api/v1/openapi.json")
    assert status == 200 and doc == json.loads(json.dumps(openapi_document("0.1.0")))
    assert doc["openapi"].startswith("3.")
    documented = {path: set(ops) - {"parameters"} for path, ops in doc["paths"].items()}
    assert routes == documented
    assert len(routes) >= 11
    # Every $ref resolves.
    text = json.dumps(doc)
    for name in doc["components"]["schemas"]:
        assert f'"#/components/schemas/{name}"' in text or name in ("StatusDict",)
    refs = {r.split("/")[-1] for r in _refs(doc)}
    assert refs <= set(doc["components"]["schemas"])


def _refs(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        out = [obj["$ref"]] if "$ref" in obj else []
        return out + [r for v in obj.values() for r in _refs(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in _refs(v)]
    return []


def test_monitor_page_and_static(local: Client) -> None:
    status, headers, body = local.call("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]
    assert b"/static/monitor.js" in body and b"http" not in body  # no external URL
    for name, ctype in [("monitor.js", "text/javascript"), ("monitor.css", "text/css")]:
        status, headers, body = local.call("GET", f"/static/{name}")
        assert status == 200 and headers["content-type"].startswith(ctype)
        assert b"https://" not in body and b"http://" not in body  # works offline: no CDN


def test_reads_need_token_rule() -> None:
    assert not reads_need_token("127.0.0.1")
    assert not reads_need_token("127.0.0.2")
    assert not reads_need_token("::1")
    assert not reads_need_token("localhost")
    assert reads_need_token("0.0.0.0")
    assert reads_need_token("192.168.1.5")
    assert reads_need_token("::")
    assert reads_need_token("worker.example")


def test_server_stop_frees_port_and_is_idempotent(view: FakeView) -> None:
    server = start_status_server(view)
    port = server.port
    assert Client(port).call("GET", "/healthz")[0] == 200
    server.stop()
    server.stop()
    with pytest.raises(OSError):
        Client(port).call("GET", "/healthz")
    assert not [t for t in threading.enumerate() if t.name == "status-http"]


def test_slow_view_does_not_block_health(view: FakeView) -> None:
    """A request stuck in the view leaves the server answering others (its own thread pool)."""
    gate = threading.Event()
    original = view.tasks

    def slow_tasks() -> list[TaskDict]:
        gate.wait(10)
        return original()

    view.tasks = slow_tasks  # type: ignore[method-assign]
    server = start_status_server(view)
    try:
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(
            Client(server.port).call("GET", "/api/v1/tasks", token=TOKEN)[0]))
        t.start()
        assert Client(server.port).call("GET", "/healthz")[0] == 200
        gate.set()
        t.join(10)
        assert result == [200]
    finally:
        gate.set()
        server.stop()


def test_a_missing_falcon_fails_the_start_not_the_first_visitor(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "falcon" else real(name, *a))
    server = StatusServer(lambda: None, "127.0.0.1", 0, logger=logging.getLogger(LOG))
    with pytest.raises(ImportError, match="falcon"):
        server.start()
    server.stop()


def test_the_port_is_bound_before_the_app_loads_and_a_stop_before_any_visit_is_clean() -> None:
    loads: list[int] = []
    server = StatusServer(lambda: loads.append(1), "127.0.0.1", 0, logger=logging.getLogger(LOG))
    server.start()
    taken = socket.socket()
    try:
        with pytest.raises(OSError):
            taken.bind(("127.0.0.1", server.port))
    finally:
        taken.close()
    port = server.port
    server.stop()
    assert loads == [] and not server.loaded
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
