"""What a metrics backend returns: plain frozen dataclasses, the same for every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hivemind.errors import HivemindError

DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class CgroupStats:
    """One cgroup's usage. Limits are None when unlimited (or, on rootless cgroup v1, not applied)."""

    version: int  # 1 or 2
    cpu_usage_ns: int
    memory_current: int  # bytes
    memory_peak: int | None  # bytes; None when the kernel doesn't report it (v2 before Linux 5.19)
    memory_limit: int | None  # bytes
    pids_current: int
    pids_limit: int | None


@dataclass(frozen=True)
class TreeUsage:
    """A process tree's usage from /proc (a task the kernel keeps no cgroup for)."""

    procs: int  # live processes, the root included (zombies hold nothing and are left out)
    cpu_seconds: float  # user+system of live members and of the children they reaped
    rss_bytes: int  # summed resident set sizes (a page shared by two processes counts twice)


@dataclass(frozen=True)
class Snapshot:
    """The machine at one moment, plus the file system of `disk_path` and optionally one cgroup."""

    cpu_count: int  # logical CPUs online
    cpu_busy: float  # busy fraction 0..1 since the previous snapshot of this source (since boot at first)
    load1: float
    load5: float
    load15: float
    memory_total: int  # bytes
    memory_available: int  # bytes
    swap_total: int  # bytes
    swap_free: int  # bytes
    disk_total: int  # bytes
    disk_free: int  # bytes available to unprivileged users
    cgroup: CgroupStats | None  # None when not asked for, or when the cgroup no longer exists


class MetricsError(HivemindError):
    """A snapshot failed (e.g. disk_path doesn't exist); the message says which figure and why."""

    recoverable = True


class MetricsUnavailable(HivemindError):
    """The backend asked for can't be used here (e.g. backend "native" and no loadable library)."""


class MetricsSource(Protocol):
    """A source of snapshots. One source keeps its own previous CPU counters, so two sources
    never disturb each other's `cpu_busy`. Sources are thread-safe."""

    backend: str  # "native" or "psutil"
    fallback_reason: str | None  # why "auto" didn't give the native backend; None otherwise

    def snapshot(self, disk_path: str = "/", cgroup_path: str | None = None) -> Snapshot:
        """Reads everything now. `cgroup_path` is relative to each cgroup hierarchy
        (e.g. "/machine.slice/libpod-ID.scope"); raises MetricsError."""
        ...

    def tree(self, pid: int) -> TreeUsage | None:
        """Usage of `pid` and all its descendants, listing /proc once; None when pid is gone.
        Raises MetricsError."""
        ...

    def close(self) -> None:
        """Releases the source; idempotent."""
        ...
