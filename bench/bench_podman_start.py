"""Start latency: task spec in hand -> first output line, PodmanExecutor vs a bare `podman run`.

Rootful (cgroup v1 applies limits only there). The executor talks to its own private service
(started once, outside the timings), like the worker does. Prints medians, the ratio and the
executor's phases (create, inspect, start, first line, wait, cleanup).

Usage: .venv/bin/python bench/bench_podman_start.py [RUNS]
"""

from __future__ import annotations

import functools
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from hivemind.config import PodmanConfig
from hivemind.executors.base import Entry, Limits, OutputLine, TaskSpec
from hivemind.executors.podman import PodmanExecutor
from hivemind.executors.podman_service import PodmanService

IMAGE = "localhost/hivemind-task:latest"
CODE = "print('ready', flush=True)"


def bare_run(userns: bool = True) -> float:
    """`podman run` with the isolation the executor gives rootful tasks (userns=auto), or, for
    comparison, in the host's user namespace (uid 1000 inside = host uid 1000)."""
    t0 = time.perf_counter()
    extra = ["--userns=auto"] if userns else []
    proc = subprocess.Popen(["podman", "run", "--rm", "--network", "none", *extra, IMAGE,
                             "python3", "-c", CODE], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    t = time.perf_counter() - t0
    proc.wait()
    assert line.strip() == b"ready", line
    return t


def executor_run(ex: PodmanExecutor, ws: Path, i: int, phases: dict[str, list[float]]) -> float:
    spec = TaskSpec(f"bench-{i}", ws, Entry(("python3", "-c", CODE)),
                    Limits(cpus=1.0, memory_bytes=256 * 1024 * 1024))
    first = threading.Event()
    seen: list[float] = []

    def sink(line: OutputLine) -> None:
        if not seen:
            seen.append(time.perf_counter())
            first.set()

    t0 = time.perf_counter()
    ex.start(spec, sink)
    assert first.wait(30)
    t_first = seen[0] - t0
    phases["first line"].append(t_first)
    tw = time.perf_counter()
    res = ex.wait(spec.task_id, 30)
    phases["wait after first line"].append(time.perf_counter() - tw)
    assert res is not None and res.exit_code == 0, res
    tc = time.perf_counter()
    ex.cleanup(spec.task_id)
    phases["cleanup"].append(time.perf_counter() - tc)
    return t_first


def timed(phases: dict[str, list[float]], name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            phases[name].append(time.perf_counter() - t)
    return wrapper


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    log = logging.getLogger("bench")
    with tempfile.TemporaryDirectory() as tmp:
        svc = PodmanService(PodmanConfig(mode="rootful"), log,
                            rootful_socket=f"{tmp}/podman.sock")
        svc.ensure()
        ex = PodmanExecutor(PodmanConfig(mode="rootful"), "bench", Path(tmp) / "state", log, 60,
                            service=svc)
        ws = Path(tmp) / "ws"
        ws.mkdir()
        phases: dict[str, list[float]] = defaultdict(list)
        api = ex._api()
        for name in ("create", "inspect", "start"):
            setattr(api, name, timed(phases, name, getattr(api, name)))
        bare_run()                                   # warm caches for both
        executor_run(ex, ws, -1, defaultdict(list))
        phases.clear()
        bare, host_ns, mine = [], [], []
        for i in range(runs):                        # interleaved, so drift hits all alike
            bare.append(bare_run())
            host_ns.append(bare_run(userns=False))
            mine.append(executor_run(ex, ws, i, phases))
        ex.close()
        svc.close()
    mb, me = statistics.median(bare), statistics.median(mine)
    print(f"runs={runs} (rootful, network none, spec -> first output line)")
    print(f"bare podman run   median {mb * 1000:7.1f} ms (--userns=auto, as the executor)")
    print(f"  without userns  median {statistics.median(host_ns) * 1000:7.1f} ms "
          f"(the user namespace costs {(mb - statistics.median(host_ns)) * 1000:+.1f} ms)")
    print(f"PodmanExecutor    median {me * 1000:7.1f} ms")
    print(f"ratio executor/bare      {me / mb:7.2f}")
    for name, vals in phases.items():
        print(f"  phase {name:22s} median {statistics.median(vals) * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
