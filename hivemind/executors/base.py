"""The one narrow interface every executor (Podman, venv) implements, and the types it speaks.

Calling rules, for every executor:
- `probe` may be called at any time, from any thread; it never raises, it reports.
- `prepare` runs before `start` for the same task, in the task's own runner thread; it is the only
  step allowed network access (installing requirements.txt) and honours `cancel`.
- `start` returns a `TaskHandle` as soon as the task runs; the caller persists it at once, so a
  restarted daemon can `recover` it. Output lines flow to the `OutputSink` from then on.
- `wait` blocks until the task ends (or `timeout` passes: returns None) and may be called again.
- `stop` is idempotent: SIGTERM, `grace` seconds, then SIGKILL; it returns once the task is dead.
- `cleanup` is idempotent and removes everything the executor created for the task (container,
  process group, locks), never the workspace (the runner packs the result from it first).
- `recover` reattaches to a task started by an earlier daemon from its handle; raises TaskNotFound
  when nothing is left of it. `resume` maps each stream to the `pos` of the last line the sink
  already holds: the executor delivers exactly the lines after it (none twice, none skipped),
  also for a task that exited while no daemon watched. None: from the executor's own record.
- `orphans` lists task ids of things this executor labelled and that still exist.
- `stats` and `facts` may be called from any thread while the task is known (after `start` or
  `recover`, until `cleanup`); `facts` says what the task really got (limits the kernel applied,
  where it ran) and is read for the task record before `cleanup`.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class ExitReason(enum.StrEnum):
    EXITED = "exited"                  # the task ended by itself; see exit_code
    STOPPED = "stopped"                # ended by StopTaskExecution or an operator
    OUT_OF_MEMORY = "out_of_memory"
    DISK_QUOTA = "disk_quota"          # wrote past its disk quota (workspace and temporary space)
    TIMED_OUT = "timed_out"
    FAILED_TO_START = "failed_to_start"
    LOST = "lost"                      # the daemon restarted and nothing of the task was left


@dataclass(frozen=True)
class Limits:
    """What a task may use. Executors apply what they can and say so in `Enforcement`."""

    cpus: float                        # CPU quota in cores (from the requested CPU score)
    memory_bytes: int                  # memory limit; swap is set equal (no extra swap)
    pids: int = 256
    timeout_s: float = 3600.0
    tmpfs_bytes: int = 256 * 1024 * 1024
    network: bool = False              # outbound network during the run
    gpu_devices: tuple[str, ...] = ()  # CDI names, e.g. "nvidia.com/gpu=0"
    output_bytes: int = 0              # cap of the task's output log, container log too (0: none)


@dataclass(frozen=True)
class Entry:
    """How to start the task, relative to the workspace: e.g. ("bash", "run.sh") or ("python", "main.py")."""

    argv: tuple[str, ...]
    timeout_s: float | None = None     # from the manifest; the runner takes min(this, configured)


@dataclass(frozen=True)
class TaskSpec:
    task_id: str                       # validated: [A-Za-z0-9._-]{1,128}, safe in names and paths
    workspace: Path                    # extracted archive; the task's writable cwd
    entry: Entry
    limits: Limits
    requirements: Path | None = None   # workspace/requirements.txt when present
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)   # node id, worker version, ...


@dataclass(frozen=True)
class OutputLine:
    ts: float                          # time.time() when the line was read
    stream: str                        # "stdout" | "stderr" | "prepare"
    text: str                          # without the trailing newline
    # Where this line ends in the executor's own source, per stream (a byte offset, a line
    # count); -1 when it has none. A restarted worker hands the last recorded one to `recover`.
    pos: int = -1


OutputSink = Callable[[OutputLine], None]


@dataclass(frozen=True)
class TaskHandle:
    """Opaque to everyone but its executor; persisted the moment a task starts."""

    version: int
    task_id: str
    executor: str                      # "podman" | "venv"
    state: Mapping[str, Any]           # JSON-serialisable, executor-specific


@dataclass(frozen=True)
class ExitResult:
    exit_code: int | None
    reason: ExitReason
    started_at: float
    finished_at: float
    peak_memory_bytes: int | None = None
    cpu_seconds: float | None = None
    message: str = ""


@dataclass(frozen=True)
class Usage:
    cpu_cores: float                   # average cores busy since the previous call
    memory_bytes: int
    pids: int | None = None
    cpu_seconds: float | None = None   # CPU time used since the task started
    peak_memory_bytes: int | None = None   # the kernel's peak (cgroup) or the highest sample
    source: str = ""                   # "cgroup v1" | "cgroup v2" | "proc tree" | "process group"


@dataclass(frozen=True)
class TaskFacts:
    """What a task really got, for its record and the status API.

    `applied`: per limit (memory_bytes, cpus, pids) a dict {requested, applied, how}; `applied`
    is None where the kernel does not enforce it, and `how` names the cgroup file read or why.
    `provenance`: what ran the task (image ID and digest, or interpreter and venv hash; mode).
    `usage`: the executor's own totals from its sampling (source, max_pids).
    `timing`: the executor's own phase marks (e.g. output_closed, waited), for the task timing.
    """

    applied: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    usage: Mapping[str, Any] = field(default_factory=dict)
    timing: Mapping[str, float] = field(default_factory=dict)   # phase -> when it ended (wall)


@dataclass(frozen=True)
class Enforcement:
    """What the executor really applies on this machine (checked, never assumed)."""

    isolation: str                     # "container" | "process"
    memory: bool
    cpu: bool
    pids: bool
    network_isolated: bool
    readonly_root: bool
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExecutorStatus:
    name: str
    usable: bool
    reason: str                        # why not usable, or a short description when it is
    enforcement: Enforcement | None = None


class PrepareCancelled(Exception):
    """`prepare` saw its cancel event set."""


@runtime_checkable
class Executor(Protocol):
    name: str

    def probe(self) -> ExecutorStatus: ...

    def prepare(self, spec: TaskSpec, sink: OutputSink, cancel: threading.Event) -> None: ...

    def start(self, spec: TaskSpec, sink: OutputSink) -> TaskHandle: ...

    def recover(self, handle: TaskHandle, sink: OutputSink,
                resume: Mapping[str, int] | None = None) -> None: ...

    def wait(self, task_id: str, timeout: float | None = None) -> ExitResult | None: ...

    def stop(self, task_id: str, grace: float) -> None: ...

    def stats(self, task_id: str) -> Usage | None: ...

    def facts(self, task_id: str) -> TaskFacts: ...

    def cleanup(self, task_id: str) -> None: ...

    def orphans(self) -> list[str]: ...
