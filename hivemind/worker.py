"""The worker's task side: admission, one runner per task, durable state, results, recovery.

It implements the gRPC service's TaskAcceptor (execute, stop) and knows nothing of sockets,
signals or systemd (that is the daemon's job). All task state goes through the one Lifecycle;
the store mirrors each transition, so a restarted worker knows what it had.

Durable before visible: ExecuteTask answers success only once the task's row is committed and its
archive is fsynced (file and directory). What a restart finds, and does (hivemind.faults names the
points a test kills the worker at):

    row, no archive, no handle        the pool never heard yes: forgotten, its retry is admitted
    row + archive, no handle          not started yet: started now (once: see `starting`)
    `starting` marker, no handle      may have started: reported lost (never started twice)
    handle, no pending result         reattached; an exited task's real result is collected
    pending result                    leftovers removed, the output rest and the result resent
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivemind import faults
from hivemind.archive import ArchiveRules, inspect_task_archive
from hivemind.config import Config
from hivemind.errors import ArchiveRejected, TaskNotFound
from hivemind.executors.base import Executor, ExitReason, ExitResult, Limits, TaskHandle
from hivemind.executors.disk_quota import DiskQuota
from hivemind.metrics.cpuscore import cpus_for_score
from hivemind.output import OutputStreamer, TaskOutput
from hivemind.runner import RunnerPaths, RunnerResult, TaskRunner
from hivemind.server.service import Decision, ExecuteRequest
from hivemind.tasks.ids import InvalidTaskId, describe_id, validate_task_id
from hivemind.tasks.state import Lifecycle, Outcome, Resources, TaskRecord, TaskState
from hivemind.tasks.store import TaskStore, follow, fsync_file, restore_lifecycle
from hivemind.uploader import PendingResult, ResultUploader

GIB = 1024 ** 3
ACTIVE = (TaskState.ACCEPTED, TaskState.PREPARING, TaskState.RUNNING)


@dataclass(frozen=True)
class Capacity:
    total_cpus: float
    total_memory_bytes: int
    reserve_cpus: float
    reserve_memory_bytes: int
    slots: int
    gpus: tuple[str, ...]
    cpu_score_per_core: float
    gpu_memory_mib: tuple[int, ...] = ()   # per entry of `gpus`; empty when unknown

    def for_tasks(self) -> Resources:
        return Resources(cpus=max(0.0, self.total_cpus - self.reserve_cpus),
                         memory_bytes=max(0, self.total_memory_bytes - self.reserve_memory_bytes),
                         gpus=self.gpus, slots=self.slots)


class Worker:
    def __init__(self, cfg: Config, *, executor: Executor, lifecycle: Lifecycle, store: TaskStore,
                 capacity: Capacity, logger: logging.Logger,
                 upload_output: Callable[[str, str], None] | None = None,
                 upload_result: Callable[[str, Path], None] | None = None,
                 on_output_line: Callable[[str, Any], None] | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] = lambda name, info: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.executor = executor
        self.lifecycle = lifecycle
        self.store = store
        self.capacity = capacity
        self._log = logger
        self._clock = clock
        self._on_output_line = on_output_line
        self._on_event = on_event
        self._rules = ArchiveRules.from_config(cfg.archive)
        self._runners: dict[str, TaskRunner] = {}
        self._answered: dict[str, float] = {}   # last "already running" answer per task
        self._finished: collections.OrderedDict[str, RunnerResult] = collections.OrderedDict()
        self._lock = threading.Lock()
        # Worker facts every task record names (the daemon sets auth_mode once the server runs).
        self.context: dict[str, str] = {}
        self.draining = False
        self._dirs = _Dirs(cfg.state_dir)
        ex = cfg.executor
        self.quota = DiskQuota(ex.disk_quota_mb * 1024 * 1024, ex.disk_reserve_mb * 1024 * 1024,
                               cfg.state_dir / "disk-quota", logger)
        self.streamer = OutputStreamer(upload_output or (lambda tid, text: None),
                                       cfg.pool.output_flush_interval_s,
                                       cfg.pool.output_batch_max_kb * 1024, logger)
        self.uploader = ResultUploader(upload_result or _no_pool, self._result_delivered, logger,
                                       on_failure=lambda: on_event("upload_failed", {}),
                                       on_given_up=self._result_given_up, clock=clock)
        follow(lifecycle, store)  # every transition is persisted before anything else sees it
        lifecycle.subscribe(self._transition_event)

    # -- lifecycle of the worker ---------------------------------------------------------------
    def start(self) -> None:
        self._dirs.create()
        self.streamer.start()
        self.uploader.start()

    def close(self) -> None:
        self.quota.close()
        self.streamer.flush_all()
        self.streamer.stop()
        self.uploader.stop()

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded config (only live-safe differences; see daemon.LIVE_SECTIONS)."""
        self.cfg = cfg
        self._rules = ArchiveRules.from_config(cfg.archive)

    # -- TaskAcceptor --------------------------------------------------------------------------
    def execute(self, req: ExecuteRequest) -> Decision:
        try:
            task_id = validate_task_id(req.task_id)
        except InvalidTaskId as exc:
            return Decision(False, str(exc))
        if self.draining:
            return Decision(False, "worker is draining and takes no new tasks")
        size = len(req.task_zip)
        if size == 0:
            return Decision(False, "task archive is empty")
        if size > self._rules.max_archive_bytes:
            return Decision(False, f"task archive of {size} bytes exceeds the cap of {self._rules.max_archive_bytes} bytes")
        request = self._request_for(req)
        if isinstance(request, str):
            return Decision(False, request)
        # A full worker (or one that knows the id: admit answers duplicates) says so before
        # reading the archive: a pool retrying a busy node costs it one lock, not a zip parse.
        known = self.lifecycle.known(task_id)
        busy = "" if known else self.lifecycle.refusal(request)
        if busy:
            return Decision(False, busy)
        if not known:
            try:
                inspect_task_archive(req.task_zip, self._rules)
            except ArchiveRejected as exc:
                self._log.info("task %s refused: %s", task_id, exc,
                               extra={"task_id": task_id, "event": "task.refused"})
                return Decision(False, f"archive rejected: {exc}")
        wants_gpu = req.gpu_score > 0 or req.gpu_memory_gb > 0
        if wants_gpu:
            gpu, why = self._pick_gpu(req.gpu_memory_gb)
            if gpu is None:
                return Decision(False, why)
            request = dataclasses.replace(request, gpus=(gpu,))
        adm = self.lifecycle.admit(task_id, request)
        if not adm.ok:
            rec = self.lifecycle.get(task_id)
            if adm.duplicate and rec is not None and rec.state in ACTIVE:
                # The pool marks the task RUNNING once this answer arrives, over a result it
                # may already hold: the result waits for the same delay after this answer too.
                with self._lock:
                    self._answered[task_id] = self._clock()
                return Decision(True, f"task {task_id} is already running here")
            self._log.info("task %s not admitted: %s", task_id, adm.reason,
                           extra={"task_id": task_id, "event": "task.not_admitted"})
            return Decision(False, adm.reason)
        granted = adm.granted or request
        try:
            faults.hit("accepted_before_persist", task_id)
            self._persist_archive(task_id, req.task_zip)
            faults.hit("archive_persisted", task_id)
            self._spawn(task_id, granted, req.task_zip, accepted_at=self._clock())
        except OSError as exc:  # e.g. the state directory is full: give the reservation back
            self.lifecycle.advance(task_id, TaskState.FAILED, message=f"could not start: {exc}"[:500])
            self._log.error("task %s could not be started: %s", task_id, exc,
                            extra={"task_id": task_id, "event": "task.spawn_failed"})
            return Decision(False, f"worker could not start the task: {type(exc).__name__}")
        self._log.info("task %s accepted: %.2f CPUs, %d MiB, %d bytes archive", task_id, granted.cpus,
                       granted.memory_bytes // (1024 * 1024), size,
                       extra={"task_id": task_id, "event": "task.accepted"})
        return Decision(True, "accepted")

    def stop(self, task_id: str, peer: str = "") -> Decision:
        try:
            task_id = validate_task_id(task_id)
        except InvalidTaskId:
            return Decision(False, f"unknown task {describe_id(task_id)}")
        with self._lock:
            runner = self._runners.get(task_id)
        if runner is None:
            rec = self.lifecycle.get(task_id)
            if rec is not None:
                return Decision(True, f"task {task_id} already ended ({rec.state.value})")
            return Decision(False, f"unknown task {task_id}")
        runner.request_stop(f"stopped by {peer or 'the pool'}")
        return Decision(True, f"stopping task {task_id}")

    # -- runs ----------------------------------------------------------------------------------
    def _request_for(self, req: ExecuteRequest) -> Resources | str:
        cap = self.capacity.for_tasks()
        for name, value in (("cpu_usage", req.cpu_score), ("gpu_usage", req.gpu_score)):
            if not math.isfinite(value) or value < 0:
                return f"{name} must be a finite number >= 0"
        if req.memory_gb < 0 or req.gpu_memory_gb < 0:
            return "memory_gb and gpu_memory_gb must be >= 0"
        memory = (req.memory_gb or self.cfg.resources.default_memory_gb) * GIB
        if memory > cap.memory_bytes:
            return f"requested {req.memory_gb} GiB memory but this node gives tasks at most {cap.memory_bytes // GIB} GiB"
        if cap.cpus <= 0:
            return "this node keeps all its CPUs for the system (resources.reserve_cpus)"
        cpus = cpus_for_score(req.cpu_score, int(self.capacity.cpu_score_per_core), cap.cpus)
        return Resources(cpus=cpus, memory_bytes=memory, slots=1)

    def _pick_gpu(self, memory_gb: int) -> tuple[str | None, str]:
        """The free GPU with the least memory that still covers the request, or (None, why).
        Only tasks that ask get a GPU, and only a free one (the Lifecycle re-checks at admit)."""
        if not self.capacity.gpus:
            return None, "this node has no GPU"
        mem = dict(zip(self.capacity.gpus, self.capacity.gpu_memory_mib, strict=False))
        free = [g for g in self.lifecycle.free().gpus if not mem or mem.get(g, 0) >= memory_gb * 1024]
        if not free:
            return None, f"no free GPU with at least {memory_gb} GiB of memory"
        return min(free, key=lambda g: (mem.get(g, 0), g)), ""

    def limit_notes(self) -> list[str]:
        """How disk and output are bounded here, for status (the executor's notes sit beside)."""
        return [f"disk quota: {self.quota.describe()}",
                f"output: {self.cfg.executor.max_output_mb} MiB kept per task (output.log and the "
                "container log), then marked truncated"]

    def _limits(self, granted: Resources) -> Limits:
        pc = self.cfg.executor.podman
        return Limits(cpus=granted.cpus, memory_bytes=granted.memory_bytes, pids=pc.pids_limit,
                      timeout_s=self.cfg.executor.task_timeout_s, tmpfs_bytes=pc.tmpfs_mb * 1024 * 1024,
                      network=pc.network == "outbound",
                      gpu_devices=tuple(f"nvidia.com/gpu={g}" for g in granted.gpus),
                      output_bytes=self.cfg.executor.max_output_mb * 1024 * 1024)

    def _persist_archive(self, task_id: str, data: bytes) -> None:
        """The archive on disk before the pool hears yes: a crash after the answer can't lose it."""
        path = self._dirs.paths(task_id).archive
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        # 0600: the worker's copy; the task (another user) gets only the extracted workspace.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_file(path)                  # the rename, in the task's directory
        fsync_file(path.parent)           # the task's directory, in tasks/

    def _spawn(self, task_id: str, granted: Resources, archive: bytes | Path | None, *,
               accepted_at: float, handle: TaskHandle | None = None) -> TaskRunner:
        paths = self._dirs.paths(task_id)
        self._dirs.make_private(paths)
        output = TaskOutput(task_id, paths.output_log, self._on_output_line,
                            max_bytes=self.cfg.executor.max_output_mb * 1024 * 1024)
        runner = TaskRunner(
            task_id, executor=self.executor, paths=paths, archive=archive, limits=self._limits(granted),
            labels={"hivemind.node_id": self.cfg.node_id}, node_id=self.cfg.node_id, rules=self._rules,
            max_result_bytes=self._result_cap(), stop_grace_s=self.cfg.executor.stop_grace_s,
            task_timeout_s=self.cfg.executor.task_timeout_s, output=output,
            advance=self._advance, started=lambda h: self._started(task_id, h),
            finished=self._finished_run, logger=self._log, accepted_at=accepted_at, handle=handle,
            clock=self._clock, quota=self.quota, result_ready=self._result_ready,
            released=self._released, context=self.context)
        with self._lock:
            self._runners[task_id] = runner
        self.streamer.add(output)
        runner.start()
        return runner

    def _result_cap(self) -> int:
        return self.cfg.archive.max_result_mb * 1024 * 1024

    def _advance(self, task_id: str, state: str) -> None:
        rec = self.lifecycle.get(task_id)
        if rec is not None and rec.state is TaskState(state):
            return   # a task restarted after a crash in `preparing` passes it again
        self.lifecycle.advance(task_id, TaskState(state), executor=self.executor.name)

    def _started(self, task_id: str, handle: TaskHandle) -> None:
        self.store.save_handle(task_id, handle)
        paths = self._dirs.paths(task_id)
        for done_with in (paths.archive, paths.starting):   # from now on the handle says it all
            if done_with is not None:
                done_with.unlink(missing_ok=True)

    def _result_ready(self, res: RunnerResult) -> None:
        """The result is packed and fsynced: record it as pending before anything is removed and
        before any pool call."""
        self.store.mark_result_pending(res.record["task_id"], res.result_zip)

    def _released(self, res: RunnerResult) -> TaskRecord:
        """The run is over and its result pending: UPLOADING gives the reservation back, so
        the next task is admitted while this one's container and workspace are removed. (A crash
        before the removal ends leaves an orphan container and mount, which recovery sweeps.)"""
        task_id = res.record["task_id"]
        rec = self.lifecycle.get(task_id)
        if rec is not None and rec.state not in ACTIVE:
            return rec
        return self.lifecycle.advance(task_id, TaskState.UPLOADING, outcome=_outcome(res.exit),
                                      exit_code=res.exit.exit_code, reason=res.exit.reason.value,
                                      message=res.exit.message[:500])

    def _finished_run(self, res: RunnerResult) -> None:
        task_id = res.record["task_id"]
        rec = self._released(res)
        with self._lock:
            self._runners.pop(task_id, None)
            self._finished[task_id] = res
            while len(self._finished) > 200:
                self._finished.popitem(last=False)
            answered = self._answered.pop(task_id, 0.0)
        self._on_event("task_finished", {"task_id": task_id, "duration": (res.exit.finished_at or 0) - (res.exit.started_at or 0),
                                         "record": res.record})
        not_before = max(rec.accepted_at, answered) + self.cfg.pool.result_min_delay_s
        # The output's rest reaches the pool before the result, however long the pool is away.
        self.streamer.finish(task_id, then=lambda: self._queue_result(
            PendingResult(task_id, res.result_zip, not_before)))

    def _queue_result(self, item: PendingResult) -> None:
        faults.hit("result_handoff", item.task_id)
        self.uploader.submit(item)

    def _result_delivered(self, task_id: str) -> None:
        rec = self.lifecycle.get(task_id)
        if rec is not None and rec.state is TaskState.UPLOADING:
            final = {Outcome.SUCCEEDED: TaskState.DONE, Outcome.STOPPED: TaskState.STOPPED}.get(
                rec.outcome or Outcome.FAILED, TaskState.FAILED)
            self.lifecycle.advance(task_id, final)
        self.store.result_acknowledged(task_id)
        shutil.rmtree(self._dirs.task_dir(task_id), ignore_errors=True)

    def _result_given_up(self, task_id: str, why: str) -> None:
        rec = self.lifecycle.get(task_id)
        if rec is not None and rec.state is TaskState.UPLOADING:
            self.lifecycle.advance(task_id, TaskState.FAILED, message=f"result refused by the pool: {why}"[:500])
        self.store.result_acknowledged(task_id)
        shutil.rmtree(self._dirs.task_dir(task_id), ignore_errors=True)

    def _transition_event(self, task_id: str, old: TaskState | None, new: TaskState) -> None:
        self._on_event("state", {"task_id": task_id, "old": old, "new": new})

    # -- recovery ------------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """After a restart: start, reattach or reap the tasks the store knows, resend pending
        output and results, remove orphans (labelled containers/processes and workspaces nobody
        owns). See the table at the top of this module."""
        counts = {"reattached": 0, "restarted": 0, "reaped": 0, "forgotten": 0,
                  "results_requeued": 0, "orphans_removed": 0}
        pending = dict(self.store.pending_results())
        for stored in self.store.tasks(ACTIVE):
            paths = self._dirs.paths(stored.record.task_id)
            if (stored.record.state is TaskState.ACCEPTED and stored.handle is None
                    and stored.record.task_id not in pending and paths.archive is not None
                    and not paths.archive.exists()):
                # Killed before the archive was persisted: ExecuteTask never answered yes.
                self.store.discard(stored.record.task_id)
                shutil.rmtree(self._dirs.task_dir(stored.record.task_id), ignore_errors=True)
                counts["forgotten"] += 1
        records = restore_lifecycle(self.lifecycle, self.store)
        for stored in records:
            rec = stored.record
            paths = self._dirs.paths(rec.task_id)
            if rec.task_id in pending:
                if rec.state in ACTIVE:
                    self._settle_pending(rec, pending[rec.task_id])
                continue
            if rec.state not in ACTIVE:
                continue
            extra = {"task_id": rec.task_id}
            if stored.handle is not None:
                self._spawn(rec.task_id, rec.granted, None, accepted_at=rec.accepted_at,
                            handle=stored.handle)
                counts["reattached"] += 1
                self._log.info("reattaching task %s", rec.task_id, extra={**extra, "event": "task.reattach"})
            elif paths.starting is not None and paths.starting.exists():
                self._reap(rec, "the worker died while starting the task; it may have run in part, "
                                "so it is not started again")
                counts["reaped"] += 1
            elif paths.archive is not None and paths.archive.exists():
                self._release_quota(rec.task_id)                     # a half-done extraction:
                shutil.rmtree(paths.workspace, ignore_errors=True)   # the run starts afresh
                self._spawn(rec.task_id, rec.granted, paths.archive, accepted_at=rec.accepted_at)
                counts["restarted"] += 1
                self._log.info("starting task %s accepted before the restart", rec.task_id,
                               extra={**extra, "event": "task.restart"})
            else:
                self._reap(rec, "the worker restarted before the task started")
                counts["reaped"] += 1
        for task_id, path in self.store.pending_results():
            known = self.lifecycle.get(task_id)
            accepted = known.accepted_at if known else 0.0
            not_before = accepted + self.cfg.pool.result_min_delay_s
            output = TaskOutput(task_id, self._dirs.paths(task_id).output_log)
            output.close()
            self.streamer.add(output)
            self.streamer.finish(task_id, then=functools.partial(
                self._queue_result, PendingResult(task_id, path, not_before)))
            counts["results_requeued"] += 1
        with self._lock:
            live = set(self._runners)
        for orphan in self.executor.orphans():
            if orphan not in live:
                self._log.warning("removing orphan task %s left by the executor", orphan,
                                  extra={"task_id": orphan, "event": "task.orphan_removed"})
                with contextlib.suppress(TaskNotFound):
                    self.executor.stop(orphan, 0)
                self.executor.cleanup(orphan)
                counts["orphans_removed"] += 1
        # Before any task directory is removed: a mounted workspace would be emptied, not freed.
        pids = getattr(self.executor, "mount_namespace_pids", None)
        self.quota.sweep(self._dirs.tasks_root, keep=live,
                         namespaces=list(pids()) if callable(pids) else [])
        pending_now = {tid for tid, _ in self.store.pending_results()}
        for d in self._dirs.tasks_root.iterdir() if self._dirs.tasks_root.exists() else []:
            if d.name not in live and d.name not in pending_now:
                shutil.rmtree(d, ignore_errors=True)
        if any(counts.values()):
            self._log.info("recovery: %s", ", ".join(f"{k}={v}" for k, v in counts.items()),
                           extra={"event": "worker.recovered"})
        return counts

    def _release_quota(self, task_id: str) -> None:
        """Unmount a workspace filesystem a killed worker left (rmtree would only empty it)."""
        pids = getattr(self.executor, "mount_namespace_pids", None)
        self.quota.release(task_id, self._dirs.paths(task_id).workspace,
                           list(pids()) if callable(pids) else [])

    def _settle_pending(self, rec: TaskRecord, zip_path: Path) -> None:
        """Killed between "result pending" and the end of the run: finish what the runner would
        have done (remove the container and workspace, enter UPLOADING with the packed outcome)."""
        with contextlib.suppress(Exception):
            self.executor.cleanup(rec.task_id)
        paths = self._dirs.paths(rec.task_id)
        self._release_quota(rec.task_id)
        shutil.rmtree(paths.workspace, ignore_errors=True)
        for leftover in (paths.archive, paths.starting):
            if leftover is not None:
                leftover.unlink(missing_ok=True)
        try:
            with zipfile.ZipFile(zip_path) as zf:
                record = json.loads(zf.read("_hivemind/execution.json"))
            outcome = Outcome(record.get("status", "failed")) if record.get("status") in (
                "succeeded", "failed", "stopped") else Outcome.FAILED
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            record, outcome = {}, Outcome.FAILED
        self.lifecycle.advance(rec.task_id, TaskState.UPLOADING, outcome=outcome,
                               exit_code=record.get("exit_code"), reason=str(record.get("reason", "")),
                               message=str(record.get("message") or "")[:500],
                               executor=self.executor.name)

    def _reap(self, rec: TaskRecord, why: str) -> None:
        """A task that can't continue: pack what is left into a failure result and upload it."""
        now = self._clock()
        paths = self._dirs.paths(rec.task_id)
        self._dirs.make_private(paths)
        output = TaskOutput(rec.task_id, paths.output_log,
                            max_bytes=self.cfg.executor.max_output_mb * 1024 * 1024)
        runner = TaskRunner(
            rec.task_id, executor=self.executor, paths=paths, archive=None,
            limits=self._limits(rec.granted), labels={}, node_id=self.cfg.node_id, rules=self._rules,
            max_result_bytes=self._result_cap(), stop_grace_s=0, task_timeout_s=1, output=output,
            advance=self._advance, started=lambda h: None, finished=self._finished_run,
            logger=self._log, accepted_at=rec.accepted_at, clock=self._clock, quota=self.quota,
            result_ready=self._result_ready, released=self._released,
            context=self.context)
        with self._lock:
            self._runners[rec.task_id] = runner
        self.streamer.add(output)
        runner.finish_now(ExitResult(None, ExitReason.LOST, rec.started_at or now, now, message=why))

    # -- reading -------------------------------------------------------------------------------
    def runners(self) -> list[TaskRunner]:
        with self._lock:
            return list(self._runners.values())

    def runner(self, task_id: str) -> TaskRunner | None:
        with self._lock:
            return self._runners.get(task_id)

    def finished_result(self, task_id: str) -> RunnerResult | None:
        with self._lock:
            return self._finished.get(task_id)

    def running_count(self) -> int:
        with self._lock:
            return len(self._runners)

    def is_idle(self) -> bool:
        """Whether the pool may send one more task: the pool dispatches only to `Idle` nodes."""
        if self.draining:
            return False
        # Idle only when a default request (score 0: one core, resources.default_memory_gb) would
        # be admitted: the pool sends whatever it has to an Idle node, a refusal costs it a round
        # and a whole archive transfer.
        cap = self.capacity.for_tasks()
        if cap.cpus <= 0:
            return False
        default = self._request_for(ExecuteRequest("idle-probe", b"", 0.0, 0.0, 0, 0, ""))
        if isinstance(default, str):
            return False
        free = self.lifecycle.free()
        return (free.slots >= 1 and free.cpus + 1e-9 >= default.cpus
                and free.memory_bytes >= default.memory_bytes)

    def drain(self) -> None:
        if not self.draining:
            self.draining = True
            self._log.info("draining: no new tasks", extra={"event": "worker.draining"})

    def stop_all(self, reason: str) -> None:
        for r in self.runners():
            r.request_stop(reason)

    def results_owed(self) -> int:
        """Results packed and not yet acknowledged by the pool, wherever they are on the way
        (still behind the task's last output, or in the uploader's queue): the store's count,
        since a result leaves the runner before it reaches the uploader."""
        return self.store.pending_result_count()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(r.join(max(0.0, deadline - time.monotonic())) for r in self.runners())


def _outcome(res: ExitResult) -> Outcome:
    if res.reason == ExitReason.STOPPED:
        return Outcome.STOPPED
    if res.reason == ExitReason.EXITED and res.exit_code == 0:
        return Outcome.SUCCEEDED
    return Outcome.FAILED


def _no_pool(task_id: str, path: Path) -> None:
    raise OSError("no pool configured")


class _Dirs:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self.tasks_root = state_dir / "tasks"

    def create(self) -> None:
        self.tasks_root.mkdir(parents=True, exist_ok=True)
        self.tasks_root.chmod(0o711)

    def task_dir(self, task_id: str) -> Path:
        return self.tasks_root / task_id

    @staticmethod
    def make_private(paths: RunnerPaths) -> None:
        """A task dir only its task's user may pass through (to its workspace, which the
        executor makes 0700 for it); output log and result 0600, root's (or the worker's)."""
        d = paths.workspace.parent
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o711 if os.geteuid() == 0 else 0o700)
        for f in (paths.output_log, paths.result_zip):
            with contextlib.suppress(FileNotFoundError):
                f.chmod(0o600)
        if not paths.output_log.exists():
            os.close(os.open(paths.output_log, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))

    def paths(self, task_id: str) -> RunnerPaths:
        d = self.task_dir(task_id)
        return RunnerPaths(workspace=d / "workspace", output_log=d / "output.log",
                           result_zip=d / "result.zip", archive=d / "archive.zip",
                           starting=d / "starting")
