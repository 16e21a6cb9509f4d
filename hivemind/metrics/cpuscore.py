"""CPU score: how much work one core of this machine does, measured once and cached.

The pool asks for CPU in score units; the worker turns a request into a CPU quota with
`cpus_for_score`. Tasks are Python programs, so the benchmark is a pure-Python integer loop
(a xorshift generator folded into a checksum): it tracks interpreter speed on this CPU, which a
C hash loop with SHA instructions would not.

Formula: one work unit is UNIT_ITERATIONS loop iterations. The loop runs in batches of
BATCH_UNITS units, on one thread, until the time budget (<= 1 s) is spent; the fastest batch
counts, since background load can only slow a batch down:

    per_core = floor(BATCH_UNITS / fastest_batch_seconds)      (units per second, one core)
    total    = per_core * cores                                (cores this process may use)

The result is cached as JSON in STATE_DIR/cpu_score.json, keyed by the CPU model and the Python
version (either changing means a new measurement).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CACHE_FILE = "cpu_score.json"
CACHE_VERSION = 1
UNIT_ITERATIONS = 10_000
BATCH_UNITS = 4
_UNIT_CHECKSUM_SEED = 1

Clock = Callable[[], float]


@dataclass(frozen=True)
class CpuScore:
    per_core: int
    total: int
    cores: int


def _unit(seed: int) -> int:
    x = seed
    acc = 0
    for _ in range(UNIT_ITERATIONS):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        acc = (acc + x) & 0xFFFFFFFF
    return acc ^ x


def run_benchmark(clock: Clock = time.perf_counter, budget_s: float = 0.3,
                  max_batches: int = 200) -> int:
    """Per-core score (see the module doc). Single-threaded; returns within about budget_s."""
    if not 0 < budget_s <= 1.0:
        raise ValueError("budget_s must be in (0, 1]")
    start = clock()
    best = math.inf
    expected = _unit(_UNIT_CHECKSUM_SEED)
    for _ in range(max_batches):
        t0 = clock()
        for _ in range(BATCH_UNITS):
            if _unit(_UNIT_CHECKSUM_SEED) != expected:
                raise RuntimeError("CPU benchmark checksum changed between runs")
        t1 = clock()
        best = min(best, t1 - t0)
        if t1 - start >= budget_s:
            break
    if not best > 0:
        raise RuntimeError("CPU benchmark clock did not advance")
    return max(1, math.floor(BATCH_UNITS / best))


def machine_fingerprint() -> str:
    """What the cached score depends on: the CPU model and the Python implementation."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    return f"{model}|{platform.python_implementation()} {platform.python_version()}"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_score(state_dir: str | os.PathLike[str], *, per_core_override: float = 0.0,
              cores: int | None = None, benchmark: Callable[[], int] = run_benchmark,
              fingerprint: str | None = None) -> CpuScore:
    """The cached score, measuring (and caching) it first when needed.

    per_core_override > 0 (config resources.cpu_score_per_core) skips the benchmark.
    """
    n = cores if cores is not None else usable_cores()
    if per_core_override > 0:
        per_core = round(per_core_override)
        return CpuScore(per_core, per_core * n, n)
    fp = fingerprint if fingerprint is not None else machine_fingerprint()
    path = Path(state_dir) / CACHE_FILE
    cached = _read_cache(path, fp)
    if cached is None:
        cached = benchmark()
        _write_cache(path, fp, cached)
    return CpuScore(cached, cached * n, n)


def _read_cache(path: Path, fingerprint: str) -> int | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing or corrupt: measure again
    if (not isinstance(data, dict) or data.get("version") != CACHE_VERSION
            or data.get("fingerprint") != fingerprint):
        return None
    per_core = data.get("per_core")
    return per_core if isinstance(per_core, int) and per_core > 0 else None


def _write_cache(path: Path, fingerprint: str, per_core: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "fingerprint": fingerprint,
                               "per_core": per_core, "unit_iterations": UNIT_ITERATIONS}),
                   encoding="utf-8")
    os.replace(tmp, path)  # readers never see half a file


def cpus_for_score(requested_score: float, per_core: int, max_cpus: float) -> float:
    """CPU quota (cores, 2 decimals, rounded up) for a requested score.

    requested / per_core, at least 0.1 core and at most max_cpus; a request of 0 (the pool's
    "no preference") gets 1 core, also capped at max_cpus.
    """
    if per_core <= 0:
        raise ValueError("per_core must be positive")
    if max_cpus <= 0:
        raise ValueError("max_cpus must be positive")
    if requested_score <= 0:
        return min(1.0, max_cpus)
    cpus = math.ceil(requested_score / per_core * 100 - 1e-9) / 100
    return min(max(cpus, 0.1), max_cpus)
