"""The task record and the usage units, as pure functions (the e2e tests check them on real runs)."""

from __future__ import annotations

import json

from hivemind.executors.base import ExitReason, ExitResult, Limits, TaskFacts, Usage
from hivemind.tasks.record import build_record
from hivemind.tasks.usage import UsageTracker, node_percentages, task_percentages

GIB = 1 << 30
LIMITS = Limits(cpus=2.0, memory_bytes=GIB, pids=256, timeout_s=600)


def test_task_percentages_are_of_the_grant_and_clamped() -> None:
    assert task_percentages(Usage(cpu_cores=1.0, memory_bytes=GIB // 4), LIMITS) == (50.0, 25.0)
    # A burst above the quota or memory above the grant (no limit applied) still reads 100.
    assert task_percentages(Usage(cpu_cores=3.0, memory_bytes=3 * GIB), LIMITS) == (100.0, 100.0)
    assert task_percentages(Usage(cpu_cores=-0.1, memory_bytes=0), LIMITS) == (0.0, 0.0)
    assert task_percentages(Usage(1.0, GIB), Limits(cpus=0.0, memory_bytes=0)) == (0.0, 0.0)


def test_node_percentages_are_of_the_machine() -> None:
    assert node_percentages(0.25, 4 * GIB, 16 * GIB) == (25.0, 25.0)
    assert node_percentages(1.2, 0, 0) == (100.0, 0.0)


def test_tracker_keeps_peaks_and_cpu_seconds() -> None:
    t = UsageTracker()
    t.add(Usage(0.5, 100, pids=3, cpu_seconds=1.0, peak_memory_bytes=150))
    t.add(Usage(0.1, 50, pids=9, cpu_seconds=2.5))
    t.add(Usage(0.1, 60, pids=2, cpu_seconds=None))
    assert (t.peak_memory, t.max_pids, t.cpu_seconds) == (150, 9, 2.5)


def test_record_carries_requested_applied_usage_and_provenance() -> None:
    facts = TaskFacts(
        applied={"memory_bytes": {"requested": GIB, "applied": None, "how": "not applied: shares cgroup /"}},
        provenance={"executor": "podman", "mode": "rootless", "image_id": "abc", "image_digest": "sha256:def"},
        usage={"source": "proc tree", "max_pids": 12})
    tracker = UsageTracker()
    tracker.add(Usage(1.0, 300, pids=4, cpu_seconds=3.0, source="proc tree"))
    result = ExitResult(0, ExitReason.EXITED, 10.0, 20.0, peak_memory_bytes=None, cpu_seconds=None)
    rec = build_record(task_id="t1", result=result, accepted_at=9.0, started_at=10.0, node_id="n1",
                       executor="podman", limits=LIMITS, facts=facts, tracker=tracker,
                       archive_sha256="f" * 64, context={"auth_mode": "mtls"})
    json.dumps(rec)                                    # what pack_result writes
    assert rec["status"] == "succeeded"
    assert rec["limits"]["requested"] == {"cpus": 2.0, "memory_bytes": GIB, "pids": 256, "timeout_s": 600}
    assert rec["limits"]["applied"]["memory_bytes"]["applied"] is None
    # The executor saw 12 processes between the runner's samples: the larger count wins.
    assert rec["usage"] == {"cpu_seconds": 3.0, "peak_memory_bytes": 300, "max_pids": 12, "source": "proc tree"}
    assert rec["peak_memory_bytes"] == 300 and rec["cpu_seconds"] == 3.0
    p = rec["provenance"]
    assert p["archive_sha256"] == "f" * 64 and p["auth_mode"] == "mtls" and p["node_id"] == "n1"
    assert (p["executor"], p["mode"], p["image_id"], p["image_digest"]) == ("podman", "rootless", "abc", "sha256:def")
    assert p["worker_version"]


def test_record_of_a_task_that_never_started() -> None:
    result = ExitResult(None, ExitReason.FAILED_TO_START, 5.0, 5.0, message="no entry point")
    rec = build_record(task_id="t2", result=result, accepted_at=4.0, started_at=None, node_id="n1",
                       executor="venv", limits=LIMITS, facts=TaskFacts(), tracker=UsageTracker(),
                       archive_sha256=None, context={})
    assert rec["status"] == "failed" and rec["limits"]["applied"] == {}
    assert rec["usage"] == {"cpu_seconds": None, "peak_memory_bytes": None, "max_pids": None, "source": "none"}
