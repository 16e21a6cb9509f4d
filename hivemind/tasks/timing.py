"""Where one task's time went: named phase marks, in the order they happened.

The runner marks its own steps (workspace ready, prepared, started, exited, packed, removed);
executors add theirs through `TaskFacts.timing` (Podman: created, container_started,
output_closed, exit_seen), read when the task ends. The record
carries the marks up to packing; the `task.timing` log event carries all of them, removal
included, so a slow machine can be read phase by phase (bench/run sums them per batch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


class PhaseClock:
    def __init__(self, origin: float, clock: Callable[[], float]) -> None:
        self._origin = origin           # accepted_at: every mark is seconds after it
        self._clock = clock
        self._marks: dict[str, float] = {}

    def mark(self, phase: str, at: float | None = None) -> None:
        """`phase` ended now (or at `at`, a time on the same clock). The first mark wins:
        a phase passed again after a restart keeps its first time."""
        self._marks.setdefault(phase, (self._clock() if at is None else at) - self._origin)

    def merge(self, marks: Mapping[str, float]) -> None:
        """Marks an executor took on the same clock (absolute times)."""
        for phase, at in marks.items():
            if isinstance(at, (int, float)):
                self.mark(phase, float(at))

    def since_accepted(self) -> dict[str, float]:
        """Each phase's end, in seconds after acceptance, in time order."""
        return {k: round(v, 4) for k, v in sorted(self._marks.items(), key=lambda kv: kv[1])}

    def durations(self) -> dict[str, float]:
        """Each phase's own length: from the mark before it (acceptance for the first)."""
        out: dict[str, float] = {}
        prev = 0.0
        for phase, at in sorted(self._marks.items(), key=lambda kv: kv[1]):
            out[phase] = round(max(0.0, at - prev), 4)
            prev = max(prev, at)
        return out
