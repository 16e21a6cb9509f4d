"""The 2025-10 bindings match shared/PROTOCOL-2025-10.md: every message's field numbers and types,
and every service's methods (the tables below are copied from that sheet)."""

from __future__ import annotations

import re

from google.protobuf.descriptor import FieldDescriptor as FD

from hivemind._proto.v2025_10 import nodepool_pb2 as pb

MESSAGES = """
| LoginRequest | 1: string username · 2: string password |
| LoginResponse | 1: bool success · 2: string message · 3: string token |
| RegisterRequest | 1: string username · 2: string password |
| RegisterResponse | 1: bool success · 2: string message |
| TransferRequest | 1: string token · 2: string receiver_username · 3: int64 amount |
| TransferResponse | 1: bool success · 2: string message |
| GetBalanceRequest | 1: string username · 2: string token |
| GetBalanceResponse | 1: bool success · 2: string message · 3: int64 balance |
| RegisterWorkerNodeRequest | 1: string node_id · 2: string hostname · 3: int32 cpu_cores · 4: int32 memory_gb · 5: int32 cpu_score · 6: int32 gpu_score · 7: int32 gpu_memory_gb · 8: string location · 9: int32 port · 12: string gpu_name · 13: string docker_status |
| StatusResponse | 1: bool success · 2: string message |
| HealthCheckRequest | (empty) |
| HealthCheckResponse | 1: bool healthy · 2: string message |
| ReportStatusRequest | 1: string node_id · 2: string status_message |
| UploadTaskRequest | 1: string task_id · 2: bytes task_zip · 3: int32 memory_gb · 4: int32 cpu_score · 5: int32 gpu_score · 6: int32 gpu_memory_gb · 7: string location · 8: string gpu_name · 9: string user_id |
| UploadTaskResponse | 1: bool success · 2: string message |
| PollTaskStatusRequest | 1: string task_id |
| PollTaskStatusResponse | 1: string task_id · 2: string status · 3: repeated string output · 4: string message |
| StoreOutputRequest | 1: string task_id · 2: string output |
| StoreResultRequest | 1: string task_id · 2: bytes result_zip |
| GetTaskResultRequest | 1: string task_id · 2: string token |
| GetTaskResultResponse | 1: bool success · 2: string message · 3: bytes result_zip |
| ReturnTaskResultRequest | 1: string task_id · 2: bytes result_zip |
| ReturnTaskResultResponse | 1: bool success · 2: string message |
| ExecuteTaskRequest | 1: string node_id · 2: string task_id · 3: bytes task_zip · 4: int32 cpu · 5: int32 gpu · 6: int32 memory_gb · 7: int32 gpu_memory_gb |
| ExecuteTaskResponse | 1: bool success · 2: string message · 3: bytes result |
| ReportOutputRequest | 1: string node_id · 2: string task_id · 3: string output |
| RunningStatusRequest | 1: string node_id · 2: string task_id · 3: int32 cpu_usage · 4: int32 memory_usage · 5: int32 gpu_usage · 6: int32 gpu_memory_usage |
| RunningStatusResponse | 1: bool success · 2: string message · 3: int64 cpt_reward |
| TaskCompletedRequest | 1: string task_id · 2: string node_id · 3: bool success |
| StoreLogsRequest | 1: string node_id · 2: string task_id · 3: string logs · 4: int64 timestamp |
| GetTaskLogsRequest | 1: string task_id · 2: string token |
| GetTaskLogsResponse | 1: bool success · 2: string message · 3: string logs |
| GetAllTasksRequest | 1: string token |
| TaskStatus | 1: string task_id · 2: string status · 3: string created_at · 4: string updated_at · 5: string assigned_node |
| GetAllTasksResponse | 1: bool success · 2: string message · 3: repeated TaskStatus tasks |
| StopTaskRequest | 1: string task_id · 2: string token |
| StopTaskResponse | 1: bool success · 2: string message |
| StopTaskExecutionRequest | 1: string task_id |
| StopTaskExecutionResponse | 1: bool success · 2: string message |
| WorkerNodeInfo | 1: string node_id · 2: string hostname · 3: int32 cpu_cores · 4: int32 memory_gb · 5: string status · 6: double last_heartbeat · 7: int32 cpu_score · 8: int32 gpu_score · 9: int32 gpu_memory_gb · 10: string location · 11: int32 port · 12: string gpu_name |
| GetNodeListRequest | (empty) |
| GetNodeListResponse | 1: bool success · 2: string message · 3: repeated WorkerNodeInfo nodes |
"""

SERVICES = """
| UserService | Login(LoginRequest → LoginResponse) |
| UserService | Register(RegisterRequest → RegisterResponse) |
| UserService | Transfer(TransferRequest → TransferResponse) |
| UserService | GetBalance(GetBalanceRequest → GetBalanceResponse) |
| NodeManagerService | RegisterWorkerNode(RegisterWorkerNodeRequest → StatusResponse) |
| NodeManagerService | HealthCheck(HealthCheckRequest → HealthCheckResponse) |
| NodeManagerService | ReportStatus(ReportStatusRequest → StatusResponse) |
| NodeManagerService | GetNodeList(GetNodeListRequest → GetNodeListResponse) |
| MasterNodeService | UploadTask(UploadTaskRequest → UploadTaskResponse) |
| MasterNodeService | PollTaskStatus(PollTaskStatusRequest → PollTaskStatusResponse) |
| MasterNodeService | StoreOutput(StoreOutputRequest → StatusResponse) |
| MasterNodeService | StoreResult(StoreResultRequest → StatusResponse) |
| MasterNodeService | GetTaskResult(GetTaskResultRequest → GetTaskResultResponse) |
| MasterNodeService | TaskCompleted(TaskCompletedRequest → StatusResponse) |
| MasterNodeService | StoreLogs(StoreLogsRequest → StatusResponse) |
| MasterNodeService | GetTaskLogs(GetTaskLogsRequest → GetTaskLogsResponse) |
| MasterNodeService | GetAllTasks(GetAllTasksRequest → GetAllTasksResponse) |
| MasterNodeService | StopTask(StopTaskRequest → StopTaskResponse) |
| MasterNodeService | ReturnTaskResult(ReturnTaskResultRequest → ReturnTaskResultResponse) |
| WorkerNodeService | ExecuteTask(ExecuteTaskRequest → ExecuteTaskResponse) |
| WorkerNodeService | ReportOutput(ReportOutputRequest → StatusResponse) |
| WorkerNodeService | ReportRunningStatus(RunningStatusRequest → RunningStatusResponse) |
| WorkerNodeService | StopTaskExecution(StopTaskExecutionRequest → StopTaskExecutionResponse) |
"""

TYPES = {"string": FD.TYPE_STRING, "bytes": FD.TYPE_BYTES, "bool": FD.TYPE_BOOL, "int32": FD.TYPE_INT32,
         "int64": FD.TYPE_INT64, "float": FD.TYPE_FLOAT, "double": FD.TYPE_DOUBLE}


def test_every_message_of_the_sheet_has_its_numbers_and_types() -> None:
    rows = [r for r in MESSAGES.strip().splitlines() if r]
    assert len(rows) == len(pb.DESCRIPTOR.message_types_by_name)
    for row in rows:
        _, name, spec, _ = (c.strip() for c in row.split("|"))
        desc = pb.DESCRIPTOR.message_types_by_name[name]
        want: dict[str, tuple[int, int, bool]] = {}
        if spec != "(empty)":
            for part in spec.split("·"):
                m = re.fullmatch(r"(\d+): (repeated )?(\w+) (\w+)", part.strip())
                assert m, part
                number, repeated, tname, fname = m.groups()
                ftype = TYPES.get(tname, FD.TYPE_MESSAGE)
                want[fname] = (int(number), ftype, bool(repeated))
        got = {f.name: (f.number, f.type, f.is_repeated) for f in desc.fields}
        assert got == want, name


def test_every_service_and_method_of_the_sheet() -> None:
    want: dict[str, set[tuple[str, str, str]]] = {}
    for row in SERVICES.strip().splitlines():
        _, service, method, _ = (c.strip() for c in row.split("|"))
        m = re.fullmatch(r"(\w+)\((\w+) → (\w+)\)", method)
        assert m, method
        want.setdefault(service, set()).add(m.groups())
    got = {s.name: {(m.name, m.input_type.name, m.output_type.name) for m in s.methods}
           for s in pb.DESCRIPTOR.services_by_name.values()}
    assert got == want
    assert pb.DESCRIPTOR.package == "nodepool"
