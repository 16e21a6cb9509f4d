"""The worker's half of `nodepool.WorkerNodeService`: ExecuteTask and StopTaskExecution.

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
from typing import Any, NoReturn, Protocol

import grpc

from hivemind._proto import nodepool_pb2, nodepool_pb2_grpc

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


def parse_execute(request: Any, peer: str) -> ExecuteRequest:
    """Translate and validate an ExecuteTaskRequest; raises InvalidRequest."""
    task_id = check_task_id(request.task_id)
    if not request.task_zip:
        raise InvalidRequest("empty task archive")
    return ExecuteRequest(
        task_id=task_id,
        task_zip=bytes(request.task_zip),
        cpu_score=_score("cpu_usage (requested CPU score)", request.cpu_usage),
        gpu_score=_score("gpu_usage (requested GPU score)", request.gpu_usage),
        memory_gb=_gb("memory_gb", request.memory_gb),
        gpu_memory_gb=_gb("gpu_memory_gb", request.gpu_memory_gb),
        peer=peer,
    )


class WorkerNodeServicer(nodepool_pb2_grpc.WorkerNodeServiceServicer):  # type: ignore[misc]
    def __init__(self, acceptor: TaskAcceptor, *, logger: logging.Logger,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._acceptor = acceptor
        self._log = logger
        self._clock = clock

    def ExecuteTask(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        peer = context.peer()
        try:
            parsed = parse_execute(request, peer)
        except InvalidRequest as exc:
            self._log.info("refused ExecuteTask from %s: %s", peer, exc)
            return nodepool_pb2.ExecuteTaskResponse(success=False, message=str(exc))
        decision = self._call("ExecuteTask", parsed.task_id, peer,
                              lambda: self._acceptor.execute(parsed))
        return nodepool_pb2.ExecuteTaskResponse(success=decision.accepted,
                                                message=decision.message)

    def StopTaskExecution(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        peer = context.peer()
        try:
            task_id = check_task_id(request.task_id)
        except InvalidRequest as exc:
            self._log.info("refused StopTaskExecution from %s: %s", peer, exc)
            return nodepool_pb2.StopTaskExecutionResponse(success=False, message=str(exc))
        decision = self._call("StopTaskExecution", task_id, peer,
                              lambda: self._acceptor.stop(task_id, peer))
        return nodepool_pb2.StopTaskExecutionResponse(success=decision.accepted,
                                                      message=decision.message)

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

    def TaskOutputUpload(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        _pool_side(context)

    def TaskResultUpload(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        _pool_side(context)

    def TaskOutput(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        _pool_side(context)

    def TaskUsage(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        _pool_side(context)


def _pool_side(context: grpc.ServicerContext) -> NoReturn:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "implemented by the pool, not the worker")
    raise AssertionError("unreachable: context.abort raises")
