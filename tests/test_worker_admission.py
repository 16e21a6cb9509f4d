"""Worker admission with a fake executor (the real executors have their own tests and the e2e
tests): GPUs from a recorded nvidia-smi output go only to tasks that ask for one and only while
one is free; slots, memory and duplicate ids are refused with reasons; resources come back."""

from __future__ import annotations

import io
import logging
import threading
import time
import zipfile
from pathlib import Path

import pytest

from hivemind.config import parse_config
from hivemind.executors.base import (
    Enforcement,
    ExecutorStatus,
    ExitReason,
    ExitResult,
    OutputLine,
    OutputSink,
    TaskFacts,
    TaskHandle,
    TaskSpec,
    Usage,
)
from hivemind.metrics.gpu import detect_gpus
from hivemind.server.service import ExecuteRequest
from hivemind.tasks.state import Lifecycle
from hivemind.tasks.store import TaskStore
from hivemind.worker import GIB, Capacity, Worker

from e2e import wait_for

DATA = Path(__file__).parent / "data"


class FakeExecutor:
    """Records what it was asked to run; tasks end when the test releases them."""

    name = "fake"

    def __init__(self) -> None:
        self.specs: dict[str, TaskSpec] = {}
        self.release: dict[str, threading.Event] = {}
        self.cleaned: list[str] = []

    def probe(self) -> ExecutorStatus:
        return ExecutorStatus("fake", True, "fake", Enforcement("process", False, False, False, False, False))

    def prepare(self, spec: TaskSpec, sink: OutputSink, cancel: threading.Event) -> None:
        pass

    def start(self, spec: TaskSpec, sink: OutputSink) -> TaskHandle:
        self.specs[spec.task_id] = spec
        self.release[spec.task_id] = threading.Event()
        sink(OutputLine(time.time(), "stdout", "started"))
        return TaskHandle(1, spec.task_id, "fake", {})

    def recover(self, handle: TaskHandle, sink: OutputSink) -> None:
        raise NotImplementedError

    def wait(self, task_id: str, timeout: float | None = None) -> ExitResult | None:
        if self.release[task_id].wait(timeout):
            now = time.time()
            return ExitResult(0, ExitReason.EXITED, now, now)
        return None

    def stop(self, task_id: str, grace: float) -> None:
        self.release[task_id].set()

    def stats(self, task_id: str) -> Usage | None:
        return None

    def facts(self, task_id: str) -> TaskFacts:
        return TaskFacts()

    def cleanup(self, task_id: str) -> None:
        self.cleaned.append(task_id)

    def orphans(self) -> list[str]:
        return []


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("main.py", "print(1)")
    return buf.getvalue()


@pytest.fixture()
def worker(tmp_path: Path):
    gpus = detect_gpus(runner=lambda argv: (DATA / "nvidia-smi-2gpu.csv").read_text()).gpus
    assert [g.name for g in gpus] == ["Tesla T4", "NVIDIA A100-SXM4-40GB"]
    cfg = parse_config({"node": {"state_dir": str(tmp_path / "state")}, "pool": {"result_min_delay_s": 0}}, {})
    cap = Capacity(total_cpus=4, total_memory_bytes=16 * GIB, reserve_cpus=0, reserve_memory_bytes=0,
                   slots=3, gpus=tuple(str(g.index) for g in gpus), cpu_score_per_core=500,
                   gpu_memory_mib=tuple(g.memory_total_mib for g in gpus))
    ex = FakeExecutor()
    delivered: list[str] = []
    store = TaskStore(tmp_path / "state" / "worker.db")
    w = Worker(cfg, executor=ex, lifecycle=Lifecycle(cap.for_tasks()), store=store, capacity=cap,
               logger=logging.getLogger("test"), upload_result=lambda tid, p: delivered.append(tid))
    w.start()
    yield w, ex, delivered
    # Release every task, also one that started after the first pass (its workspace holds a
    # disk quota mount until its runner finishes).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for ev in list(ex.release.values()):
            ev.set()
        if w.wait_idle(0.1) and not any(r.is_alive() for r in w.runners()):
            break
    w.close()
    store.close()


def req(task_id: str, *, gpu: float = 0, gpu_mem: int = 0, mem: int = 1, cpu: float = 0) -> ExecuteRequest:
    return ExecuteRequest(task_id, zip_bytes(), cpu, gpu, mem, gpu_mem, "test")


def test_gpus_go_only_to_tasks_that_ask_and_only_while_free(worker) -> None:
    w, ex, _ = worker
    assert w.execute(req("cpu-only")).accepted
    d = w.execute(req("too-big", gpu_mem=80))
    assert not d.accepted and "at least 80 GiB" in d.message
    assert w.execute(req("gpu-a", gpu_mem=20)).accepted   # only the 40 GB A100 fits
    assert w.execute(req("gpu-b", gpu=100)).accepted      # the smallest free one: the T4
    wait_for(lambda: len(ex.specs) == 3, 10, "three tasks started")
    assert ex.specs["cpu-only"].limits.gpu_devices == ()
    assert ex.specs["gpu-a"].limits.gpu_devices == ("nvidia.com/gpu=1",)
    assert ex.specs["gpu-b"].limits.gpu_devices == ("nvidia.com/gpu=0",)
    ex.release["cpu-only"].set()
    wait_for(lambda: w.lifecycle.free().slots >= 1, 10, "a slot free again")
    d = w.execute(req("gpu-c", gpu=1))
    assert not d.accepted and "gpu" in d.message.lower()
    ex.release["gpu-b"].set()
    wait_for(lambda: len(w.lifecycle.free().gpus) == 1, 10, "gpu-b's GPU back")
    assert w.execute(req("gpu-c", gpu=1)).accepted


def test_refusals_name_the_reason_and_resources_return(worker) -> None:
    w, ex, delivered = worker
    d = w.execute(req("big", mem=64))
    assert not d.accepted and "memory" in d.message
    for i in range(3):
        assert w.execute(req(f"t{i}")).accepted
    d = w.execute(req("t3"))
    assert not d.accepted and "slot" in d.message.lower()
    assert w.is_idle() is False
    dup = w.execute(req("t0"))
    assert "already" in dup.message
    for i in range(3):
        wait_for(lambda i=i: f"t{i}" in ex.release, 10, "started")
        ex.release[f"t{i}"].set()
    wait_for(lambda: sorted(delivered) == ["t0", "t1", "t2"], 20, "all results delivered")
    wait_for(lambda: all(r.state.value == "done" for r in w.lifecycle.tasks()), 10, "all done")
    assert w.lifecycle.reserved().slots == 0 and w.lifecycle.reserved().cpus == 0
    assert w.is_idle() is True
    again = w.execute(req("t0"))
    assert not again.accepted, "a finished task id never runs twice"


def test_cpu_score_maps_to_a_quota(worker) -> None:
    w, ex, _ = worker
    assert w.execute(req("score", cpu=1000)).accepted
    wait_for(lambda: "score" in ex.specs, 10, "start")
    assert ex.specs["score"].limits.cpus == pytest.approx(2.0)
    assert ex.specs["score"].limits.memory_bytes == GIB


def test_idle_only_while_a_default_request_fits(worker) -> None:
    """The pool sends any queued task to an Idle node: with half a core free, a default request
    (one core) would be refused, so the node must not say Idle (issue 15, item 7)."""
    w, ex, _ = worker
    assert w.is_idle() is True
    assert w.execute(req("most-cpus", cpu=1750)).accepted      # 3.5 of 4 cores
    free = w.lifecycle.free()
    assert free.slots == 2 and free.memory_bytes >= GIB and free.cpus == pytest.approx(0.5)
    assert w.is_idle() is False
    assert not w.execute(req("default")).accepted, "the probe above must match admission"
    wait_for(lambda: "most-cpus" in ex.release, 10, "started")
    ex.release["most-cpus"].set()
    wait_for(lambda: w.lifecycle.free().cpus == 4, 10, "the cores back")
    assert w.is_idle() is True
    # Memory counts the same way: a default request needs resources.default_memory_gb.
    assert w.execute(req("most-memory", mem=16)).accepted
    assert w.lifecycle.free().memory_bytes < GIB and w.is_idle() is False


def test_a_full_worker_declines_before_reading_the_archive(worker, monkeypatch) -> None:
    """Bench rows drive ExecuteTask against a full worker in a tight loop (as a pool retrying
    a busy node does): such a call must not cost a zip parse, but a fitting one still gets it."""
    import hivemind.worker as worker_module

    w, ex, _ = worker
    parsed: list[int] = []
    real = worker_module.inspect_task_archive
    monkeypatch.setattr(worker_module, "inspect_task_archive",
                        lambda data, rules: (parsed.append(len(data)), real(data, rules))[1])
    for i in range(3):
        assert w.execute(req(f"f{i}")).accepted
    assert len(parsed) == 3
    d = w.execute(req("f3"))
    assert not d.accepted and "slot" in d.message.lower()
    assert len(parsed) == 3, "a full worker parsed the archive of a task it could not take"
    dup = w.execute(req("f0"))                 # a known id still gets its own answer
    assert dup.accepted and "already" in dup.message
    bad = ExecuteRequest("f4", b"this is not a zip archive", 0, 0, 1, 0, "test")
    wait_for(lambda: "f0" in ex.release, 10, "f0 started")
    ex.release["f0"].set()
    wait_for(lambda: w.lifecycle.free().slots >= 1, 10, "a slot free again")
    d = w.execute(bad)
    assert not d.accepted and "archive" in d.message and len(parsed) == 4


def test_the_slot_is_free_while_the_last_task_is_still_being_removed(worker) -> None:
    """Removing a container takes ~100 ms of Podman's time: the next task must not wait for it,
    and the result must not leave before the removal is done."""
    w, ex, delivered = worker
    removing = threading.Event()
    removed = threading.Event()

    def slow_cleanup(task_id: str) -> None:
        removing.set()
        assert removed.wait(10)
        ex.cleaned.append(task_id)

    ex.cleanup = slow_cleanup                  # type: ignore[method-assign]
    for i in range(3):
        assert w.execute(req(f"s{i}")).accepted
    wait_for(lambda: "s0" in ex.release, 10, "s0 started")
    ex.release["s0"].set()
    assert removing.wait(10), "cleanup never started"
    d = w.execute(req("s3"))
    assert d.accepted, f"the next task waited for the removal: {d.message}"
    assert delivered == [], "the result left before its container was removed"
    removed.set()
    wait_for(lambda: "s0" in delivered, 10, "s0's result after the removal")
