"""The task record, `_hivemind/execution.json`: what the node really did, checkable afterwards.

- `limits.requested`: what the task was granted; `limits.applied`: per limit what the kernel
  enforced (None where nothing did) and how that is known (the cgroup file read, or why not).
- `usage`: CPU seconds, peak memory and most processes, measured whatever the executor (its
  cgroup when the kernel keeps one, its process tree otherwise), with the source named.
- `provenance`: the archive's sha256, what ran it (image ID and digest, or interpreter and venv
  hash), executor and mode, worker version, node id and the gRPC auth mode the task came by.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from hivemind import __version__
from hivemind.executors.base import ExitReason, ExitResult, Limits, TaskFacts
from hivemind.tasks.usage import UsageTracker


def _status(result: ExitResult) -> str:
    if result.reason == ExitReason.EXITED and result.exit_code == 0:
        return "succeeded"
    return "stopped" if result.reason == ExitReason.STOPPED else "failed"


def requested_limits(limits: Limits) -> dict[str, Any]:
    return {"cpus": limits.cpus, "memory_bytes": limits.memory_bytes, "pids": limits.pids,
            "timeout_s": limits.timeout_s}


def usage_record(result: ExitResult | None, tracker: UsageTracker, facts: TaskFacts) -> dict[str, Any]:
    cpu = result.cpu_seconds if result is not None and result.cpu_seconds is not None \
        else tracker.cpu_seconds
    peak = (result.peak_memory_bytes if result is not None else None) or tracker.peak_memory or None
    pids = max(int(facts.usage.get("max_pids") or 0), tracker.max_pids) or None
    source = str(facts.usage.get("source") or (tracker.last.source if tracker.last else "") or "none")
    return {"cpu_seconds": cpu, "peak_memory_bytes": peak, "max_pids": pids, "source": source}


def build_record(*, task_id: str, result: ExitResult, accepted_at: float,
                 started_at: float | None, node_id: str, executor: str, limits: Limits,
                 facts: TaskFacts, tracker: UsageTracker, archive_sha256: str | None,
                 context: Mapping[str, str], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`context`: facts of the worker rather than the task (auth_mode); `extra`: more sections
    the runner owns (output summary, disk quota)."""
    usage = usage_record(result, tracker, facts)
    provenance = {"archive_sha256": archive_sha256, **facts.provenance,
                  "executor": executor, "worker_version": __version__, "node_id": node_id,
                  "auth_mode": context.get("auth_mode", "")}
    provenance.setdefault("mode", "")
    return {
        "task_id": task_id,
        "status": _status(result),
        "exit_code": result.exit_code,
        "reason": result.reason.value,
        "message": result.message,
        "accepted_at": accepted_at,
        "started_at": result.started_at or started_at,
        "finished_at": result.finished_at,
        "node_id": node_id,
        "node_hostname": socket.gethostname(),
        "worker_version": __version__,
        "executor": executor,
        "limits": {"requested": requested_limits(limits), "applied": dict(facts.applied)},
        "usage": usage,
        "provenance": provenance,
        # Kept at the top level for readers of the earlier record.
        "peak_memory_bytes": usage["peak_memory_bytes"],
        "cpu_seconds": usage["cpu_seconds"],
        **(extra or {}),
    }
