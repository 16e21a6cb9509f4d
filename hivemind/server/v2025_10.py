"""WorkerNodeService as pool protocol generation 2025-10 calls it (proto/v2025_10/):
ExecuteTask{node_id, task_id, task_zip, cpu: int32, gpu: int32, memory_gb, gpu_memory_gb}; the
response's `result` field is unused by that pool and left empty. ReportOutput and
ReportRunningStatus are never called by the pool and answer UNIMPLEMENTED."""

from __future__ import annotations

from typing import Any

import grpc

from hivemind._proto.v2025_10 import nodepool_pb2 as pb2
from hivemind._proto.v2025_10 import nodepool_pb2_grpc as pb2_grpc
from hivemind.server.service import ServedCalls, parse_execute, pool_side

_grpc: Any = pb2_grpc  # untyped generated helpers


class WorkerNodeServicer(pb2_grpc.WorkerNodeServiceServicer):  # type: ignore[misc]
    def __init__(self, calls: ServedCalls) -> None:
        self._calls = calls

    def ExecuteTask(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        peer = context.peer()
        ours = self._calls.node_id
        if request.node_id and ours and request.node_id != ours:
            # The pool dialled an address it has on record for another node (a stale
            # registration); refusing leaves the task queued for the node it meant.
            shown = repr(str(request.node_id)[:64])
            return pb2.ExecuteTaskResponse(success=False, message=f"this is node {ours!r}, not {shown}")
        decision = self._calls.execute(lambda: parse_execute(
            task_id=request.task_id, task_zip=request.task_zip, cpu_score=float(request.cpu),
            gpu_score=float(request.gpu), memory_gb=request.memory_gb,
            gpu_memory_gb=request.gpu_memory_gb, peer=peer, cpu_field="cpu", gpu_field="gpu"), peer)
        return pb2.ExecuteTaskResponse(success=decision.accepted, message=decision.message)

    def StopTaskExecution(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        decision = self._calls.stop(request.task_id, context.peer())
        return pb2.StopTaskExecutionResponse(success=decision.accepted, message=decision.message)

    def ReportOutput(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        pool_side(context)

    def ReportRunningStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        pool_side(context)


def add_to_server(server: grpc.Server, calls: ServedCalls) -> None:
    _grpc.add_WorkerNodeServiceServicer_to_server(WorkerNodeServicer(calls), server)
