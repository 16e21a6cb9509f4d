"""End to end with the Podman executor: pool → worker daemon → container → output → result;
kill -9 of the worker mid-task and a restart that reattaches to the running container; nothing
labelled is left behind."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import psutil
import pytest

from e2e import (
    make_pool,
    result_of,
    running_worker,
    stop_via_pool,
    upload,
    wait_for,
    write_worker_config,
)

pytestmark = pytest.mark.podman


def labelled_containers(node: str = "e2e-node", user: str | None = None) -> list[str]:
    cmd = ["podman", "ps", "-a", "--filter", f"label=hivemind.node_id={node}", "--format", "{{.Names}}"]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    return [line for line in out.stdout.splitlines() if line]


def podman_services() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [])[:3] == ["podman", "system", "service"]}


@pytest.fixture(autouse=True)
def no_leaked_podman_service():
    """A worker killed with -9 leaves the API service it started behind (its successor reuses
    it); end the ones this test caused, never one that ran before."""
    before = podman_services()
    yield
    for pid in podman_services() - before:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            proc.terminate()
            proc.wait(10)


@pytest.fixture()
def pool(tmp_path: Path, request: pytest.FixtureRequest):
    p = make_pool(tmp_path / "spool", protocol=getattr(request, "param", "2026-04"))
    yield p
    p.stop()


@pytest.mark.parametrize("mode,pool", [("rootless", "2026-04"), ("rootful", "2026-04"), ("rootful", "2025-10")],
                         indirect=["pool"])
def test_task_runs_in_a_container_and_streams(tmp_path: Path, pool, mode: str) -> None:
    w = write_worker_config(tmp_path, pool.address, {"kind": "podman", "podman": {"mode": mode}},
                            protocol=pool.protocol)
    files = {"main.py": ("import os, time, numpy\n"
                         "print('in container', os.getuid(), flush=True)\n"
                         "time.sleep(2)\n"
                         "open('sum.txt', 'w').write(str(int(numpy.arange(10).sum())))\n"
                         "print('bye', flush=True)\n")}
    with running_worker(w, pool):
        upload(pool, files, f"pod-{mode}")
        t = wait_for(lambda: (x := pool.task(f"pod-{mode}")) and "in container" in x.output and x, 120,
                     "output from the container")
        assert "bye" not in t.output
        z = result_of(pool, f"pod-{mode}", timeout=120)
        record = json.loads(z.read("_hivemind/execution.json"))
        assert record["exit_code"] == 0 and record["executor"] == "podman", record
        assert z.read("sum.txt") == b"45"
        assert "in container 1000" in z.read("_hivemind/output.log").decode() or \
            "in container" in z.read("_hivemind/output.log").decode()
    user = "hivemind" if mode == "rootless" else None
    assert labelled_containers(user=user) == []


def test_stop_mid_task_in_a_container(tmp_path: Path, pool) -> None:
    w = write_worker_config(tmp_path, pool.address, {"kind": "podman", "podman": {"mode": "rootful"}})
    with running_worker(w, pool):
        upload(pool, {"run.sh": "echo partial > partial.txt; echo started; sleep 300\n"}, "pod-stop")
        wait_for(lambda: (x := pool.task("pod-stop")) and "started" in x.output, 120, "the task to run")
        assert stop_via_pool(pool, "pod-stop").success
        z = result_of(pool, "pod-stop", timeout=120)
        assert json.loads(z.read("_hivemind/execution.json"))["reason"] == "stopped"
        assert z.read("partial.txt") == b"partial\n"
    assert labelled_containers() == []


def test_kill9_then_restart_reattaches_to_the_container(tmp_path: Path, pool) -> None:
    w = write_worker_config(tmp_path, pool.address, {"kind": "podman", "podman": {"mode": "rootful"}},
                            extra={"shutdown": {"policy": "leave"}})
    files = {"run.sh": "echo started\nsleep 6\necho finished > done.txt\necho end\n"}
    w.start()
    try:
        wait_for(lambda: any(n.status == "Idle" for n in pool.nodes()), 60, "registration")
        upload(pool, files, "pod-k9")
        wait_for(lambda: (x := pool.task("pod-k9")) and "started" in x.output, 120, "the task to run")
        w.kill9()
        assert labelled_containers() != [], "the container should outlive the worker"
    finally:
        if w.alive():
            w.kill9()
    with running_worker(w, pool):
        z = result_of(pool, "pod-k9", timeout=120)
        record = json.loads(z.read("_hivemind/execution.json"))
        assert record["reason"] == "exited" and record["exit_code"] == 0, record
        assert z.read("done.txt") == b"finished\n"
        assert pool.task("pod-k9").execute_calls == 1
        wait_for(lambda: labelled_containers() == [], 30, "the container removed")
    assert "reattach" in w.log()
