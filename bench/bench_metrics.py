"""Time one full snapshot, native library vs psutil, collecting the same figures.

    .venv/bin/python bench/bench_metrics.py [--iterations N] [--rounds R] [--cgroup PATH]

Rounds alternate between the backends so background load on the machine hits both alike; the
median round is reported. Target: native at least 3x faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from hivemind.metrics import MetricsSource, open_metrics


def per_call_us(src: MetricsSource, disk: str, cgroup: str | None, iterations: int) -> float:
    snap = src.snapshot
    start = time.perf_counter()
    for _ in range(iterations):
        snap(disk, cgroup)
    return (time.perf_counter() - start) / iterations * 1e6


def make_leaf_cgroup(base: Path = Path("/sys/fs/cgroup")) -> tuple[str, list[Path]]:
    """An empty cgroup in each hierarchy the metrics read; ("/", []) when that isn't possible.

    The root cgroup is a poor stand-in: its v1 totals are summed over the whole machine."""
    name = f"hivemind-bench-{os.getpid()}"
    dirs = ([base / name] if (base / "cgroup.controllers").exists()
            else [base / c / name for c in ("memory", "cpuacct", "pids")])
    made: list[Path] = []
    try:
        for d in dirs:
            d.mkdir()
            made.append(d)
    except OSError:
        for d in made:
            d.rmdir()
        return "/", []
    return "/" + name, made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cgroup", default="auto",
                    help="cgroup path to include ('' for none); auto makes an empty leaf cgroup "
                         "like a task's when it can (root), else reads the root cgroup")
    ap.add_argument("--disk", default="/")
    ap.add_argument("--library", default="")
    args = ap.parse_args(argv)
    native = open_metrics("native", library_path=args.library)
    py = open_metrics("psutil")
    made: list[Path] = []
    cg: str | None = args.cgroup or None
    if cg == "auto":
        cg, made = make_leaf_cgroup()
    try:
        results: dict[str, list[float]] = {"native": [], "psutil": []}
        for src in (native, py):  # warm caches and imports
            per_call_us(src, args.disk, cg, 100)
        for _ in range(args.rounds):
            for name, src in (("native", native), ("psutil", py)):
                results[name].append(per_call_us(src, args.disk, cg, args.iterations))
    finally:
        native.close()
        py.close()
        for d in made:
            d.rmdir()
    n, p = statistics.median(results["native"]), statistics.median(results["psutil"])
    print(f"snapshot (disk={args.disk}, cgroup={cg}), median of {args.rounds} rounds "
          f"x {args.iterations} calls")
    print(f"  native: {n:8.1f} us/call  (rounds: {', '.join(f'{x:.0f}' for x in results['native'])})")
    print(f"  psutil: {p:8.1f} us/call  (rounds: {', '.join(f'{x:.0f}' for x in results['psutil'])})")
    print(f"  ratio psutil/native: {p / n:.2f}x (target >= 3x: {'met' if p / n >= 3 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
