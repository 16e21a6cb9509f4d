"""The restart table of hivemind/worker.py, with the real store and a fake executor (the real
executors are killed for real in test_durability_faults.py): worker A is abandoned mid-way, as a
crash would leave it, and worker B on the same state directory must start, reattach, resend or
forget each task exactly as the table says, and never start one twice."""

from __future__ import annotations

import io
import logging
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping
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
    TaskHandle,
    TaskSpec,
    Usage,
)
from hivemind.server.service import ExecuteRequest
from hivemind.tasks.state import Lifecycle, TaskState
from hivemind.tasks.store import TaskStore
from hivemind.worker import GIB, Capacity, Worker

from e2e import wait_for


class FakeExecutor:
    """Tasks print one line and end when released; `recover` records what it was asked."""

    name = "fake"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.recovered: list[tuple[str, dict[str, int] | None]] = []
        self.release: dict[str, threading.Event] = {}
        self.cleaned: list[str] = []

    def probe(self) -> ExecutorStatus:
        return ExecutorStatus("fake", True, "fake", Enforcement("process", False, False, False, False, False))

    def prepare(self, spec: TaskSpec, sink: OutputSink, cancel: threading.Event) -> None:
        pass

    def start(self, spec: TaskSpec, sink: OutputSink) -> TaskHandle:
        self.started.append(spec.task_id)
        self.release.setdefault(spec.task_id, threading.Event())
        sink(OutputLine(time.time(), "stdout", "hello", pos=1))
        return TaskHandle(1, spec.task_id, "fake", {"started_at": time.time()})

    def recover(self, handle: TaskHandle, sink: OutputSink,
                resume: Mapping[str, int] | None = None) -> None:
        self.recovered.append((handle.task_id, dict(resume) if resume is not None else None))
        self.release.setdefault(handle.task_id, threading.Event())
        sink(OutputLine(time.time(), "stdout", "after the restart", pos=2))

    def wait(self, task_id: str, timeout: float | None = None) -> ExitResult | None:
        if self.release[task_id].wait(timeout):
            now = time.time()
            return ExitResult(0, ExitReason.EXITED, now, now)
        return None

    def stop(self, task_id: str, grace: float) -> None:
        self.release.setdefault(task_id, threading.Event()).set()

    def stats(self, task_id: str) -> Usage | None:
        return None

    def cleanup(self, task_id: str) -> None:
        self.cleaned.append(task_id)

    def orphans(self) -> list[str]:
        return []


class LastWordExecutor(FakeExecutor):
    """Prints one more line as it ends, so the task's output has a tail to send after the run."""

    def __init__(self) -> None:
        super().__init__()
        self.sinks: dict[str, OutputSink] = {}

    def start(self, spec: TaskSpec, sink: OutputSink) -> TaskHandle:
        self.sinks[spec.task_id] = sink
        return super().start(spec, sink)

    def wait(self, task_id: str, timeout: float | None = None) -> ExitResult | None:
        res = super().wait(task_id, timeout)
        if res is not None:
            self.sinks[task_id](OutputLine(time.time(), "stdout", "bye", pos=2))
        return res


def archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("main.py", "print(1)")
    return buf.getvalue()


class Node:
    """One state directory; each `worker()` is a new daemon on it (the previous one abandoned)."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.delivered: list[str] = []
        self.output: list[str] = []
        self.output_open = threading.Event()   # cleared: the pool takes no output for now
        self.output_open.set()
        self.workers: list[tuple[Worker, TaskStore]] = []

    def worker(self, ex: FakeExecutor) -> Worker:
        # No disk quota: a fake executor's abandoned runners would keep its mounts.
        cfg = parse_config({"node": {"state_dir": str(self.state)},
                            "executor": {"disk_quota_mb": 0},
                            "pool": {"result_min_delay_s": 0, "output_flush_interval_s": 0.05}}, {})
        cap = Capacity(total_cpus=4, total_memory_bytes=16 * GIB, reserve_cpus=0,
                       reserve_memory_bytes=0, slots=3, gpus=(), cpu_score_per_core=500)
        store = TaskStore(self.state / "worker.db")
        w = Worker(cfg, executor=ex, lifecycle=Lifecycle(cap.for_tasks()), store=store, capacity=cap,
                   logger=logging.getLogger("test-recovery"),
                   upload_result=lambda tid, p: self.delivered.append(tid),
                   upload_output=self._take_output)
        w.start()
        self.workers.append((w, store))
        return w

    def _take_output(self, task_id: str, text: str) -> None:
        self.output_open.wait(30)
        self.output.append(text)

    def close(self) -> None:
        self.output_open.set()
        for w, store in self.workers:
            w.close()
            store.close()


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path / "state")
    yield n
    n.close()


def req(task_id: str) -> ExecuteRequest:
    return ExecuteRequest(task_id, archive(), 0, 0, 1, 0, "test")


def test_accepted_not_started_is_started_once_after_the_restart(node: Node) -> None:
    a_ex = FakeExecutor()
    a = node.worker(a_ex)
    # Worker A answered yes (the archive is on disk), then died before its runner started it.
    a._spawn = lambda *args, **kw: None            # type: ignore[method-assign]
    assert a.execute(req("t1")).accepted
    assert (node.state / "tasks" / "t1" / "archive.zip").exists()
    b_ex = FakeExecutor()
    b = node.worker(b_ex)
    assert b.recover()["restarted"] == 1
    wait_for(lambda: b_ex.started == ["t1"], 10, "t1 started by B")
    assert b.execute(req("t1")).message.endswith("already running here")
    b_ex.release["t1"].set()
    wait_for(lambda: node.delivered == ["t1"], 10, "t1's result")
    assert b_ex.started == ["t1"] and a_ex.started == []


def test_a_finished_task_owes_its_result_until_the_pool_has_it(node: Node) -> None:
    """The drain's wait: between the runner's end and the uploader's queue the result waits behind
    the task's last output, and a drain that asked only the uploader saw nothing owed there."""
    ex = LastWordExecutor()
    w = node.worker(ex)
    assert w.execute(req("t1")).accepted
    wait_for(lambda: ex.started == ["t1"] and node.output, 10, "t1 started, its first line sent")
    node.output_open.clear()            # the last output (and so the result) waits for the pool
    ex.release["t1"].set()
    assert w.wait_idle(10), "the runner did not end"
    assert w.running_count() == 0 and w.uploader.pending() == 0
    assert w.results_owed() == 1, "a result behind its output must count as owed"
    node.output_open.set()
    wait_for(lambda: node.delivered == ["t1"], 10, "t1's result")
    wait_for(lambda: w.results_owed() == 0, 10, "nothing owed once the pool has it")


def test_accepted_without_archive_is_forgotten_so_the_retry_is_admitted(node: Node) -> None:
    a = node.worker(FakeExecutor())
    a._persist_archive = lambda task_id, data: None  # type: ignore[method-assign]
    a._spawn = lambda *args, **kw: None            # type: ignore[method-assign]
    assert a.execute(req("t1")).accepted           # (the kill came before the answer left)
    b_ex = FakeExecutor()
    b = node.worker(b_ex)
    assert b.recover()["forgotten"] == 1
    assert b.execute(req("t1")).accepted, "the pool's retry must be admitted"
    wait_for(lambda: b_ex.started == ["t1"], 10, "t1 started")


def test_started_without_handle_is_reported_lost_not_started_again(node: Node) -> None:
    a = node.worker(FakeExecutor())
    a._spawn = lambda *args, **kw: None            # type: ignore[method-assign]
    assert a.execute(req("t1")).accepted
    (node.state / "tasks" / "t1" / "starting").touch()   # executor.start called, handle not saved
    b_ex = FakeExecutor()
    b = node.worker(b_ex)
    assert b.recover()["reaped"] == 1
    wait_for(lambda: node.delivered == ["t1"], 10, "t1's result")
    assert b_ex.started == []
    rec = b.lifecycle.get("t1")
    assert rec is not None and rec.reason == "lost"


def test_reattach_resumes_after_the_last_line_of_the_log(node: Node) -> None:
    a_ex = FakeExecutor()
    a = node.worker(a_ex)
    assert a.execute(req("t1")).accepted
    wait_for(lambda: a_ex.started == ["t1"] and a.store.get("t1").handle is not None, 10, "started")
    wait_for(lambda: "hello\n" in node.output, 10, "the first line at the pool")
    b_ex = FakeExecutor()
    b = node.worker(b_ex)                          # A is abandoned with t1 running
    assert b.recover()["reattached"] == 1
    wait_for(lambda: b_ex.recovered, 10, "recover called")
    assert b_ex.recovered == [("t1", {"stdout": 1})]
    b_ex.release["t1"].set()
    wait_for(lambda: node.delivered == ["t1"], 10, "t1's result")
    assert "".join(node.output) == "hello\nafter the restart\n"


def test_a_pending_result_is_resent_never_reattached(node: Node) -> None:
    a_ex = FakeExecutor()
    a = node.worker(a_ex)
    a.uploader.stop()                              # A dies before any upload
    a._finished_run = lambda res: None             # type: ignore[method-assign]
    a._released = lambda res: None                 # type: ignore[method-assign,assignment,return-value]
    assert a.execute(req("t1")).accepted
    wait_for(lambda: "t1" in a_ex.release, 10, "started")
    a_ex.release["t1"].set()
    wait_for(lambda: a.store.pending_results(), 10, "result pending")
    assert a.store.get("t1").record.state is TaskState.RUNNING   # killed before UPLOADING
    b_ex = FakeExecutor()
    b = node.worker(b_ex)
    assert b.recover()["results_requeued"] == 1
    wait_for(lambda: node.delivered == ["t1"], 10, "t1's result")
    assert b_ex.recovered == [] and b_ex.started == []
    wait_for(lambda: b.lifecycle.get("t1").state is TaskState.DONE, 10, "done")
