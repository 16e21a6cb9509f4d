"""CPU score: the benchmark, its cache, and the score-to-quota mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivemind.metrics.cpuscore import (
    BATCH_UNITS,
    CACHE_FILE,
    CpuScore,
    cpu_score,
    cpus_for_score,
    run_benchmark,
)


class StepClock:
    """Advances by a fixed step at every reading: each batch spans exactly one step."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class CountingBenchmark:
    def __init__(self, result: int = 1000) -> None:
        self.result, self.calls = result, 0

    def __call__(self) -> int:
        self.calls += 1
        return self.result


def test_benchmark_formula_with_an_injected_clock() -> None:
    # Every batch reads as 0.01 s: BATCH_UNITS / 0.01 units per second.
    assert run_benchmark(clock=StepClock(0.01), budget_s=0.1) == BATCH_UNITS * 100


def test_benchmark_really_runs_on_this_cpu() -> None:
    a = run_benchmark(budget_s=0.1)
    assert a > 0


def test_benchmark_rejects_a_long_budget() -> None:
    with pytest.raises(ValueError):
        run_benchmark(budget_s=5)


def test_score_is_measured_once_and_cached(tmp_path: Path) -> None:
    bench = CountingBenchmark(1234)
    first = cpu_score(tmp_path, cores=4, benchmark=bench, fingerprint="cpu-a")
    second = cpu_score(tmp_path, cores=2, benchmark=bench, fingerprint="cpu-a")
    assert first == CpuScore(per_core=1234, total=4936, cores=4)
    assert second == CpuScore(per_core=1234, total=2468, cores=2)  # cores aren't cached
    assert bench.calls == 1
    assert json.loads((tmp_path / CACHE_FILE).read_text())["per_core"] == 1234


def test_new_cpu_or_python_means_a_new_measurement(tmp_path: Path) -> None:
    bench = CountingBenchmark()
    cpu_score(tmp_path, cores=1, benchmark=bench, fingerprint="cpu-a|CPython 3.11")
    cpu_score(tmp_path, cores=1, benchmark=bench, fingerprint="cpu-a|CPython 3.12")
    assert bench.calls == 2


@pytest.mark.parametrize("content", ["{not json", '{"version": 1, "fingerprint": "f", "per_core": -3}',
                                     '[1, 2]', '{"version": 99, "fingerprint": "f", "per_core": 5}'])
def test_bad_cache_is_remeasured_and_rewritten(tmp_path: Path, content: str) -> None:
    (tmp_path / CACHE_FILE).write_text(content)
    bench = CountingBenchmark(77)
    assert cpu_score(tmp_path, cores=1, benchmark=bench, fingerprint="f").per_core == 77
    assert bench.calls == 1
    assert json.loads((tmp_path / CACHE_FILE).read_text())["per_core"] == 77


def test_configured_per_core_skips_the_benchmark(tmp_path: Path) -> None:
    bench = CountingBenchmark()
    assert cpu_score(tmp_path, per_core_override=500, cores=3, benchmark=bench) == CpuScore(500, 1500, 3)
    assert bench.calls == 0 and not (tmp_path / CACHE_FILE).exists()


def test_real_score_on_this_machine(tmp_path: Path) -> None:
    s = cpu_score(tmp_path / "state")
    assert s.per_core > 0 and s.cores >= 1 and s.total == s.per_core * s.cores


@pytest.mark.parametrize(("requested", "per_core", "max_cpus", "cpus"), [
    (0, 1000, 8, 1.0),        # no preference: one core
    (0, 1000, 0.5, 0.5),      # ... but never past the cap
    (2000, 1000, 8, 2.0),
    (1500, 1000, 8, 1.5),
    (1001, 1000, 8, 1.01),    # rounded up: the request is met
    (10, 1000, 8, 0.1),       # floor of 0.1 core
    (50_000, 1000, 7.5, 7.5),  # capped
])
def test_cpus_for_score(requested: float, per_core: int, max_cpus: float, cpus: float) -> None:
    assert cpus_for_score(requested, per_core, max_cpus) == cpus


def test_cpus_for_score_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        cpus_for_score(100, 0, 4)
    with pytest.raises(ValueError):
        cpus_for_score(100, 1000, 0)


@given(st.floats(0, 1e7), st.floats(0, 1e7), st.integers(1, 100_000), st.floats(0.1, 512))
def test_cpus_for_score_is_bounded_and_monotonic(a: float, b: float, per_core: int,
                                                 max_cpus: float) -> None:
    lo, hi = sorted((a, b))
    c_lo, c_hi = cpus_for_score(lo, per_core, max_cpus), cpus_for_score(hi, per_core, max_cpus)
    for c in (c_lo, c_hi):
        assert 0.1 <= c <= max_cpus
    if lo > 0:
        assert c_lo <= c_hi
        assert c_hi == max_cpus or c_hi * per_core >= hi - 1e-6
