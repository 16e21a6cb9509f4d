"""The task state machine: unit tests, a threaded test, and a hypothesis stateful model."""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hivemind.tasks.state import (
    ZERO,
    IllegalTransition,
    Lifecycle,
    Outcome,
    Resources,
    TaskState,
    UnknownTask,
)

GiB = 1 << 30
CAP = Resources(cpus=4.0, memory_bytes=8 * GiB, gpus=("g0", "g1"), slots=3)
S = TaskState
# The model's own copy of the diagram's sets, so a change to the module can't hide from the test.
HOLDING = frozenset({S.ACCEPTED, S.PREPARING, S.RUNNING})
TERMINAL = frozenset({S.DONE, S.FAILED, S.STOPPED})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def req(cpus: float = 1.0, mem_gib: int = 1, gpus: tuple[str, ...] = (), slots: int = 1) -> Resources:
    return Resources(cpus=cpus, memory_bytes=mem_gib * GiB, gpus=gpus, slots=slots)


def run_to_done(lc: Lifecycle, task_id: str) -> None:
    lc.advance(task_id, S.PREPARING)
    lc.advance(task_id, S.RUNNING)
    lc.advance(task_id, S.UPLOADING, outcome=Outcome.SUCCEEDED, exit_code=0)
    lc.advance(task_id, S.DONE)


# -- admission -------------------------------------------------------------------------------

def test_admit_reserves_and_the_happy_path_releases() -> None:
    clock = FakeClock()
    lc = Lifecycle(CAP, clock=clock)
    adm = lc.admit("t1", req(1.5, 2))
    assert adm.ok and adm.granted == req(1.5, 2)
    assert lc.reserved() == req(1.5, 2)
    assert lc.free() == Resources(2.5, 6 * GiB, ("g0", "g1"), 2)
    lc.advance("t1", S.PREPARING)
    lc.advance("t1", S.RUNNING, executor="podman")
    assert lc.reserved() == req(1.5, 2)
    rec = lc.advance("t1", S.UPLOADING, outcome=Outcome.SUCCEEDED, exit_code=0, reason="exited")
    assert lc.reserved() == ZERO, "UPLOADING holds nothing"
    assert (rec.accepted_at, rec.started_at, rec.finished_at) == (1001.0, 1003.0, 1004.0)
    assert rec.executor == "podman" and rec.exit_code == 0
    done = lc.advance("t1", S.DONE)
    assert done.terminal and done.outcome is Outcome.SUCCEEDED and done.finished_at == 1004.0


@pytest.mark.parametrize(("request_", "gpu_count", "why"), [
    (req(slots=4), 0, "no free slot"),
    (req(cpus=4.5), 0, "not enough CPU"),
    (req(mem_gib=9), 0, "not enough memory"),
    (req(gpus=("g7",)), 0, "GPU not free: g7"),
    (req(), 3, "not enough GPUs"),
])
def test_admit_refuses_with_a_reason(request_: Resources, gpu_count: int, why: str) -> None:
    lc = Lifecycle(CAP)
    adm = lc.admit("t1", request_, gpu_count)
    assert not adm.ok and why in adm.reason and not adm.duplicate
    assert lc.get("t1") is None and lc.reserved() == ZERO
    assert lc.admit("t1", req()).ok, "a refused id may come back later"


def test_admission_counts_what_is_held() -> None:
    lc = Lifecycle(CAP)
    assert lc.admit("a", req(2.0, 4)).ok
    assert lc.admit("b", req(2.0, 4)).ok
    refused = lc.admit("c", req(0.5, 1))
    assert not refused.ok and "not enough CPU" in refused.reason
    lc.advance("a", S.FAILED, reason="crashed")
    assert lc.admit("c", req(0.5, 1)).ok


def test_gpus_are_picked_and_never_shared() -> None:
    lc = Lifecycle(CAP)
    a = lc.admit("a", req(), gpu_count=1)
    b = lc.admit("b", req(), gpu_count=1)
    assert a.granted is not None and b.granted is not None
    assert {a.granted.gpus, b.granted.gpus} == {("g0",), ("g1",)}
    assert not lc.admit("c", req(), gpu_count=1).ok
    assert not lc.admit("d", req(gpus=("g0",))).ok
    lc.advance("a", S.STOPPED)
    assert lc.admit("e", req(gpus=a.granted.gpus)).ok


def test_the_same_id_is_never_admitted_twice() -> None:
    lc = Lifecycle(CAP)
    assert lc.admit("t1", req()).ok
    again = lc.admit("t1", req())
    assert not again.ok and again.duplicate and "already known" in again.reason
    run_to_done(lc, "t1")
    lc.forget("t1")
    assert lc.get("t1") is None
    assert lc.admit("t1", req()).duplicate, "forgetting a record does not forget the id"


# -- transitions -----------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "bad"), [
    ([], S.RUNNING),                                  # ACCEPTED -> RUNNING skips PREPARING
    ([], S.DONE),
    ([S.PREPARING], S.ACCEPTED),
    ([S.PREPARING, S.RUNNING], S.PREPARING),
    ([S.PREPARING, S.RUNNING, S.FAILED], S.UPLOADING),
    ([S.STOPPED], S.PREPARING),
])
def test_illegal_transitions_raise_and_change_nothing(path: list[TaskState], bad: TaskState) -> None:
    lc = Lifecycle(CAP)
    lc.admit("t", req())
    for state in path:
        lc.advance("t", state)
    before = lc.get("t")
    reserved = lc.reserved()
    with pytest.raises(IllegalTransition):
        lc.advance("t", bad)
    assert lc.get("t") == before and lc.reserved() == reserved


def test_uploading_needs_an_outcome_and_ends_by_it() -> None:
    lc = Lifecycle(CAP)
    lc.admit("t", req())
    with pytest.raises(IllegalTransition, match="needs an outcome"):
        lc.advance("t", S.UPLOADING)
    lc.advance("t", S.UPLOADING, outcome=Outcome.STOPPED, reason="stopped")
    with pytest.raises(IllegalTransition):
        lc.advance("t", S.DONE)
    assert lc.advance("t", S.STOPPED).outcome is Outcome.STOPPED


def test_a_failed_upload_of_a_success_may_end_failed() -> None:
    lc = Lifecycle(CAP)
    lc.admit("t", req())
    lc.advance("t", S.PREPARING)
    lc.advance("t", S.RUNNING)
    lc.advance("t", S.UPLOADING, outcome=Outcome.SUCCEEDED)
    rec = lc.advance("t", S.FAILED, message="upload gave up")
    assert rec.state is S.FAILED and rec.outcome is Outcome.SUCCEEDED


def test_direct_terminal_jump_implies_the_outcome() -> None:
    lc = Lifecycle(CAP)
    lc.admit("a", req())
    lc.admit("b", req())
    assert lc.advance("a", S.STOPPED).outcome is Outcome.STOPPED
    assert lc.advance("b", S.FAILED).outcome is Outcome.FAILED
    lc.admit("c", req())
    with pytest.raises(IllegalTransition, match="contradicts"):
        lc.advance("c", S.FAILED, outcome=Outcome.SUCCEEDED)


def test_unknown_tasks_and_fields() -> None:
    lc = Lifecycle(CAP)
    with pytest.raises(UnknownTask):
        lc.advance("nope", S.PREPARING)
    lc.admit("t", req())
    with pytest.raises(TypeError, match="colour"):
        lc.advance("t", S.PREPARING, colour="red")
    with pytest.raises(IllegalTransition, match="only terminal"):
        lc.forget("t")


# -- listeners -------------------------------------------------------------------------------

def test_listeners_see_every_transition_in_order() -> None:
    lc = Lifecycle(CAP)
    seen: list[tuple[str, TaskState | None, TaskState]] = []
    unsubscribe = lc.subscribe(lambda *e: seen.append(e))

    def broken(*_: object) -> None:
        raise RuntimeError("listener bug")

    lc.subscribe(broken)
    lc.admit("t", req())
    run_to_done(lc, "t")
    assert seen == [("t", None, S.ACCEPTED), ("t", S.ACCEPTED, S.PREPARING),
                    ("t", S.PREPARING, S.RUNNING), ("t", S.RUNNING, S.UPLOADING),
                    ("t", S.UPLOADING, S.DONE)]
    unsubscribe()
    lc.admit("u", req())
    assert len(seen) == 5


def test_a_listener_may_call_back_into_the_lifecycle() -> None:
    lc = Lifecycle(CAP)
    seen: list[tuple[str, TaskState | None, TaskState]] = []

    def auto_prepare(task_id: str, old: TaskState | None, new: TaskState) -> None:
        seen.append((task_id, old, new))
        if new is S.ACCEPTED:
            lc.advance(task_id, S.PREPARING)     # reentrant: must neither deadlock nor reorder
        assert lc.get(task_id) is not None

    lc.subscribe(auto_prepare)
    lc.admit("t", req())
    assert seen == [("t", None, S.ACCEPTED), ("t", S.ACCEPTED, S.PREPARING)]


# -- restore ---------------------------------------------------------------------------------

def test_restore_rebuilds_reservations_and_known_ids() -> None:
    old = Lifecycle(CAP)
    old.admit("running", req(2.0, 2), gpu_count=1)
    old.advance("running", S.PREPARING)
    old.advance("running", S.RUNNING)
    old.admit("done", req())
    run_to_done(old, "done")
    new = Lifecycle(CAP)
    new.restore(old.tasks(), known_ids=["forgotten"])
    assert new.reserved() == old.reserved() == Resources(2.0, 2 * GiB, ("g0",), 1)
    assert new.admit("running", req()).duplicate
    assert new.admit("done", req()).duplicate
    assert new.admit("forgotten", req()).duplicate
    with pytest.raises(ValueError, match="restored twice"):
        new.restore(old.tasks()[:1])


def test_restore_past_capacity_clamps_free() -> None:
    big = Lifecycle(replace(CAP, cpus=16.0))
    big.admit("t", req(cpus=8.0))
    small = Lifecycle(CAP)
    small.restore(big.tasks())
    assert small.free().cpus == 0.0 and not small.admit("u", req(0.1)).ok


# -- threads ---------------------------------------------------------------------------------

def test_concurrent_admission_never_overcommits() -> None:
    cap = Resources(cpus=2.0, memory_bytes=100 * GiB, gpus=(), slots=100)
    lc = Lifecycle(cap)
    worst = [0.0]
    lock = threading.Lock()

    def check(*_: object) -> None:
        used = lc.reserved().cpus
        with lock:
            worst[0] = max(worst[0], used)

    lc.subscribe(check)
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(50):
            tid = f"w{n}-{i}"
            if lc.admit(tid, Resources(cpus=0.3, memory_bytes=GiB, slots=1)).ok:
                run_to_done(lc, tid)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lc.reserved() == ZERO
    assert worst[0] <= 2.0 + 1e-9
    assert all(r.state is S.DONE for r in lc.tasks())


# -- the stateful model ----------------------------------------------------------------------

IDS = [f"t{i}" for i in range(4)]


class LifecycleMachine(RuleBasedStateMachine):
    """Random interleavings of the runner's and the pool's actions against a plain model."""

    def __init__(self) -> None:
        super().__init__()
        self.lc = Lifecycle(CAP, clock=FakeClock())
        self.model: dict[str, TaskState] = {}
        self.granted: dict[str, Resources] = {}
        self.outcome: dict[str, Outcome] = {}
        self.last_seen: dict[str, TaskState] = {}
        self.lc.subscribe(self._on_event)

    def _on_event(self, task_id: str, old: TaskState | None, new: TaskState) -> None:
        # Per task, each event continues from the previous one: no task is in two states.
        assert self.last_seen.get(task_id) == old
        self.last_seen[task_id] = new

    def _try(self, task_id: str, to: TaskState, **info: object) -> bool:
        legal = self._legal(task_id, to, info.get("outcome"))  # type: ignore[arg-type]
        try:
            self.lc.advance(task_id, to, **info)
        except (IllegalTransition, UnknownTask):
            assert not legal, f"{task_id}: {self.model.get(task_id)} -> {to} should be legal"
            return False
        assert legal, f"{task_id}: {self.model.get(task_id)} -> {to} should be illegal"
        self.model[task_id] = to
        if to is S.UPLOADING:
            self.outcome[task_id] = info["outcome"]  # type: ignore[assignment]
        return True

    def _legal(self, task_id: str, to: TaskState, outcome: Outcome | None) -> bool:
        cur = self.model.get(task_id)
        if cur is None or cur in TERMINAL:
            return False
        if to is S.PREPARING:
            return cur is S.ACCEPTED
        if to is S.RUNNING:
            return cur is S.PREPARING
        if to is S.UPLOADING:
            return cur in HOLDING and outcome is not None
        if cur is S.UPLOADING:
            oc = self.outcome[task_id]
            return {S.DONE: oc is Outcome.SUCCEEDED, S.STOPPED: oc is Outcome.STOPPED,
                    S.FAILED: True}[to]
        return to in (S.FAILED, S.STOPPED)

    @rule(task_id=st.sampled_from(IDS), cpus=st.sampled_from([0.5, 1.0, 1.5, 2.5]),
          mem=st.sampled_from([1, 2, 4]), gpu_count=st.integers(0, 2))
    def accept(self, task_id: str, cpus: float, mem: int, gpu_count: int) -> None:
        request = req(cpus, mem)
        held = [self.granted[t] for t, s in self.model.items() if s in HOLDING]
        fits = (sum(r.slots for r in held) + 1 <= CAP.slots
                and math.fsum(r.cpus for r in held) + cpus <= CAP.cpus + 1e-9
                and sum(r.memory_bytes for r in held) + request.memory_bytes <= CAP.memory_bytes
                and sum(len(r.gpus) for r in held) + gpu_count <= len(CAP.gpus))
        adm = self.lc.admit(task_id, request, gpu_count)
        if task_id in self.model:
            assert not adm.ok and adm.duplicate
            return
        assert adm.ok == fits, adm.reason
        if adm.ok:
            assert adm.granted is not None and len(adm.granted.gpus) == gpu_count
            self.model[task_id] = S.ACCEPTED
            self.granted[task_id] = adm.granted

    @rule(task_id=st.sampled_from(IDS))
    def prepare(self, task_id: str) -> None:
        self._try(task_id, S.PREPARING)

    @rule(task_id=st.sampled_from(IDS))
    def start(self, task_id: str) -> None:
        self._try(task_id, S.RUNNING)

    @rule(task_id=st.sampled_from(IDS), direct=st.booleans())
    def stop(self, task_id: str, direct: bool) -> None:
        if direct:
            self._try(task_id, S.STOPPED)
        else:
            self._try(task_id, S.UPLOADING, outcome=Outcome.STOPPED, reason="stopped")

    @rule(task_id=st.sampled_from(IDS), direct=st.booleans())
    def executor_crash(self, task_id: str, direct: bool) -> None:
        if direct:
            self._try(task_id, S.FAILED, reason="lost")
        else:
            self._try(task_id, S.UPLOADING, outcome=Outcome.FAILED, reason="lost")

    @rule(task_id=st.sampled_from(IDS), ok=st.booleans())
    def complete(self, task_id: str, ok: bool) -> None:
        if self.model.get(task_id) is not S.RUNNING:
            return
        self._try(task_id, S.UPLOADING, outcome=Outcome.SUCCEEDED if ok else Outcome.FAILED,
                  exit_code=0 if ok else 1)

    @rule(task_id=st.sampled_from(IDS), to=st.sampled_from([S.DONE, S.FAILED, S.STOPPED]))
    def upload(self, task_id: str, to: TaskState) -> None:
        self._try(task_id, to)

    @precondition(lambda self: bool(self.model))
    @rule()
    def finish_everything(self) -> None:
        for task_id, state in list(self.model.items()):
            if state in HOLDING:
                self._try(task_id, S.UPLOADING, outcome=Outcome.FAILED)
            if self.model[task_id] is S.UPLOADING:
                self._try(task_id, S.FAILED)
        assert self.lc.reserved() == ZERO

    @invariant()
    def reservations_match_the_holding_tasks(self) -> None:
        held = [self.granted[t] for t, s in self.model.items() if s in HOLDING]
        reserved = self.lc.reserved()
        assert math.isclose(reserved.cpus, math.fsum(r.cpus for r in held), abs_tol=1e-9)
        assert reserved.memory_bytes == sum(r.memory_bytes for r in held)
        assert reserved.slots == len(held)
        assert sorted(reserved.gpus) == sorted(g for r in held for g in r.gpus)
        assert len(set(reserved.gpus)) == len(reserved.gpus)
        if all(s not in HOLDING for s in self.model.values()):
            assert reserved == ZERO

    @invariant()
    def never_over_capacity(self) -> None:
        r = self.lc.reserved()
        assert r.cpus <= CAP.cpus + 1e-9 and r.memory_bytes <= CAP.memory_bytes
        assert r.slots <= CAP.slots and set(r.gpus) <= set(CAP.gpus)

    @invariant()
    def one_state_per_task(self) -> None:
        records = self.lc.tasks()
        assert len({r.task_id for r in records}) == len(records)
        assert {r.task_id: r.state for r in records} == self.model
        assert self.last_seen == self.model


TestLifecycleMachine = LifecycleMachine.TestCase
TestLifecycleMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


def test_a_long_history_keeps_the_latest_records_and_every_id() -> None:
    """A worker that ran many tasks keeps only the latest ended records (its calls cost what the
    running tasks cost, not its history), never forgets an id, and counts every task."""
    lc = Lifecycle(CAP, max_terminal=5)
    for i in range(12):
        assert lc.admit(f"t{i}", req()).ok
        run_to_done(lc, f"t{i}")
    assert lc.admit("live", req(cpus=2.0)).ok
    assert [r.task_id for r in lc.tasks()] == ["t7", "t8", "t9", "t10", "t11", "live"]
    assert lc.admit("t0", req()).duplicate, "an id whose record was dropped is still known"
    assert lc.counts() == {"done": 12, "accepted": 1}
    assert lc.reserved().cpus == 2.0 and lc.free().slots == CAP.slots - 1
    lc.advance("live", S.FAILED)
    assert lc.reserved() == Resources() and lc.counts() == {"done": 12, "failed": 1}
    assert lc.get("t6") is None and lc.get("live") is not None


def test_restore_rebuilds_the_reservations_and_counts() -> None:
    a = Lifecycle(CAP)
    assert a.admit("run", req(cpus=1.5)).ok
    a.advance("run", S.PREPARING)
    assert a.admit("done", req()).ok
    run_to_done(a, "done")
    b = Lifecycle(CAP)
    b.restore(a.tasks())
    assert b.reserved().cpus == 1.5 and b.counts() == {"preparing": 1, "done": 1}
