"""The daemon's StatusView: what the status API and the monitor page read. Cheap, thread-safe,
no blocking I/O (the machine snapshot is refreshed by the daemon's main loop, not here)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hivemind import __version__
from hivemind.executors.base import ExecutorStatus
from hivemind.pool.session import PoolSession
from hivemind.status.view import (
    Enforces,
    ExecutorInfo,
    PoolInfo,
    ResourcesInfo,
    SlotsInfo,
    StatusDict,
    TaskDict,
    WarningInfo,
    security_info,
)
from hivemind.tasks.state import TaskRecord
from hivemind.tasks.usage import task_percentages
from hivemind.worker import Worker

MAX_WARNINGS = 50


@dataclass
class MachineSample:
    cpu_percent: float = 0.0
    memory_used: int = 0


@dataclass
class ViewState:
    started_at: float = field(default_factory=time.time)
    metrics_backend: str = "psutil"
    grpc_auth_mode: str = "legacy"
    pool_tls: bool = False
    pool_protocol: str = ""
    pool_limitations: list[str] = field(default_factory=list)
    reported_status: str = ""
    machine: MachineSample = field(default_factory=MachineSample)


class WarningLog(logging.Handler):
    """Keeps the most recent warnings and errors for the status page (already redacted by the
    redaction filter on the way in, and never the text of task output)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.items: collections.deque[WarningInfo] = collections.deque(maxlen=MAX_WARNINGS)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "hivemind_output", None):
            return
        try:
            msg = record.getMessage()
        except Exception:
            msg = str(record.msg)
        self.items.append(WarningInfo(ts=record.created, level="error" if record.levelno >= logging.ERROR else "warning",
                                      message=msg[:300]))


class WorkerView:
    def __init__(self, worker: Worker, executor_status: Callable[[], ExecutorStatus],
                 session: PoolSession | None, state: ViewState, warnings: WarningLog,
                 pool_address: str) -> None:
        self._worker = worker
        self._executor_status = executor_status
        self._session = session
        self.state = state
        self._warnings = warnings
        self._pool_address = pool_address
        self._lock = threading.Lock()

    def status(self) -> StatusDict:
        w = self._worker
        cap = w.capacity
        reserved = w.lifecycle.reserved()
        free = w.lifecycle.free()
        es = self._executor_status()
        enf = es.enforcement
        s = self._session.state if self._session else None
        pool_state = "disconnected"
        if s is not None:
            pool_state = "registered" if (s.connected and s.registered) else ("connecting" if not s.last_error else "disconnected")
        return StatusDict(
            node_id=w.cfg.node_id, version=__version__, started_at=self.state.started_at,
            pool=PoolInfo(address=self._pool_address, state=pool_state,
                          reported_status=self.state.reported_status,
                          last_heartbeat=s.last_heartbeat if s else None,
                          heartbeat_failures=(0 if (s is None or s.connected) else s.heartbeat_failures),
                          protocol=self.state.pool_protocol,
                          protocol_limitations=list(self.state.pool_limitations)),
            executor=ExecutorInfo(
                name=es.name if es.usable else "", usable=es.usable, reason=es.reason,
                isolation=enf.isolation if enf else "",
                enforces=Enforces(memory=bool(enf and enf.memory), cpu=bool(enf and enf.cpu),
                                  pids=bool(enf and enf.pids),
                                  network_isolated=bool(enf and enf.network_isolated),
                                  readonly_root=bool(enf and enf.readonly_root)),
                notes=(list(enf.notes) if enf else []) + w.limit_notes()),
            security=security_info(self.state.grpc_auth_mode, self.state.pool_tls),
            metrics_backend=self.state.metrics_backend,
            resources=ResourcesInfo(
                cpu={"total": cap.total_cpus, "reserved": cap.reserve_cpus, "allocated": reserved.cpus,
                     "free": free.cpus, "usage_percent": self.state.machine.cpu_percent},
                memory={"total_bytes": cap.total_memory_bytes, "reserved_bytes": cap.reserve_memory_bytes,
                        "allocated_bytes": reserved.memory_bytes, "free_bytes": free.memory_bytes,
                        "used_bytes": self.state.machine.memory_used},
                gpus=len(cap.gpus)),
            slots=SlotsInfo(total=cap.slots, used=reserved.slots),
            draining=w.draining,
            warnings=list(self._warnings.items),
        )

    def tasks(self) -> list[TaskDict]:
        recs = sorted(self._worker.lifecycle.tasks(), key=lambda r: r.accepted_at, reverse=True)
        return [self._task_dict(r, tail=False) for r in recs[:200]]

    def task(self, task_id: str) -> TaskDict | None:
        rec = self._worker.lifecycle.get(task_id)
        return self._task_dict(rec, tail=True) if rec else None

    def _task_dict(self, rec: TaskRecord, tail: bool) -> TaskDict:
        runner = self._worker.runner(rec.task_id)
        usage: dict[str, Any] | None = None
        limits: dict[str, Any] | None = None
        provenance: dict[str, Any] | None = None
        lines: list[str] = []
        if runner is not None:
            last = runner.usage.last
            if last is not None:
                cpu_pct, mem_pct = task_percentages(last, runner.limits)
                usage = {"cpu_cores": last.cpu_cores, "memory_bytes": last.memory_bytes,
                         "peak_memory_bytes": runner.usage.peak_memory or None,
                         "cpu_percent": cpu_pct, "memory_percent": mem_pct,
                         "cpu_seconds": last.cpu_seconds, "pids": last.pids,
                         "max_pids": runner.usage.max_pids or None, "source": last.source}
            facts = runner.facts()
            limits = dict(facts.applied) or None
            provenance = {"archive_sha256": runner.archive_sha256, **facts.provenance}
            lines = runner.output.tail(50) if tail else runner.output.tail(3)
        else:
            done = self._worker.finished_result(rec.task_id)
            if done is not None:
                rec_usage = done.record.get("usage") or {}
                usage = {"cpu_cores": 0.0, "memory_bytes": 0,
                         "peak_memory_bytes": done.record.get("peak_memory_bytes"),
                         "cpu_seconds": rec_usage.get("cpu_seconds"),
                         "max_pids": rec_usage.get("max_pids"), "source": rec_usage.get("source", "")}
                limits = (done.record.get("limits") or {}).get("applied") or None
                provenance = done.record.get("provenance")
                if tail:
                    lines = list(done.output_tail)
        return TaskDict(
            task_id=rec.task_id, state=rec.state.value, created_at=rec.accepted_at,
            started_at=rec.started_at, finished_at=rec.finished_at,
            requested={"cpus": rec.granted.cpus, "memory_bytes": rec.granted.memory_bytes,
                       "gpus": len(rec.granted.gpus), "timeout_s": self._worker.cfg.executor.task_timeout_s},
            usage=usage,  # type: ignore[typeddict-item]
            exit_code=rec.exit_code,
            exit_reason=rec.reason or None,
            message=rec.message,
            output_tail=lines,
            limits=limits,  # type: ignore[typeddict-item]
            provenance=provenance,  # type: ignore[typeddict-item]
        )

    def ready(self) -> tuple[bool, str]:
        es = self._executor_status()
        if not es.usable:
            return False, f"no usable executor: {es.reason}"
        if self._session is None:
            return False, "no pool session"
        s = self._session.state
        if not (s.connected and s.registered):
            return False, f"not registered with the pool ({s.last_error or 'connecting'})"
        return True, ""

    def drain(self) -> None:
        self._worker.drain()
        if self._session is not None:
            self._session.poke()

    def stop_task(self, task_id: str) -> bool:
        rec = self._worker.lifecycle.get(task_id)
        if rec is None:
            return False
        self._worker.stop(task_id, "operator")
        return True


__all__ = ["MachineSample", "ViewState", "WarningLog", "WorkerView"]
