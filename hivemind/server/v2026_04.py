"""WorkerNodeService as pool protocol generation 2026-04 calls it (proto/v2026_04/):
ExecuteTask{task_id, task_zip, cpu_usage: float, gpu_usage: float, memory_gb, gpu_memory_gb}."""

from __future__ import annotations

from typing import Any

import grpc

from hivemind._proto.v2026_04 import nodepool_pb2 as pb2
from hivemind._proto.v2026_04 import nodepool_pb2_grpc as pb2_grpc
from hivemind.server.service import ServedCalls, parse_execute, pool_side

_grpc: Any = pb2_grpc  # untyped generated helpers


class WorkerNodeServicer(pb2_grpc.WorkerNodeServiceServicer):  # type: ignore[misc]
    def __init__(self, calls: ServedCalls) -> None:
        self._calls = calls

    def ExecuteTask(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        peer = context.peer()
        decision = self._calls.execute(lambda: parse_execute(
            task_id=request.task_id, task_zip=request.task_zip, cpu_score=request.cpu_usage,
            gpu_score=request.gpu_usage, memory_gb=request.memory_gb,
            gpu_memory_gb=request.gpu_memory_gb, peer=peer), peer)
        return pb2.ExecuteTaskResponse(success=decision.accepted, message=decision.message)

    def StopTaskExecution(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        decision = self._calls.stop(request.task_id, context.peer())
        return pb2.StopTaskExecutionResponse(success=decision.accepted, message=decision.message)

    def TaskOutputUpload(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        pool_side(context)

    def TaskResultUpload(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        pool_side(context)

    def TaskOutput(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        pool_side(context)

    def TaskUsage(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        pool_side(context)


def add_to_server(server: grpc.Server, calls: ServedCalls) -> None:
    _grpc.add_WorkerNodeServiceServicer_to_server(WorkerNodeServicer(calls), server)
