"""What the status API reads from the daemon: the StatusView protocol and the shapes it returns.

The daemon implements `StatusView`; the status app only reads it and serialises what it returns
as JSON, unchanged. Every key below is part of the public API (/api/v1/status, /api/v1/tasks),
documented in openapi.py, and must stay stable: add keys, never rename or drop them.

Conventions: times are Unix seconds (float, `time.time()`), None when not happened yet; sizes are
bytes; CPU amounts are cores (float). No value may hold a secret (tokens, passwords, key paths
are fine to leave out; the app also refuses to send a body that contains its own token).

Threading: the app calls the view from waitress worker threads, concurrently with the daemon's
own threads. Every method must be thread-safe, cheap (no blocking I/O, no waiting on a task) and
must not raise for ordinary conditions.
"""

from __future__ import annotations

from typing import NotRequired, Protocol, TypedDict

# Task states, in lifecycle order. `TASK_STATES` is also the label set of the `hivemind_tasks`
# gauge, so a state that empties drops to 0 instead of vanishing from the scrape.
TASK_STATES: tuple[str, ...] = (
    "accepted",    # archive received and checked, waiting for a slot
    "preparing",   # installing requirements.txt
    "running",     # the entry point runs
    "uploading",   # finished; the result waits for, or is in, upload
    "done",        # result delivered to the pool
    "failed",      # failed to start, crashed, timed out, or the result could not be delivered
    "stopped",     # stopped by the pool or an operator
)

# Pool connection states (StatusDict.pool.state).
POOL_STATES: tuple[str, ...] = ("connecting", "registered", "disconnected")


class PoolInfo(TypedDict):
    address: str                    # host:port of the pool
    state: str                      # one of POOL_STATES
    reported_status: str            # last `status` sent in ReportStatus, e.g. "Idle", "Running"
    last_heartbeat: float | None    # time of the last successful ReportStatus
    heartbeat_failures: int         # consecutive failed heartbeats (0 when the last succeeded)
    protocol: str                   # pool protocol generation (pool.protocol): "2026-04" or "2025-10"
    protocol_limitations: list[str]  # what that generation lacks and what the worker does instead


class Enforces(TypedDict):
    """What the executor really applies on this machine (from executors.base.Enforcement)."""

    memory: bool
    cpu: bool
    pids: bool
    network_isolated: bool
    readonly_root: bool


class ExecutorInfo(TypedDict):
    name: str                       # "podman" | "venv" | "" when none is usable
    usable: bool
    reason: str                     # why not usable, or a short description
    isolation: str                  # "container" | "process" | ""
    enforces: Enforces
    notes: list[str]


class SecurityInfo(TypedDict):
    grpc_auth_mode: str             # "mtls" | "token" | "legacy"
    pool_tls: bool                  # TLS towards the pool
    insecure: bool                  # true when any of insecure_reasons applies
    insecure_reasons: list[str]     # human-readable, e.g. "gRPC auth mode legacy: ..."


class CpuInfo(TypedDict):
    total: float                    # logical CPUs of the machine
    reserved: float                 # kept for the system, never given to tasks
    allocated: float                # held by admitted tasks
    free: float                     # total - reserved - allocated: what a new task can get
    usage_percent: float            # whole-machine CPU busy, 0..100


class MemoryInfo(TypedDict):
    total_bytes: int
    reserved_bytes: int
    allocated_bytes: int
    free_bytes: int                 # total - reserved - allocated
    used_bytes: int                 # whole-machine memory in use (not available)


class ResourcesInfo(TypedDict):
    cpu: CpuInfo
    memory: MemoryInfo
    gpus: int                       # usable GPUs (0 when none)


class SlotsInfo(TypedDict):
    total: int
    used: int


class WarningInfo(TypedDict):
    ts: float
    level: str                      # "warning" | "error"
    message: str                    # safe to show anyone (no secrets)


class StatusDict(TypedDict):
    """GET /api/v1/status."""

    node_id: str
    version: str
    started_at: float               # when the daemon started
    pool: PoolInfo
    executor: ExecutorInfo
    security: SecurityInfo
    metrics_backend: str            # "native" | "psutil"
    resources: ResourcesInfo
    slots: SlotsInfo
    draining: bool
    warnings: list[WarningInfo]     # most recent last; the daemon keeps a bounded list


class RequestedInfo(TypedDict):
    cpus: float                     # cores granted from the requested CPU score
    memory_bytes: int
    gpus: int
    timeout_s: float


class UsageInfo(TypedDict):
    cpu_cores: float                # average cores busy over the last sample
    memory_bytes: int
    peak_memory_bytes: int | None
    cpu_percent: NotRequired[float]     # cpu_cores / cores granted × 100 (what TaskUsage sends)
    memory_percent: NotRequired[float]  # memory_bytes / memory granted × 100
    cpu_seconds: NotRequired[float | None]
    pids: NotRequired[int | None]
    max_pids: NotRequired[int | None]
    source: NotRequired[str]            # cgroup v1 | cgroup v2 | proc tree | process group


class AppliedLimitInfo(TypedDict):
    requested: float | None
    applied: float | None           # what the kernel enforces; None: not enforced
    how: str                        # the cgroup file read and its value, or why not


class LimitsInfo(TypedDict):
    memory_bytes: AppliedLimitInfo
    cpus: AppliedLimitInfo
    pids: AppliedLimitInfo


class ProvenanceInfo(TypedDict, total=False):
    archive_sha256: str | None
    executor: str
    mode: str                       # rootless | rootful | venv
    image: str
    image_id: str
    image_digest: str
    container_id: str
    interpreter: str                # venv: real path and version of the interpreter
    venv_hash: str
    worker_version: str
    node_id: str
    auth_mode: str


class TaskDict(TypedDict):
    """One entry of GET /api/v1/tasks and the body of GET /api/v1/tasks/{task_id}."""

    task_id: str
    state: str                      # one of TASK_STATES
    created_at: float               # archive accepted
    started_at: float | None        # entry point started
    finished_at: float | None       # entry point ended
    requested: RequestedInfo
    usage: UsageInfo | None         # None before start or when the executor can't tell
    exit_code: int | None
    exit_reason: str | None         # executors.base.ExitReason value, None while running
    message: str                    # short human-readable note (why it failed, ...), or ""
    output_tail: list[str]          # last lines of output; may be [] in tasks() for brevity
    limits: LimitsInfo | None       # applied limits (what the kernel enforces), once started
    provenance: ProvenanceInfo | None   # archive sha256, image or venv, mode, worker, auth


class StatusView(Protocol):
    """The daemon's read (and two operator actions) side, as the status API sees it."""

    def status(self) -> StatusDict: ...

    def tasks(self) -> list[TaskDict]:
        """Tasks the daemon knows, newest first (running ones and a bounded recent history)."""
        ...

    def task(self, task_id: str) -> TaskDict | None:
        """One task with its output tail, or None when unknown."""
        ...

    def ready(self) -> tuple[bool, str]:
        """(True, "") when registered with the pool and an executor is usable; else (False, why)."""
        ...

    def drain(self) -> None:
        """Take no new tasks; running ones finish. Idempotent; returns at once."""
        ...

    def stop_task(self, task_id: str) -> bool:
        """Ask a task to stop (returns at once); False when the id is unknown."""
        ...


def insecure_reasons(grpc_auth_mode: str, pool_tls: bool) -> list[str]:
    """The reasons a SecurityInfo reports `insecure`; the daemon uses this to fill it."""
    reasons: list[str] = []
    if grpc_auth_mode == "legacy":
        reasons.append("gRPC auth mode legacy: callers are trusted by IP address, without TLS")
    if not pool_tls:
        reasons.append("pool connection without TLS: the password and tasks travel in clear")
    return reasons


def security_info(grpc_auth_mode: str, pool_tls: bool) -> SecurityInfo:
    reasons = insecure_reasons(grpc_auth_mode, pool_tls)
    return SecurityInfo(grpc_auth_mode=grpc_auth_mode, pool_tls=pool_tls,
                        insecure=bool(reasons), insecure_reasons=reasons)
