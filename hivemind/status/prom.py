"""Prometheus metrics of one worker, in a registry of their own.

A registry per WorkerMetrics keeps two workers in one process, and tests, from sharing metrics.
The metric objects (hivemind.status.exposition) are thread-safe, so the daemon may call these
methods from any thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from hivemind.status.exposition import CONTENT_TYPE, Counter, Gauge, Histogram, Registry
from hivemind.status.view import TASK_STATES

# Tasks run from seconds to hours; start latency (accept -> entry point running) from tens of
# milliseconds (warm container) to minutes (requirements.txt install).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
START_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

_M = TypeVar("_M", Counter, Gauge, Histogram)

__all__ = ["CONTENT_TYPE", "DURATION_BUCKETS", "START_LATENCY_BUCKETS", "WorkerMetrics"]


class WorkerMetrics:
    def __init__(self, version: str, node_id: str = "") -> None:
        self.registry = Registry()
        build = self._add(Gauge("hivemind_build_info", "Worker build.", ["node_id", "version"]))
        build.set(1, version=version, node_id=node_id)
        self._tasks = self._add(Gauge("hivemind_tasks", "Tasks the worker knows, by state.", ["state"]))
        for state in TASK_STATES:
            self._tasks.set(0, state=state)
        self._duration = self._add(Histogram("hivemind_task_duration_seconds",
                                             "Run time of finished tasks (entry point start to end).",
                                             DURATION_BUCKETS, ["outcome"]))
        self._start_latency = self._add(Histogram("hivemind_task_start_latency_seconds",
                                                  "From archive accepted to entry point running.",
                                                  START_LATENCY_BUCKETS))
        self._results_pending = self._add(Gauge("hivemind_results_pending",
                                                "Results waiting for upload to the pool."))
        self._heartbeat_failures = self._add(Counter("hivemind_heartbeat_failures",
                                                     "ReportStatus calls that failed."))
        self._upload_failures = self._add(Counter("hivemind_upload_failures",
                                                  "Result or output uploads that failed."))
        self._cpu = self._add(Gauge("hivemind_cpu_cores", "CPU cores by kind (total, reserved for the "
                                    "system, allocated to tasks, free for new tasks).", ["kind"]))
        self._mem = self._add(Gauge("hivemind_memory_bytes", "Memory by kind (total, reserved, allocated, "
                                    "free, used).", ["kind"]))
        self._cpu_usage = self._add(Gauge("hivemind_cpu_usage_ratio", "Whole-machine CPU busy, 0..1."))
        self._slots = self._add(Gauge("hivemind_slots", "Task slots by kind (total, used).", ["kind"]))
        self._draining = self._add(Gauge("hivemind_draining", "1 while the worker takes no new tasks."))
        self._pool_up = self._add(Gauge("hivemind_pool_registered", "1 while registered with the pool."))

    def _add(self, metric: _M) -> _M:
        self.registry.add(metric)
        return metric

    def task_state(self, state_counts: Mapping[str, int]) -> None:
        """Set the per-state task counts; states left out are set to 0."""
        for state in (*TASK_STATES, *(s for s in state_counts if s not in TASK_STATES)):
            self._tasks.set(state_counts.get(state, 0), state=state)

    def observe_task_duration(self, seconds: float, outcome: str = "exited") -> None:
        """`outcome` is an executors.base.ExitReason value."""
        self._duration.observe(max(0.0, seconds), outcome=outcome)

    def observe_start_latency(self, seconds: float) -> None:
        self._start_latency.observe(max(0.0, seconds))

    def results_pending(self, n: int) -> None:
        self._results_pending.set(n)

    def heartbeat_failed(self) -> None:
        self._heartbeat_failures.inc()

    def upload_failed(self) -> None:
        self._upload_failures.inc()

    def resources(self, *, total_cpus: float, reserved_cpus: float, allocated_cpus: float,
                  total_mem: int, reserved_mem: int, allocated_mem: int,
                  used_mem: int, cpu_usage: float) -> None:
        """Machine resources; `cpu_usage` is the whole-machine busy ratio 0..1."""
        for kind, value in (("total", total_cpus), ("reserved", reserved_cpus),
                            ("allocated", allocated_cpus),
                            ("free", max(0.0, total_cpus - reserved_cpus - allocated_cpus))):
            self._cpu.set(value, kind=kind)
        for kind, mem in (("total", total_mem), ("reserved", reserved_mem),
                          ("allocated", allocated_mem),
                          ("free", max(0, total_mem - reserved_mem - allocated_mem)),
                          ("used", used_mem)):
            self._mem.set(mem, kind=kind)
        self._cpu_usage.set(cpu_usage)

    def slots(self, total: int, used: int) -> None:
        self._slots.set(total, kind="total")
        self._slots.set(used, kind="used")

    def draining(self, on: bool) -> None:
        self._draining.set(1 if on else 0)

    def pool_registered(self, on: bool) -> None:
        self._pool_up.set(1 if on else 0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric; serve it with CONTENT_TYPE."""
        return self.registry.render()
