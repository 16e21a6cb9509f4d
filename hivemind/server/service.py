"""The worker's half of `nodepool.WorkerNodeService` (ExecuteTask and StopTaskExecution), whatever
the pool's protocol generation: validation and the calls into the acceptor. The generated
servicers live in one adapter per generation (`v2026_04.py`, `v2025_10.py`), which only move
fields between their own messages and `ServedCalls`.

The servicer only validates and translates; a `TaskAcceptor` (the daemon) decides. Calling rules:
- Handlers run concurrently on the server's thread pool; the acceptor must be thread-safe.
- `TaskAcceptor.execute` must return within milliseconds: admit, start the run asynchronously,
  answer. The pool leaves a refused task queued and retries on a later round.
- Nothing raises out of a handler: a broken acceptor answers success=false "internal error",
  is logged, and the server keeps serving.
- The pool-side methods answer UNIMPLEMENTED: one service is served on both sides.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol

import grpc

# Far above any real machine, far below anything that overflows a consumer's arithmetic.
MAX_SCORE = 1e9
MAX_GB = 1 << 20
MAX_MESSAGE_CHARS = 1000
SLOW_ACCEPTOR_S = 1.0

_TASK_ID_FALLBACK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ExecuteRequest:
    task_id: str            # validated
    task_zip: bytes         # non-empty; the acceptor checks its contents
    cpu_score: float        # requested CPU score (benchmark units), finite, 0..MAX_SCORE
    gpu_score: float
    memory_gb: int          # 0..MAX_GB
    gpu_memory_gb: int
    peer: str               # grpc peer string of the caller, for logs

    def __repr__(self) -> str:   # keep megabytes of archive out of any log line
        return (f"ExecuteRequest(task_id={self.task_id!r}, task_zip=<{len(self.task_zip)} bytes>, "
                f"cpu_score={self.cpu_score}, gpu_score={self.gpu_score}, "
                f"memory_gb={self.memory_gb}, gpu_memory_gb={self.gpu_memory_gb}, peer={self.peer!r})")


@dataclass(frozen=True)
class Decision:
    accepted: bool
    message: str


class TaskAcceptor(Protocol):
    def execute(self, request: ExecuteRequest) -> Decision:
        """Admit and start asynchronously, or refuse; returns in milliseconds. Thread-safe."""
        ...

    def stop(self, task_id: str, peer: str) -> Decision:
        """Ask a task to stop (idempotent); the (partial) result is still uploaded later."""
        ...


class InvalidRequest(ValueError):
    """A request field breaks a rule; the message is safe to return to the caller."""


def check_task_id(raw: str) -> str:
    try:
        from hivemind.tasks.ids import InvalidTaskId, validate_task_id
    except ImportError:   # the ids module is optional at this layer
        if isinstance(raw, str) and _TASK_ID_FALLBACK.fullmatch(raw):
            return raw
        shown = repr(raw[:40]) + (f"... ({len(raw)} chars)" if len(raw) > 40 else "")
        raise InvalidRequest(f"invalid task id {shown}: must match "
                             "[A-Za-z0-9][A-Za-z0-9._-]{0,127}") from None
    try:
        return validate_task_id(raw)
    except InvalidTaskId as exc:
        raise InvalidRequest(str(exc)) from None


def _score(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, got {value!r}")
    if value < 0 or value > MAX_SCORE:
        raise InvalidRequest(f"{name} must be between 0 and {MAX_SCORE:g}, got {value:g}")
    return float(value)


def _gb(name: str, value: int) -> int:
    if value < 0 or value > MAX_GB:
        raise InvalidRequest(f"{name} must be between 0 and {MAX_GB} GiB, got {value}")
    return int(value)


def parse_execute(*, task_id: str, task_zip: bytes, cpu_score: float, gpu_score: float,
                  memory_gb: int, gpu_memory_gb: int, peer: str,
                  cpu_field: str = "cpu_usage", gpu_field: str = "gpu_usage") -> ExecuteRequest:
    """Validate an ExecuteTask's fields; raises InvalidRequest naming the wire field at fault."""
    checked_id = check_task_id(task_id)
    if not task_zip:
        raise InvalidRequest("empty task archive")
    return ExecuteRequest(
        task_id=checked_id,
        task_zip=bytes(task_zip),
        cpu_score=_score(f"{cpu_field} (requested CPU score)", cpu_score),
        gpu_score=_score(f"{gpu_field} (requested GPU score)", gpu_score),
        memory_gb=_gb("memory_gb", memory_gb),
        gpu_memory_gb=_gb("gpu_memory_gb", gpu_memory_gb),
        peer=peer,
    )


class ServedCalls:
    """What both generations' servicers do once the fields are out of their messages."""

    def __init__(self, acceptor: TaskAcceptor, *, logger: logging.Logger,
                 clock: Callable[[], float] = time.monotonic, node_id: str = "") -> None:
        self.node_id = node_id      # this node's id, for generations whose requests name the node
        self._acceptor = acceptor
        self._log = logger
        self._clock = clock

    def execute(self, parse: Callable[[], ExecuteRequest], peer: str) -> Decision:
        try:
            parsed = parse()
        except InvalidRequest as exc:
            self._log.info("refused ExecuteTask from %s: %s", peer, exc)
            return Decision(False, str(exc))
        return self._call("ExecuteTask", parsed.task_id, peer, lambda: self._acceptor.execute(parsed))

    def stop(self, raw_task_id: str, peer: str) -> Decision:
        try:
            task_id = check_task_id(raw_task_id)
        except InvalidRequest as exc:
            self._log.info("refused StopTaskExecution from %s: %s", peer, exc)
            return Decision(False, str(exc))
        return self._call("StopTaskExecution", task_id, peer, lambda: self._acceptor.stop(task_id, peer))

    def _call(self, what: str, task_id: str, peer: str, fn: Callable[[], Decision]) -> Decision:
        started = self._clock()
        try:
            decision = fn()
            if not isinstance(decision, Decision) or not isinstance(decision.message, str):
                raise TypeError(f"acceptor returned {type(decision).__name__}, not Decision")
        except Exception:
            self._log.exception("%s %s from %s: acceptor failed", what, task_id, peer)
            return Decision(False, "internal error")
        elapsed = self._clock() - started
        if elapsed > SLOW_ACCEPTOR_S:
            # The pool's deadline is tens of seconds, but a slow answer stalls its dispatch loop.
            self._log.warning("%s %s took %.1f s in the acceptor; it must answer in milliseconds",
                              what, task_id, elapsed)
        self._log.info("%s %s from %s: %s%s", what, task_id, peer,
                       "accepted" if decision.accepted else "refused",
                       f" ({decision.message})" if decision.message else "")
        return Decision(decision.accepted, decision.message[:MAX_MESSAGE_CHARS])


def pool_side(context: grpc.ServicerContext) -> NoReturn:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "implemented by the pool, not the worker")
    raise AssertionError("unreachable: context.abort raises")


def add_worker_service(server: grpc.Server, generation: str, calls: ServedCalls) -> None:
    """Serve the worker's half of WorkerNodeService in the pool's protocol generation."""
    if generation == "2025-10":
        from hivemind.server.v2025_10 import add_to_server
    else:
        from hivemind.server.v2026_04 import add_to_server
    add_to_server(server, calls)
