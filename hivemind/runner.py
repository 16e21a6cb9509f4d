"""One task's run, in its own thread: extract → prepare → start → wait → pack the result.

The order at the end is what makes a crash harmless (fault points in brackets):

    task ends [task_exited] → output log closed → result.zip packed and fsynced [result_packed]
      → `result_ready`: the worker records "result pending" [result_pending]
      → `released`: the slot is free for the next task
      → container/processes and workspace removed → `finished`: output rest, then the upload

Until "result pending" is committed, the container (or the venv task's exit record) and the
workspace are still there, so a restarted worker reattaches and packs the same result again;
after it, the restarted worker only resends. Never is a LOST result packed over a real one.

The runner knows nothing about gRPC or the pool: it reports through the callbacks it is given
(`advance` for state changes, `finished` with the packed result) and talks to its executor only
through the narrow Executor interface. Stop requests arrive as an event; the runner turns them
into `executor.stop(grace)` at whatever phase the task is in (a stop during pip install cancels it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivemind import faults
from hivemind.archive import ArchiveRules, extract_task_archive, pack_result
from hivemind.errors import HivemindError, TaskNotFound
from hivemind.executors.base import (
    Executor,
    ExitReason,
    ExitResult,
    Limits,
    PrepareCancelled,
    TaskFacts,
    TaskHandle,
    TaskSpec,
)
from hivemind.executors.disk_quota import NO_QUOTA, POLL_INTERVAL_S, DiskQuota, QuotaInfo
from hivemind.output import TaskOutput
from hivemind.tasks.entry import discover_entry, find_requirements
from hivemind.tasks.record import build_record
from hivemind.tasks.store import fsync_file
from hivemind.tasks.timing import PhaseClock
from hivemind.tasks.usage import UsageTracker

STATS_INTERVAL_S = 2.0


@dataclass
class RunnerPaths:
    workspace: Path        # the task's cwd
    output_log: Path
    result_zip: Path
    archive: Path | None = None    # the persisted task archive (read when no bytes are given)
    starting: Path | None = None   # marker: executor.start was called, the handle may not be saved


@dataclass
class RunnerResult:
    exit: ExitResult
    result_zip: Path
    truncated: bool
    record: dict[str, Any]
    output_tail: list[str] = field(default_factory=list)   # for the status API after the run


class TaskRunner:
    def __init__(self, task_id: str, *, executor: Executor, paths: RunnerPaths,
                 archive: bytes | Path | None, limits: Limits,
                 labels: dict[str, str], node_id: str, rules: ArchiveRules, max_result_bytes: int,
                 stop_grace_s: float, task_timeout_s: float, output: TaskOutput,
                 advance: Callable[[str, str], None], started: Callable[[TaskHandle], None],
                 finished: Callable[[RunnerResult], None], logger: logging.Logger,
                 accepted_at: float, handle: TaskHandle | None = None,
                 clock: Callable[[], float] = time.time, quota: DiskQuota | None = None,
                 result_ready: Callable[[RunnerResult], None] = lambda res: None,
                 released: Callable[[RunnerResult], object] = lambda res: None,
                 context: Mapping[str, str] | None = None) -> None:
        self.task_id = task_id
        self._executor = executor
        self._paths = paths
        self._archive = archive
        self._limits = limits
        self._labels = labels
        self._node_id = node_id
        self._rules = rules
        self._max_result = max_result_bytes
        self._grace = stop_grace_s
        self._timeout = task_timeout_s
        self.output = output
        self._advance = advance
        self._started_cb = started
        self._finished_cb = finished
        self._result_ready_cb = result_ready
        self._released_cb = released
        self._log = logger
        self._clock = clock
        self._handle = handle            # set: reattach to a task an earlier daemon started
        self._quota = quota
        self.quota_info: QuotaInfo = NO_QUOTA
        self.quota_hit = False
        self.accepted_at = accepted_at
        self.timing = PhaseClock(accepted_at, clock)
        self.started_at: float | None = None
        self.stop_requested = threading.Event()
        self.stop_reason = ""
        self.usage = UsageTracker()
        self._context = context if context is not None else {}
        # Kept in the handle too, so a restarted worker's record still names the archive.
        self.archive_sha256: str | None = (hashlib.sha256(archive).hexdigest() if isinstance(archive, bytes)
                                           else (handle.state.get("archive_sha256") if handle else None))
        self._facts: TaskFacts | None = None
        self._thread = threading.Thread(target=self._run, name=f"task-{task_id}", daemon=True)
        self._extra = {"task_id": task_id}

    def start(self) -> None:
        self._thread.start()

    def request_stop(self, reason: str = "stopped by the pool") -> None:
        if not self.stop_requested.is_set():
            self.stop_reason = reason
            self.stop_requested.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # -- the run --------------------------------------------------------------------------------
    def _run(self) -> None:
        result: ExitResult
        try:
            if self._handle is not None:
                if self._quota is not None:
                    self.quota_info = self._quota.resume(self.task_id, self._paths.workspace)
                # Resume after the last line the log holds: nothing twice, nothing skipped.
                self._executor.recover(self._handle, self.output, resume=self.output.positions())
                self.started_at = float(self._handle.state.get("started_at", self._clock()))
                result = self._wait()
            else:
                result = self._fresh_run()
        except TaskNotFound:
            now = self._clock()
            result = ExitResult(None, ExitReason.LOST, now, now,
                                message="the worker restarted and nothing of the task was left")
        except Exception as exc:
            now = self._clock()
            msg = str(exc) if isinstance(exc, HivemindError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, HivemindError):
                self._log.exception("task %s failed in the worker", self.task_id,
                                    extra={**self._extra, "event": "task.internal_error"})
            result = ExitResult(None, ExitReason.FAILED_TO_START, self.started_at or now, now, message=msg)
        faults.hit("task_exited", self.task_id)
        self._finish(result)

    def _fresh_run(self) -> ExitResult:
        self._advance(self.task_id, "preparing")
        ws = self._paths.workspace
        ws.mkdir(parents=True, exist_ok=True)
        if self._quota is not None:
            # Before extraction: the archive's files count toward the quota too.
            self.quota_info = self._quota.apply(self.task_id, ws, self._mount_namespaces())
            self.timing.mark("quota")
        archive = self._archive
        if isinstance(archive, Path):
            archive = archive.read_bytes()
        assert archive is not None
        self.archive_sha256 = self.archive_sha256 or hashlib.sha256(archive).hexdigest()
        extract_task_archive(archive, ws, self._rules)
        # The archive may be hundreds of MB: don't keep it for the whole run.
        self._archive = archive = None
        self.timing.mark("workspace")
        faults.hit("preparing", self.task_id)
        entry = discover_entry(ws)
        timeout = min(self._timeout, entry.timeout_s) if entry.timeout_s else self._timeout
        limits = dataclasses.replace(self._limits, timeout_s=timeout)
        self._limits = limits           # the record names the timeout that really applied
        spec = TaskSpec(task_id=self.task_id, workspace=ws, entry=entry, limits=limits,
                        requirements=find_requirements(ws), labels=self._labels)
        if self.stop_requested.is_set():
            now = self._clock()
            return ExitResult(None, ExitReason.STOPPED, now, now, message=self.stop_reason)
        try:
            # prepare() watches stop_requested itself, so a stop during pip install cancels it.
            self._executor.prepare(spec, self.output, self.stop_requested)
        except PrepareCancelled:
            now = self._clock()
            return ExitResult(None, ExitReason.STOPPED, now, now, message=self.stop_reason or "stopped")
        if self.stop_requested.is_set():
            now = self._clock()
            return ExitResult(None, ExitReason.STOPPED, now, now, message=self.stop_reason)
        self.timing.mark("prepared")
        self.started_at = self._clock()
        if self._paths.starting is not None:
            # A restarted worker that finds this without a handle can't know whether the task ran:
            # it reports it lost rather than starting it a second time.
            self._paths.starting.touch()
        handle = self._executor.start(spec, self.output)
        self.timing.mark("started")
        handle = dataclasses.replace(handle, state={**handle.state, "archive_sha256": self.archive_sha256})
        self._handle = handle
        self._started_cb(handle)
        self._advance(self.task_id, "running")
        faults.hit("running", self.task_id)
        self._log.info("task %s started (%s)", self.task_id, " ".join(entry.argv),
                       extra={**self._extra, "event": "task.started"})
        return self._wait()

    def _wait(self) -> ExitResult:
        next_stats = 0.0
        next_quota = 0.0
        stopping = False
        while True:
            res = self._executor.wait(self.task_id, timeout=0.5)
            if res is not None:
                if not self.quota_hit and res.reason in (ExitReason.EXITED, ExitReason.STOPPED) \
                        and res.exit_code != 0 and self._quota is not None \
                        and self._quota.exceeded(self.task_id):
                    self.quota_hit = True   # it failed on a full workspace before we saw it
                if self.quota_hit and res.reason in (ExitReason.EXITED, ExitReason.STOPPED):
                    res = ExitResult(res.exit_code, ExitReason.DISK_QUOTA, res.started_at,
                                     res.finished_at, res.peak_memory_bytes, res.cpu_seconds,
                                     f"disk quota of {self.quota_info.quota_bytes} bytes reached "
                                     f"({self.quota_info.method})")
                elif stopping and res.reason == ExitReason.EXITED:
                    res = ExitResult(res.exit_code, ExitReason.STOPPED, res.started_at, res.finished_at,
                                     res.peak_memory_bytes, res.cpu_seconds, self.stop_reason)
                return res
            if self._quota is not None and not self.quota_hit and time.monotonic() >= next_quota:
                # A real filesystem answers in microseconds; a polled workspace is walked.
                poll = 0.0 if self.quota_info.method == "loop-ext4" else POLL_INTERVAL_S
                next_quota = time.monotonic() + poll
                if self._quota.exceeded(self.task_id):
                    self.quota_hit = True
                    self.request_stop(f"disk quota of {self.quota_info.quota_bytes} bytes reached")
            if self.stop_requested.is_set() and not stopping:
                stopping = True
                self._log.info("stopping task %s: %s", self.task_id, self.stop_reason,
                               extra={**self._extra, "event": "task.stopping"})
                threading.Thread(target=self._executor.stop, args=(self.task_id, self._grace),
                                 daemon=True).start()
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + STATS_INTERVAL_S
                try:
                    u = self._executor.stats(self.task_id)
                except Exception:
                    u = None
                if u is not None:
                    self.usage.add(u)

    @property
    def limits(self) -> Limits:
        return self._limits

    def facts(self) -> TaskFacts:
        """What the task really got (applied limits, provenance); the last known after the run."""
        if self._facts is not None:
            return self._facts
        try:
            return self._executor.facts(self.task_id)
        except Exception:
            return TaskFacts()

    def _mount_namespaces(self) -> list[int]:
        # Rootless Podman's namespace may not see host mounts made after it started.
        pids = getattr(self._executor, "mount_namespace_pids", None)
        return list(pids()) if callable(pids) else []

    def finish_now(self, result: ExitResult) -> None:
        """Pack and report `result` without running anything (a task reaped after a restart)."""
        self._finish(result)

    def _finish(self, result: ExitResult) -> None:
        if result.finished_at:
            self.timing.mark("exited", result.finished_at)
        self.timing.mark("collected")
        if self.output.first_line_at is not None:
            self.timing.mark("first_output", self.output.first_line_at)
        self._facts = self.facts()      # kept: cleanup below makes the executor forget the task
        self.timing.merge(self._facts.timing)
        self.output.close()
        record = self.execution_record(result)
        self._paths.result_zip.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 before any byte is written: a task's result is root's (the worker's) only.
        os.close(os.open(self._paths.result_zip, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        os.chmod(self._paths.result_zip, 0o600)
        ws = self._paths.workspace if self._paths.workspace.is_dir() else None
        try:
            if ws is None:
                ws = self._paths.workspace
                ws.mkdir(parents=True, exist_ok=True)
            summary = pack_result(ws, self._paths.result_zip, record,
                                  self._paths.output_log if self._paths.output_log.exists() else None,
                                  self._max_result)
            truncated = summary.truncated
        except Exception as exc:
            self._log.exception("packing the result of %s failed", self.task_id,
                                extra={**self._extra, "event": "task.pack_failed"})
            record["message"] = (record.get("message") or "") + f"; result packing failed: {type(exc).__name__}"
            _write_minimal_result(self._paths.result_zip, record, self._paths.output_log)
            truncated = True
        fsync_file(self._paths.result_zip)
        self.timing.mark("packed")
        faults.hit("result_packed", self.task_id)
        res = RunnerResult(result, self._paths.result_zip, truncated, record, self.output.tail(50))
        # Durable before anything it stands for is removed: after this a restart only resends.
        self._result_ready_cb(res)
        faults.hit("result_pending", self.task_id)
        self.timing.mark("pending")
        # The task holds nothing any more (its process is gone, the result is safe): its slot
        # goes to the next task now, not after the container and workspace are removed.
        self._released_cb(res)
        self.timing.mark("released")
        try:
            self._executor.cleanup(self.task_id)
        except Exception as exc:
            self._log.warning("cleanup of %s failed: %s", self.task_id, exc,
                              extra={**self._extra, "event": "task.cleanup_failed"})
        if self._quota is not None:
            self._quota.release(self.task_id, self._paths.workspace, self._mount_namespaces())
        shutil.rmtree(self._paths.workspace, ignore_errors=True)
        for leftover in (self._paths.archive, self._paths.starting):
            if leftover is not None:
                leftover.unlink(missing_ok=True)
        self.timing.mark("removed")
        self._log.info("task %s ended: %s (exit code %s)", self.task_id, result.reason.value,
                       result.exit_code, extra={**self._extra, "event": "task.ended"})
        phases = self.timing.durations()
        self._log.info("task %s timing: %s", self.task_id,
                       ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in phases.items()),
                       extra={**self._extra, "event": "task.timing",
                              "timing": json.dumps(phases, separators=(",", ":"))})
        self._finished_cb(res)

    def execution_record(self, result: ExitResult) -> dict[str, Any]:
        return build_record(task_id=self.task_id, result=result, accepted_at=self.accepted_at,
                            started_at=self.started_at, node_id=self._node_id,
                            executor=self._executor.name, limits=self._limits, facts=self.facts(),
                            tracker=self.usage, archive_sha256=self.archive_sha256,
                            context=self._context, extra={
                                "output": self.output.summary(),
                                # Seconds after acceptance at which each phase ended.
                                "timing": self.timing.since_accepted(),
                                # What the executor could really give this task (venv: uid,
                                # namespaces), as it said.
                                "isolation": dict(self._handle.state.get("isolation") or {})
                                if self._handle else None,
                                "disk_quota": self.quota_info.record(
                                    self._quota.used(self.task_id) if self._quota is not None else None,
                                    self.quota_hit)})


def _write_minimal_result(path: Path, record: dict[str, Any], output_log: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("_hivemind/execution.json", json.dumps(record, indent=2, default=str))
        if output_log.exists():
            zf.write(output_log, "_hivemind/output.log")
