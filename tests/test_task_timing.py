"""Phase marks of one task (hivemind.tasks.timing): relative to acceptance, first mark wins,
executor marks merged on the same clock, durations between consecutive marks."""

from __future__ import annotations

from hivemind.tasks.timing import PhaseClock


def test_marks_are_seconds_after_acceptance_in_time_order() -> None:
    now = [100.0]
    clock = PhaseClock(100.0, lambda: now[0])
    now[0] = 100.25
    clock.mark("workspace")
    clock.merge({"created": 100.30, "container_started": 100.50, "junk": "not a time"})  # type: ignore[dict-item]
    now[0] = 100.75
    clock.mark("started")
    clock.mark("workspace")                 # passed again (a restart): the first time stays
    clock.mark("exited", at=101.0)
    assert list(clock.since_accepted()) == ["workspace", "created", "container_started",
                                            "started", "exited"]
    assert clock.since_accepted()["started"] == 0.75
    assert clock.durations() == {"workspace": 0.25, "created": 0.05, "container_started": 0.2,
                                 "started": 0.25, "exited": 0.25}
