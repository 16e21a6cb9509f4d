"""Start latency of the venv executor (cached venv) against a bare subprocess.Popen.

Measures, over N runs each, the time from "spec in hand" to "first output line received":
- bare:     subprocess.Popen([python, main.py], stdout=PIPE) and readline()
- venv:     VenvExecutor.prepare (cache hit) + start, until the sink gets the first line
- venv-net: the same with Limits.network=True (no `unshare --net`), to show what the netns costs

Run: .venv/bin/python bench/bench_venv_start.py [--runs 30]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from hivemind.config import VenvConfig
from hivemind.executors.base import Entry, Limits, OutputLine, TaskSpec
from hivemind.executors.venv import VenvExecutor

SCRIPT = "print('ready', flush=True)\n"


def bench_bare(python: str, ws: Path, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = subprocess.Popen([python, str(ws / "main.py")], stdout=subprocess.PIPE)
        assert p.stdout is not None
        p.stdout.readline()
        out.append(time.perf_counter() - t0)
        p.wait()
        p.stdout.close()
    return out


def bench_executor(ex: VenvExecutor, base: Path, runs: int, network: bool) -> list[float]:
    out = []
    for i in range(runs):
        ws = base / "tasks" / f"bench-{network}-{i}"
        ws.mkdir(parents=True)
        (ws / "main.py").write_text(SCRIPT)
        spec = TaskSpec(f"bench-{int(network)}-{i}", ws, Entry(("python", "main.py")),
                        Limits(cpus=1, memory_bytes=1 << 30, network=network))
        got = threading.Event()

        def sink(line: OutputLine, got: threading.Event = got) -> None:
            got.set()

        t0 = time.perf_counter()
        ex.prepare(spec, sink, threading.Event())
        ex.start(spec, sink)
        got.wait(30)
        out.append(time.perf_counter() - t0)
        ex.wait(spec.task_id, 30)
        ex.cleanup(spec.task_id)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="hm-bench-"))
    base.chmod(0o755)
    try:
        ex = VenvExecutor(VenvConfig(), base / "state", logging.getLogger("bench"), "bench")
        status = ex.probe()
        ex.prepare(TaskSpec("warm", base, Entry(("python",)), Limits(1, 1 << 30)),
                   lambda line: None, threading.Event())
        venv = ex.cache.lookup(None)
        assert venv is not None
        (base / "main.py").write_text(SCRIPT)
        python = str(venv / "bin" / "python")
        bench_bare(python, base, 3)                          # warm the page cache
        bare = statistics.median(bench_bare(python, base, args.runs))
        venv_ms = statistics.median(bench_executor(ex, base, args.runs, network=False))
        net_ms = statistics.median(bench_executor(ex, base, args.runs, network=True))
        print(f"runs={args.runs} uid={os.geteuid()} netns={status.enforcement and status.enforcement.network_isolated}")
        print(f"bare Popen            median {bare * 1000:7.2f} ms")
        print(f"venv executor         median {venv_ms * 1000:7.2f} ms  (+{(venv_ms - bare) * 1000:.2f} ms)")
        print(f"venv executor, no netns median {net_ms * 1000:5.2f} ms  (+{(net_ms - bare) * 1000:.2f} ms)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
