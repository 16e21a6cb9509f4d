"""When the daemon tells the pool at once: a state change that alters what a heartbeat says
(Idle/Busy/Draining, the running count) pokes the session; one that doesn't waits for the next
regular heartbeat. The real exchange is covered end to end (test_protocol_wire, test_e2e); this
pins the gate with stand-ins for the worker and the session."""

from __future__ import annotations

from typing import Any

from hivemind.daemon import Daemon, Signals


class Worker:
    def __init__(self) -> None:
        self.idle, self.running, self.draining = True, 0, False

    def is_idle(self) -> bool:
        return self.idle

    def running_count(self) -> int:
        return self.running


class Session:
    def __init__(self) -> None:
        self.pokes = 0

    def poke(self) -> None:
        self.pokes += 1


class Counts:
    def task_state(self, counts: Any) -> None:
        pass

    def observe_task_duration(self, seconds: float, reason: str) -> None:
        pass


class Lifecycle:
    def counts(self) -> dict[str, int]:
        return {}

    def get(self, task_id: str) -> None:
        return None


def _daemon() -> tuple[Daemon, Worker, Session]:
    import threading

    d = Daemon.__new__(Daemon)   # only what _on_event touches
    worker, session = Worker(), Session()
    d.worker, d.session, d.signals = worker, session, Signals()  # type: ignore[assignment]
    d.prom, d.lifecycle = Counts(), Lifecycle()  # type: ignore[assignment]
    d._shape_lock, d._last_shape = threading.Lock(), None
    return d, worker, session


def _state(d: Daemon, new: str) -> None:
    d._on_event("state", {"task_id": "t", "old": None, "new": new})


def test_only_changes_the_pool_would_see_poke_the_session() -> None:
    d, worker, session = _daemon()
    _state(d, "accepted")
    assert session.pokes == 1          # the first report
    worker.idle, worker.running = False, 1
    _state(d, "preparing")
    assert session.pokes == 2          # Busy, one running
    for new in ("running", "exited", "packing"):
        _state(d, new)
    assert session.pokes == 2          # nothing a heartbeat says changed
    worker.idle = True
    _state(d, "uploading")
    assert session.pokes == 3          # the slot is free again: Idle at once
    worker.running = 0
    d._on_event("task_finished", {"task_id": "t", "duration": 1.0, "record": {}})
    assert session.pokes == 4          # the runner left after its last state change
    worker.draining = True
    _state(d, "done")
    assert session.pokes == 5


def test_a_poke_also_wakes_the_main_loop_for_the_status_line() -> None:
    d, worker, _ = _daemon()
    _state(d, "accepted")
    assert d.signals.wake.is_set()
    d.signals.wake.clear()
    _state(d, "preparing")
    assert not d.signals.wake.is_set()
