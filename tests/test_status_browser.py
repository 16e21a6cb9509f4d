"""The monitor page in headless chromium against a real StatusServer with a fake view."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemind.status import StatusServer
from hivemind.status.view import StatusDict

from browser import dump_dom, find_chromium, screenshot, with_token
from test_status_api import TOKEN, FakeView, make_task, start_status_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt install chromium)"),
]


class MovingView(FakeView):
    """CPU and memory change at every poll, so the charts have a shape to draw."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.task_list.append(make_task("task-fail-2", "failed", self.now))

    def status(self) -> StatusDict:
        self.calls += 1
        st = super().status()
        st["resources"]["cpu"]["usage_percent"] = [20.0, 65.0, 40.0, 85.0][self.calls % 4]
        st["resources"]["memory"]["used_bytes"] = (2 + self.calls % 3) << 30
        return st


@pytest.fixture
def server() -> Iterator[StatusServer]:
    srv = start_status_server(MovingView())
    try:
        yield srv
    finally:
        srv.stop()


def _attr(dom: str, element_id: str, name: str) -> str | None:
    tag = re.search(rf'<[^>]*\bid="{element_id}"[^>]*>', dom)
    assert tag, f"#{element_id} missing"
    m = re.search(rf'\b{name}="([^"]*)"', tag.group(0))
    return m.group(1) if m else None


def test_monitor_renders_tasks_and_charts(server: StatusServer, tmp_path: Path) -> None:
    dom = dump_dom(with_token(server.url + "/", TOKEN), tmp_path)
    assert re.search(r'<body[^>]*data-state="ok"', dom), dom[:2000]
    assert re.search(r'<tr[^>]*data-task-id="task-run-1"[^>]*data-state="running"', dom)
    assert 'data-task-id="task-fail-2"' in dom
    for chart in ("cpu-chart", "mem-chart"):
        assert _attr(dom, chart, "data-drawn") == "1"
        # History is kept in the page: more than one poll's worth of points.
        assert int(_attr(dom, chart, "data-points") or 0) >= 2
    assert "node-a" in dom and "INSECURE" in dom
    assert "rootless podman on cgroup v1 applies no memory limit" in dom


def test_monitor_screenshot(server: StatusServer, tmp_path: Path) -> None:
    png = screenshot(with_token(server.url + "/", TOKEN), tmp_path / "monitor.png", tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    keep = os.environ.get("HIVEMIND_TEST_ARTIFACTS")
    if keep:  # to look at it: HIVEMIND_TEST_ARTIFACTS=/tmp/shots pytest ...
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / "monitor.png")


def test_monitor_on_loopback_shows_the_node_but_asks_for_the_token_for_tasks(
        server: StatusServer, tmp_path: Path) -> None:
    dom = dump_dom(server.url + "/", tmp_path, budget_ms=2000)
    assert re.search(r'<body[^>]*data-state="unauthorized"', dom)
    assert "node-a" in dom                                 # /api/v1/status is open on loopback
    assert 'data-task-id="task-run-1"' not in dom          # the task list is not


def test_monitor_asks_for_token_on_remote_bind(tmp_path: Path) -> None:
    srv = start_status_server(FakeView(), remote=True)
    try:
        dom = dump_dom(srv.url + "/", tmp_path, budget_ms=2000)
        assert re.search(r'<body[^>]*data-state="unauthorized"', dom)
        assert 'data-task-id="task-run-1"' not in dom
        dom = dump_dom(with_token(srv.url + "/", TOKEN), tmp_path, budget_ms=2000)
        assert re.search(r'<body[^>]*data-state="ok"', dom)
        assert 'data-task-id="task-run-1"' in dom
        assert TOKEN not in dom  # the fragment is dropped from the address once read
    finally:
        srv.stop()
