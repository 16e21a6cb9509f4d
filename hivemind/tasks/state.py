"""The one task state machine, with the resource reservations that ride on it.

    admit()
       │
       ▼
   ACCEPTED ──► PREPARING ──► RUNNING ──┐
       │            │            │      │ outcome = succeeded | failed | stopped
       │            │            │      ▼
       │            │            │  UPLOADING ──► DONE     (outcome succeeded, result acknowledged)
       │            │            │      │    ├──► FAILED   (outcome failed, or upload given up)
       │            │            │      │    └──► STOPPED  (outcome stopped)
       ├────────────┴────────────┴──────┘
       │  (stop or failure before/while running: a partial result is still uploaded)
       └──► FAILED / STOPPED directly, only when no result can be produced at all

Holding states (ACCEPTED, PREPARING, RUNNING) own a reservation taken by `admit`. Leaving them
releases it in the same critical section as the transition, so the reservation is released
exactly once and `reserved()` always equals the sum over holding tasks. UPLOADING holds nothing:
the task's processes are gone, so the next task may start while the result travels.

Terminal states (DONE, FAILED, STOPPED) have no way out. A task id, once admitted, is remembered
for the life of the Lifecycle (and via `restore` across restarts), so the same id never runs twice.

Threading: every method may be called from any thread; one lock guards the state. Listeners run
outside that lock, in transition order, on the thread that made the transition; a listener may
call back into the Lifecycle. A listener that raises is logged and skipped.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from hivemind.errors import HivemindError

log = logging.getLogger(__name__)


class TaskState(enum.StrEnum):
    ACCEPTED = "accepted"
    PREPARING = "preparing"
    RUNNING = "running"
    UPLOADING = "uploading"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"


class Outcome(enum.StrEnum):
    """How the task itself ended; fixed when it leaves the holding states."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"


HOLDING = frozenset({TaskState.ACCEPTED, TaskState.PREPARING, TaskState.RUNNING})
TERMINAL = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.STOPPED})

_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.ACCEPTED: frozenset({TaskState.PREPARING, TaskState.UPLOADING,
                                   TaskState.FAILED, TaskState.STOPPED}),
    TaskState.PREPARING: frozenset({TaskState.RUNNING, TaskState.UPLOADING,
                                    TaskState.FAILED, TaskState.STOPPED}),
    TaskState.RUNNING: frozenset({TaskState.UPLOADING, TaskState.FAILED, TaskState.STOPPED}),
    TaskState.UPLOADING: frozenset({TaskState.DONE, TaskState.FAILED, TaskState.STOPPED}),
    TaskState.DONE: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.STOPPED: frozenset(),
}

# Which terminal state an upload may end in, given the outcome fixed on entering UPLOADING.
# FAILED is always allowed: it is also how a given-up upload ends.
_UPLOAD_ENDS: dict[Outcome, frozenset[TaskState]] = {
    Outcome.SUCCEEDED: frozenset({TaskState.DONE, TaskState.FAILED}),
    Outcome.FAILED: frozenset({TaskState.FAILED}),
    Outcome.STOPPED: frozenset({TaskState.STOPPED, TaskState.FAILED}),
}

_EPS = 1e-9


class IllegalTransition(HivemindError):
    """A transition the state diagram does not allow (a bug in the caller, or a race it lost)."""


class UnknownTask(HivemindError):
    """No task with that id is held by this Lifecycle."""


@dataclass(frozen=True)
class Resources:
    cpus: float = 0.0
    memory_bytes: int = 0
    gpus: tuple[str, ...] = ()
    slots: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cpus) and self.cpus >= 0):
            raise ValueError(f"cpus must be a finite number >= 0, got {self.cpus!r}")
        if self.memory_bytes < 0 or self.slots < 0:
            raise ValueError("memory_bytes and slots must be >= 0")
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError("gpus must not repeat a device")


ZERO = Resources()


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    state: TaskState
    request: Resources                 # what admit was asked for
    granted: Resources                 # what admit reserved (request plus picked GPUs)
    accepted_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None   # when it left the holding states
    outcome: Outcome | None = None
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    executor: str = ""

    @property
    def holding(self) -> bool:
        return self.state in HOLDING

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class Admission:
    ok: bool
    reason: str = ""
    granted: Resources | None = None
    duplicate: bool = False            # the id is already known: the pool retried an accepted task


Listener = Callable[[str, TaskState | None, TaskState], None]

_INFO_FIELDS = frozenset({"outcome", "exit_code", "reason", "message", "executor"})


def _sum(resources: Iterable[Resources]) -> Resources:
    items = list(resources)
    return Resources(
        cpus=math.fsum(r.cpus for r in items),
        memory_bytes=sum(r.memory_bytes for r in items),
        gpus=tuple(sorted(g for r in items for g in r.gpus)),
        slots=sum(r.slots for r in items),
    )


@dataclass
class _Events:
    queue: deque[tuple[str, TaskState | None, TaskState]] = field(default_factory=deque)
    lock: threading.RLock = field(default_factory=threading.RLock)


MAX_TERMINAL_RECORDS = 1000


class Lifecycle:
    """Every task this worker knows, its state, and what it holds of `capacity`.

    Each call costs what the running tasks cost, not the worker's history: reservations are
    summed over the holding tasks only, state counts are kept as they change, and only the
    latest `max_terminal` ended records are kept (their ids stay known). Before, a worker that
    had run a few hundred tasks spent visibly more CPU on every ExecuteTask and transition."""

    def __init__(self, capacity: Resources, clock: Callable[[], float] = time.time,
                 max_terminal: int = MAX_TERMINAL_RECORDS) -> None:
        self._capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._tasks: dict[str, TaskRecord] = {}
        self._seen: set[str] = set()
        self._holding: set[str] = set()
        self._counts: dict[TaskState, int] = {}
        self._ended: deque[str] = deque()        # terminal ids, oldest first
        self._max_terminal = max_terminal
        self._listeners: list[Listener] = []
        self._events = _Events()

    @property
    def capacity(self) -> Resources:
        return self._capacity

    # -- queries ---------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            return self._tasks.get(task_id)

    def tasks(self) -> list[TaskRecord]:
        with self._lock:
            return sorted(self._tasks.values(), key=lambda r: (r.accepted_at, r.task_id))

    def reserved(self) -> Resources:
        with self._lock:
            return self._reserved_locked()

    def free(self) -> Resources:
        with self._lock:
            return self._free_locked()

    def counts(self) -> dict[str, int]:
        """How many tasks (since start, restored ones included) are in each state now."""
        with self._lock:
            return {state.value: n for state, n in self._counts.items() if n}

    def known(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._seen

    def refusal(self, request: Resources, gpu_count: int = 0) -> str:
        """Why `admit(request)` would be refused for want of resources now ("" if it fits);
        reserves nothing. Lets a caller decline cheaply before costlier checks."""
        with self._lock:
            return _refusal(request, gpu_count, self._free_locked(), self._capacity)

    def _reserved_locked(self) -> Resources:
        # Derived from the holding tasks, never kept as a running total, so it cannot drift.
        return _sum(self._tasks[t].granted for t in self._holding)

    def _free_locked(self) -> Resources:
        used = self._reserved_locked()
        cap = self._capacity
        # Clamped: after a restore onto a smaller machine the reservations may exceed capacity.
        return Resources(
            cpus=max(0.0, cap.cpus - used.cpus),
            memory_bytes=max(0, cap.memory_bytes - used.memory_bytes),
            gpus=tuple(g for g in cap.gpus if g not in used.gpus),
            slots=max(0, cap.slots - used.slots),
        )

    # -- changes ---------------------------------------------------------------------------

    def admit(self, task_id: str, request: Resources, gpu_count: int = 0) -> Admission:
        """Reserve `request` (plus `gpu_count` GPUs picked from the free ones) for a new task.

        Refuses, with a reason, when the id is already known or something isn't free. The id must
        already be validated (hivemind.tasks.ids)."""
        if gpu_count < 0:
            raise ValueError("gpu_count must be >= 0")
        with self._lock:
            if task_id in self._seen:
                return Admission(False, f"task {task_id} is already known", duplicate=True)
            free = self._free_locked()
            refusal = _refusal(request, gpu_count, free, self._capacity)
            if refusal:
                return Admission(False, refusal)
            picked = tuple(g for g in free.gpus if g not in request.gpus)[:gpu_count]
            granted = replace(request, gpus=tuple(request.gpus) + picked)
            now = self._clock()
            self._tasks[task_id] = TaskRecord(task_id=task_id, state=TaskState.ACCEPTED,
                                              request=request, granted=granted,
                                              accepted_at=now, updated_at=now)
            self._seen.add(task_id)
            self._track_locked(None, self._tasks[task_id])
            self._events.queue.append((task_id, None, TaskState.ACCEPTED))
        self._deliver()
        return Admission(True, granted=granted)

    def advance(self, task_id: str, to_state: TaskState, **info: Any) -> TaskRecord:
        """Move a task to `to_state`; raises IllegalTransition when the diagram forbids it.

        `info` may set outcome, exit_code, reason, message, executor. Entering UPLOADING needs
        an outcome; a direct jump to FAILED/STOPPED implies it."""
        unknown = set(info) - _INFO_FIELDS
        if unknown:
            raise TypeError(f"advance() got unknown fields: {', '.join(sorted(unknown))}")
        to_state = TaskState(to_state)
        with self._lock:
            rec = self._tasks.get(task_id)
            if rec is None:
                raise UnknownTask(f"no task {task_id}")
            old = rec.state
            if to_state not in _TRANSITIONS[old]:
                raise IllegalTransition(f"task {task_id}: {old} -> {to_state} is not allowed")
            new = self._apply(rec, to_state, info)
            self._tasks[task_id] = new
            self._track_locked(rec, new)
            self._events.queue.append((task_id, old, to_state))
        self._deliver()
        return new

    def _track_locked(self, old: TaskRecord | None, new: TaskRecord) -> None:
        """Holding set, state counts and the kept ended records follow one record's change."""
        if old is not None:
            self._counts[old.state] -= 1
        self._counts[new.state] = self._counts.get(new.state, 0) + 1
        if new.holding:
            self._holding.add(new.task_id)
        else:
            self._holding.discard(new.task_id)
        if new.terminal and (old is None or not old.terminal):
            self._ended.append(new.task_id)
            while len(self._ended) > self._max_terminal:
                gone = self._ended.popleft()
                rec = self._tasks.get(gone)
                if rec is not None and rec.terminal:
                    del self._tasks[gone]       # the count stays: it counts tasks, not records

    def _apply(self, rec: TaskRecord, to: TaskState, info: dict[str, Any]) -> TaskRecord:
        now = self._clock()
        given = Outcome(info["outcome"]) if info.get("outcome") is not None else None
        outcome = given or rec.outcome
        if to is TaskState.UPLOADING and given is None:
            raise IllegalTransition(f"task {rec.task_id}: entering uploading needs an outcome")
        if rec.holding and to in TERMINAL:
            outcome = Outcome.STOPPED if to is TaskState.STOPPED else Outcome.FAILED
            if given is not None and given is not outcome:
                raise IllegalTransition(f"task {rec.task_id}: {to} contradicts outcome {given}")
        if rec.state is TaskState.UPLOADING and rec.outcome is not None:
            if to not in _UPLOAD_ENDS[rec.outcome]:
                raise IllegalTransition(
                    f"task {rec.task_id}: outcome {rec.outcome} can't end in {to}")
            outcome = rec.outcome
        if to is TaskState.DONE and outcome is not Outcome.SUCCEEDED:
            raise IllegalTransition(f"task {rec.task_id}: done needs outcome succeeded")
        fields: dict[str, Any] = {k: v for k, v in info.items() if k != "outcome"}
        return replace(
            rec, **fields, state=to, outcome=outcome, updated_at=now,
            started_at=now if to is TaskState.RUNNING and rec.started_at is None else rec.started_at,
            finished_at=now if rec.holding and to not in HOLDING else rec.finished_at,
        )

    def forget(self, task_id: str) -> None:
        """Drop a terminal task's record; its id stays known so it can't be admitted again."""
        with self._lock:
            rec = self._tasks.get(task_id)
            if rec is None:
                return
            if not rec.terminal:
                raise IllegalTransition(f"task {task_id} is {rec.state}; only terminal tasks can be forgotten")
            del self._tasks[task_id]

    def restore(self, records: Iterable[TaskRecord], known_ids: Iterable[str] = ()) -> None:
        """Rebuild after a restart from persisted records (before any admit).

        Holding records keep their reservations, even past capacity: those tasks may still run
        and will be reattached or failed by the caller. Fires no listeners."""
        with self._lock:
            for rec in sorted(records, key=lambda r: (r.accepted_at, r.task_id)):
                if rec.task_id in self._seen:
                    raise ValueError(f"task {rec.task_id} restored twice")
                self._tasks[rec.task_id] = rec
                self._seen.add(rec.task_id)
                self._track_locked(None, rec)
            self._seen.update(known_ids)

    # -- listeners -------------------------------------------------------------------------

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Call `callback(task_id, old, new)` after every transition; returns an unsubscribe."""
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    def _deliver(self) -> None:
        # Events are queued under the state lock, so the queue is in transition order; draining
        # under a second (reentrant) lock keeps that order across threads.
        with self._events.lock:
            while True:
                with self._lock:
                    if not self._events.queue:
                        return
                    event = self._events.queue.popleft()
                    listeners = list(self._listeners)
                for cb in listeners:
                    try:
                        cb(*event)
                    except Exception:
                        log.exception("task state listener failed for %s -> %s", event[0], event[2])


def _refusal(req: Resources, gpu_count: int, free: Resources, cap: Resources) -> str:
    if req.slots > free.slots:
        return f"no free slot ({cap.slots - free.slots} of {cap.slots} in use)"
    if req.cpus > free.cpus + _EPS:
        return f"not enough CPU: {req.cpus:g} requested, {free.cpus:g} of {cap.cpus:g} free"
    if req.memory_bytes > free.memory_bytes:
        return (f"not enough memory: {req.memory_bytes >> 20} MiB requested, "
                f"{free.memory_bytes >> 20} of {cap.memory_bytes >> 20} MiB free")
    missing = [g for g in req.gpus if g not in free.gpus]
    if missing:
        return f"GPU not free: {', '.join(missing)}"
    spare = len([g for g in free.gpus if g not in req.gpus])
    if gpu_count > spare:
        return f"not enough GPUs: {gpu_count} requested, {spare} free"
    return ""
