"""Named fault points: places in a task's life where a test can make the worker die, pause or fail.

A point is armed only through the environment of the worker process (``HIVEMIND_FAULTS``), which a
test sets when it starts the worker; nothing the network sends can arm one. Unarmed, `hit()` is
one dict lookup on an empty dict. The spec is read once, when this module is first imported.

    HIVEMIND_FAULTS="result_packed=kill"                     # SIGKILL at the first hit
    HIVEMIND_FAULTS="upload_in_flight=sleep:3,task_exited=error"
    HIVEMIND_FAULTS="output_streamed@task-7=kill"           # only when the task id matches

Actions: ``kill`` (SIGKILL this process: no cleanup, no flush, like a power cut for the process),
``sleep:SECONDS``, ``error`` (raise `FaultInjected` at the point).

The points, in the order a task meets them (each is hit with the task's id):

========================= ===============================================================
accepted_before_persist   ExecuteTask admitted the task; its archive is not on disk yet
archive_persisted         the archive is written and fsynced; ExecuteTask has not answered
preparing                 the runner extracted the archive and is about to prepare/start
running                   the executor started the task and its handle is persisted
output_streamed           the pool acknowledged a batch of the task's output (offset saved)
task_exited               the executor reported the task's end; nothing packed yet
result_packed             result.zip is written and fsynced; no "result pending" record yet
result_pending            "result pending" is committed; container/workspace still there
result_handoff            the task's last output is sent; its result is about to be queued
upload_in_flight          the result upload to the pool is about to be sent
upload_acknowledged       the pool accepted the result; the worker has not recorded it yet
========================= ===============================================================
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

ENV = "HIVEMIND_FAULTS"

POINTS = frozenset({
    "accepted_before_persist", "archive_persisted", "preparing", "running", "output_streamed",
    "task_exited", "result_packed", "result_pending", "result_handoff", "upload_in_flight",
    "upload_acknowledged",
})

log = logging.getLogger(__name__)


class FaultInjected(RuntimeError):
    """Raised at a point armed with the `error` action."""


@dataclass(frozen=True)
class Fault:
    point: str
    action: str                 # kill | sleep | error
    seconds: float = 0.0
    task_id: str = ""           # empty: any task


def parse(spec: str) -> dict[str, list[Fault]]:
    """`point[@task]=action[:arg]`, comma-separated. Raises ValueError naming the bad part."""
    armed: dict[str, list[Fault]] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        where, sep, what = part.partition("=")
        point, _, task_id = where.strip().partition("@")
        action, _, arg = what.strip().partition(":")
        if not sep or point not in POINTS:
            raise ValueError(f"{ENV}: {part!r}: unknown point (known: {', '.join(sorted(POINTS))})")
        if action not in ("kill", "sleep", "error"):
            raise ValueError(f"{ENV}: {part!r}: action must be kill, sleep:SECONDS or error")
        seconds = 0.0
        if action == "sleep":
            try:
                seconds = float(arg)
            except ValueError:
                raise ValueError(f"{ENV}: {part!r}: sleep needs seconds, e.g. sleep:2") from None
        armed.setdefault(point, []).append(Fault(point, action, seconds, task_id))
    return armed


def _from_env() -> dict[str, list[Fault]]:
    spec = os.environ.get(ENV, "")
    if not spec:
        return {}
    armed = parse(spec)
    # Loud on purpose: an armed worker must never be mistaken for a production one.
    log.warning("fault points armed from %s: %s", ENV, spec)
    return armed


_ARMED: dict[str, list[Fault]] = _from_env()


def armed() -> bool:
    return bool(_ARMED)


def hit(point: str, task_id: str = "") -> None:
    """Pass the named point; does nothing unless the environment armed it."""
    faults = _ARMED.get(point)
    if not faults:
        return
    for f in faults:
        if f.task_id and f.task_id != task_id:
            continue
        if f.action == "kill":
            # Written straight to fd 2: the logging machinery may buffer, and this process ends now.
            os.write(2, f"FAULT {point} task={task_id} kill\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.action == "sleep":
            os.write(2, f"FAULT {point} task={task_id} sleep {f.seconds:g}\n".encode())
            time.sleep(f.seconds)
        else:
            raise FaultInjected(f"fault injected at {point} (task {task_id})")
