"""bench/run's pieces at tiny sizes: the report renders, and `bench/run --quick` runs the venv
latency, idle, large-result and metrics benchmarks end to end against a real pool and daemon and
writes its JSON and PNG. No timing assertions: only that every figure was measured and sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_e2e import Measurement  # noqa: E402
from report import table, write_all  # noqa: E402


def test_report_marks_missed_targets_and_writes_json_and_png(tmp_path: Path) -> None:
    ms = [Measurement("latency", "ms", [120.0, 130.0, 110.0], [100.0, 100.0, 90.0], "bare", "<= 1.25x",
                      "ratio", 1.25),
          Measurement("throughput", "tasks/s", [3.0], [5.0], "xargs", ">= 0.8x", "ratio_min", 0.8, ["a note"]),
          Measurement("venv", "ms", [30.0], [10.0], "bare", "<= +40 ms", "delta", 40.0)]
    text = table(ms)
    rows = {line.split("  ")[0]: line for line in text.splitlines()}
    assert rows["latency"].rstrip().endswith("yes") and "1.20x" in rows["latency"]
    assert rows["throughput"].rstrip().endswith("NO") and "0.60x" in rows["throughput"]
    assert "+20.0 ms" in rows["venv"] and "a note" in text
    jpath, ppath = write_all(ms, tmp_path, {"quick": True})
    doc = json.loads(jpath.read_text())
    assert [r["met"] for r in doc["results"]] == [True, False, True]
    assert ppath.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the venv executor drops tasks to `nobody`: needs root")
def test_bench_run_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    before = set(Path("/var/tmp").glob("hivemind-bench-*"))  # another run's may be in use
    proc = subprocess.run([str(ROOT / "bench" / "run"), "--quick", "--out", str(out),
                           "--only", "latency-venv", "idle", "large", "metrics"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    got = {r["name"]: r for r in doc["results"]}
    assert set(got) == {"dispatch latency, cached venv", "idle RSS", "idle CPU",
                        "idle RSS beyond a bare gRPC server and client",
                        "large result (8 x 2 MiB)", "metrics snapshot"}
    for r in doc["results"]:
        assert r["worker"] and r["baseline"], r
        assert all(v >= 0 for v in r["worker"]), r
    assert "chunked upload used: True" in " ".join(got["large result (8 x 2 MiB)"]["notes"])
    assert got["idle RSS"]["worker_median"] > 10          # a live Python daemon, not a zombie
    # The floor served and called gRPC: more resident than a bare `import grpc`.
    floor = got["idle RSS beyond a bare gRPC server and client"]["baseline_median"]
    assert floor > got["idle RSS"]["baseline_median"]
    assert (out / "results.png").stat().st_size > 0
    assert "dispatch latency, cached venv" in proc.stdout
    # Nothing left behind: no bench state directories, no worker daemons.
    assert set(Path("/var/tmp").glob("hivemind-bench-*")) <= before


def test_phase_medians_read_the_workers_timing_lines() -> None:
    from bench_e2e import phase_medians, phase_note

    log = "\n".join([
        "2026-12-02 INFO task tp0-1 timing: quota 10 ms, created 40 ms, removed 100 ms",
        "2026-12-02 INFO task tp0-2 timing: quota 30 ms, created 20 ms, removed 80 ms",
        "2026-12-02 INFO task warm-1 timing: quota 999 ms",          # another batch: not counted
        "2026-12-02 INFO task tp0-3 ended: exited (exit code 0)",
    ])
    phases = phase_medians(log, "tp0")
    assert phases == {"quota": 20.0, "created": 30.0, "removed": 90.0}
    assert phase_note(phases) == "per task, median ms: quota 20, created 30, removed 90"
