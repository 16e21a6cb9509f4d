"""Worker CPU spent measuring task usage, per task-second of sampling.

    .venv/bin/python bench/bench_sampling.py [--rounds R] [--calls N]

Runs the Podman executor's own sampling step (`_sample_once`) against stand-in tasks: a process
tree of three (what a rootless container on cgroup v1 is sampled from, every TREE_SAMPLE_S) and
an empty leaf cgroup (rootful, every CGROUP_SAMPLE_S). CPU time of this process per call, times
calls per second, is the worker CPU one running task costs; the native library is the worker,
psutil (the fallback) the baseline of the same run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_metrics

from hivemind.config import PodmanConfig
from hivemind.executors.podman import CGROUP_SAMPLE_S, TREE_SAMPLE_S, PodmanExecutor, _Run
from hivemind.metrics import open_metrics

TREE = "import subprocess, sys; k = [subprocess.Popen(['sleep', '600']) for _ in range(2)]; sys.stdin.read()"


def _cpu_ms_per_call(sample: Callable[[], None], calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        sample()
    return (time.process_time() - start) / calls * 1e3


def measure(rounds: int, calls: int) -> dict[str, dict[str, list[float]]]:
    """ms of worker CPU per task-second: {"tree"|"cgroup": {"native"|"psutil": [per round]}}."""
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdin=subprocess.PIPE)
    cg, made = bench_metrics.make_leaf_cgroup()
    out: dict[str, dict[str, list[float]]] = {"tree": {"native": [], "psutil": []},
                                              "cgroup": {"native": [], "psutil": []}}
    log = logging.getLogger("bench.sampling")
    try:
        time.sleep(0.3)                               # the children exist
        with tempfile.TemporaryDirectory() as tmp:
            execs = {b: PodmanExecutor(PodmanConfig(mode="rootful"), "bench", Path(tmp), log, 60,
                                       metrics=open_metrics(b)) for b in ("native", "psutil")}
            runs = {}
            for b in execs:
                tree_run = _Run("t", "c", time.time(), 60, 0, lambda line: None)
                tree_run.pid = proc.pid
                cg_run = _Run("c", "c", time.time(), 60, 0, lambda line: None)
                cg_run.cgroup = cg
                runs[b] = (tree_run, cg_run)
            for _ in range(rounds):
                for b, ex in execs.items():
                    tree_run, cg_run = runs[b]
                    ms = _cpu_ms_per_call(lambda ex=ex, r=tree_run: ex._sample_once(r), calls)
                    out["tree"][b].append(ms / TREE_SAMPLE_S)
                    ms = _cpu_ms_per_call(lambda ex=ex, r=cg_run: ex._sample_once(r), calls)
                    out["cgroup"][b].append(ms / CGROUP_SAMPLE_S)
            for b, (tree_run, _) in runs.items():
                assert tree_run.pids_now == 3, f"{b}: tree of {tree_run.pids_now}, expected 3"
    finally:
        proc.kill()
        proc.wait()
        for d in made:
            d.rmdir()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args(argv)
    res = measure(args.rounds, args.calls)
    for kind, by in res.items():
        n, p = statistics.median(by["native"]), statistics.median(by["psutil"])
        print(f"{kind:6}: native {n:.3f} ms CPU per task-second, psutil {p:.3f} ({p / n:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def sampling_overhead(rounds: int, calls: int, log: Callable[[str], None]) -> list[Any]:
    """bench/run's rows: worker CPU per task-second, native (the worker) against psutil."""
    from bench_e2e import Measurement

    res = measure(rounds, calls)
    for kind, by in res.items():
        log(f"sampling {kind}: native {statistics.median(by['native']):.3f} ms, "
            f"psutil {statistics.median(by['psutil']):.3f} ms CPU per task-second")
    return [Measurement("usage sampling, /proc tree (rootless v1)", "ms CPU/task-s", res["tree"]["native"],
                        res["tree"]["psutil"], "psutil fallback", "<= 5 ms (0.5 % of a core)", "abs", 5.0,
                        [f"one sample every {TREE_SAMPLE_S:g} s of a 3-process tree"]),
            Measurement("usage sampling, task cgroup (rootful)", "ms CPU/task-s", res["cgroup"]["native"],
                        res["cgroup"]["psutil"], "psutil fallback", "<= 5 ms (0.5 % of a core)", "abs", 5.0,
                        [f"one sample every {CGROUP_SAMPLE_S:g} s of a leaf cgroup"])]
