"""Usage in the units each reader expects.

The pool's TaskUsage carries `cpu_usage` and `memory_usage` as percentages (0–100) of what the
task was granted, as the original worker sent them, and the pool clamps to that range:
- cpu_usage: cores busy over the last sampling interval / cores granted (the CPU quota), × 100;
- memory_usage: resident memory now / memory granted, × 100.
The node status carries whole-node percentages: CPU busy of all cores, and memory in use
(total − available) of the machine's total.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hivemind.executors.base import Limits, Usage


def _pct(part: float, whole: float) -> float:
    if whole <= 0:
        return 0.0
    return max(0.0, min(100.0, 100.0 * part / whole))


def percent_of_grant(part: float, grant: float) -> float:
    """`part` as percent of `grant`, clamped to 0–100 (0 without a grant)."""
    return _pct(part, grant)


def task_percentages(usage: Usage, limits: Limits) -> tuple[float, float]:
    """(cpu_usage, memory_usage) for TaskUsage: percent of the task's grant, clamped to 0–100."""
    return _pct(usage.cpu_cores, limits.cpus), _pct(usage.memory_bytes, limits.memory_bytes)


def node_percentages(cpu_busy_fraction: float, memory_used: int, memory_total: int) -> tuple[float, float]:
    """(cpu_usage, memory_usage) for the node status: percent of the whole machine."""
    return _pct(cpu_busy_fraction, 1.0), _pct(memory_used, memory_total)


@dataclass
class UsageTracker:
    """A running task's samples as the runner sees them (every few seconds from the executor)."""

    last: Usage | None = None
    peak_memory: int = 0
    max_pids: int = 0
    cpu_seconds: float | None = None
    samples: list[tuple[float, float, int]] = field(default_factory=list)

    def add(self, u: Usage) -> None:
        self.last = u
        self.peak_memory = max(self.peak_memory, u.memory_bytes, u.peak_memory_bytes or 0)
        self.max_pids = max(self.max_pids, u.pids or 0)
        if u.cpu_seconds is not None:
            self.cpu_seconds = u.cpu_seconds
