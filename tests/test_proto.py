"""The generated bindings match proto/ and the wire facts of shared/PROTOCOL.md."""

from __future__ import annotations

from hivemind._proto import nodepool_pb2 as pb


def fields(msg: type) -> dict[str, tuple[int, int]]:
    return {f.name: (f.number, f.type) for f in msg.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_field_numbers_and_types_match_the_pool() -> None:
    F = pb.google_dot_protobuf_dot_descriptor__pb2 if hasattr(pb, "google_dot_protobuf_dot_descriptor__pb2") else None
    del F
    from google.protobuf.descriptor import FieldDescriptor as FD

    assert fields(pb.RegisterWorkerNodeRequest) == {
        "node_id": (1, FD.TYPE_STRING), "hostname": (2, FD.TYPE_STRING), "cpu_cores": (3, FD.TYPE_INT32),
        "memory_gb": (4, FD.TYPE_INT32), "cpu_score": (5, FD.TYPE_INT32), "gpu_score": (6, FD.TYPE_INT32),
        "gpu_memory_gb": (7, FD.TYPE_INT32), "location": (8, FD.TYPE_STRING), "port": (9, FD.TYPE_INT32),
        "gpu_name": (12, FD.TYPE_STRING), "docker_status": (13, FD.TYPE_STRING)}
    assert fields(pb.ExecuteTaskRequest) == {
        "task_id": (1, FD.TYPE_STRING), "task_zip": (2, FD.TYPE_BYTES), "cpu_usage": (3, FD.TYPE_FLOAT),
        "gpu_usage": (4, FD.TYPE_FLOAT), "memory_gb": (5, FD.TYPE_INT32), "gpu_memory_gb": (6, FD.TYPE_INT32)}
    assert fields(pb.RunningStatusRequest)["running_tasks"] == (8, FD.TYPE_INT32)
    assert fields(pb.RunningStatusRequest)["cpu_usage"] == (3, FD.TYPE_FLOAT)
    assert fields(pb.TaskInfo)["message"] == (4, FD.TYPE_STRING)
    assert fields(pb.TaskUsageRequest)["token"] == (6, FD.TYPE_STRING)
    assert fields(pb.UploadTaskRequest)["host_count"] == (10, FD.TYPE_INT32)


def test_services_and_methods() -> None:
    services = {s.name: sorted(m.name for m in s.methods) for s in pb.DESCRIPTOR.services_by_name.values()}
    assert services["WorkerNodeService"] == sorted(["ExecuteTask", "StopTaskExecution", "TaskOutputUpload",
                                                    "TaskResultUpload", "TaskOutput", "TaskUsage"])
    assert services["UserService"] == sorted(["Login", "Transfer", "GetBalance", "RefreshToken"])
    assert services["NodeManagerService"] == ["RegisterWorkerNode", "ReportStatus"]
    assert pb.DESCRIPTOR.package == "nodepool"


def test_round_trip_matches_known_wire_bytes() -> None:
    # Field 1 (string "t1"), field 3 (float 2.0), field 5 (int32 4): bytes an existing pool sends.
    raw = bytes([0x0A, 0x02, 0x74, 0x31, 0x1D, 0x00, 0x00, 0x00, 0x40, 0x28, 0x04])
    req = pb.ExecuteTaskRequest.FromString(raw)
    assert (req.task_id, req.cpu_usage, req.memory_gb) == ("t1", 2.0, 4)
    assert req.SerializeToString() == raw
